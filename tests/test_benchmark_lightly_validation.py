"""lightly's bars beside the bake-off under the bake-off's own validation rule (issue 19: the same rules for every arm).

``bakeoff_lib.readouts(validation="proportional")`` must choose the probe's C on exactly the rows a ``radssl bakeoff``
study does (same draw, same ``[seed, 1]`` stream, same floor, same strata); lightly_bar's run files under that rule
never mix with full-validation ones; and the best method − lightly is paired by seed only when that is sound.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import load_benchmark_script, make_tiny_store
from torch import nn

from radssl.study.config import StudyConfig
from radssl.study.plan import prepare_study

QUIET = {"log": lambda _: None}
COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks/results/runs/method_bakeoff_breastmnist_12800img"


@pytest.fixture(scope="module")
def lib():  # noqa: ANN201 - a module
    return load_benchmark_script("bakeoff_lib")


@pytest.fixture(scope="module")
def bakeoff():  # noqa: ANN201 - a module
    return load_benchmark_script("method_bakeoff")


@pytest.fixture(scope="module")
def store():  # noqa: ANN201 - an ImageStore: 600 train, 100 val (50 per class), 100 test rows
    tiny = make_tiny_store(n=800, size=8)
    rows = np.arange(len(tiny))
    tiny.patient_id = np.array([f"p{(i // 4) * 2 + i % 2}" for i in rows])  # two rows of one class per patient
    return tiny


def _study(tmp_path: Path, lib) -> StudyConfig:  # noqa: ANN001
    return StudyConfig.model_validate({
        "name": "val", "output_dir": str(tmp_path / "study"), "threads": 1,
        "data": {"source": "synthetic", "n_patients": 10, "images_per_patient": 2, "image_size": 16},
        "model": {"backbone": "small_cnn"}, "initialisations": ["random"],
        "label_fractions": list(lib.FRACTIONS), "seeds": [0, 1, 2], "protocols": {"linear": {"Cs": [1.0]}},
        "validation": "proportional", "bootstrap_samples": 100})


def test_proportional_validation_rows_are_the_study_plans(lib, store, tmp_path) -> None:  # noqa: ANN001
    plan = prepare_study(_study(tmp_path, lib), **QUIET, load=lambda section: store)
    val = store.indices("val")
    for seed in (0, 1, 2):
        ours = lib.validation_subsets(store, seed, "proportional")
        assert list(ours) == list(lib.FRACTIONS)
        for fraction in lib.FRACTIONS:
            assert np.array_equal(ours[fraction], plan.val_subsets[seed][fraction]), (seed, fraction)
        assert len(ours[0.01]) < len(val) and np.array_equal(ours[1.0], val)
        assert all(np.array_equal(rows, val) for rows in lib.validation_subsets(store, seed, "full").values())
    with pytest.raises(ValueError, match="validation 'half'"):
        lib.validation_subsets(store, 0, "half")


def test_proportional_validation_rows_are_the_committed_breastmnist_studys(lib, data_dir) -> None:  # noqa: ANN001
    """The rows the committed 12,800-image bake-off's study chose C on (its subsets/val_seed<s>.json), rebuilt."""
    breast = lib.load_store("breastmnist", 28, str(data_dir))
    for seed in (0, 1, 2):
        folder = COMMITTED / f"pretrain_seed{seed}" / "resnet18" / "subsets"
        saved = json.loads((folder / f"val_seed{seed}.json").read_text())
        assert saved["meta"]["validation"] == "proportional"
        ours = lib.validation_subsets(breast, seed, "proportional")
        assert {f"{f:g}": len(r) for f, r in ours.items()} == {"0.01": 10, "0.1": 11, "1": 78}
        for fraction, rows in saved["subsets"].items():
            assert ours[float(fraction)].tolist() == rows, (seed, fraction)
        training = json.loads((folder / f"seed{seed}.json").read_text())["subsets"]
        assert {f: r.tolist() for f, r in lib.fraction_subsets(breast, seed).items()} == \
            {float(f): rows for f, rows in training.items()}


def test_readouts_choose_c_on_the_rules_rows(lib, store, monkeypatch) -> None:  # noqa: ANN001
    from radssl.transfer import linear_probe as probe_module

    seen: list[int] = []
    original = probe_module.linear_probe

    def recording(train_x, train_y, val_x, val_y, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(len(val_y))
        return original(train_x, train_y, val_x, val_y, *args, **kwargs)

    monkeypatch.setattr(probe_module, "linear_probe", recording)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten()).eval()
    expected = {f"{f:g}": len(r) for f, r in lib.validation_subsets(store, 0, "proportional").items()}
    out = lib.readouts(backbone, store, 0, bn_stats="checkpoint", validation="proportional")
    assert out["validation"] == "proportional"
    assert seen == list(expected.values())
    assert {f: cell["val_images"] for f, cell in out["linear"].items()} == expected
    assert expected["0.01"] < expected["1"] == len(store.indices("val"))
    seen.clear()
    full = lib.readouts(backbone, store, 0, bn_stats="checkpoint")
    assert full["validation"] == "full" and seen == [len(store.indices("val"))] * 3


def _lightly_run(seed: int, values: list[float], validation: str | None) -> dict:
    cells = {f: {"test_auc": v} for f, v in zip(("0.01", "0.1", "1"), values)}
    run = {"seed": seed, "images_seen": 1024, "threads": 2, "budget": {"rule": "images_seen", "images_seen": 1000},
           "pretrain_images_per_s": 50.0, "pretrain_wall_s": 20.0, "ssl": {"linear": cells, "knn": cells}}
    if validation is not None:
        run["validation"] = {"rule": validation}
    return run


def test_run_files_of_the_two_rules_never_mix(bakeoff, tmp_path) -> None:  # noqa: ANN001
    bar = load_benchmark_script("lightly_bar")
    folder = tmp_path / "runs" / "lightly_bar_breastmnist"
    folder.mkdir(parents=True)
    for seed in (0, 1):
        (folder / f"seed{seed}_documented_1000img.json").write_text(json.dumps(_lightly_run(seed, [.6] * 3, None)))
        (folder / f"seed{seed}_documented_1000img_propval.json").write_text(
            json.dumps(_lightly_run(seed, [.7] * 3, "proportional")))
    # A run recorded under the proportional rule is never read as a full-validation run, whatever its file name.
    (folder / "seed2_documented_1000img.json").write_text(json.dumps(_lightly_run(2, [.7] * 3, "proportional")))
    full = bakeoff.lightly_reference_runs(tmp_path / "runs", "breastmnist", None, 1000, 2)
    proportional = bakeoff.lightly_reference_runs(tmp_path / "runs", "breastmnist", None, 1000, 2, "proportional")
    assert [r["ssl"]["linear"]["1"]["test_auc"] for r in full["documented"]] == [.6, .6]
    assert [r["ssl"]["linear"]["1"]["test_auc"] for r in proportional["documented"]] == [.7, .7]
    # lightly_bar names its files with the same key method_bakeoff reads.
    args = type("Args", (), {"arm": "documented", "budget_images": 1000, "budget_minutes": None, "threads": 2})
    for rule in ("full", "proportional"):
        args.validation = rule
        assert bar.run_tag(args) == f"documented_{bakeoff.lightly_budget_key(None, 1000, 2, rule)}"
    (folder / "seed2_documented_1000img.json").unlink()
    assert bar.main(["--budget-images", "1000", "--cached-only", "--results-dir", str(tmp_path),
                     "--validation", "proportional"]) == 0
    summary = json.loads((tmp_path / "lightly_bar_breastmnist_documented_1000img_propval.json").read_text())
    assert summary["validation"]["rule"] == "proportional" and summary["summary"]["linear"]["1"]["mean"] == .7


def _pooled(values: dict[int, list[float]], rule: str | None = "proportional",
            pretraining_runs: str = "per_seed") -> dict:
    """A pooled bake-off record: method ``m``'s linear headline rows with per-seed values."""
    rows = [{"method": "m", "protocol": "linear", "test_set": "test", "label_fraction": float(f), "images_seen": 1024,
             "ssl": {"mean": float(np.mean([v[i] for v in values.values()])), "low": None, "high": None,
                     "per_seed": [{"seed": s, "value": v[i]} for s, v in values.items()]}}
            for i, f in enumerate(("0.01", "0.1", "1"))]
    return {"headline": rows, "pretraining_runs": pretraining_runs, "budget": {"images_seen": 1000},
            **({"validation": {"rule": rule}} if rule else {})}


OURS = {0: [0.95, 0.8, 0.9], 1: [0.15, 0.8, 0.9], 2: [0.95, 0.8, 0.9]}
THEIRS = {0: [0.05, 0.7, 0.92], 1: [0.65, 0.75, 0.95], 2: [0.0, 0.7, 0.93]}


def test_best_minus_lightly_is_paired_by_seed_when_the_rules_and_seeds_match(bakeoff) -> None:  # noqa: ANN001
    runs = {"documented": [_lightly_run(s, THEIRS[s], "proportional") for s in (0, 1, 2)]}
    arm = bakeoff.best_vs_lightly_from_bakeoff(_pooled(OURS), runs)["arms"]["documented"]
    assert arm["pairing"]["paired"] and "paired by seed [0, 1, 2]" in arm["pairing"]["why"]
    for i, fraction in enumerate(("0.01", "0.1", "1")):
        paired = arm["fractions"][fraction]["paired_by_seed"]
        diffs = [OURS[s][i] - THEIRS[s][i] for s in (0, 1, 2)]  # ours − lightly
        assert paired["mean"] == pytest.approx(np.mean(diffs)) and paired["seeds"] == [0, 1, 2]
        assert -1.0 <= paired["low"] <= paired["mean"] <= paired["high"] <= 1.0
    # At 1 % the differences (.9, −.5, .95) spread so far that an unbounded t-interval would leave [−1, 1].
    assert arm["fractions"]["0.01"]["paired_by_seed"]["high"] < 1.0
    assert arm["fractions"]["0.1"]["paired_by_seed"]["mean"] > 0 > arm["fractions"]["1"]["paired_by_seed"]["mean"]


@pytest.mark.parametrize(("pooled", "lightly_rule", "seeds", "why"), [
    (_pooled(OURS), "full", (0, 1, 2), "validation rules differ: bake-off proportional, lightly full"),
    (_pooled(OURS), None, (0, 1, 2), "validation rules differ: bake-off proportional, lightly full"),
    (_pooled(OURS), "proportional", (0, 1), "seeds differ: bake-off [0, 1, 2], lightly [0, 1]"),
    (_pooled(OURS, rule=None), "proportional", (0, 1, 2), "validation rule is not recorded"),
    (_pooled(OURS, pretraining_runs="shared"), "proportional", (0, 1, 2), "pretrains each method once"),
])
def test_unpaired_bars_say_why(bakeoff, pooled, lightly_rule, seeds, why) -> None:  # noqa: ANN001
    runs = {"documented": [_lightly_run(s, THEIRS[s], lightly_rule) for s in seeds]}
    arm = bakeoff.best_vs_lightly_from_bakeoff(pooled, runs)["arms"]["documented"]
    assert not arm["pairing"]["paired"] and why in arm["pairing"]["why"]
    assert all("paired_by_seed" not in cell for cell in arm["fractions"].values())
    assert set(arm["fractions"]) == {"0.01", "0.1", "1"}  # the unpaired bars are still set side by side


def test_combine_pairs_every_method_only_under_the_same_rule(bakeoff) -> None:  # noqa: ANN001
    for rule, paired in (("proportional", True), ("full", False)):
        rows = {"m": {}}
        runs = {"strong": [_lightly_run(s, THEIRS[s], rule) for s in (0, 1, 2)]}
        pairing = bakeoff.pair_with_lightly(rows, _pooled(OURS), runs)
        assert pairing["strong"]["paired"] is paired
        assert ("minus_lightly_paired" in rows["m"]) is paired
    assert rows["m"] == {}


def test_a_lightly_run_reads_out_and_records_its_validation_rule(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    bar = load_benchmark_script("lightly_bar")
    calls: list[dict] = []
    monkeypatch.setattr(bar, "train_example", lambda *a, **k: {
        "backbone": nn.Identity(), "losses": [1.0], "step_ends_s": [1.0], "pretrain_images_available": 10})
    monkeypatch.setattr(bar.lib, "readouts", lambda *a, **k: calls.append(k) or {"linear": {}, "knn": {}})
    monkeypatch.setattr(bar.lib, "machine", lambda **k: {})
    args = type("Args", (), {"dataset": "breastmnist", "arm": "strong", "budget_images": 256, "budget_minutes": None,
                             "threads": 1, "workers": 0, "size": 28, "validation": "proportional"})
    record = bar.run_seed(args, None, 0, tmp_path / "run.json", 1, None)
    assert calls == [{"validation": "proportional"}]
    assert record["validation"] == {"rule": "proportional", "min_per_class": 5}


def test_the_pooled_record_knows_its_validation_rule() -> None:
    from radssl.study.bakeoff_replicates import Replicate, validation_rule

    def rule(*configs: dict) -> dict:
        return validation_rule(Replicate(Path("b"), 0, {}, study_configs={f"g{i}": c for i, c in enumerate(configs)}))

    assert rule({"validation": "proportional", "validation_min_per_class": 4}) == {"rule": "proportional",
                                                                                   "min_per_class": 4}
    assert rule({}) == {"rule": "full", "min_per_class": None}  # saved before the field: the full split
    mixed = rule({"validation": "full"}, {"validation": "proportional", "validation_min_per_class": 5})
    assert mixed["rule"] == "mixed"
