"""benchmarks/label_efficiency.py (issue 7, point 5): one row per pretraining run, two-sided reference target,
the backbone actually used on every row and target, and a standard-stem ResNet-18 option."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from radssl.study.config import StudyConfig, load_study_config
from radssl.study.results_store import CellKey, ResultsStore
from radssl.study.statistics import binary_auc, bootstrap_ci

ROOT = Path(__file__).resolve().parents[1]


def _benchmark():  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("label_efficiency", ROOT / "benchmarks" / "label_efficiency.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _scores(y: np.ndarray, skill: float, seed: int) -> np.ndarray:
    return skill * y + np.random.default_rng(seed).normal(size=y.size)


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    """A study with random init and two SSL runs (different quality) on a small CNN."""
    path = tmp_path / "results.sqlite"
    config = StudyConfig.model_validate({"name": "bench", "model": {"backbone": "small_cnn"},
                                         "data": {"source": "medmnist", "name": "pneumoniamnist", "size": 28}})
    y = np.random.default_rng(99).integers(0, 2, 300)
    with ResultsStore(path) as store:
        store.save_study_config("bench", config.to_dict())
        for run, backbone in (("simclr", "small_cnn"), ("byol", "resnet18")):
            store.record_pretrain_run("bench", run, f"{run}.pt", 1.0, "cpu",
                                      config={"model": {"backbone": backbone, "small_input": True}})
        for init, pretrain, skill in (("random", "none", 0.5), ("ssl", "simclr", 2.0), ("ssl", "byol", 1.0)):
            for fraction in (0.01, 0.1, 1.0):
                for seed in (0, 1, 2):
                    scores = _scores(y, skill + fraction, 10 * seed + int(100 * fraction) + len(pretrain))
                    store.record_cell("bench", CellKey(pretrain, init, "finetune", fraction, 1.0, seed, "test"),
                                      {"auc": bootstrap_ci(y, scores, binary_auc, n_boot=100)}, wall_time_s=1.0,
                                      device="cpu", versions={}, y_true=y, y_score=scores)
    return path


def test_each_pretraining_run_is_its_own_row_with_its_backbone(store_file: Path) -> None:
    bench = _benchmark()
    table = bench.summarise(store_file, "bench")
    assert set(table) == {"random", "ssl:simclr", "ssl:byol"}  # two SSL runs are not pooled
    simclr = table["ssl:simclr"]["protocols"]["finetune"]["0.01"]
    byol = table["ssl:byol"]["protocols"]["finetune"]["0.01"]
    assert simclr["n"] == byol["n"] == 3 and simclr["mean"] > byol["mean"] + 0.05
    assert table["ssl:simclr"]["backbone"].startswith("small_cnn (1 ch")
    assert table["ssl:byol"]["backbone"].startswith("resnet18 (1 ch, 2D, small stem")
    assert table["random"]["backbone"].startswith("small_cnn")
    low, high = simclr["ci95_seeds_and_cases"]
    t_low, t_high = simclr["t95_seeds"]
    assert low < simclr["mean"] < high and t_low < simclr["mean"] < t_high
    checks = bench.check_targets("pneumoniamnist", table, store_file, "bench")
    t2 = [c for c in checks if c["target"].startswith("T2")]
    assert [c["target"].split()[1] for c in t2] == ["ssl:byol", "ssl:simclr"]
    assert all(c["paired_seeds"] == 3 and len(c["ci95_seeds_and_cases"]) == 2 for c in t2)
    for check in checks:  # every target names the backbone it was measured with
        assert check["backbone"] in check["target"]


def test_reference_target_is_two_sided_and_labels_the_backbone() -> None:
    bench = _benchmark()

    def table(auc: float, backbone: str) -> dict:
        return {"random": {"init": "random", "backbone": backbone,
                           "protocols": {"finetune": {"1": {"mean": auc, "sd": 0.0, "n": 3}}}}}

    small = "small_cnn (1 ch, 2D, 28×28 px)"
    above = bench.check_targets("pneumoniamnist", table(0.97, small))[0]  # .944 + 0.026: too far above
    assert above["met"] is False and "two-sided" in above["rule"]
    assert above["threshold"] == [0.924, 0.964]
    within = bench.check_targets("pneumoniamnist", table(0.93, small))[0]
    assert within["met"] is True
    assert "(small_cnn" in within["target"] and within["same_architecture_as_reference"] is False
    resnet = bench.check_targets("breastmnist", table(0.9, "resnet18 (1 ch, 2D, small stem, 28×28 px)"))[0]
    assert resnet["met"] is True and resnet["same_architecture_as_reference"] is True


def test_standard_stem_resnet18_can_be_run() -> None:
    bench = _benchmark()
    args = bench.parse_args(["--stem", "standard", "--backbone", "resnet18", "--steps", "87"])
    overrides = bench.study_overrides(args, "pneumoniamnist")
    assert "model.small_input=false" in overrides and "model.backbone=resnet18" in overrides
    config = load_study_config(ROOT / "configs" / "pneumoniamnist.yaml", overrides)
    assert config.model.small_input is False
    assert "standard stem" in config.model.spec_for(1, (28, 28)).describe()
    rules = bench.protocol_rules(config)
    assert rules["validation"] == config.validation and rules["finetune"]["steps_per_epoch"] == "full"
