"""BYOL: non-contrastive learning with a momentum target network (Grill et al., NeurIPS 2020, arXiv:2006.07733).

Heads, loss and the EMA update are lightly's (``BYOLProjectionHead``, ``BYOLPredictionHead``,
``NegativeCosineSimilarity``, ``update_momentum``). The target momentum follows BYOL's cosine schedule from
``momentum_start`` to ``momentum_end``, computed from the global step so that a resumed run follows exactly the
schedule of an uninterrupted one.
"""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from pydantic import Field, model_validator

from radssl.methods.base import MethodParams, SSLMethod
from radssl.models.backbones import Backbone


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
    num_views = 2

    def __init__(self, backbone: Backbone, params: BYOLParams) -> None:
        super().__init__(backbone, params)
        self.projection_head = BYOLProjectionHead(
            backbone.feature_dim, params.projection_hidden_dim, params.projection_dim
        )
        self.prediction_head = BYOLPredictionHead(
            params.projection_dim, params.prediction_hidden_dim, params.projection_dim
        )
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projection_head = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.target_backbone)
        deactivate_requires_grad(self.target_projection_head)
        self.criterion = NegativeCosineSimilarity()
        self._momentum = params.momentum_start

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        first, second = views
        both = torch.cat([first, second], dim=0)
        predictions = self.prediction_head(self.projection_head(self.backbone(both))).float()
        with torch.no_grad():
            targets = self.target_projection_head(self.target_backbone(both)).float()
        p0, p1 = predictions.chunk(2, dim=0)
        t0, t1 = targets.chunk(2, dim=0)
        # Symmetrised: each view's prediction regresses the other view's target projection.
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))

    def on_step_end(self, step: int, max_steps: int) -> None:
        self._momentum = cosine_schedule(step, max_steps, self.params.momentum_start, self.params.momentum_end)
        update_momentum(self.backbone, self.target_backbone, m=self._momentum)
        update_momentum(self.projection_head, self.target_projection_head, m=self._momentum)

    def diagnostics(self) -> dict[str, float]:
        return {"momentum": float(self._momentum)}
