"""One registry shape for every plugin table (methods, backbones, view policies, pairings, protocols).

A table maps a name to a class or to ``"module:Class"``; the string form is imported on first use so that importing
a registry stays cheap and a broken optional plugin cannot break the others. Every table registers the same way
(``register`` as a decorator, or a literal entry), lists the same way (``names(where=...)``) and fails the same way
(:class:`UnknownNameError`, with the closest spelling).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from radssl.errors import RadsslError

T = TypeVar("T")


def load_entry(entry: str | type) -> Any:
    """The class an entry names (imported now if it is a ``"module:Class"`` path)."""
    if isinstance(entry, str):
        module_name, class_name = entry.split(":")
        return getattr(importlib.import_module(module_name), class_name)
    return entry


class UnknownNameError(RadsslError, KeyError, ValueError):
    """A name no table entry has. A KeyError (a lookup failed) and a ValueError (a bad configuration value), so
    callers written against either keep working; the message names the table, the closest spelling and the choices."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Registry(dict, Generic[T]):
    """``name → class | "module:Class"``; a dict, so ``name in table`` and ``sorted(table)`` read as before."""

    def __init__(self, kind: str, entries: Mapping[str, str | type[T]] | None = None) -> None:
        super().__init__(entries or {})
        self.kind = kind

    def register(self, cls: type[T] | None = None, *, name: str | None = None) -> Any:
        """Add a class under ``name`` (default: its ``name`` attribute); usable as ``@table.register``. A later
        registration of the same name wins (a user's plugin may replace a built-in one)."""

        def add(target: type[T]) -> type[T]:
            key = name or getattr(target, "name", "")
            if not key:
                raise TypeError(f"{self.kind} {target!r} has no name to register under")
            self[key] = target
            return target

        return add if cls is None else add(cls)

    def unknown(self, name: str) -> UnknownNameError:
        """The error for a name not in the table (also for callers that validate before looking up)."""
        close = difflib.get_close_matches(name, list(self), n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        return UnknownNameError(f"unknown {self.kind} '{name}'{hint}; choose one of {sorted(self)}")

    def load(self, name: str) -> type[T]:
        """The class registered under ``name`` (imported on first use)."""
        if name not in self:
            raise self.unknown(name)
        return load_entry(self[name])

    def names(self, where: Callable[[type[T]], bool] | None = None) -> list[str]:
        """Registered names in registration order; ``where`` filters on the class (e.g. 3D-capable backbones)."""
        return [n for n in self if where is None or where(self.load(n))]
