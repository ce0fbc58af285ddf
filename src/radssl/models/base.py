"""The interface every encoder implements: a pooled feature vector and, on request, multi-scale feature maps.

Methods and transfer protocols only see this interface. ``forward`` returns (B, feature_dim) — what probes, kNN and
projection heads use. ``forward_features`` returns a list of maps from high to low resolution with
``feature_channels`` channels and ``feature_strides`` strides — what U-Net-style segmentation decoders and
restoration decoders (Models Genesis) attach to.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from radssl.models.spec import BackboneSpec


class NoOptions(BaseModel):
    """Families without options: any option key is an error."""

    model_config = ConfigDict(extra="forbid")


class Backbone(nn.Module):
    """An encoder built from a :class:`BackboneSpec`; subclasses register under ``family``."""

    family: ClassVar[str]
    spatial_dims_supported: ClassVar[tuple[int, ...]] = (2,)
    Options: ClassVar[type[BaseModel]] = NoOptions
    feature_dim: int
    feature_channels: tuple[int, ...]
    feature_strides: tuple[int, ...]

    def __init__(self, spec: BackboneSpec | None = None) -> None:
        super().__init__()
        # A hand-made subclass (a test double, a user's own encoder) may skip the spec; registered families never do.
        self.spec = spec if spec is not None else BackboneSpec(getattr(self, "family", type(self).__name__))
        self.name: str = self.spec.family
        self.in_channels: int = self.spec.in_channels
        self.spatial_dims: int = self.spec.spatial_dims

    @classmethod
    def resolve(cls, spec: BackboneSpec) -> BackboneSpec:
        """Fill in automatic choices (stem, patch size) so the recorded spec rebuilds the same network."""
        return spec

    @classmethod
    def options(cls, spec: BackboneSpec) -> Any:
        """The family's validated options (pydantic model)."""
        return cls.Options(**spec.options)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def resnet_feature_maps(net: nn.Module, images: torch.Tensor, activation: nn.Module,
                        max_pool: bool = True) -> list[torch.Tensor]:
    """The stem's and the four stages' outputs of a torchvision or MONAI ResNet (2D or 3D), high to low resolution.

    The stem is ``activation(bn1(conv1(x)))`` (torchvision names its activation ``relu``, MONAI ``act``); the stem's
    max-pool runs unless ``max_pool`` is False (MONAI's ``no_max_pool``).
    """
    stem = activation(net.bn1(net.conv1(images)))
    x1 = net.layer1(net.maxpool(stem) if max_pool else stem)
    x2 = net.layer2(x1)
    x3 = net.layer3(x2)
    return [stem, x1, x2, x3, net.layer4(x3)]
