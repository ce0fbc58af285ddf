"""benchmarks/head_to_head.py (issue 19 points 1 and 10): radssl's validation-chosen arm against lightly's arms only
at equal images seen, differences paired by seed, every arm beside its images seen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import load_benchmark_script


@pytest.fixture(scope="module")
def h2h():  # noqa: ANN201 - a module
    return load_benchmark_script("head_to_head")


def _run(seed: int, linear: list[float], images: int = 25600, random: list[float] | None = None) -> dict:
    readout = lambda values: {"linear": {f: {"test_auc": v} for f, v in zip(("0.01", "0.1", "1"), values)},  # noqa: E731
                              "knn": {f: {"test_auc": v - 0.01} for f, v in zip(("0.01", "0.1", "1"), values)}}
    return {"seed": seed, "images_seen": images, "pretrain_images_per_s": 100.0, "pretrain_wall_s": images / 100.0,
            "overrides": ["optim.momentum=0.9"], "config": {"train": {"threads": 2}}, "ssl": readout(linear), "random_init": readout(random or [0.5] * 3)}


def _write(root: Path, name: str, run: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(run))


def _fixture(tmp_path: Path, lightly_images: int = 25600, lightly_threads: int = 2) -> Path:
    runs = tmp_path / "runs"
    stem = "preset_sweep_simclr_breastmnist_25600img"
    for seed, shift in enumerate((0.00, 0.02, 0.04)):
        _write(runs / stem, f"momentum_09_seed{seed}.json", _run(seed, [0.70 + shift, 0.80 + shift, 0.90 + shift]))
        _write(runs / stem, f"preset_seed{seed}.json", _run(seed, [0.1, 0.1, 0.1]))
        # lightly is 0.05 below radssl at every seed at 1 %: the paired difference is exactly +0.05 with no spread
        _write(runs / "lightly_bar_breastmnist", f"seed{seed}_strong_25600img.json",
               {**_run(seed, [0.65 + shift, 0.81 + shift, 0.88 + shift], images=lightly_images),
                "threads": lightly_threads})
    (tmp_path / f"{stem}.json").write_text(json.dumps(
        {"winner": "momentum_09", "decision": {"change_preset": True, "min_val_gain_to_change": 0.02}}))
    return tmp_path


def test_radssl_minus_lightly_is_paired_by_seed_and_the_chosen_candidate_is_read(h2h, tmp_path) -> None:  # noqa: ANN001
    results = _fixture(tmp_path)
    assert h2h.main(["--budget-images", "25600", "--results-dir", str(results)]) == 0
    record = json.loads((results / "head_to_head_breastmnist_25600img.json").read_text())
    assert list(record["radssl_arms"]) == ["momentum_09"]  # the sweep's decision, not the preset's runs
    diff = record["result"]["radssl_minus"]["radssl_momentum_09 − lightly_strong"]["linear"]
    assert diff["0.01"]["mean"] == pytest.approx(0.05) and diff["0.01"]["low"] == pytest.approx(0.05)
    assert diff["0.1"]["mean"] == pytest.approx(-0.01)
    assert record["result"]["radssl_minus"]["radssl_momentum_09 − random_init"]["linear"]["1"]["mean"] == \
        pytest.approx(0.92 - 0.5)
    arms = record["result"]["arms"]
    assert arms["radssl_momentum_09"]["images_seen"]["mean"] == arms["lightly_strong"]["images_seen"]["mean"] == 25600
    assert arms["radssl_momentum_09"]["linear"]["0.01"]["mean"] == pytest.approx(0.72)
    assert "| lightly_strong | 25600 |" in record["markdown"]


def test_several_candidates_are_each_compared_with_every_other_arm(h2h, tmp_path) -> None:  # noqa: ANN001
    results = _fixture(tmp_path)
    assert h2h.main(["--budget-images", "25600", "--results-dir", str(results),
                     "--candidates", "preset", "momentum_09"]) == 0
    record = json.loads((results / "head_to_head_breastmnist_25600img.json").read_text())
    diffs = record["result"]["radssl_minus"]
    # the preset's runs score 0.1 everywhere: its difference to momentum_09 at 1 % is 0.1 − 0.72 paired by seed
    assert diffs["radssl_preset − radssl_momentum_09"]["linear"]["0.01"]["mean"] == pytest.approx(0.1 - 0.72)
    assert diffs["radssl_momentum_09 − radssl_preset"]["linear"]["0.01"]["mean"] == pytest.approx(0.72 - 0.1)
    assert "radssl_preset − lightly_strong" in diffs and "lightly_strong − radssl_preset" not in diffs


def test_unequal_images_are_refused(h2h, tmp_path) -> None:  # noqa: ANN001
    results = _fixture(tmp_path, lightly_images=22272)
    with pytest.raises(SystemExit, match="unequal images"):
        h2h.main(["--budget-images", "25600", "--results-dir", str(results)])


def test_unequal_threads_are_refused(h2h, tmp_path) -> None:  # noqa: ANN001
    results = _fixture(tmp_path, lightly_threads=1)
    with pytest.raises(SystemExit, match="unequal torch threads"):
        h2h.main(["--budget-images", "25600", "--results-dir", str(results)])


def test_auc_intervals_and_differences_stay_inside_their_range(h2h) -> None:  # noqa: ANN001
    # three seeds near the ceiling with a wide spread: a plain t-interval would pass 1 (0.96 ± 4.3 × 0.05)
    runs = [_run(seed, [v, v, v]) for seed, v in enumerate((0.999, 0.90, 0.98))]
    summary = h2h.arm_summary(runs)["linear"]["0.01"]
    assert 0.0 < summary["low"] < summary["mean"] < summary["high"] < 1.0
    low = [_run(seed, [0.0005, 0.0005, 0.0005]) for seed in range(3)]
    diff = h2h.paired_with_reference(runs, low, "linear", h2h.DIFFERENCE_RANGE)["0.01"]
    assert -1.0 < diff["low"] < diff["high"] < 1.0
