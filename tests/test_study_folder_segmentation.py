"""A 2D segmentation study on an image folder with PNG masks, run from the shipped example config (paths and budgets
overridden): the breast-ultrasound archive's layout, masks by file-name rule, Dice per case, report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_folder_masks import busi_like

from radssl.study.config import load_study_config
from radssl.study.plan import prepare_study
from radssl.study.runner import run_study
from radssl.study.results_store import ResultsStore

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "folder_masks_example.yaml"
QUIET = {"log": lambda _: None}
TINY_SEGMENTATION = ("epochs=1", "min_epochs=1", "batch_size=4", "hd95=false")


def _overrides(root: Path, tmp_path: Path) -> list[str]:
    tiny = [f"protocols.{p}.{o}" for p in ("segmentation_frozen", "segmentation_finetune") for o in TINY_SEGMENTATION]
    return [f"data.source.root={root}", f"data.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'study'}",
            "data.preprocess.target_size=[16, 16]", "model.backbone=small_cnn", "model.options={width: 8}",
            "seeds=[0]", "label_fractions=[1.0]", "pretraining.simclr.train.epochs=null",
            "pretraining.simclr.train.steps=2", "pretraining.simclr.train.batch_size=8",
            "pretraining.simclr.train.accelerator=cpu", "pretraining.simclr.train.progress_bar=false", *tiny]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_the_folder_masks_example_runs_a_2d_segmentation_study_end_to_end(tmp_path: Path) -> None:
    root = busi_like(tmp_path / "busi", per_class=8, shape=(30, 40))
    config = load_study_config(EXAMPLE, _overrides(root, tmp_path))
    plan = prepare_study(config, **QUIET)
    assert plan.store.mask_classes == ("background", "foreground") and len(plan.store) == 24
    assert plan.store.meta["mask"].shape == (24, 16, 16)
    output = run_study(config, **QUIET)
    with ResultsStore(output / "results.sqlite") as results:
        dice = [r for r in results.cells("folder-masks") if r["metric"] == "dice"]
        assert len(dice) == 2 * 2  # encoders (random, SSL) × protocols (frozen, fine-tuned)
        for row in dice:
            values = results.case_values("folder-masks", row["cell_key"])
            assert len(values["dice"]) == len(plan.test_sets["test"][1]) and np.isfinite(values["dice"]).all()
            assert "dice_foreground" in values
    assert "segmentation (frozen encoder)" in (output / "report" / "report.html").read_text()
