"""U-Net-style decoders over an encoder's multi-scale feature maps, 2D and 3D.

Used by restoration pretraining (Models Genesis: encoder–decoder, only the encoder transfers) and meant for
segmentation transfer: the input is the list of maps ``Backbone.forward_features`` returns (high → low resolution)
with their ``feature_channels`` / ``feature_strides``; the output is a map with ``out_channels`` channels at the
input's resolution. The decoder walks from the coarsest map up: upsample to the next skip's *actual* size
(interpolation, so odd sizes such as 29×31 and equal strides — a ViT's four maps all at stride 16 — need no special
case), concatenate the skip, two 3×3 conv–norm–ReLU layers (Ronneberger et al., MICCAI 2015; Çiçek et al. 2016 for
3D). After the finest skip, a last block at the input size and a 1×1 convolution give the output.

Why our own and not MONAI's ``BasicUNet``/``FlexibleUNet``: those own their encoder; here the encoder is any radssl
backbone (ResNet, small CNN, ViT, later 3D nets) whose strides and channels are only known from its attributes, and
the sizes must follow the skips exactly. The decoder is ~40 lines of standard layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "instance", "group"]


def _norm(kind: Norm, channels: int, spatial_dims: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 2](channels)
    if kind == "instance":
        return (nn.InstanceNorm2d, nn.InstanceNorm3d)[spatial_dims - 2](channels, affine=True)
    return nn.GroupNorm(min(8, channels), channels)


class ConvBlock(nn.Sequential):
    """Two 3×3(×3) convolutions, each followed by a norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int, norm: Norm) -> None:
        conv = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2]
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels, spatial_dims),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            _norm(norm, out_channels, spatial_dims),
            nn.ReLU(inplace=True),
        )


class UNetDecoder(nn.Module):
    """Decode ``forward_features`` maps back to a full-resolution ``out_channels`` map.

    Args:
        feature_channels: channels of each encoder map, high → low resolution (``Backbone.feature_channels``).
        feature_strides: their strides relative to the input (``Backbone.feature_strides``); used to decide
            whether a final upsampling stage is needed and recorded for users, sizes themselves come from the maps.
        out_channels: channels of the output (image channels for restoration, classes for segmentation).
        spatial_dims: 2 or 3.
        decoder_channels: channels after each decoder stage, high → low resolution like the features (default: the
            skip's own channels, capped at ``max_channels`` to keep wide encoders such as ResNet-50 affordable).
        norm: ``batch`` (default, as Models Genesis' U-Net), ``instance`` (nnU-Net; small 3D batches) or ``group``.
    """

    def __init__(self, feature_channels: Sequence[int], feature_strides: Sequence[int], out_channels: int,
                 spatial_dims: int = 2, decoder_channels: Sequence[int] | None = None, norm: Norm = "batch",
                 max_channels: int = 256) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UNetDecoder spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(feature_channels) == 0 or len(feature_channels) != len(feature_strides):
            raise ValueError(f"UNetDecoder needs one stride per feature map, got channels {list(feature_channels)} "
                             f"and strides {list(feature_strides)}")
        if decoder_channels is None:
            decoder_channels = [min(c, max_channels) for c in feature_channels]
        if len(decoder_channels) != len(feature_channels):
            raise ValueError(f"decoder_channels {list(decoder_channels)} needs one entry per feature map "
                             f"({len(feature_channels)})")
        self.spatial_dims = spatial_dims
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.feature_strides = tuple(int(s) for s in feature_strides)
        self.out_channels = out_channels
        levels = len(feature_channels)
        # Stage i fuses (upsampled stage i+1 output, or the coarsest map itself) with skip i.
        stages = []
        for i in range(levels):
            below = decoder_channels[i + 1] if i + 1 < levels else 0
            stages.append(ConvBlock(feature_channels[i] + below, decoder_channels[i], spatial_dims, norm))
        self.stages = nn.ModuleList(stages)
        finest = decoder_channels[0]
        self.full_resolution = ConvBlock(finest, finest, spatial_dims, norm) if self.feature_strides[0] > 1 else None
        self.head = (nn.Conv2d, nn.Conv3d)[spatial_dims - 2](finest, out_channels, kernel_size=1)
        self._mode = "bilinear" if spatial_dims == 2 else "trilinear"

    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode=self._mode, align_corners=False)

    def forward(self, features: Sequence[torch.Tensor], output_size: Sequence[int]) -> torch.Tensor:
        """``features`` high → low resolution (as ``forward_features`` returns them); output at ``output_size``."""
        if len(features) != len(self.stages):
            raise ValueError(f"UNetDecoder was built for {len(self.stages)} feature maps, got {len(features)}")
        x = self.stages[-1](features[-1])
        for i in range(len(features) - 2, -1, -1):
            skip = features[i]
            x = self.stages[i](torch.cat([self._resize(x, skip.shape[2:]), skip], dim=1))
        x = self._resize(x, output_size)
        if self.full_resolution is not None:
            x = self.full_resolution(x)
        return self.head(x)
