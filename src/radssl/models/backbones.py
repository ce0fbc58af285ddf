"""Encoders that map a batch of 1-channel images to feature vectors.

ResNets come from torchvision (tested, and their parameter names match published ImageNet state dicts, so
``imagenet:<file>`` initialisation loads without renaming). Two adaptations matter for radiology:
- 1-channel input: the first convolution takes ``in_channels`` (usually 1) instead of RGB;
- small images (MedMNIST 28–64 px): the ImageNet stem (7×7 stride-2 conv + max-pool) throws away 75 % of
  the resolution before the first block, so the ``small_input`` stem uses a 3×3 stride-1 conv and no pool
  (as in the CIFAR variants of SimCLR and in the MedMNIST baselines).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

BackboneName = Literal["resnet18", "resnet50", "small_cnn"]
BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "small_cnn")


class Backbone(nn.Module):
    """An encoder plus the size of the feature vector it returns (``feature_dim``)."""

    feature_dim: int
    name: str

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ResNetBackbone(Backbone):
    """torchvision ResNet without its classifier; ``self.net`` keeps torchvision's parameter names."""

    def __init__(self, name: str, in_channels: int = 1, small_input: bool = False) -> None:
        super().__init__()
        factory = {"resnet18": resnet18, "resnet50": resnet50}[name]
        net = factory(weights=None)
        if small_input:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        else:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.feature_dim = int(net.fc.in_features)
        net.fc = nn.Identity()
        self.net = net
        self.name = name
        self.small_input = small_input
        self.in_channels = in_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class SmallCNN(Backbone):
    """A four-stage conv net (≈0.3 M parameters at width 16) for quick CPU runs, demos and tests.

    Why not a tiny ResNet: BatchNorm + ReLU conv stages with stride-2 downsampling train well under SSL, and at
    width 16 every stage costs the same (~5 M multiply-adds at 48 px), so it runs ~15× faster than the
    small-stem ResNet-18 at 28–64 px on a laptop CPU.
    """

    def __init__(self, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        widths = (width, width * 2, width * 4, width * 8)
        layers: list[nn.Module] = []
        previous = in_channels
        for stage, channels in enumerate(widths):
            stride = 1 if stage == 0 else 2
            layers += [
                nn.Conv2d(previous, channels, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            previous = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]
        self.name = "small_cnn"
        self.in_channels = in_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(images)), 1)


def build_backbone(
    name: str, in_channels: int = 1, small_input: bool | None = None, image_size: int | None = None
) -> Backbone:
    """Build a backbone by name.

    ``small_input=None`` chooses the small stem automatically for images of 64 px or less.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone '{name}'; choose one of {list(BACKBONES)}")
    if name == "small_cnn":
        return SmallCNN(in_channels=in_channels)
    if small_input is None:
        small_input = image_size is not None and image_size <= 64
    return ResNetBackbone(name, in_channels=in_channels, small_input=small_input)
