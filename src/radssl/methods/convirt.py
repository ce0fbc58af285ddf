"""ConVIRT: contrastive learning of image representations from paired reports (Zhang et al., 2020, arXiv:2010.00747).

An image encoder and a text encoder, each followed by a **non-linear** projection (Linear–ReLU–Linear), trained with
a bidirectional InfoNCE: ``λ · L(image→text) + (1 − λ) · L(text→image)`` at temperature τ. The paper's chest X-ray
setting: τ = 0.1, λ = 0.75, projection to 512. Here the projection defaults to 128 (small CPU models); the loss is
:func:`radssl.methods.image_text.image_text_loss`, which also keeps identical reports apart from the negatives.
"""

from __future__ import annotations

import torch
from lightly.models.modules.heads import ProjectionHead
from pydantic import Field
from torch import nn

from radssl.methods.image_text import ImageTextMethod, ImageTextParams
from radssl.models.base import Backbone


class ConVIRTParams(ImageTextParams):
    temperature: float = Field(0.1, gt=0.0, description="τ of both InfoNCE terms (paper: 0.1)")
    image_to_text_weight: float = Field(0.75, ge=0.0, le=1.0, description="λ: weight of image→text (paper: 0.75)")
    projection_hidden_dim: int = Field(512, gt=0)


class ConVIRT(ImageTextMethod):
    name = "convirt"
    Params = ConVIRTParams
    paper = "Zhang et al., MLHC 2022 / arXiv:2010.00747 (2020)"

    def __init__(self, backbone: Backbone, params: ConVIRTParams) -> None:
        super().__init__(backbone, params)
        self.register_buffer("_scale", torch.tensor(1.0 / params.temperature), persistent=False)

    def make_projection(self, input_dim: int, params: ConVIRTParams) -> nn.Module:  # type: ignore[override]
        # lightly's generic head: Linear → ReLU → Linear, no BatchNorm (as in the paper's g_v / g_u).
        return ProjectionHead([
            (input_dim, params.projection_hidden_dim, None, nn.ReLU()),
            (params.projection_hidden_dim, params.projection_dim, None, None),
        ])

    def logit_scale(self) -> torch.Tensor:
        return self._scale

    def image_to_text_weight(self) -> float:
        return float(self.params.image_to_text_weight)
