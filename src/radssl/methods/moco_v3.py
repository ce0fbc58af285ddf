"""MoCo v3: in-batch contrast of a predictor's queries against momentum keys (Chen, Xie & He, ICCV 2021,
arXiv:2104.02057).

No queue: each query (online backbone → projector → predictor) is contrasted with the momentum encoder's keys of
the *other* view of every image in the (global) batch; the loss is symmetric and scaled by 2τ as in the paper's
Algorithm 1 and reference code (``ctr(q1, k2) + ctr(q2, k1)``, ``ctr = CrossEntropy(q·kᵀ/τ, labels) · 2τ``). Under
DDP the keys of every process are gathered (no gradient flows through keys, as in the reference), so each query
sees the global batch's negatives; ``gather_distributed`` (default on) switches this off.

What is lightly's: the MLP building block (``ProjectionHead``), the key gather (``concat_all_gather``), rank and
world size, and the EMA. What is ours: the 2τ-scaled symmetric loss (lightly has no MoCo v3 loss — its
``NTXentLoss`` is SimCLR's 2N-sample form), and the heads built with the reference's exact layer layout
(facebookresearch/moco-v3 ``builder.py``): bias-free linear layers, BN + ReLU on hidden layers, an affine-free BN
on the projector's output; for CNNs (the reference's ResNet) a 2-layer projector and a predictor without output
BN, for ViTs a 3-layer projector and a predictor with output BN. lightly's ``MoCoProjectionHead`` differs (affine
output BN, and output BN on the ResNet predictor too), so it is not used.

Backbone-dependent defaults (``None`` = automatic, from the reference code): projector and predictor layout as above;
for ViTs the patch embedding is frozen at its random init (the paper's "random patch projection",
``--stop-grad-conv1``) — the trained backbone object then keeps ``requires_grad=False`` on it; a backbone rebuilt
from the checkpoint (transfer) does not. Temperature 0.2: the paper's ViT setting (CONFIG.md ``--moco-t=.2``), and
MoCo v2's; the reference's ResNet default of 1.0 goes with batch 4096 (set ``temperature: 1.0`` for it). Momentum:
0.99 → 1 by a cosine (``--moco-m-cos``). MLP widths: 1024 hidden (paper 4096; scaled like radssl's BYOL), 256
output (paper). The two views go through the encoders in separate passes, so BatchNorm statistics are per view as
in the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import concat_all_gather
from lightly.utils import dist
from pydantic import Field, model_validator
from torch import nn

from radssl.methods.base import MethodOutput, MethodParams, SSLMethod, frozen_copy
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements


class MoCoV3Params(MethodParams):
    temperature: float = Field(0.2, gt=0.0, description="τ (paper's ViT setting; reference ResNet code: 1.0)")
    projection_hidden_dim: int = Field(1024, gt=0, description="projector/predictor hidden width (paper 4096)")
    projection_dim: int = Field(256, gt=0, description="query/key size (paper 256)")
    projection_layers: int | None = Field(None, ge=2, description="projector depth; null = 2 for CNNs, 3 for ViTs")
    freeze_patch_embedding: bool | None = Field(
        None, description="ViT: keep the patch embedding at its random init (paper's stability fix); null = on for "
                          "ViTs")
    momentum_start: float = Field(0.99, ge=0.0, le=1.0)
    momentum_end: float = Field(1.0, ge=0.0, le=1.0)
    gather_distributed: bool = Field(True, description="contrast against the keys of every DDP process")

    @model_validator(mode="after")
    def _ordered(self) -> "MoCoV3Params":
        if self.momentum_end < self.momentum_start:
            raise ValueError("momentum_end must be >= momentum_start")
        return self


def patch_embedding(backbone: nn.Module) -> nn.Module | None:
    """The patch embedding of a ViT backbone (radssl's wrap timm's model as ``.vit``); None for CNNs."""
    return getattr(getattr(backbone, "vit", backbone), "patch_embed", None)


def reference_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool) -> ProjectionHead:
    """moco-v3's ``_build_mlp``: bias-free linears, BN+ReLU between, optional affine-free BN at the output."""
    blocks = []
    for layer in range(num_layers):
        d_in = input_dim if layer == 0 else hidden_dim
        if layer < num_layers - 1:
            blocks.append((d_in, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(), False))
        else:
            norm = nn.BatchNorm1d(output_dim, affine=False) if last_bn else None
            blocks.append((d_in, output_dim, norm, None, False))
    return ProjectionHead(blocks)


def moco_v3_contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float,
                             gather_distributed: bool) -> torch.Tensor:
    """CrossEntropy(q·kᵀ/τ) · 2τ with the positive of query i at key i of this process's slice of the batch."""
    queries = F.normalize(queries, dim=1)
    keys = F.normalize(keys, dim=1)
    offset = 0
    if gather_distributed and dist.world_size() > 1:
        keys = concat_all_gather(keys.contiguous())  # keys carry no gradient (momentum encoder), as the reference
        offset = dist.rank() * queries.shape[0]
    logits = queries @ keys.T / temperature
    labels = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


class MoCoV3(SSLMethod):
    name = "moco_v3"
    Params = MoCoV3Params
    family = "contrastive"
    paper = "Chen, Xie & He, ICCV 2021 (arXiv:2104.02057)"

    def __init__(self, backbone: Backbone, params: MoCoV3Params) -> None:
        super().__init__(backbone, params)
        vit = patch_embedding(backbone) is not None
        layers = params.projection_layers if params.projection_layers is not None else (3 if vit else 2)
        freeze = params.freeze_patch_embedding if params.freeze_patch_embedding is not None else vit
        if freeze:
            embedding = patch_embedding(backbone)
            if embedding is None:
                raise ValueError(f"moco_v3: freeze_patch_embedding needs a ViT backbone, got '{backbone.name}'")
            for parameter in embedding.parameters():
                parameter.requires_grad = False
        hidden, out = params.projection_hidden_dim, params.projection_dim
        self.projection_head = reference_mlp(layers, backbone.feature_dim, hidden, out, last_bn=True)
        self.prediction_head = reference_mlp(2, out, hidden, out, last_bn=vit)
        self.target_backbone = frozen_copy(backbone)
        self.target_projection_head = frozen_copy(self.projection_head)

    @classmethod
    def requirements(cls, params: MoCoV3Params) -> ViewRequirements:
        return ViewRequirements(spatial_dims=(2, 3))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projection_head, self.target_projection_head)]

    def query(self, images: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(images)))

    @torch.no_grad()
    def key(self, images: torch.Tensor) -> torch.Tensor:
        return self.target_projection_head(self.target_backbone(images))

    def forward(self, batch: ViewBatch) -> MethodOutput:
        first, second = batch.views
        q1, q2 = self.query(first).float(), self.query(second).float()
        k1, k2 = self.key(first).float(), self.key(second).float()
        gather = self.params.gather_distributed
        loss = (moco_v3_contrastive_loss(q1, k2, self.params.temperature, gather)
                + moco_v3_contrastive_loss(q2, k1, self.params.temperature, gather))
        with torch.no_grad():
            positive = 0.5 * (F.cosine_similarity(q1, k2).mean() + F.cosine_similarity(q2, k1).mean())
        return {"loss": loss, "positive_similarity": positive}
