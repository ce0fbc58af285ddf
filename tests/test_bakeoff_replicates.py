"""Per-seed pretraining replicates of a bake-off (``pretraining_runs: per_seed``) and their pooling
(:func:`radssl.study.bakeoff_replicates.combine_replicates`, ``benchmarks/method_bakeoff.py --combine``): every seed is
its own pretraining run, so the intervals include the pretraining run's variance (the project's rule)."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

import radssl.study.bakeoff as bakeoff
from radssl.errors import ConfigError
from radssl.study.bakeoff import BakeoffConfig, CellSource, headline
from radssl.study.bakeoff_replicates import run_bakeoff
from radssl.study.bakeoff_replicates import combine_replicates, replicate_dir
from radssl.study.results_store import CellKey, ResultsStore
from radssl.transfer.metrics import binary_auc

QUIET = {"log": lambda _: None}
DATA_2D = {"source": "synthetic", "n_patients": 30, "images_per_patient": 2, "image_size": 24}
TRAIN = {"batch_size": 16, "accelerator": "cpu", "devices": 1, "progress_bar": False, "log_every": 1}


def _config(**changes) -> BakeoffConfig:  # noqa: ANN003
    raw = {"name": "tiny", "data": DATA_2D, "model": {"backbone": "small_cnn"}, "methods": ["simclr"],
           "budget": {"images_seen": 32}, "train": TRAIN, "label_fractions": [1.0], "seeds": [0],
           "protocols": {"linear": {"Cs": [1.0]}}, "bootstrap_samples": 100}
    raw.update(changes)
    return BakeoffConfig.model_validate(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny real bake-offs: a per-seed one (seeds 0, 1; wall-clock budget, calibration faked and counted) and a
    separately run shared one of pretraining seed 0 with an extra label seed (as the lead's first replicate)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("replicates")
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bakeoff, "calibrate", lambda config, arm, store: calls.append(arm.method) or
                      {"images_per_s": 16.0, "peak_memory_mb": 1.0, "peak_memory_source": "test"})
        per_seed = _config(output_dir=str(root / "per_seed"), seeds=[0, 1], pretraining_runs="per_seed",
                           budget={"wall_clock_s": 2.0, "threads": 1})
        run_bakeoff(per_seed, **QUIET)
        per_seed_calls = list(calls)
        run_bakeoff(_config(output_dir=str(root / "wide0"), seed=0, seeds=[0, 1],
                            budget={"wall_clock_s": 2.0, "threads": 1}), **QUIET)
    return {"per_seed": root / "per_seed", "wide0": root / "wide0", "calibrations": per_seed_calls}  # type: ignore


def _summary(directory: Path) -> dict:
    return json.loads((directory / "bakeoff.json").read_text())


# ------------------------------------------------------------------------------------------------ per_seed
def test_per_seed_runs_one_pretraining_run_per_seed_with_that_seed(runs: dict[str, Path]) -> None:
    weights = {}
    for seed in (0, 1):
        run_dir = replicate_dir(runs["per_seed"], seed) / "small_cnn" / "pretraining" / "simclr"
        assert json.loads((run_dir / "run.json").read_text())["seed"] == seed
        assert _summary(replicate_dir(runs["per_seed"], seed))["seeds"] == [seed]  # label subset s only
        weights[seed] = torch.load(run_dir / "checkpoints" / "final.pt", map_location="cpu",
                                   weights_only=False)["backbone"]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # two pretraining runs
    pooled = _summary(runs["per_seed"])
    assert pooled["pretraining_runs"] == "per_seed" and pooled["seeds"] == [0, 1]
    assert "each seed its own pretraining run" in pooled["pretraining_statement"]
    for row in pooled["headline"]:
        assert row["ssl"]["n_seeds"] == 2 and [p["seed"] for p in row["ssl"]["per_seed"]] == [0, 1]
        for entry in row["ssl"]["per_seed"]:  # each seed's score is its own replicate's
            own = next(r for r in _summary(replicate_dir(runs["per_seed"], entry["seed"]))["headline"]
                       if (r["protocol"], r["test_set"], r["label_fraction"]) ==
                       (row["protocol"], row["test_set"], row["label_fraction"]))
            assert entry["value"] == pytest.approx(own["ssl"]["mean"])


def test_a_wall_clock_budget_is_calibrated_once_and_every_replicate_runs_its_steps(runs: dict[str, Path]) -> None:
    assert runs["calibrations"] == ["simclr"]  # one calibration, reused by both replicates
    assert (runs["per_seed"] / "calibration.json").is_file()
    arm = _summary(runs["per_seed"])["arms"]["simclr"]
    assert [r["steps"] for r in arm["replicates"]] == [2, 2]  # floor(2 s · 16 img/s / 16)
    assert arm["images_seen"] == 32 and arm["images_seen_equal"] is True
    assert [r["pretraining_seed"] for r in arm["replicates"]] == [0, 1]
    assert all(r["pretrain_wall_s"] > 0 for r in arm["replicates"])


def test_shared_mode_says_so_in_its_summary(runs: dict[str, Path]) -> None:
    summary = _summary(runs["wide0"])
    assert (summary["pretraining_runs"], summary["seed"], summary["seeds"]) == ("shared", 0, [0, 1])
    assert not (runs["wide0"] / "pretrain_seed0").exists()  # one pretraining run per method, no replicates
    assert summary["headline"][0]["ssl"]["n_seeds"] == 2
    with pytest.raises(Exception, match="pretraining_runs"):
        _config(pretraining_runs="per_run")


# ----------------------------------------------------------------------------- pooled statistics, constructed
Y = np.array([0, 1] * 1000)  # many cases: a pretraining run's AUC is stable across its label seeds


def _scores(auc_shift: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(size=Y.shape)
    return (Y * auc_shift + noise).astype(np.float32)


def _store(path: Path, ssl_shift: dict[int, float], random_shift: dict[int, float]) -> CellSource:
    """A study store with SSL and random cells (predictions stored) at seeds 0 and 1."""
    with ResultsStore(path) as results:
        for init, shifts in (("ssl", ssl_shift), ("random", random_shift)):
            for seed, shift in shifts.items():
                scores = _scores(shift, 100 * seed + len(init))
                key = CellKey("simclr" if init == "ssl" else "none", init, "linear", 1.0, 1.0, seed, "test")
                results.record_cell("s", key, {"auc": binary_auc(Y, scores)}, 1.0, "cpu", {}, y_true=Y,
                                    y_score=scores, primary_metric="auc")
    return CellSource(path, "s", (0, 1), 0)


ARMS = {"simclr": {"images_seen": 32}}


def test_headline_reads_only_the_configured_seeds(tmp_path: Path) -> None:
    source = _store(tmp_path / "a.sqlite", {0: 2.0, 1: 0.2}, {0: 0.5, 1: 0.5})
    only_0 = headline([CellSource(source.results_path, "s", (0,), 0)], ARMS, 100)[0]
    assert only_0["ssl"]["n_seeds"] == 1 and [p["seed"] for p in only_0["ssl"]["per_seed"]] == [0]
    assert only_0["ssl"]["mean"] == pytest.approx(binary_auc(Y, _scores(2.0, 3)))
    both = headline([source], ARMS, 100)[0]
    assert both["ssl"]["n_seeds"] == 2


def test_pooled_interval_carries_the_pretraining_run_and_pairs_each_seed_with_its_own_twin(tmp_path: Path) -> None:
    # Replicate 0's pretraining run is good (its two label seeds agree); replicate 1's is poor.
    rep0 = _store(tmp_path / "r0.sqlite", {0: 2.0, 1: 2.0}, {0: 0.3, 1: 1.5})
    rep1 = _store(tmp_path / "r1.sqlite", {0: 0.4, 1: 0.4}, {0: 1.5, 1: 0.3})
    shared = headline([rep0], ARMS, 200)[0]  # one pretraining run, two label seeds
    pooled = headline([CellSource(rep0.results_path, "s", (0,), 0), CellSource(rep1.results_path, "s", (1,), 1)],
                      ARMS, 200)[0]
    assert pooled["ssl"]["interval"] == "seeds + test cases"
    assert (pooled["ssl"]["high"] - pooled["ssl"]["low"]) > 2 * (shared["ssl"]["high"] - shared["ssl"]["low"])
    ssl = {p["seed"]: p["value"] for p in pooled["ssl"]["per_seed"]}
    random = {p["seed"]: p["value"] for p in pooled["random"]["per_seed"]}
    assert random == pytest.approx({0: binary_auc(Y, _scores(0.3, 6)), 1: binary_auc(Y, _scores(0.3, 106))})
    assert pooled["gain_over_random"]["mean"] == pytest.approx(np.mean([ssl[s] - random[s] for s in (0, 1)]))


# ------------------------------------------------------------------------------------ combining separate runs
def test_combine_takes_from_each_folder_only_its_pretraining_seed(runs: dict[str, Path]) -> None:
    pooled = combine_replicates([(runs["wide0"], 0), (replicate_dir(runs["per_seed"], 1), 1)])
    wide = _summary(runs["wide0"])
    assert wide["headline"][0]["ssl"]["n_seeds"] == 2  # the folder holds label seeds 0 and 1 of pretraining seed 0
    row = pooled["headline"][0]
    assert [p["seed"] for p in row["ssl"]["per_seed"]] == [0, 1] and row["ssl"]["n_seeds"] == 2
    seed0 = next(p["value"] for p in wide["headline"][0]["ssl"]["per_seed"] if p["seed"] == 0)
    assert row["ssl"]["per_seed"][0]["value"] == pytest.approx(seed0)
    assert pooled["arms"]["simclr"]["images_seen"] == 32 and pooled["pretraining_runs"] == "per_seed"


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_combine_refuses_unequal_images_seen_naming_the_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    other = _copy(replicate_dir(runs["per_seed"], 1), tmp_path / "seed1")
    summary = _summary(other)
    summary["arms"]["simclr"]["images_seen"] = 48
    (other / "bakeoff.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match=f"{other}.*images seen per method"):
        combine_replicates([(runs["wide0"], 0), (other, 1)])
    flagged = combine_replicates([(runs["wide0"], 0), (other, 1)], strict=False)
    assert pooled_flag(flagged) and flagged["arms"]["simclr"]["images_seen"] is None
    summary["arms"]["simclr"]["images_seen"] = 32
    summary["budget"] = {"images_seen": 32}
    (other / "bakeoff.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match=f"{other}.*in budget"):
        combine_replicates([(runs["wide0"], 0), (other, 1)])


def pooled_flag(summary: dict) -> bool:
    return any("images seen per method" in flag for flag in summary["flags"])


def test_combine_refuses_a_folder_without_its_seed_or_pretrained_with_another(runs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pretrained with seed 0, not 1"):
        combine_replicates([(runs["wide0"], 1)])
    other = _copy(replicate_dir(runs["per_seed"], 1), tmp_path / "seed1")
    with sqlite3.connect(other / "small_cnn" / "results.sqlite") as db:
        db.execute("DELETE FROM cells WHERE seed = 1")
    with pytest.raises(ConfigError, match=f"{other}.*no cells of seed 1"):
        combine_replicates([(runs["wide0"], 0), (other, 1)])
    with pytest.raises(ConfigError, match="seeds repeat"):
        combine_replicates([(runs["wide0"], 0), (runs["wide0"], 0)])


def test_benchmark_combine_writes_the_pooled_result_and_its_page(runs: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    from support import load_benchmark_script

    script = load_benchmark_script("method_bakeoff")
    monkeypatch.setattr(script, "RESULTS", tmp_path)
    code = script.main(["--dataset", "synthetic", "--tag", "pooled", "--combine", f"{runs['wide0']}:0",
                        f"{replicate_dir(runs['per_seed'], 1)}:1"])
    assert code == 0
    record = json.loads((tmp_path / "method_bakeoff_synthetic_pooled.json").read_text())
    assert record["bakeoff"]["pretraining_runs"] == "per_seed" and record["settings"]["seeds"] == [0, 1]
    linear = record["summary"]["methods"]["simclr"]["ssl"]["linear"]["1"]
    assert linear["n"] == 2 and linear["mean"] == pytest.approx(record["bakeoff"]["headline"][0]["ssl"]["mean"])
    page = (tmp_path / "method_bakeoff_synthetic_pooled.html").read_text()
    assert "simclr" in page and "over seeds and test cases" in page and "random twin, paired by seed" in page
    assert "| simclr |" in capsys.readouterr().out  # the README-ready table
    with pytest.raises(SystemExit):
        script.main(["--dataset", "synthetic", "--combine", f"{runs['wide0']}"])  # no :SEED


def test_the_benchmark_and_the_plan_state_per_seed_pretraining(tmp_path: Path) -> None:
    import argparse

    from support import load_benchmark_script

    script = load_benchmark_script("method_bakeoff")
    flags = dict(dataset="breastmnist", size=28, backbone="resnet18", stem="standard", batch_size=256, threads=2,
                 budget_minutes=None, budget_images=12800, calibration_warmup=5, calibration_steps=20, methods=None,
                 seeds=[0, 1, 2], pretrain_seed=0, finetune_epochs=0, tag="", output_dir=None, data_root=None)
    assert script.bakeoff_config(argparse.Namespace(**flags)).pretraining_runs == "shared"
    per_seed = script.bakeoff_config(argparse.Namespace(**flags, pretraining_runs="per_seed"))
    assert per_seed.pretraining_runs == "per_seed" and per_seed.seeds == [0, 1, 2]
    plan = bakeoff.plan_bakeoff(_config(output_dir=str(tmp_path), seeds=[0, 1], pretraining_runs="per_seed"), **QUIET)
    assert any("one per seed (2 replicates" in line for line in bakeoff.plan_lines(plan))
