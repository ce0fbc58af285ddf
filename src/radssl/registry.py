"""Registry entries shared by every plugin table (methods, backbones, view policies, pairings, protocols).

A table maps a name to a class or to ``"module:Class"``; the string form is imported on first use so that importing
a registry stays cheap and a broken optional plugin cannot break the others.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_entry(entry: str | type) -> Any:
    """The class an entry names (imported now if it is a ``"module:Class"`` path)."""
    if isinstance(entry, str):
        module_name, class_name = entry.split(":")
        return getattr(importlib.import_module(module_name), class_name)
    return entry
