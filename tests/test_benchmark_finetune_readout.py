"""benchmarks/bakeoff_lib.py's fine-tuning read-out (issue 8): the backbone LR is chosen on validation, never test."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support import load_benchmark_script, make_tiny_store

from radssl.models.registry import build_backbone


@pytest.fixture(scope="module")
def lib():  # noqa: ANN201 - a module
    return load_benchmark_script("bakeoff_lib")


def test_the_candidate_with_the_best_validation_auc_wins_even_when_its_test_auc_is_worst(lib) -> None:  # noqa: ANN001
    candidates = [{"backbone_lr_scale": 0.1, "val_auc": 0.70, "test_auc": 0.95},
                  {"backbone_lr_scale": 1.0, "val_auc": 0.80, "test_auc": 0.60}]
    assert lib.select_on_validation(candidates)["backbone_lr_scale"] == 1.0
    tie = [{"backbone_lr_scale": 0.1, "val_auc": 0.8, "test_auc": 0.5},
           {"backbone_lr_scale": 1.0, "val_auc": 0.8, "test_auc": 0.9}]
    assert lib.select_on_validation(tie)["backbone_lr_scale"] == 0.1  # ties go to the first listed


def test_finetune_readout_tries_every_scale_at_every_fraction_on_the_seeded_subsets(lib, monkeypatch) -> None:  # noqa: ANN001
    import radssl.transfer.finetune as finetune_module

    store = make_tiny_store(n=160)
    calls = []

    def fake_finetune(backbone, store, rows, val, tests, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append((len(rows), kwargs["backbone_lr_scale"], kwargs["steps_per_epoch"], kwargs["epochs"]))
        # Validation prefers the low backbone LR, test the high one: the read-out must follow validation.
        low = kwargs["backbone_lr_scale"] < 0.5
        return SimpleNamespace(val_metric=0.9 if low else 0.6, metrics={"test": {"auc": 0.5 if low else 0.99}},
                               best_epoch=1, steps_run=kwargs["steps_per_epoch"] * kwargs["epochs"], wall_time_s=0.0)

    monkeypatch.setattr(finetune_module, "finetune", fake_finetune)
    out = lib.finetune_readouts(build_backbone("small_cnn"), store, seed=3, epochs=2, batch_size=32)
    train = store.indices("train")
    assert set(out) == {"0.01", "0.1", "1"}
    assert out["1"]["train_images"] == len(train)
    assert out["0.01"]["train_images"] < out["0.1"]["train_images"] < len(train)
    for fraction in out.values():
        assert fraction["backbone_lr_scale"] == 0.1 and fraction["test_auc"] == 0.5
        assert [c["backbone_lr_scale"] for c in fraction["candidates"]] == list(lib.FINETUNE_BACKBONE_LR_SCALES)
    # Every fraction and scale gets the same optimiser steps: one full training-split pass per epoch.
    assert {(steps, epochs) for _, _, steps, epochs in calls} == {(int(np.ceil(len(train) / 32)), 2)}
    assert len(calls) == 3 * len(lib.FINETUNE_BACKBONE_LR_SCALES)


def test_finetune_readout_runs_end_to_end_on_a_tiny_store(lib) -> None:  # noqa: ANN001
    store = make_tiny_store(n=160)
    torch.manual_seed(0)
    out = lib.finetune_readouts(build_backbone("small_cnn"), store, seed=0, epochs=1, batch_size=32)
    for fraction in out.values():
        chosen = max(fraction["candidates"], key=lambda c: c["val_auc"])
        assert fraction["val_auc"] == chosen["val_auc"] and fraction["test_auc"] == chosen["test_auc"]
    # The tiny store's class is a bright square: with every label one epoch learns it (0.89 measured), far from
    # chance — a read-out that scored noise or mixed up the split would sit near 0.5.
    assert out["1"]["test_auc"] > 0.75, out["1"]
