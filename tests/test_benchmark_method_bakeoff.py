"""benchmarks/method_bakeoff.py (issue 8): the summary's checks compare like with like.

A method with one lucky seed must not be named "best" over methods with three seeds, and a check passes on the mean
but is only "confident" when the whole seed interval clears the bar.
"""

from __future__ import annotations

import pytest
from support import load_benchmark_script


@pytest.fixture(scope="module")
def bakeoff():  # noqa: ANN201 - a module
    return load_benchmark_script("method_bakeoff")


def _run(method: str, seed: int, ssl: list[float], random: list[float]) -> dict:
    fractions = ("0.01", "0.1", "1")

    def readout(values: list[float]) -> dict:
        return {protocol: {f: {"test_auc": v} for f, v in zip(fractions, values)} for protocol in ("linear", "knn")}

    return {"method": method, "seed": seed, "backbone": "resnet18", "images_seen": 1000, "pretrain_wall_s": 60.0,
            "pretrain_images_per_s": 16.0, "peak_rss_mb": 900.0, "final_loss": 1.0,
            "ssl": readout(ssl), "random_init": readout(random)}


def test_best_method_is_chosen_among_methods_with_the_most_seeds(bakeoff) -> None:  # noqa: ANN001
    runs = [_run("steady", s, [0.90 + 0.01 * s, 0.91, 0.92], [0.80, 0.85, 0.88]) for s in range(3)]
    runs.append(_run("lucky", 0, [0.99, 0.99, 0.99], [0.80, 0.85, 0.88]))  # one seed, higher mean
    summary = bakeoff.summarise(runs, "breastmnist")
    checks = summary["checks"]
    assert checks["best_method_by_mean_linear_auc"] == "steady"
    assert checks["best_method_chosen_among"] == {"seeds": 3, "methods": ["steady"]}
    bar = checks["best_beats_lightly_bar_at_every_fraction"]
    # steady: 0.91 mean at 1 % (bar .758) with a tight interval; 0.92 at 100 % beats .894 on the mean and interval.
    assert bar["0.01"]["beats"] and bar["0.01"]["confident"]
    assert bar["1"]["beats"] and bar["1"]["confident"]


def test_beating_on_the_mean_is_not_confident_when_the_interval_holds_the_bar(bakeoff) -> None:  # noqa: ANN001
    runs = [_run("noisy", s, [0.70 + 0.15 * s, 0.81, 0.89], [0.75, 0.80, 0.85]) for s in range(3)]
    checks = bakeoff.summarise(runs, "breastmnist")["checks"]
    one_percent = checks["best_beats_lightly_bar_at_every_fraction"]["0.01"]
    assert one_percent["ours"] == pytest.approx(0.85)
    assert one_percent["beats"] and not one_percent["confident"]  # interval of .70/.85/1.0 reaches below .758
    assert not checks["best_beats_lightly_bar_at_every_fraction"]["0.1"]["beats"]  # .81 < .813
    random = checks["every_method_beats_random_at_1_percent"]["noisy"]
    assert random["seeds"] == 3
    assert random["gain"] == pytest.approx(0.10)
    assert random["beats"] and not random["confident"]  # gains −.05/.10/.25


def test_a_method_below_its_random_twin_fails_the_random_check(bakeoff) -> None:  # noqa: ANN001
    runs = [_run("weak", s, [0.70, 0.80, 0.85], [0.72 + 0.001 * s, 0.80, 0.85]) for s in range(2)]
    random = bakeoff.summarise(runs, "pneumoniamnist")["checks"]["every_method_beats_random_at_1_percent"]["weak"]
    assert random["gain"] < 0 and not random["beats"] and not random["confident"]


def test_comparison_with_the_lightly_rerun_is_paired_by_seed(bakeoff) -> None:  # noqa: ANN001
    # The subsets of seed s are hard or easy for both sides alike: the paired difference is a steady +.02, although
    # the unpaired intervals overlap widely. Seeds only one side has are left out.
    runs = [_run("ours", s, [0.70 + 0.10 * s + 0.02, 0.90, 0.90], [0.6, 0.7, 0.8]) for s in range(3)]
    reference = [{"seed": s, "images_seen": 500, "ssl": {"linear": {"0.01": {"test_auc": 0.70 + 0.10 * s},
                                                                   "0.1": {"test_auc": 0.91},
                                                                   "1": {"test_auc": 0.89}}}} for s in (0, 1, 2, 7)]
    reference[1], reference[2] = reference[2], reference[1]  # order must not matter
    summary = bakeoff.summarise(runs, "breastmnist", reference)
    paired = summary["checks"]["best_minus_lightly_example_rerun_paired_by_seed"]
    assert paired["0.01"]["mean"] == pytest.approx(0.02) and paired["0.01"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert paired["0.01"]["seeds"] == [0, 1, 2] and paired["0.01"]["beats"]
    assert not paired["0.1"]["beats"] and paired["1"]["confident"]  # .90 vs .89 on every seed
    assert summary["lightly_example_rerun"]["seeds"] == [0, 1, 2, 7]


def _with_finetune(run: dict, ssl: list[float], random: list[float]) -> dict:
    fractions = ("0.01", "0.1", "1")
    run["ssl"]["finetune"] = {f: {"test_auc": v} for f, v in zip(fractions, ssl)}
    run["random_init"]["finetune"] = {f: {"test_auc": v} for f, v in zip(fractions, random)}
    return run


def test_finetune_readout_is_summarised_and_checked_against_random_when_every_seed_has_it(bakeoff) -> None:  # noqa: ANN001
    runs = [_with_finetune(_run("genesis", s, [0.60, 0.70, 0.80], [0.65, 0.70, 0.80]),
                           [0.70 + 0.01 * s, 0.80, 0.85], [0.60, 0.75, 0.84]) for s in range(3)]
    summary = bakeoff.summarise(runs, "breastmnist")
    entry = summary["methods"]["genesis"]
    assert entry["ssl"]["finetune"]["0.01"]["mean"] == pytest.approx(0.71)
    assert entry["gain_over_random"]["finetune"]["0.01"]["mean"] == pytest.approx(0.11)
    checks = summary["checks"]
    assert not checks["every_method_beats_random_at_1_percent"]["genesis"]["beats"]  # linear: .60 vs .65
    assert checks["every_method_beats_random_at_1_percent_finetuned"]["genesis"]["confident"]
    # One seed without the fine-tuning read-out: the protocol is left out rather than averaged over fewer seeds.
    del runs[2]["ssl"]["finetune"]
    partial = bakeoff.summarise(runs, "breastmnist")
    assert "finetune" not in partial["methods"]["genesis"]["ssl"]
    assert "every_method_beats_random_at_1_percent_finetuned" not in partial["checks"]


def test_steps_come_from_the_calibration_file_else_the_lowest_finished_seed(bakeoff, tmp_path) -> None:  # noqa: ANN001
    assert bakeoff.calibration_file(tmp_path, "simclr", "5.0min") is None
    for seed in (10, 2):
        (tmp_path / f"simclr_seed{seed}_5.0min.json").write_text("{}")
    (tmp_path / "simclr_seed1_10.0min.json").write_text("{}")  # another budget: not a source
    assert bakeoff.calibration_file(tmp_path, "simclr", "5.0min").name == "simclr_seed2_5.0min.json"
    (tmp_path / "simclr_calibration_5.0min.json").write_text("{}")
    assert bakeoff.calibration_file(tmp_path, "simclr", "5.0min").name == "simclr_calibration_5.0min.json"
    assert bakeoff.calibration_file(tmp_path, "byol", "5.0min") is None
    assert bakeoff.bakeoff_stem("breastmnist", "") == "method_bakeoff_breastmnist"
    assert bakeoff.bakeoff_stem("breastmnist", "finetune") == "method_bakeoff_breastmnist_finetune"
