"""benchmarks/preset_sweep.py: a sweep changes the shipped preset only when its winner clears the pre-set margin."""

from __future__ import annotations

import pytest
from support import load_benchmark_script


@pytest.fixture(scope="module")
def sweep():  # noqa: ANN201 - a module
    return load_benchmark_script("preset_sweep")


def _scored(**scores: float) -> dict:
    return {name: {"val_score": {"mean": value}} for name, value in scores.items()}


def test_a_winner_inside_the_margin_keeps_the_preset(sweep) -> None:  # noqa: ANN001
    decision = sweep.decide(_scored(preset=0.8658, crop_025=0.8733), "crop_025", 0.02)
    assert decision["winner_gain_over_preset"] == pytest.approx(0.0075)
    assert decision["change_preset"] is False


def test_a_winner_beyond_the_margin_changes_the_preset(sweep) -> None:  # noqa: ANN001
    assert sweep.decide(_scored(preset=0.705, two_locals=0.732), "two_locals", 0.02)["change_preset"] is True
    assert sweep.decide(_scored(preset=0.705, two_locals=0.732), "preset", 0.02)["change_preset"] is False


def _sweep_files() -> list:
    from pathlib import Path

    return sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "sweeps").glob("*.json"))


@pytest.mark.parametrize("path", _sweep_files(), ids=lambda p: p.name)
def test_every_sweep_candidate_is_a_valid_config_whose_overrides_take_effect(path, tmp_path) -> None:  # noqa: ANN001
    import json

    lib = load_benchmark_script("bakeoff_lib")
    spec = json.loads(path.read_text())
    model = lib.method_model(spec["method"], "resnet18", "standard")
    for name, overrides in spec["candidates"].items():
        config = lib.pretrain_config(spec["method"], model, 1, 256, 0, 1, tmp_path / name, list(overrides))
        for override in overrides:  # a shipped preset must not silently win over a candidate's value
            key, value = override.split("=", 1)
            section, field = key.split(".", 1)
            if section == "optim" and field == "momentum":
                assert config.optim.momentum == pytest.approx(float(value)), (path.name, name)


def test_the_simclr_sweep_tries_momentum_at_the_presets_schedule() -> None:
    # Issue 19 point 10: lightly's strongest arm uses SGD momentum 0.9 at a constant LR; the sweep must try it.
    import json

    spec = json.loads(next(p for p in _sweep_files() if p.name == "simclr_bakeoff_budget.json").read_text())
    alone = [name for name, overrides in spec["candidates"].items()
             if "optim.momentum=0.9" in overrides and not any(o.startswith("optim.min_lr_ratio") for o in overrides)]
    assert {"momentum_09", "momentum_09_lr003", "momentum_09_tau05"} <= set(alone)
    assert spec["min_val_gain_to_change"] == 0.02 and spec["candidates"]["preset"] == []
