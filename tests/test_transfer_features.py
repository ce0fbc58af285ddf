"""Input normalisation convention and cached, eval-mode, batch-invariant feature extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from radssl.data.store import ImageStore, TaskInfo
from radssl.transfer.features import (
    NORMALISATION_MEAN,
    NORMALISATION_STD,
    FeatureCache,
    extract_features,
    module_fingerprint,
    normalise_for_backbone,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: one thread beats two on a shared 2-core machine (overrides conftest's setting)."""
    torch.set_num_threads(1)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.body(x)


def _images(n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_normalisation_convention_for_uint8_and_float():
    pixels = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    expected = (torch.tensor([0.0, 1.0]) - NORMALISATION_MEAN) / NORMALISATION_STD
    torch.testing.assert_close(normalise_for_backbone(pixels).flatten(), expected)
    as_half = pixels.half() / 255
    torch.testing.assert_close(normalise_for_backbone(as_half).flatten(), expected, atol=1e-3, rtol=0)
    as_float = pixels.float() / 255
    before = as_float.clone()
    normalise_for_backbone(as_float)
    assert torch.equal(as_float, before)  # never modifies the caller's (store's) tensor


def test_extraction_is_eval_mode_batch_invariant_and_restores_mode():
    torch.manual_seed(0)
    model = _Tiny()
    with torch.no_grad():
        model.body[1].running_mean.fill_(0.3)
    model.train()
    images = _images()
    a = extract_features(model, images, batch_size=3)
    b = extract_features(model, images, batch_size=100)
    assert a.shape == (10, 4) and a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert model.training  # mode restored
    assert torch.all(model.body[1].running_mean == 0.3)  # eval mode: statistics untouched
    single = extract_features(model, images[4:5])
    torch.testing.assert_close(single[0], a[4])


def test_cache_extracts_once_per_backbone_and_data(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    images = _images()
    cache = FeatureCache(tmp_path)
    first = cache.features(model, images, batch_size=4)
    calls = model.calls
    again = cache.features(model, images.clone(), batch_size=4)
    assert model.calls == calls and cache.hits == 1 and torch.equal(first, again)
    # A fresh cache on the same folder reads the atomically written file instead of extracting.
    reloaded = FeatureCache(tmp_path).features(model, images)
    assert model.calls == calls and torch.equal(first, reloaded)
    assert len(list(tmp_path.glob("features-*.pt"))) == 1
    # Other data or other weights are other keys.
    cache.features(model, _images(seed=1))
    with torch.no_grad():
        model.body[0].weight.add_(1.0)
    changed = cache.features(model, images)
    assert cache.misses == 3 and not torch.allclose(changed, first)


def test_cache_keys_stores_by_their_fingerprint():
    n = 6
    store = ImageStore(
        "toy", _images(n), torch.zeros(n, dtype=torch.long), np.array(["train"] * n), np.array([""] * n),
        TaskInfo("binary", 2),
    )
    torch.manual_seed(0)
    model = _Tiny()
    cache = FeatureCache()
    features = cache.features(model, store)
    assert features.shape == (n, 4)
    cache.features(model, store)
    assert cache.hits == 1


def test_fingerprint_ignores_device_and_mode_but_not_buffers():
    torch.manual_seed(0)
    model = _Tiny()
    before = module_fingerprint(model)
    model.eval()
    assert module_fingerprint(model) == before
    with torch.no_grad():
        model.body[1].running_var.fill_(2.0)
    assert module_fingerprint(model) != before


def test_rejects_non_image_input():
    with pytest.raises(ValueError, match="shape"):
        extract_features(_Tiny(), torch.zeros(3, 8, 8))
