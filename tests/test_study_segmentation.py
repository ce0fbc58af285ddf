"""Segmentation as a study task: tiny 2D and 3D studies with masks, Dice per case, the equal-budget rule, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.errors import DataError
from radssl.study.config import StudyConfig
from radssl.study.plan import prepare_study
from radssl.study.results_store import ResultsStore
from radssl.study.runner import run_study
from radssl.study.statistics import case_mean

QUIET = {"log": lambda _: None}
SEGMENTATION = {"epochs": 2, "min_epochs": 1, "batch_size": 8, "lr": 0.003, "hd95": True}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _study(output_dir: Path, **changes) -> StudyConfig:
    raw = {
        "name": "seg", "output_dir": str(output_dir),
        "data": {"source": "synthetic", "n_patients": 30, "images_per_patient": 2, "image_size": 24, "masks": True},
        "external_test_sets": [{"name": "site1", "data": {"source": "synthetic", "n_patients": 8,
                                                          "images_per_patient": 2, "image_size": 24, "site": 1,
                                                          "masks": True}}],
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        "pretraining": [{"name": "simclr", "train": {"steps": 3, "batch_size": 16, "accelerator": "cpu",
                                                     "devices": 1, "progress_bar": False, "checkpoint_every": 3,
                                                     "log_every": 1}}],
        "initialisations": ["random", "ssl:simclr"],
        "label_fractions": [0.5, 1.0], "seeds": [0], "bootstrap_samples": 100,
        "protocols": {"segmentation_frozen": SEGMENTATION,
                      "segmentation_finetune": {**SEGMENTATION, "encoder_lr_scale": [0.5, 1.0]}},
    }
    raw.update(changes)
    return StudyConfig.model_validate(raw)


def test_a_2d_segmentation_study_records_dice_per_case_under_equal_budgets(tmp_path: Path) -> None:
    config = _study(tmp_path / "study")
    plan = prepare_study(config, **QUIET)
    output = run_study(config, **QUIET)
    with ResultsStore(output / "results.sqlite") as results:
        rows = results.cells("seg")
        primary = [r for r in rows if r["metric"] == "dice"]
        assert {r["cell_key"] for r in primary} == {k.key for k in plan.cell_keys()}
        assert len(primary) == 2 * 2 * 2 * 2  # encoders × protocols × fractions × test sets
        for row in primary:
            assert row["primary_metric"] == "dice" and row["has_case_values"] and not row["has_predictions"]
            values = results.case_values("seg", row["cell_key"])
            assert {"dice", "dice_finding", "hd95", "hd95_finding"} <= set(values)
            assert len(values["dice"]) == len(plan.test_sets[row["test_set"]][1])
            assert row["value"] == pytest.approx(case_mean(None, values["dice"]))
            assert row["ci_low"] <= row["value"] <= row["ci_high"]
        by_metric: dict[str, dict[str, float]] = {}
        for r in rows:
            by_metric.setdefault(r["metric"], {})[r["cell_key"]] = r["value"]
        # Equal budgets: the same planned optimiser steps at every label fraction (one pass over the whole split).
        assert len(set(by_metric["finetune_budget_steps"].values())) == 1
        # The encoder-LR rule only exists for full fine-tuning and picks one of its candidates per cell.
        chosen = {k: v for k, v in by_metric["encoder_lr_scale"].items()}
        assert chosen and all("segmentation_finetune" in k and v in (0.5, 1.0) for k, v in chosen.items())
        # Proportional validation: the 50 % cells select on no more validation cases than the 100 % cells.
        val = by_metric["val_images"]
        half = [v for k, v in val.items() if "lf=0.5" in k]
        full = [v for k, v in val.items() if "lf=1.0" in k]
        assert max(half) <= min(full) == len(plan.val_rows)
    page = (output / "report" / "report.html").read_text()
    assert "Per-class Dice and HD95" in page and "segmentation (frozen encoder)" in page
    assert "Wilcoxon signed-rank" in page


def test_a_3d_segmentation_study_runs_on_volumes(tmp_path: Path) -> None:
    config = _study(tmp_path / "vol", data={"source": "synthetic3d", "n_patients": 16, "volumes_per_patient": 1,
                                            "volume_size": 16},
                    external_test_sets=[], pretraining=[], initialisations=["random"], label_fractions=[1.0],
                    model={"backbone": "small_cnn_3d", "options": {"width": 8}},
                    protocols={"segmentation_frozen": {**SEGMENTATION, "epochs": 1, "batch_size": 4}})
    output = run_study(config, **QUIET)
    with ResultsStore(output / "results.sqlite") as results:
        (row,) = [r for r in results.cells("seg") if r["metric"] == "dice"]
        values = results.case_values("seg", row["cell_key"])
        assert {"dice_organ", "dice_finding", "hd95_organ"} <= set(values)
        assert np.isfinite(values["dice"]).all()


def test_segmentation_without_masks_or_with_a_too_large_patch_is_refused_before_compute(tmp_path: Path) -> None:
    no_masks = _study(tmp_path / "a", data={"source": "synthetic", "n_patients": 30, "images_per_patient": 2,
                                            "image_size": 24}, external_test_sets=[])
    with pytest.raises(DataError, match="protocol 'segmentation_frozen' needs segmentation masks"):
        prepare_study(no_masks, **QUIET)
    big = _study(tmp_path / "b", protocols={"segmentation_finetune": {**SEGMENTATION, "patch_size": 32}})
    with pytest.raises(DataError, match=r"protocols.segmentation_finetune.patch_size.*larger than the images"):
        prepare_study(big, **QUIET)
    external_without = _study(tmp_path / "c", external_test_sets=[{"name": "site1", "data": {
        "source": "synthetic", "n_patients": 8, "images_per_patient": 2, "image_size": 24, "site": 1}}])
    with pytest.raises(DataError, match="site1.*no segmentation masks"):
        prepare_study(external_without, **QUIET)
    assert not any((tmp_path / n).exists() for n in "abc"), "nothing written"


@pytest.mark.slow
def test_hippocampus_segmentation_config_passes_every_check_on_the_real_cases(data_dir: Path,
                                                                              tmp_path: Path) -> None:
    """The shipped MSD hippocampus study reads the 260 cases with their masks and is valid before any compute."""
    from radssl.study.config import load_study_config

    root = data_dir / "msd" / "task04_hippocampus"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    config = load_study_config(Path(__file__).resolve().parents[1] / "configs" / "hippocampus_segmentation.yaml",
                               [f"data.source.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                                f"output_dir={tmp_path / 'study'}"])
    plan = prepare_study(config, **QUIET)
    assert plan.store.mask_classes == ("background", "anterior", "posterior") and plan.store.spatial_dims == 3
    assert len(plan.store) == 260
    assert len(plan.cell_keys()) == 2 * 2 * 3 * 4  # encoders × protocols × seeds × fractions (internal test set)
    smallest = min(len(plan.subsets[s][0.05]) for s in config.seeds)
    assert smallest >= 1 and all(len(plan.val_subsets[s][0.05]) >= 5 for s in config.seeds)
    assert not (tmp_path / "study").exists()
