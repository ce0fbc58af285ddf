"""Method presets as data (radssl/presets/methods.yaml): exact, complete, sourced, shared blocks shared, read-only."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from radssl.config import PretrainConfig, load_config
from radssl.errors import ConfigError
from radssl.methods.barlow_twins import BarlowTwins
from radssl.methods.presets import method_preset, method_presets, parse_presets
from radssl.methods.registry import METHODS, method_class
from radssl.methods.simclr import SimCLR
from radssl.methods.vicreg import VICReg

ROOT = Path(__file__).parents[1]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def test_presets_equal_the_snapshot_of_the_class_body_presets_they_replaced() -> None:
    snapshot = json.loads((ROOT / "tests" / "data" / "method_presets.json").read_text())["presets"]
    assert sorted(snapshot) == sorted(METHODS)
    for name in METHODS:
        assert _plain(method_class(name).preset) == snapshot[name], name


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_has_a_sourced_preset_that_validates_into_its_config(name: str) -> None:
    entry = method_presets()[name]
    sources = re.findall(r"benchmarks/\S+?\.json", entry.chosen_by)
    assert sources or "not swept" in entry.chosen_by, entry.chosen_by
    for source in sources:
        assert (ROOT / source).is_file(), f"{name}: chosen_by names a missing file {source}"
    cls = method_class(name)
    assert cls.preset is entry.sections
    cls.Params(**dict(cls.preset.get("method", {})))  # the method keys are its own parameters
    config = load_config(None, [f"method.name={name}"])
    for section, values in cls.preset.items():
        for key, value in values.items():
            assert getattr(getattr(config, section), key) == value, f"{name}: {section}.{key}"


def test_every_entry_names_a_registered_method() -> None:
    assert set(method_presets()) == set(METHODS)


def test_shared_blocks_are_one_read_only_object() -> None:
    assert BarlowTwins.preset["views"] is VICReg.preset["views"]
    moco_views = method_preset("moco_v2")["views"]
    assert method_preset("moco_v3")["views"] is moco_views and method_preset("simsiam")["views"] is moco_views
    assert moco_views["crop_scale"] == (0.2, 1.0) and BarlowTwins.preset["views"]["crop_scale"] == (0.3, 1.0)
    assert method_preset("clip") == method_preset("convirt")
    with pytest.raises(TypeError):
        BarlowTwins.preset["views"]["crop_scale"] = (0.5, 1.0)  # type: ignore[index]


def test_dino_keeps_gradient_clipping_and_user_keys_still_win() -> None:
    assert load_config(None, ["method.name=dino"]).train.clip_grad == 3.0
    config = PretrainConfig.model_validate({"method": {"name": "simclr"}, "optim": {"lr": 0.5}})
    assert config.optim.lr == 0.5 and config.optim.optimizer == SimCLR.preset["optim"]["optimizer"]


def test_a_subclass_without_an_entry_inherits_its_parents_preset() -> None:
    class MySimCLR(SimCLR):
        name = "my_simclr"

    assert MySimCLR.preset is SimCLR.preset and method_preset("my_simclr") == {}


@pytest.mark.parametrize(("text", "expected"), [
    ("simclr: {chosen_by: a sweep, viewz: {crop_scale: [0.5, 1.0]}}", "f.yaml: simclr.viewz: Extra inputs"),
    ("simclr: {views: {crop_scale: [0.5, 1.0]}}", "f.yaml: simclr.chosen_by: Field required"),
    ("simclr: {chosen_by: '', views: {}}", "f.yaml: simclr.chosen_by"),
    ("- simclr", "f.yaml: the top level must map method names"),
])
def test_a_bad_presets_file_is_an_error_naming_the_file_method_and_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_presets(text, "f.yaml")
