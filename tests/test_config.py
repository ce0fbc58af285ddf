"""Config validation: unknown keys name the key (with a suggestion), overrides are validated like the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from radssl.config import PretrainConfig, dump_config, load_config
from radssl.errors import ConfigError


def test_defaults_validate_and_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(None)
    assert isinstance(config, PretrainConfig)
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "pretrain.yaml"
    path.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "pretrain.yaml" in message and "unknown key 'train.stepz'" in message and "did you mean 'steps'" in message


def test_method_hyperparameters_are_validated_by_the_method(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'method.temperatur' — did you mean 'temperature'"):
        load_config(None, ["method.temperatur=0.3"])
    with pytest.raises(ConfigError, match="unknown key 'method.temperature'"):
        load_config(None, ["method.name=byol", "method.temperature=0.3"])
    with pytest.raises(ConfigError, match="unknown method 'mocov9'"):
        load_config(None, ["method.name=mocov9"])
    assert load_config(None, ["method.name=byol", "method.momentum_start=0.95"]).method.params() == {
        "momentum_start": 0.95
    }


def test_overrides_are_typed_and_validated() -> None:
    config = load_config(None, ["train.steps=7", "views.crop_scale=[0.5, 1.0]", "data.source=synthetic"])
    assert config.train.steps == 7 and config.train.epochs is None
    assert config.views.crop_scale == (0.5, 1.0)
    assert config.data.source == "synthetic"
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(None, ["train.batch_size=-3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="unknown key 'data.n_patient' — did you mean 'n_patients'"):
        load_config(None, ["data.source=synthetic", "data.n_patient=3"])
    with pytest.raises(ConfigError, match="either train.steps or train.epochs"):
        load_config(None, ["train.steps=3", "train.epochs=2"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)
