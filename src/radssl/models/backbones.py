"""Convolutional encoders for 1-channel (or multi-sequence) radiology images: torchvision ResNets and a small CNN.

ResNets come from torchvision (tested, and their parameter names match published ImageNet state dicts, so
``imagenet:<file>`` initialisation loads without renaming). Two adaptations matter for radiology:
- 1-channel input: the first convolution takes ``in_channels`` (usually 1) instead of RGB;
- small images (MedMNIST 28–64 px): the ImageNet stem (7×7 stride-2 conv + max-pool) throws away 75 % of
  the resolution before the first block, so the ``small`` stem uses a 3×3 stride-1 conv and no pool
  (as in the CIFAR variants of SimCLR and in the MedMNIST baselines). ``stem: null`` picks it for ≤ 64 px images.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision.models import resnet18, resnet50

from radssl.models.base import Backbone, resnet_feature_maps
from radssl.models.spec import BackboneSpec

SMALL_STEM_MAX_SIZE = 64
"""Images of at most this many pixels per side get the small stem when the stem is automatic."""


class _ResNet(Backbone):
    """torchvision ResNet without its classifier; ``self.net`` keeps torchvision's parameter names."""

    _factory = staticmethod(resnet18)

    @classmethod
    def resolve(cls, spec: BackboneSpec) -> BackboneSpec:
        if spec.stem is not None:
            return spec
        small = spec.image_size is not None and max(spec.image_size) <= SMALL_STEM_MAX_SIZE
        return replace(spec, stem="small" if small else "standard")

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        net = self._factory(weights=None)
        if spec.stem == "small":
            net.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.feature_dim = int(net.fc.in_features)
        net.fc = nn.Identity()
        self.net = net
        expansion = self.feature_dim // 512
        self.feature_channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.feature_strides = (1, 1, 2, 4, 8) if spec.stem == "small" else (2, 4, 8, 16, 32)

    @property
    def small_input(self) -> bool:
        return self.spec.stem == "small"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return resnet_feature_maps(self.net, images, self.net.relu)


class ResNet18(_ResNet):
    family = "resnet18"
    _factory = staticmethod(resnet18)


class ResNet50(_ResNet):
    family = "resnet50"
    _factory = staticmethod(resnet50)


class SmallCNNOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(16, gt=0, description="channels of the first stage (doubled per stage)")


class SmallCNN(Backbone):
    """A four-stage conv net (≈0.3 M parameters at width 16 in 2D) for quick CPU runs, demos and tests.

    Why not a tiny ResNet: BatchNorm + ReLU conv stages with stride-2 downsampling train well under SSL, and at
    width 16 every stage costs the same (~5 M multiply-adds at 48 px), so it runs ~15× faster than the
    small-stem ResNet-18 at 28–64 px on a laptop CPU. One network for 2D and 3D, parametrised by the spec's spatial
    dims (as MONAI's networks are): ``small_cnn_3d`` is this class with Conv3d stages and a stem choice.
    """

    family = "small_cnn"
    Options = SmallCNNOptions

    def first_stride(self, spec: BackboneSpec) -> int:
        """Stride of the first stage (2D: always full resolution)."""
        return 1

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        width = self.options(spec).width
        widths = (width, width * 2, width * 4, width * 8)
        conv, norm, pool = ((nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d) if spec.spatial_dims == 2
                            else (nn.Conv3d, nn.BatchNorm3d, nn.AdaptiveAvgPool3d))
        first = self.first_stride(spec)
        stages: list[nn.Module] = []
        previous = spec.in_channels
        for stage, channels in enumerate(widths):
            stages.append(nn.Sequential(
                conv(previous, channels, 3, stride=first if stage == 0 else 2, padding=1, bias=False),
                norm(channels),
                nn.ReLU(inplace=True),
                conv(channels, channels, 3, padding=1, bias=False),
                norm(channels),
                nn.ReLU(inplace=True),
            ))
            previous = channels
        self.stages = nn.ModuleList(stages)
        self.pool = pool(1)
        self.feature_dim = widths[-1]
        self.feature_channels = widths
        self.feature_strides = tuple(first * 2**i for i in range(4))

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        x = images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for stage in self.stages:
            x = stage(x)
        return torch.flatten(self.pool(x), 1)
