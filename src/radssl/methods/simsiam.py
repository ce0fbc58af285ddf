"""SimSiam: a predictor regresses the stop-gradient projection of the other view (Chen & He, CVPR 2021,
arXiv:2011.10566).

Loss (paper eq. 4): ½·D(p₁, stopgrad(z₂)) + ½·D(p₂, stopgrad(z₁)) with D the negative cosine similarity. No negatives,
no momentum encoder: the stop-gradient is what prevents collapse (the paper's Sec. 4.1), so the projections used as
targets are detached and only the predictor side carries gradient.

What is lightly's: the heads (``SimSiamProjectionHead``: 3 layers, BN on every layer, affine-free BN at the output;
``SimSiamPredictionHead``: 2-layer bottleneck) and the loss (``NegativeCosineSimilarity``). What is ours: the 2-layer
projector of the paper's CIFAR-10 setting (built from lightly's ``ProjectionHead`` with the same output layer), the
default for the 28–64 px images radssl targets (``projection_layers: 3`` gives the ImageNet head), and the logged
``output_std``: the per-channel standard deviation of the ℓ₂-normalised projections, the collapse monitor of the
paper's Fig. 2 (≈ 1/√dim when healthy, → 0 when collapsed). The views go through the encoder in separate passes, so
BatchNorm statistics are per view as in the reference code (facebookresearch/simsiam).

Not reproduced: the paper's optional fixed learning rate of the predictor (``--fix-pred-lr``), which needs a
per-parameter-group LR schedule that radssl's engine does not offer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from lightly.models.modules.heads import ProjectionHead
from pydantic import Field

from radssl.methods.base import MethodOutput, MethodParams, SSLMethod
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements


class SimSiamParams(MethodParams):
    projection_layers: Literal[2, 3] = Field(2, description="projector depth: 2 = paper's CIFAR-10, 3 = ImageNet")
    projection_hidden_dim: int = Field(2048, gt=0, description="projector hidden width (paper 2048)")
    projection_dim: int = Field(2048, gt=0, description="projection / prediction size (paper 2048)")
    prediction_hidden_dim: int = Field(512, gt=0, description="predictor bottleneck (paper 512 = dim / 4)")


class SimSiam(SSLMethod):
    name = "simsiam"
    Params = SimSiamParams
    family = "non-contrastive"
    paper = "Chen & He, CVPR 2021 (arXiv:2011.10566)"

    def __init__(self, backbone: Backbone, params: SimSiamParams) -> None:
        super().__init__(backbone, params)
        hidden, dim = params.projection_hidden_dim, params.projection_dim
        if params.projection_layers == 3:
            self.projection_head = SimSiamProjectionHead(backbone.feature_dim, hidden, dim)
        else:
            self.projection_head = ProjectionHead([
                (backbone.feature_dim, hidden, torch.nn.BatchNorm1d(hidden), torch.nn.ReLU()),
                (hidden, dim, torch.nn.BatchNorm1d(dim, affine=False), None),
            ])
        self.prediction_head = SimSiamPredictionHead(dim, params.prediction_hidden_dim, dim)
        self.criterion = NegativeCosineSimilarity()

    @classmethod
    def requirements(cls, params: SimSiamParams) -> ViewRequirements:
        return ViewRequirements(spatial_dims=(2, 3))

    def forward(self, batch: ViewBatch) -> MethodOutput:
        first, second = batch.views
        z1, z2 = self.project(first), self.project(second)
        p1, p2 = self.prediction_head(z1).float(), self.prediction_head(z2).float()
        z1, z2 = z1.float().detach(), z2.float().detach()  # the stop-gradient
        loss = 0.5 * (self.criterion(p1, z2) + self.criterion(p2, z1))
        with torch.no_grad():
            output_std = F.normalize(z1, dim=1).std(dim=0).mean()
        return {"loss": loss, "output_std": output_std}
