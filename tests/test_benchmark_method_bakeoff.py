"""benchmarks/method_bakeoff.py (issue 8): the summary's checks compare like with like.

A method with one lucky seed must not be named "best" over methods with three seeds, and a check passes on the mean
but is only "confident" when the whole seed interval clears the bar.
"""

from __future__ import annotations

import json

import pytest
from support import bakeoff_run, load_benchmark_script


@pytest.fixture(scope="module")
def bakeoff():  # noqa: ANN201 - a module
    return load_benchmark_script("method_bakeoff")


_run = bakeoff_run


def _lightly(seed: int, values: list[float], images: int = 1000) -> dict:
    """A benchmarks/lightly_bar.py run record (what its run files hold)."""
    fractions = ("0.01", "0.1", "1")
    return {"seed": seed, "images_seen": images, "threads": 2, "budget": {"rule": "images_seen", "images_seen": images},
            "ssl": {"linear": {f: {"test_auc": v} for f, v in zip(fractions, values)}}}


def _bar(values: list[float], images: int = 1000) -> dict:
    """A lightly arm whose three seeds all score ``values`` (its bar is exactly that)."""
    return {"documented": [_lightly(s, values, images) for s in range(3)]}


def test_best_method_is_chosen_among_methods_with_the_most_seeds(bakeoff) -> None:  # noqa: ANN001
    runs = [_run("steady", s, [0.90 + 0.01 * s, 0.91, 0.92], [0.80, 0.85, 0.88]) for s in range(3)]
    runs.append(_run("lucky", 0, [0.99, 0.99, 0.99], [0.80, 0.85, 0.88]))  # one seed, higher mean
    summary = bakeoff.summarise(runs, _bar([0.758, 0.813, 0.894]))
    checks = summary["checks"]
    assert checks["best_method_by_mean_linear_auc"] == "steady"
    assert checks["best_method_chosen_among"] == {"seeds": 3, "methods": ["steady"]}
    bar = checks["best_vs_lightly"]["documented"]["at_every_fraction"]
    # steady: 0.91 mean at 1 % (bar .758) with a tight interval; 0.92 at 100 % beats .894 on the mean and interval.
    assert bar["0.01"]["beats"] and bar["0.01"]["confident"]
    assert bar["1"]["beats"] and bar["1"]["confident"]


def test_beating_on_the_mean_is_not_confident_when_the_interval_holds_the_bar(bakeoff) -> None:  # noqa: ANN001
    runs = [_run("noisy", s, [0.70 + 0.15 * s, 0.81, 0.89], [0.75, 0.80, 0.85]) for s in range(3)]
    checks = bakeoff.summarise(runs, _bar([0.758, 0.813, 0.894]))["checks"]
    one_percent = checks["best_vs_lightly"]["documented"]["at_every_fraction"]["0.01"]
    assert one_percent["ours"] == pytest.approx(0.85) and one_percent["bar"] == pytest.approx(0.758)
    assert one_percent["beats"] and not one_percent["confident"]  # interval of .70/.85/1.0 reaches below .758
    assert not checks["best_vs_lightly"]["documented"]["at_every_fraction"]["0.1"]["beats"]  # .81 < .813
    random = checks["every_method_beats_random_at_1_percent"]["noisy"]
    assert random["seeds"] == 3
    assert random["gain"] == pytest.approx(0.10)
    assert random["beats"] and not random["confident"]  # gains −.05/.10/.25


def test_a_method_below_its_random_twin_fails_the_random_check(bakeoff) -> None:  # noqa: ANN001
    runs = [_run("weak", s, [0.70, 0.80, 0.85], [0.72 + 0.001 * s, 0.80, 0.85]) for s in range(2)]
    random = bakeoff.summarise(runs)["checks"]["every_method_beats_random_at_1_percent"]["weak"]
    assert random["gain"] < 0 and not random["beats"] and not random["confident"]


def test_comparison_with_the_lightly_rerun_is_paired_by_seed(bakeoff) -> None:  # noqa: ANN001
    # The subsets of seed s are hard or easy for both sides alike: the paired difference is a steady +.02, although
    # the unpaired intervals overlap widely. Seeds only one side has are left out.
    runs = [_run("ours", s, [0.70 + 0.10 * s + 0.02, 0.90, 0.90], [0.6, 0.7, 0.8]) for s in range(3)]
    reference = [{"seed": s, "images_seen": 500, "ssl": {"linear": {"0.01": {"test_auc": 0.70 + 0.10 * s},
                                                                   "0.1": {"test_auc": 0.91},
                                                                   "1": {"test_auc": 0.89}}}} for s in (0, 1, 2, 7)]
    reference[1], reference[2] = reference[2], reference[1]  # order must not matter
    summary = bakeoff.summarise(runs, {"documented": reference})
    paired = summary["checks"]["best_vs_lightly"]["documented"]["paired_by_seed"]
    assert paired["0.01"]["mean"] == pytest.approx(0.02) and paired["0.01"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert paired["0.01"]["seeds"] == [0, 1, 2] and paired["0.01"]["beats"]
    assert not paired["0.1"]["beats"] and paired["1"]["confident"]  # .90 vs .89 on every seed
    assert summary["lightly"]["documented"]["seeds"] == [0, 1, 2, 7]


def _with_finetune(run: dict, ssl: list[float], random: list[float]) -> dict:
    fractions = ("0.01", "0.1", "1")
    run["ssl"]["finetune"] = {f: {"test_auc": v} for f, v in zip(fractions, ssl)}
    run["random_init"]["finetune"] = {f: {"test_auc": v} for f, v in zip(fractions, random)}
    return run


def test_finetune_readout_is_summarised_and_checked_against_random_when_every_seed_has_it(bakeoff) -> None:  # noqa: ANN001
    runs = [_with_finetune(_run("genesis", s, [0.60, 0.70, 0.80], [0.65, 0.70, 0.80]),
                           [0.70 + 0.01 * s, 0.80, 0.85], [0.60, 0.75, 0.84]) for s in range(3)]
    summary = bakeoff.summarise(runs)
    entry = summary["methods"]["genesis"]
    assert entry["ssl"]["finetune"]["0.01"]["mean"] == pytest.approx(0.71)
    assert entry["gain_over_random"]["finetune"]["0.01"]["mean"] == pytest.approx(0.11)
    checks = summary["checks"]
    assert not checks["every_method_beats_random_at_1_percent"]["genesis"]["beats"]  # linear: .60 vs .65
    assert checks["every_method_beats_random_at_1_percent_finetuned"]["genesis"]["confident"]
    # One seed without the fine-tuning read-out: the protocol is left out rather than averaged over fewer seeds.
    del runs[2]["ssl"]["finetune"]
    partial = bakeoff.summarise(runs)
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


def test_no_bar_is_typed_in_without_lightly_runs_there_is_no_bar(bakeoff) -> None:  # noqa: ANN001
    # Issue 19 point 3: the old LIGHTLY_BAR constant (one unseeded run nothing here produced) is gone.
    assert not hasattr(bakeoff, "LIGHTLY_BAR")
    runs = [_run("ours", s, [0.80, 0.85, 0.90], [0.6, 0.7, 0.8]) for s in range(3)]
    summary = bakeoff.summarise(runs, None)
    assert summary["lightly"] == {} and "best_vs_lightly" not in summary["checks"]


def test_each_lightly_arm_is_a_bar_with_the_images_both_sides_saw(bakeoff) -> None:  # noqa: ANN001
    runs = [_run("ours", s, [0.80, 0.85, 0.90], [0.6, 0.7, 0.8]) for s in range(3)]  # 1000 images each
    references = {"documented": [_lightly(s, [0.70, 0.80, 0.85]) for s in range(3)],
                  "strong": [_lightly(s, [0.82, 0.84, 0.91], images=768) for s in range(3)]}
    summary = bakeoff.summarise(runs, references)
    strong = summary["checks"]["best_vs_lightly"]["strong"]
    assert strong["images_seen"] == {"ours": 1000, "lightly": 768, "equal": False}
    assert not strong["at_every_fraction"]["0.01"]["beats"] and strong["at_every_fraction"]["0.1"]["beats"]
    assert strong["at_every_fraction"]["0.01"]["bar_images_seen"] == 768
    assert summary["checks"]["best_vs_lightly"]["documented"]["images_seen"]["equal"] is True
    assert summary["lightly"]["strong"]["linear"]["1"]["mean"] == pytest.approx(0.91)
    assert summary["lightly"]["strong"]["linear"]["1"]["images_seen"] == 768
    assert summary["methods"]["ours"]["minus_lightly_paired"]["strong"]["0.01"]["mean"] == pytest.approx(-0.02)


def _write(path, record: dict) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_bars_are_read_from_lightly_bar_runs_at_the_same_budget(bakeoff, tmp_path) -> None:  # noqa: ANN001
    folder = tmp_path / "lightly_bar_breastmnist"
    for seed in (0, 1):
        _write(folder / f"seed{seed}_strong_51200img.json", _lightly(seed, [0.75, 0.82, 0.89], 51200))
        _write(folder / f"seed{seed}_documented_5min2t.json", _lightly(seed, [0.7, 0.8, 0.85], 30000))
        _write(folder / f"seed{seed}_5min.json", _lightly(seed, [0.6, 0.7, 0.8], 22272))  # before the budget rule
    _write(folder / "seed0_strong_22272img.json", _lightly(0, [0.1, 0.1, 0.1], 22272))  # another budget
    by_images = bakeoff.lightly_reference_runs(tmp_path, "breastmnist", None, 51200, 2)
    assert list(by_images) == ["strong"] and [r["images_seen"] for r in by_images["strong"]] == [51200, 51200]
    by_time = bakeoff.lightly_reference_runs(tmp_path, "breastmnist", 5.0, None, 2)
    assert list(by_time) == ["documented"] and by_time["documented"][0]["images_seen"] == 30000  # the rule's runs
    assert bakeoff.lightly_reference_runs(tmp_path, "breastmnist", 5.0, None, 1) == {
        "documented": [{**_lightly(s, [0.6, 0.7, 0.8], 22272), "legacy_budget": True} for s in (0, 1)]}
    assert bakeoff.lightly_summary(bakeoff.lightly_reference_runs(tmp_path, "breastmnist", 5.0, None, 1)[
        "documented"])["budget"].startswith("legacy")


def test_the_committed_lightly_runs_are_the_bar_of_the_committed_bake_off(bakeoff) -> None:  # noqa: ANN001
    references = bakeoff.lightly_reference_runs(bakeoff.RESULTS / "runs", "breastmnist", 5.0, None, 2)
    runs = references["documented"]
    assert sorted(run["seed"] for run in runs) == [0, 1, 2] and all(run["legacy_budget"] for run in runs)
    bar = bakeoff.lightly_summary(runs)
    mean = sum(run["ssl"]["linear"]["0.01"]["test_auc"] for run in runs) / 3
    assert bar["linear"]["0.01"]["mean"] == pytest.approx(mean) and bar["images_seen"]["mean"] == 22272


def test_lightly_bar_intervals_stay_inside_the_auc_range(bakeoff) -> None:  # noqa: ANN001
    # Three seeds with a wide spread near the top: an unbounded t-interval (t = 4.30, 2 df) would end above 1.
    runs = [_lightly(seed, [0.6, 0.8, auc], 12800) for seed, auc in enumerate((0.99, 0.90, 0.97))]
    bar = bakeoff.lightly_summary(runs)["linear"]["1"]
    assert bar["mean"] == pytest.approx((0.99 + 0.90 + 0.97) / 3)
    assert 0.0 < bar["low"] < bar["mean"] < bar["high"] < 1.0, bar


def test_radssl_bakeoff_best_is_set_beside_each_lightly_arm_at_its_images(bakeoff) -> None:  # noqa: ANN001
    def row(method: str, fraction: float, mean: float, protocol: str = "linear") -> dict:
        return {"method": method, "protocol": protocol, "test_set": "test", "label_fraction": fraction,
                "images_seen": 51200, "ssl": {"mean": mean, "low": mean - 0.05, "high": mean + 0.05}}

    headline = [row("simclr", f, m) for f, m in ((0.01, 0.76), (0.1, 0.80), (1.0, 0.87))] + \
        [row("byol", f, m) for f, m in ((0.01, 0.70), (0.1, 0.75), (1.0, 0.80))] + [row("byol", 0.01, 0.99, "knn")]
    references = {"strong": [_lightly(s, [0.753, 0.821, 0.889], 51200) for s in range(3)]}
    out = bakeoff.best_vs_lightly_from_bakeoff({"headline": headline, "budget": {"images_seen": 51200}}, references)
    assert out["best_method"] == "simclr"
    cells = out["arms"]["strong"]["fractions"]
    assert list(cells) == ["0.01", "0.1", "1"]
    assert cells["0.1"]["ours_minus_lightly"] == pytest.approx(0.80 - 0.821)
    assert cells["1"]["equal_images_seen"] and cells["1"]["lightly_images_seen"] == 51200


def _stat(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "low": low, "high": high, "sd": 0.0, "n": 3}


def test_printed_tables_carry_every_readouts_gain_and_the_random_twin(bakeoff) -> None:  # noqa: ANN001
    """The README's fine-tuning table is printed by ``--combine``, not typed from a side script: fine-tuning gains
    (bold only where the interval excludes 0) and the random-init row per backbone."""
    random_init = {"linear": {"0.01": _stat(0.53, 0.42, 0.64)}, "finetune": {"0.01": _stat(0.57, 0.42, 0.71)}}
    rows = {
        "simclr": {"backbone": "resnet18", "images_seen": _stat(12800, 12800, 12800),
                   "images_per_s": _stat(135, 120, 150), "random_init": random_init,
                   "ssl": {"linear": {"0.01": _stat(0.74, 0.56, 0.86)}, "finetune": {"0.01": _stat(0.65, 0.35, 0.87)}},
                   "gain_over_random": {"linear": {"0.01": _stat(0.21, 0.03, 0.43)},
                                        "finetune": {"0.01": _stat(0.08, -0.18, 0.33)}}},
        "models_genesis": {"backbone": "resnet18", "images_seen": _stat(12800, 12800, 12800),
                           "images_per_s": _stat(81, 70, 90), "random_init": random_init,
                           "ssl": {"linear": {"0.01": _stat(0.57, 0.31, 0.80)},
                                   "finetune": {"0.01": _stat(0.47, 0.40, 0.55)}},
                           "gain_over_random": {"linear": {"0.01": _stat(0.04, -0.19, 0.27)},
                                                "finetune": {"0.01": _stat(-0.10, -0.17, -0.02)}}},
    }
    gains = bakeoff.gain_table(rows).splitlines()
    assert "gain, fine-tune 1%" in gains[0] and "gain, linear probe 1%" in gains[0]
    simclr = next(line for line in gains if line.startswith("| simclr"))
    genesis = next(line for line in gains if line.startswith("| models_genesis"))
    assert "**+0.210 [+0.030, +0.430]**" in simclr and "| +0.080 [−0.180, +0.330] |" in simclr
    assert "**−0.100 [−0.170, −0.020]**" in genesis and "| +0.040 [−0.190, +0.270] |" in genesis
    table = bakeoff.markdown_table(rows).splitlines()
    twins = [line for line in table if line.startswith("| random init")]
    assert twins == ["| random init (resnet18) | 0 | – | 0.530 [0.420, 0.640] | 0.570 [0.420, 0.710] | – |"]
