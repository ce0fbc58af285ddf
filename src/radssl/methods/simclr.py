"""SimCLR: contrastive learning with in-batch negatives (Chen et al., ICML 2020, arXiv:2002.05709).

Loss and projection head are lightly's (NT-Xent, ``SimCLRProjectionHead``). Both views go through the backbone in
one concatenated pass: one large batch is faster than two small ones on every device, and BatchNorm then sees
both views, as in the reference implementation. Under DDP, negatives are gathered across processes by default
(``gather_distributed``), so the effective number of negatives is the global batch.
"""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from pydantic import Field

from radssl.methods.base import MethodOutput, MethodParams, SSLMethod
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements


class SimCLRParams(MethodParams):
    temperature: float = Field(0.1, gt=0.0,
                               description="NT-Xent temperature (the preset sets 0.2, chosen on validation)")
    projection_hidden_dim: int = Field(512, gt=0)
    projection_dim: int = Field(128, gt=0)
    gather_distributed: bool = Field(True, description="gather negatives across DDP processes")


class SimCLR(SSLMethod):
    name = "simclr"
    Params = SimCLRParams
    family = "contrastive"
    paper = "Chen et al., ICML 2020 (arXiv:2002.05709)"

    def __init__(self, backbone: Backbone, params: SimCLRParams) -> None:
        super().__init__(backbone, params)
        self.projection_head = SimCLRProjectionHead(
            input_dim=backbone.feature_dim,
            hidden_dim=params.projection_hidden_dim,
            output_dim=params.projection_dim,
        )
        self.criterion = NTXentLoss(temperature=params.temperature, gather_distributed=params.gather_distributed)

    @classmethod
    def requirements(cls, params: SimCLRParams) -> ViewRequirements:
        return ViewRequirements(spatial_dims=(2, 3))

    def forward(self, batch: ViewBatch) -> MethodOutput:
        first, second = batch.views
        projections = self.project(torch.cat([first, second], dim=0))
        z0, z1 = projections.float().chunk(2, dim=0)
        return {"loss": self.criterion(z0, z1)}
