"""One registry shape for every plugin table (methods, backbones, view policies, pairings, protocols).

A table maps a name to a class or to ``"module:Class"``; the string form is imported on first use so that importing
a registry stays cheap and a broken optional plugin cannot break the others. Every table registers the same way
(``register`` as a decorator, or a literal entry), lists the same way (``names(where=...)``) and fails the same way
(:class:`UnknownNameError`, with the closest spelling). A table given its ``base`` class refuses anything else, so a
wrong plugin fails where it is registered or first loaded, not deep inside a run.

The modules that own a table export its lookups as the table's own methods (``method_class = METHODS.load``):
there is no second lookup function to drift from this one.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from radssl.errors import RadsslError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """`` — did you mean 'x'?`` for the closest of ``choices`` (difflib's ratio ≥ 0.6), else ``""``: the hint every
    unknown name or key carries."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" — did you mean '{close[0]}'?" if close else ""


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

    def __init__(self, kind: str, entries: Mapping[str, str | type[T]] | None = None,
                 base: type[T] | None = None) -> None:
        super().__init__(entries or {})
        self.kind = kind
        self.base = base

    def _checked(self, target: Any) -> type[T]:
        if self.base is not None and not (isinstance(target, type) and issubclass(target, self.base)):
            raise TypeError(f"a {self.kind} must be a {self.base.__name__} subclass, got {target!r}")
        return target

    def register(self, cls: type[T] | None = None, *, name: str | None = None) -> Any:
        """Add a class under ``name`` (default: its ``name`` attribute); usable as ``@table.register``. A later
        registration of the same name wins (a user's plugin may replace a built-in one)."""

        def add(target: type[T]) -> type[T]:
            self._checked(target)
            key = name or getattr(target, "name", "")
            if not key:
                raise TypeError(f"{self.kind} {target!r} has no name to register under")
            self[key] = target
            return target

        return add if cls is None else add(cls)

    def unknown(self, name: str) -> UnknownNameError:
        """The error for a name not in the table (also for callers that validate before looking up)."""
        return UnknownNameError(f"unknown {self.kind} '{name}'{did_you_mean(name, self)}; choose one of {sorted(self)}")

    def load(self, name: str) -> type[T]:
        """The class registered under ``name`` (imported on first use)."""
        if name not in self:
            raise self.unknown(name)
        return self._checked(load_entry(self[name]))

    def names(self, where: Callable[[type[T]], bool] | None = None) -> list[str]:
        """Registered names in registration order; ``where`` filters on the class (e.g. 3D-capable backbones)."""
        return [n for n in self if where is None or where(self.load(n))]
