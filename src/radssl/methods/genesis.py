"""Models Genesis: restore images from four corruptions (Zhou et al., MICCAI 2019; MedIA 2021, arXiv:2004.07882).

The ``restoration`` view policy corrupts each (geometrically augmented) image with local pixel shuffling, a
non-linear Bézier intensity mapping and in- or out-painting, and hands over the uncorrupted image as the target;
an encoder–decoder learns to restore it (the reference: a 3D U-Net, MSE loss). Only the encoder transfers
(``transfer_backbone`` = the backbone), as Models Genesis fine-tunes its encoder for classification and the whole
U-Net for segmentation.

Nothing here is lightly's (it has no restoration method). Ours: the encoder is any radssl backbone (its
``forward_features`` maps), the decoder is :class:`radssl.models.decoders.UNetDecoder` (reusable by segmentation),
2D and 3D alike. The target is normalised like the input, so the network's output is linear (the reference ends in a
sigmoid because its targets are in [0, 1]); the loss is MSE as in the reference, L1 optional.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from radssl.errors import ConfigError
from radssl.methods.base import MethodOutput, MethodParams, SSLMethod
from radssl.models.base import Backbone
from radssl.models.decoders import UNetDecoder
from radssl.views.batch import ViewBatch, ViewRequirements


class ModelsGenesisParams(MethodParams):
    loss: Literal["mse", "l1"] = Field("mse", description="restoration loss (reference: MSE)")
    decoder_channels: list[int] | None = Field(
        None, description="channels per decoder stage, high → low resolution; null = the encoder's (≤ 256)")
    decoder_norm: Literal["batch", "instance", "group"] = Field("batch", description="reference U-Net: batch norm")


class ModelsGenesis(SSLMethod):
    """Encoder (the backbone) + U-Net decoder restoring the uncorrupted image; the encoder transfers."""

    name = "models_genesis"
    Params = ModelsGenesisParams
    family = "generative"
    paper = "Zhou et al., MICCAI 2019 / Medical Image Analysis 2021 (arXiv:2004.07882)"

    def __init__(self, backbone: Backbone, params: ModelsGenesisParams) -> None:
        super().__init__(backbone, params)
        channels = getattr(backbone, "feature_channels", None)
        strides = getattr(backbone, "feature_strides", None)
        if not channels or not strides:
            raise ConfigError(f"models_genesis needs a backbone with multi-scale features (feature_channels, "
                              f"feature_strides); '{backbone.spec.family}' has none")
        self.decoder = UNetDecoder(channels, strides, out_channels=backbone.in_channels,
                                   spatial_dims=backbone.spatial_dims, decoder_channels=params.decoder_channels,
                                   norm=params.decoder_norm)

    @classmethod
    def requirements(cls, params: ModelsGenesisParams) -> ViewRequirements:
        return ViewRequirements(min_views=1, max_views=1, targets=True, spatial_dims=(2, 3))

    def restore(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``images`` (B, C, *spatial), same shape."""
        return self.decoder(self.backbone.forward_features(images), images.shape[2:])

    def forward(self, batch: ViewBatch) -> MethodOutput:
        if not batch.targets:
            raise ConfigError("models_genesis needs restoration targets — use views.policy restoration")
        restored = self.restore(batch.views[0]).float()
        target = batch.targets[0].float()
        loss = F.mse_loss(restored, target) if self.params.loss == "mse" else F.l1_loss(restored, target)
        return {"loss": loss, "reconstruction_loss": loss.detach()}
