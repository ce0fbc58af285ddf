"""BYOL: non-contrastive learning with a momentum target network (Grill et al., NeurIPS 2020, arXiv:2006.07733).

Heads and loss are lightly's (``BYOLProjectionHead``, ``BYOLPredictionHead``, ``NegativeCosineSimilarity``). The
target backbone and projection head are declared as momentum pairs, so the engine applies BYOL's cosine EMA
schedule from ``momentum_start`` to ``momentum_end`` as a function of the global step.

Each view goes through the online and the target network in its own pass, so BatchNorm normalises a view with the
statistics of that view's batch only, as in the paper's implementation (each augmented view is a separate batch)
and in radssl's SimSiam, Barlow Twins, VICReg and MoCo v3. One pass over both views concatenated would normalise
every image with statistics shared with the other view of itself — a cue the paper's networks do not get.
"""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from pydantic import Field, model_validator
from torch import nn

from radssl.methods.base import MethodOutput, MethodParams, SSLMethod, frozen_copy
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements


class BYOLParams(MethodParams):
    projection_hidden_dim: int = Field(1024, gt=0)
    projection_dim: int = Field(256, gt=0)
    prediction_hidden_dim: int = Field(1024, gt=0)
    momentum_start: float = Field(0.99, ge=0.0, le=1.0)
    momentum_end: float = Field(1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> "BYOLParams":
        if self.momentum_end < self.momentum_start:
            raise ValueError("momentum_end must be >= momentum_start")
        return self


class BYOL(SSLMethod):
    name = "byol"
    Params = BYOLParams
    family = "non-contrastive"
    paper = "Grill et al., NeurIPS 2020 (arXiv:2006.07733)"

    def __init__(self, backbone: Backbone, params: BYOLParams) -> None:
        super().__init__(backbone, params)
        self.projection_head = BYOLProjectionHead(
            backbone.feature_dim, params.projection_hidden_dim, params.projection_dim
        )
        self.prediction_head = BYOLPredictionHead(
            params.projection_dim, params.prediction_hidden_dim, params.projection_dim
        )
        self.target_backbone = frozen_copy(backbone)
        self.target_projection_head = frozen_copy(self.projection_head)
        self.criterion = NegativeCosineSimilarity()

    @classmethod
    def requirements(cls, params: BYOLParams) -> ViewRequirements:
        return ViewRequirements(spatial_dims=(2, 3))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projection_head, self.target_projection_head)]

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Online network: backbone → projection → prediction."""
        return self.prediction_head(self.projection_head(self.backbone(images))).float()

    @torch.no_grad()
    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Momentum target network: backbone → projection (no gradient)."""
        return self.target_projection_head(self.target_backbone(images)).float()

    def forward(self, batch: ViewBatch) -> MethodOutput:
        first, second = batch.views
        # One pass per view: BatchNorm statistics are per view (see the module docstring).
        p0, p1 = self.predict(first), self.predict(second)
        t0, t1 = self.target(first), self.target(second)
        # Symmetrised: each view's prediction regresses the other view's target projection.
        return {"loss": 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))}
