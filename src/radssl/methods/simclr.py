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
    preset = {
        # Chosen on VALIDATION AUC only by benchmarks/preset_sweep.py (benchmarks/sweeps/simclr.json; results in
        # benchmarks/results/preset_sweep_simclr_breastmnist_22272img.json): BreastMNIST, ResNet-18 standard stem,
        # 28 px, batch 256, 22,272 images seen (87 steps, lightly's example budget), linear probe at 1/10/100 %.
        # Mean val AUC: this recipe .832; lightly's example recipe (tau 0.5) .801; the former defaults (LARS 0.3,
        # tau 0.1, rotation + blur, warm-up + cosine) .793. Mild crops (50-100 %) and no rotation, blur or noise:
        # a likely reason is that at 28 px a blurred or tightly cropped lesion is gone and the pair teaches nothing.
        # One seed and 78 validation images: the ranking of the top candidates is within noise; the old defaults'
        # deficit (.04 here) agrees with the earlier independent test-set measurement (issue 7, point 8).
        # A short-budget CPU preset for 2D radiographs (volumes: see configs/vesselmnist3d.yaml); no long GPU budget
        # could be swept here (the paper's LARS 0.3 x B/256 with warm-up + cosine remains the usual choice for
        # hundreds of epochs).
        "method": {"temperature": 0.2},
        "views": {"crop_scale": (0.5, 1.0), "rotation_degrees": 0.0, "blur_p": 0.0, "noise_p": 0.0},
        "optim": {"optimizer": "sgd", "lr": 0.06, "lr_scaling": "none", "momentum": 0.0, "weight_decay": 0.0,
                  "warmup_fraction": 0.0, "min_lr_ratio": 1.0},
    }

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

    def project(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(images))

    def forward(self, batch: ViewBatch) -> MethodOutput:
        first, second = batch.views
        projections = self.project(torch.cat([first, second], dim=0))
        z0, z1 = projections.float().chunk(2, dim=0)
        return {"loss": self.criterion(z0, z1)}
