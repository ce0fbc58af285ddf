"""BatchNorm statistics of frozen encoders re-estimated on unlabelled training images (issue 19, point 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from radssl.data.store import normalise_for_backbone
from radssl.models.registry import build_backbone
from radssl.transfer.bn_stats import (
    frozen_encoder,
    has_batch_norm,
    reads_frozen_encoder,
    reestimate_bn_statistics,
)
from radssl.transfer.protocols import build_protocol

from support import make_tiny_store


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("small_cnn", in_channels=1, image_size=16, options={"width": 8})


def _first_bn_input(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the first BatchNorm layer sees for ``images`` (captured with a forward hook, eval mode)."""
    bn = next(m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    seen = []
    handle = bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    with torch.no_grad():
        backbone.eval()(normalise_for_backbone(images))
    handle.remove()
    return seen[0]


def test_reestimated_statistics_are_the_images_statistics_and_the_original_is_untouched():
    store = make_tiny_store(n=64, size=16)
    backbone = _backbone()
    assert has_batch_norm(backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rows = store.indices("train")
    fresh = reestimate_bn_statistics(backbone, store.images, rows, batch_size=len(rows))  # one batch: exact
    activations = _first_bn_input(backbone, store.images[torch.from_numpy(rows)])
    bn = next(m for m in fresh.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    torch.testing.assert_close(bn.running_mean, activations.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, activations.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert not fresh.training
    for key, value in backbone.state_dict().items():  # the caller's module keeps its statistics
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    weights = {k: v for k, v in fresh.state_dict().items() if "running" not in k and "num_batches" not in k}
    for key, value in weights.items():  # only running statistics change
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_batches_are_averaged_cumulatively_not_with_the_default_momentum():
    """Several batches give (close to) the one-batch estimate: momentum=None averages every batch equally."""
    store = make_tiny_store(n=96, size=16)
    rows = store.indices("train")
    backbone = _backbone()
    one = reestimate_bn_statistics(backbone, store.images, rows, batch_size=len(rows))
    many = reestimate_bn_statistics(backbone, store.images, rows, batch_size=12)
    bn_one, bn_many = (next(m for m in b.modules() if isinstance(m, nn.BatchNorm2d)) for b in (one, many))
    torch.testing.assert_close(bn_many.running_mean, bn_one.running_mean, rtol=1e-4, atol=1e-5)


def test_frozen_encoder_uses_pretraining_rows_only_and_checkpoint_keeps_the_module():
    """Val/test images never enter the estimate (they are made extreme here: any leak would move the mean)."""
    store = make_tiny_store(n=64, size=16)
    store.images[torch.from_numpy(np.flatnonzero(store.split != "train"))] = 255
    backbone = _backbone()
    assert frozen_encoder(backbone, store, "checkpoint") is backbone
    fresh = frozen_encoder(backbone, store, "reestimate", batch_size=1000)
    train = store.pretrain_indices()
    expected = _first_bn_input(backbone, store.images[torch.from_numpy(train)]).mean((0, 2, 3))
    bn = next(m for m in fresh.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="bn_stats must be one of"):
        frozen_encoder(backbone, store, "adabn")


def test_frozen_read_outs_are_the_ones_that_get_reestimated_statistics():
    frozen = {name: reads_frozen_encoder(build_protocol(name, {})) for name in
              ("linear", "knn", "finetune", "segmentation_frozen", "segmentation_finetune")}
    assert frozen == {"linear": True, "knn": True, "finetune": False, "segmentation_frozen": True,
                      "segmentation_finetune": False}
