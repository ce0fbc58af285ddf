"""benchmarks/calibration_check.py (issue 19 point 2): immediate calibration checks and a finished wall-clock
bake-off's lagged deviations summarise the same way, so the two explanations of an off-budget arm can be compared."""

from __future__ import annotations

import pytest
from support import load_benchmark_script


@pytest.fixture(scope="module")
def check():  # noqa: ANN201
    return load_benchmark_script("calibration_check")


def test_summary_counts_runs_beyond_the_tolerance_per_method_and_overall(check) -> None:  # noqa: ANN001
    records = [{"method": "simclr", "deviation": 0.05}, {"method": "simclr", "deviation": -0.15},
               {"method": "vicreg", "deviation": 0.11}]
    summary = check.summarise_checks(records, 0.10)
    assert summary["overall"]["flagged"] == 2 and summary["overall"]["runs"] == 3
    assert summary["per_method"]["simclr"]["mean_deviation"] == pytest.approx(-0.05)
    assert summary["per_method"]["simclr"]["mean_abs_deviation"] == pytest.approx(0.10)
    assert summary["per_method"]["simclr"]["max_abs_deviation"] == pytest.approx(0.15)
    assert summary["per_method"]["vicreg"]["flagged"] == 1
    with pytest.raises(ValueError, match="no calibration checks"):
        check.summarise_checks([], 0.10)


def test_lagged_deviations_read_every_replicate_of_a_pooled_bakeoff(check) -> None:  # noqa: ANN001
    pooled = {"bakeoff": {"arms": {
        "simclr": {"replicates": [{"pretraining_seed": 0, "wall_clock_deviation": 0.17, "images_per_s": 160.0},
                                  {"pretraining_seed": 1, "wall_clock_deviation": 0.07, "images_per_s": 176.0}]},
        "moco_v3": {"replicates": [{"pretraining_seed": 0, "wall_clock_deviation": -0.18}]}}}}
    records = check.lagged_deviations(pooled)
    assert [(r["method"], r["pretraining_seed"], r["deviation"]) for r in records] == [
        ("moco_v3", 0, -0.18), ("simclr", 0, 0.17), ("simclr", 1, 0.07)]
    assert [r["method"] for r in check.lagged_deviations(pooled, ["simclr"])] == ["simclr", "simclr"]
    with pytest.raises(ValueError, match="no wall-clock deviations"):
        check.lagged_deviations({"arms": {"simclr": {"images_seen": 12800}}})


def test_steps_from_the_previous_replicate_would_miss_by_the_ratio_of_their_rates(check) -> None:  # noqa: ANN001
    pooled = {"bakeoff": {"arms": {"byol": {"replicates": [
        {"pretraining_seed": 0, "images_per_s": 100.0}, {"pretraining_seed": 1, "images_per_s": 125.0},
        {"pretraining_seed": 2, "images_per_s": 125.0}]}}}}
    records = check.previous_replicate_deviations(pooled)
    # seed 1 planned at 100 img/s ran at 125: 20 % short of the budget; seed 2 planned at seed 1's rate: on time
    assert [(r["pretraining_seed"], r["predicted_from_seed"]) for r in records] == [(1, 0), (2, 1)]
    assert [r["deviation"] for r in records] == pytest.approx([-0.2, 0.0])
    with pytest.raises(ValueError, match="fewer than two replicates"):
        check.previous_replicate_deviations({"arms": {"byol": {"replicates": [{"images_per_s": 100.0}]}}})
