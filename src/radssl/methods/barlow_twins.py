"""Barlow Twins: make the cross-correlation of the two views' embeddings the identity (Zbontar et al., ICML 2021,
arXiv:2103.03230).

Loss (paper eq. 1): C = Z̃ᴬᵀ Z̃ᴮ / N with each embedding dimension normalised over the batch; L = Σᵢ (1 − Cᵢᵢ)²
(invariance) + λ Σᵢ Σⱼ≠ᵢ Cᵢⱼ² (redundancy reduction).

What is lightly's: the projector (``BarlowTwinsProjectionHead``: three linear layers, BN + ReLU after the first two)
and the loss (``BarlowTwinsLoss``), and the differentiable all-gather. What is ours: under DDP the correlation matrix
is that of the *global* batch, as in the reference code (facebookresearch/barlowtwins: SyncBatchNorm-normalised
embeddings, C summed over processes and divided by the global batch). lightly's own ``gather_distributed`` instead
averages per-process matrices, each normalised with its process's batch statistics, which is not the same matrix;
so we gather the embeddings (lightly's autograd-aware ``gather``) and apply lightly's loss to the global batch. Its
gradient on each process is ``world_size`` × the true one, which DDP's gradient averaging cancels (as SimCLR's gather).
The two terms are logged: the invariance term is computed from the normalised embeddings' diagonal (O(N·D), no
second D×D product) and the redundancy term follows from the loss, ``(loss − invariance) / λ``.

Radiology defaults: projector widths 2048 (paper 8192; 2048 is what lightly's ResNet-18 example and CIFAR-10
benchmark use); λ = 0.0051 (the reference code's default, "5·10⁻³" in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.utils import dist
from pydantic import Field

from radssl.methods.base import MethodOutput, MethodParams, SSLMethod
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements


class BarlowTwinsParams(MethodParams):
    lambda_param: float = Field(0.0051, gt=0.0, description="weight λ of the off-diagonal (redundancy) term")
    projection_hidden_dim: int = Field(2048, gt=0, description="projector hidden width (paper 8192)")
    projection_dim: int = Field(2048, gt=0, description="embedding size D of the D×D correlation (paper 8192)")
    gather_distributed: bool = Field(True, description="correlation over the global batch under DDP")


def invariance_term(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """Σᵢ (1 − Cᵢᵢ)² from the diagonal alone, with the batch normalisation lightly's loss uses."""
    a = F.batch_norm(z_a, None, None, training=True)
    b = F.batch_norm(z_b, None, None, training=True)
    diagonal = (a * b).sum(dim=0) / z_a.shape[0]
    return (1.0 - diagonal).pow(2).sum()


class BarlowTwins(SSLMethod):
    name = "barlow_twins"
    Params = BarlowTwinsParams
    family = "non-contrastive"
    paper = "Zbontar et al., ICML 2021 (arXiv:2103.03230)"

    def __init__(self, backbone: Backbone, params: BarlowTwinsParams) -> None:
        super().__init__(backbone, params)
        self.projection_head = BarlowTwinsProjectionHead(
            backbone.feature_dim, params.projection_hidden_dim, params.projection_dim
        )
        self.criterion = BarlowTwinsLoss(lambda_param=params.lambda_param, gather_distributed=False)

    @classmethod
    def requirements(cls, params: BarlowTwinsParams) -> ViewRequirements:
        return ViewRequirements(spatial_dims=(2, 3))

    def forward(self, batch: ViewBatch) -> MethodOutput:
        first, second = batch.views
        # Separate passes: the projector's BatchNorm sees each view's batch, as in the reference.
        z_a, z_b = self.project(first).float(), self.project(second).float()
        if self.params.gather_distributed and dist.world_size() > 1:
            z_a, z_b = torch.cat(dist.gather(z_a), dim=0), torch.cat(dist.gather(z_b), dim=0)
        loss = self.criterion(z_a, z_b)
        with torch.no_grad():
            invariance = invariance_term(z_a, z_b)
            redundancy = (loss - invariance) / self.params.lambda_param
        return {"loss": loss, "invariance": invariance, "redundancy": redundancy}
