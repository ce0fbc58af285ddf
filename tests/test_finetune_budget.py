"""Fine-tuning budget pieces (issue 7, points 1 and 3): step counts, the early-stopping floor, validation subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from radssl.data.splits import label_fraction_subsets
from radssl.errors import DataError
from radssl.transfer.finetune import finetune

from support import make_tiny_store


class _Plain(nn.Module):
    """A minimal encoder: finetune() needs only ``feature_dim`` (and ``in_channels`` when present)."""

    feature_dim, in_channels = 8, 1

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _finetune(store, rows, **options):  # noqa: ANN001, ANN003, ANN202
    torch.manual_seed(0)
    return finetune(_Plain(), store, rows, store.indices("val"), {"test": (store, store.indices("test"))},
                    batch_size=16, seed=0, **options)


def test_every_fraction_gets_the_steps_it_is_given() -> None:
    store = make_tiny_store(n=96, size=12)
    train = store.indices("train")  # 72 rows: 5 steps of 16 per pass
    small, full = _finetune(store, train[:8], epochs=2, min_steps_per_epoch=5), _finetune(store, train, epochs=2)
    assert full.steps_per_epoch == small.steps_per_epoch == 5
    assert full.steps_run == small.steps_run == 10
    assert [h["train_samples"] for h in small.history] == [5 * 16, 5 * 16]  # the 8 images, cycled
    plain = _finetune(store, train[:8], epochs=2)
    assert plain.steps_per_epoch == 1 and plain.steps_run == 2


def test_exact_steps_per_epoch_give_every_subset_the_same_budget() -> None:
    store = make_tiny_store(n=96, size=12)
    train = store.indices("train")
    runs = {n: _finetune(store, train[:n], epochs=3, steps_per_epoch=2, early_stopping_patience=None)
            for n in (4, 20, 72)}
    for run in runs.values():  # 4, 20 or 72 images: 3 epochs × exactly 2 steps of 16 each
        assert run.steps_per_epoch == 2 and run.steps_run == 6
        assert [h["train_samples"] for h in run.history] == [32, 32, 32]
    assert runs[72].history[0]["train_samples"] < 72  # a large set is seen in part per epoch
    with pytest.raises(ValueError, match="steps_per_epoch"):
        _finetune(store, train, epochs=1, steps_per_epoch=0)


def test_early_stopping_waits_for_the_floor() -> None:
    store = make_tiny_store(n=96, size=12)
    rows = store.indices("train")
    # lr ~ 0: the validation AUC never improves after epoch 1, so patience 1 would stop at epoch 2.
    free = _finetune(store, rows, epochs=6, lr=1e-12, early_stopping_patience=1)
    floored = _finetune(store, rows, epochs=6, lr=1e-12, early_stopping_patience=1, min_epochs=4)
    assert free.epochs_run == 2 and free.stopped_early
    assert floored.epochs_run == 4 and floored.stopped_early
    assert floored.steps_run == 4 * floored.steps_per_epoch
    with pytest.raises(ValueError, match="min_epochs"):
        _finetune(store, rows, epochs=2, min_epochs=0)


def test_proportional_validation_subsets_are_nested_grouped_and_floored() -> None:
    rng = np.random.default_rng(0)
    n = 400
    patient = np.array([f"p{i // 2}" for i in range(n)])
    labels = np.repeat(rng.random(n // 2) < 0.2, 2).astype(np.int64)  # one label per patient, 20 % positive
    rows = np.arange(n)
    fractions = [0.01, 0.1, 0.5, 1.0]
    subsets = label_fraction_subsets(labels, rows, fractions, [3, 1], patient, min_rows_per_class=6)
    for small, large in zip(fractions[:-1], fractions[1:], strict=True):
        assert set(subsets[small]) <= set(subsets[large])  # nested
    for fraction, chosen in subsets.items():
        counts = np.bincount(labels[chosen], minlength=2)
        assert counts.min() >= 6, (fraction, counts)  # the floor, per class
        kept = set(patient[chosen])
        assert set(rows[np.isin(patient, list(kept))]) == set(chosen)  # whole patients only
    assert len(subsets[0.01]) <= 14  # the floor, not more: 6 rows per class, whole patients of 2 images
    assert len(subsets[0.5]) == pytest.approx(200, abs=4)  # the fraction when it is above the floor
    assert np.array_equal(subsets[1.0], rows)
    # The same seed's second stream draws other patients than its first (independent of the training subsets).
    first = label_fraction_subsets(labels, rows, [0.1], 3, patient)[0.1]
    assert not np.array_equal(first, label_fraction_subsets(labels, rows, [0.1], [3, 1], patient)[0.1])
    with pytest.raises(DataError, match="min_rows_per_class"):
        label_fraction_subsets(labels, rows, [0.1], 0, patient, min_rows_per_class=0)
