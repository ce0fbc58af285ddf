"""Method presets as data: ``radssl/presets/methods.yaml``, read once, looked up by method name.

A preset is a method's radiology defaults for the ``views``/``optim``/``method``/``train`` config sections (a user's
own keys win; :func:`radssl.config.merge_method_preset` applies it). Keeping them in one YAML file rather than in
the class bodies puts every recipe and the sweep (or paper) that chose it (``chosen_by``) on one page, lets blocks
that several methods share be written once (a YAML anchor: one object here, so they cannot drift apart), and keeps
adding a method at one module + one registry line (+ its entry here, if it has a preset).

Loaded presets are read-only: mappings are ``MappingProxyType`` and YAML lists are tuples (the config's sequence
fields are tuples too, so a preset value compares equal to the validated config's), so a caller cannot change a
preset that another method shares.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radssl.errors import ConfigError

PRESETS_RESOURCE = ("radssl.presets", "methods.yaml")
"""Package data holding every built-in method's preset (listed in pyproject's ``package-data``: presets/*.yaml)."""

Preset = Mapping[str, Mapping[str, Any]]
NO_PRESET: Preset = MappingProxyType({})


class PresetEntry(BaseModel):
    """One method's entry in the file: where it came from, and the config sections it fills."""

    model_config = ConfigDict(extra="forbid")

    chosen_by: str = Field(min_length=1, description="the sweep file/result that chose it, or 'paper default, not swept'")
    views: dict[str, Any] = Field(default_factory=dict)
    optim: dict[str, Any] = Field(default_factory=dict)
    method: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class MethodPreset:
    """A method's preset: ``sections`` (section → read-only key mapping; only the sections it sets) + ``chosen_by``."""

    chosen_by: str
    sections: Preset


def _frozen(value: Any, memo: dict[int, Any]) -> Any:
    """A read-only copy; objects the YAML shares through an alias stay one (shared) object."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, dict):
        frozen: Any = MappingProxyType({key: _frozen(item, memo) for key, item in value.items()})
    elif isinstance(value, list):
        frozen = tuple(_frozen(item, memo) for item in value)
    else:
        return value
    memo[id(value)] = frozen
    return frozen


def parse_presets(text: str, source: str) -> dict[str, MethodPreset]:
    """Method name → preset from the YAML ``text``; ConfigError naming ``source``, the method and the key otherwise."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML ({error})") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must map method names to presets, got {type(raw).__name__}")
    memo: dict[int, Any] = {}
    presets: dict[str, MethodPreset] = {}
    for name, entry in raw.items():
        try:
            PresetEntry.model_validate(entry)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in (name, *e['loc']))}: {e['msg']}" for e in error.errors())
            raise ConfigError(f"{source}: {problems}") from None
        # Each section is frozen on its own (not a temporary dict, whose id a later one could reuse in ``memo``).
        sections = {key: _frozen(value, memo) for key, value in entry.items() if key != "chosen_by" and value}
        presets[str(name)] = MethodPreset(chosen_by=entry["chosen_by"], sections=MappingProxyType(sections))
    return presets


@functools.cache
def method_presets() -> Mapping[str, MethodPreset]:
    """Every shipped preset, read from the package data on first use."""
    path = resources.files(PRESETS_RESOURCE[0]) / PRESETS_RESOURCE[1]
    return MappingProxyType(parse_presets(path.read_text(encoding="utf-8"), f"radssl/presets/{PRESETS_RESOURCE[1]}"))


def method_preset(name: str) -> Preset:
    """The preset sections of method ``name`` (empty for a method without an entry, e.g. a user's plugin)."""
    entry = method_presets().get(name)
    return entry.sections if entry is not None else NO_PRESET
