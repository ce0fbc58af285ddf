"""Fine-tuning, segmentation and prediction read a store's images a batch at a time (a memory-mapped archive larger
than RAM is never copied whole): the largest gather from the store's images is one batch, not the split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radssl.data.store import StoreRows
from radssl.data.synthetic import SyntheticSpec, make_synthetic_store
from radssl.models.registry import build_backbone
from radssl.transfer.finetune import finetune
from radssl.transfer.segmentation import finetune_segmentation


_GATHERS = (torch.Tensor.__getitem__, torch.index_select, torch.Tensor.index_select)


class _Gathers(torch.Tensor):
    """A store's images that remember the most rows one indexing call returned."""

    largest = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func in _GATHERS and isinstance(out, torch.Tensor) and out.ndim == args[0].ndim:
            cls.largest = max(cls.largest, int(out.shape[0]))
        return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out


def _watched_store(masks: bool = False):  # noqa: ANN202
    store = make_synthetic_store(SyntheticSpec(n_patients=60, images_per_patient=2, image_size=16, masks=masks,
                                               positive_rate=1.0 if masks else 0.5))
    store.images = store.images.as_subclass(_Gathers)
    _Gathers.largest = 0
    return store


def test_store_rows_gathers_only_what_is_asked() -> None:
    images = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 1, 3)
    view = StoreRows(images, np.array([7, 2, 5]))
    assert view.shape == (3, 1, 3) and len(view) == 3 and view.nbytes() == 3 * 3 * 4
    assert torch.equal(view[0:2], images[[7, 2]]) and torch.equal(view[torch.tensor([2])], images[[5]])


def test_store_rows_index_select_is_a_fresh_batch_in_the_asked_order() -> None:
    images = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 1, 3)
    view = StoreRows(images, np.array([7, 2, 5]), device="cpu")
    batch = view.index_select(0, torch.tensor([2, 0, 2]))
    assert torch.equal(batch, images[[5, 7, 5]])
    batch.zero_()
    assert torch.equal(images, torch.arange(10 * 3, dtype=torch.float32).reshape(10, 1, 3)), "a copy, not a view"
    with pytest.raises(ValueError, match="dim 0"):
        view.index_select(1, torch.tensor([0]))


def test_finetune_reads_the_store_a_batch_at_a_time() -> None:
    store = _watched_store()
    train, val, test = store.indices("train"), store.indices("val"), store.indices("test")
    torch.manual_seed(0)
    finetune(build_backbone("small_cnn", 1, image_size=16, options={"width": 4}), store, train, val,
             {"test": (store, test)}, epochs=1, batch_size=8, eval_batch_size=8, early_stopping_patience=None)
    assert len(train) > 40 and 0 < _Gathers.largest <= 8


def test_segmentation_reads_the_store_a_batch_at_a_time() -> None:
    store = _watched_store(masks=True)
    train, val, test = store.indices("train"), store.indices("val"), store.indices("test")
    torch.manual_seed(0)
    finetune_segmentation(build_backbone("small_cnn", 1, image_size=16, options={"width": 4}), store, train, val,
                          {"test": (store, test)}, epochs=1, steps_per_epoch=2, batch_size=4, eval_batch_size=4,
                          hd95=False)
    assert len(train) > 40 and 0 < _Gathers.largest <= 4
