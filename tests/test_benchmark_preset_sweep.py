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
