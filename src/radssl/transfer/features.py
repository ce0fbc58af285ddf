"""Input normalisation shared by every stage, and frozen-feature extraction with a cache.

Normalisation convention (one for the whole project — pretraining, probing, kNN and fine-tuning all call
:func:`normalise_for_backbone`): stored pixels become float32 in [0, 1] (uint8 / 255; float16 stores are
already in [0, 1]), then ``(x - 0.449) / 0.226`` on every channel. These constants are the ImageNet
mean/std averaged over RGB (0.485, 0.456, 0.406 / 0.229, 0.224, 0.225), i.e. the statistics a greyscale
ImageNet image would have. Why them: an ``imagenet:`` initialisation sums the RGB kernels of conv1
(see :mod:`radssl.transfer.initialisation`), and that only reproduces ImageNet-like conv1 responses — which
the frozen BatchNorm running statistics of a linear probe / kNN depend on — when grey inputs are scaled like
ImageNet grey. For random or SSL initialisation any fixed affine map is equivalent (BatchNorm follows
conv1), so nothing is lost by choosing the ImageNet-compatible one.

Why a cache: a label-efficiency study probes the same frozen backbone at many label fractions and seeds;
the features of a (backbone weights, images) pair never change, so they are computed once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from radssl.atomic import torch_save_atomic
from radssl.data.store import (  # noqa: F401 - the convention is re-exported here
    NORMALISATION_MEAN,
    NORMALISATION_STD,
    ImageStore,
    images_to_float,
    normalise_for_backbone,
)

NORMALISATION_TAG = f"grey-imagenet-{NORMALISATION_MEAN}-{NORMALISATION_STD}"
"""Part of every feature-cache key, so a change of convention never reuses stale features."""


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's class, parameter/buffer names, shapes, dtypes and values.

    Two backbones with equal weights (and BatchNorm statistics) share a fingerprint, whatever their device.
    """
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_fingerprint(images: torch.Tensor) -> str:
    """SHA-256 over a tensor's shape, dtype and bytes (the data half of a feature-cache key)."""
    digest = hashlib.sha256(f"{tuple(images.shape)}:{images.dtype}".encode())
    digest.update(images.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Frozen features (N, D) float32 on the CPU for stored images (N, C, H, W) in uint8 or float.

    Runs in eval mode (BatchNorm uses running statistics, so a sample's feature does not depend on its
    batch) under ``no_grad``, batch by batch; the backbone is moved to ``device`` and its train/eval mode
    is restored afterwards.
    """
    if images.ndim < 4:
        raise ValueError(f"images must be (N, C, H, W) or (N, C, D, H, W), got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    was_training = backbone.training
    backbone.to(device).eval()
    chunks: list[torch.Tensor] = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device, non_blocking=True)
            features = backbone(normalise_for_backbone(batch))
            if features.ndim != 2 or features.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"backbone {type(backbone).__name__} returned shape {tuple(features.shape)}; "
                    f"expected (batch, feature_dim) = ({batch.shape[0]}, D)"
                )
            chunks.append(features.float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)


class FeatureCache:
    """Features keyed by (backbone fingerprint, data fingerprint, normalisation): computed once per backbone.

    An in-memory dict, plus an optional folder of ``<key>.pt`` files written atomically so interrupted or
    repeated studies reuse them. Passed explicitly (no module-level state).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(backbone_fingerprint: str, data_fingerprint: str) -> str:
        text = f"{backbone_fingerprint}|{data_fingerprint}|{NORMALISATION_TAG}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"features-{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.is_file():
            features = torch.load(path, map_location="cpu", weights_only=True)
            self._memory[key] = features
            return features
        return None

    def put(self, key: str, features: torch.Tensor) -> None:
        self._memory[key] = features
        path = self._path(key)
        if path is not None:
            torch_save_atomic(path, features)

    def features(
        self,
        backbone: nn.Module,
        images: torch.Tensor | ImageStore,
        batch_size: int = 512,
        device: str | torch.device = "cpu",
        data_fingerprint: str | None = None,
    ) -> torch.Tensor:
        """Features of ``images`` (a tensor, or every row of a store) from the cache, extracting on a miss.

        For a store, its own fingerprint is the data key, so rows can then be selected with ``store.indices``.
        """
        if isinstance(images, ImageStore):
            data_fingerprint = data_fingerprint or images.fingerprint()
            images = images.images
        key = self.key(module_fingerprint(backbone), data_fingerprint or tensor_fingerprint(images))
        cached = self.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        features = extract_features(backbone, images, batch_size=batch_size, device=device)
        self.put(key, features)
        return features
