"""benchmarks/throughput.py (issue 19 point 4): the like-for-like lightly arm has a target, and one-arm runs made in
a mirrored order pool into per-arm medians whose ratios the targets read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import load_benchmark_script


@pytest.fixture(scope="module")
def throughput():  # noqa: ANN201
    return load_benchmark_script("throughput")


def _run(directory: Path, index: int, arm: str, rate: float, throughput) -> None:  # noqa: ANN001
    record = {"results": {throughput.ARMS[arm]: {"images_per_s": rate}}}
    (directory / f"run{index}_{arm}.json").write_text(json.dumps(record))


def test_every_ratio_has_a_target_including_the_like_for_like_lightly_arm(throughput) -> None:  # noqa: ANN001
    ratios = throughput.ratios_of({"a": 120.0, "b": 125.0, "c": 70.0, "c2": 125.0})
    met = throughput.targets_met(ratios)
    assert met == {"a_over_b >= 0.95": True, "a2_over_a >= 0.9": False, "a_over_c >= 1.5": True,
                   "a_over_c2 >= 1": False}  # a/c2 = 0.96: our data path is the slower one
    assert throughput.ratios_of({"a": 1.0})["a_over_b"] is None


def test_interleaved_runs_pool_into_medians_in_run_order(tmp_path: Path, throughput) -> None:  # noqa: ANN001
    # runs 1..8 in the mirrored order; run10 sorts after run8 numerically, not as text
    for index, (arm, rate) in enumerate([("b", 160.0), ("a", 150.0), ("c2", 130.0), ("c", 100.0), ("c", 96.0),
                                         ("c2", 120.0), ("a", 170.0), ("b", 150.0)], start=1):
        _run(tmp_path, index, arm, rate, throughput)
    _run(tmp_path, 10, "a", 200.0, throughput)
    summary = throughput.summarise_interleaved(tmp_path)
    assert summary["order"] == ["b", "a", "c2", "c", "c", "c2", "a", "b", "a"]
    assert summary["median_images_per_s"] == {"b": 155.0, "a": 170.0, "c2": 125.0, "c": 98.0}
    assert summary["ratios"]["a_over_c2"] == pytest.approx(170.0 / 125.0)
    assert summary["targets_met"]["a_over_b >= 0.95"] is True


def test_a_run_holding_several_arms_is_refused(tmp_path: Path, throughput) -> None:  # noqa: ANN001
    record = {"results": {throughput.ARMS["a"]: {"images_per_s": 1.0}, throughput.ARMS["b"]: {"images_per_s": 1.0}}}
    (tmp_path / "run1_a.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="one arm each"):
        throughput.summarise_interleaved(tmp_path)
    with pytest.raises(SystemExit, match="no run"):
        throughput.summarise_interleaved(tmp_path / "empty")
