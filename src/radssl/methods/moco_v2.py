"""MoCo v2: contrast against a queue of keys from a momentum encoder (He et al., CVPR 2020, arXiv:1911.05722;
Chen et al. 2020, arXiv:2003.04297).

The query encoder (``backbone`` + ``projection_head``) embeds the first view; the momentum encoder
(``target_backbone`` + ``target_projection_head``, declared as momentum pairs so the engine applies the EMA) embeds
the second view as the positive key; the negatives are a FIFO queue of the keys of previous steps (under DDP, of
every process: keys are gathered before they are enqueued, as MoCo's ``concat_all_gather``). Loss: InfoNCE (MoCo
eq. 1), −log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ exp(q·queue/τ)) on ℓ₂-normalised vectors — asymmetric, as in the paper.

What is lightly's: the MoCo v2 MLP head (``MoCoProjectionHead``: 2 layers, ReLU, no BN), the gather
(``concat_all_gather``) and the EMA. What is ours, and why:

- The queue (``KeyQueue``) and the InfoNCE written out. lightly's ``NTXentLoss`` + ``MemoryBankModule`` compute the
  same loss (a test checks it) but (i) register the queue as a *non-persistent* buffer — it would be missing from the
  checkpoint and a resumed run would restart from a random queue; ours is checkpointed and resume is bit-for-bit —
  and (ii) cannot exclude the query's *own* image from the negatives. Radiology sets are small: a 4096-key queue
  holds 87 % of PneumoniaMNIST's 4 708 training images and 7.5 copies of each of BreastMNIST's 546, so a query meets
  earlier keys of its own image (and of its pair partner) as "negatives" — on a 128-image set the loss sat at chance
  and then rose as the momentum encoder made those copies ever more alike. We store each key's source row and mask
  those entries (``exclude_own_keys``). In the paper's regime (65 536 keys ≪ 1.28 M images) no entry is ever masked,
  so this changes nothing there.
- The queue starts, as in the reference code (facebookresearch/moco ``moco/builder.py``: ``torch.randn(dim, K)``
  normalised), from random unit vectors, marked as made from no image (row −1). An earlier version started it from
  the first step's keys tiled to its size; without ``exclude_own_keys`` that put each query's own key ~K/B times
  among its negatives. The random start costs a transient of ``queue_size / batch`` steps while real keys replace
  the easy random negatives.
- Shuffling BN (MoCo Sec. 3.3): with the query and its positive key normalised with the statistics of the same
  batch, the positive is told from the queue's negatives by its batch statistics ("cheating"). MoCo shuffles the
  keys across 8 GPUs of 32 samples each; on one device we emulate this by encoding the keys in groups of
  about ``shuffle_bn_group`` samples, each with its own BN statistics (the queries use the whole batch), as
  lightly's CIFAR-10 benchmark does with split BatchNorm. The batch is cut into ⌈B / group⌉ groups of near-equal
  size, so no group is a single sample (BatchNorm cannot train on one) whatever the batch size. Skipped when the
  encoder has no BatchNorm (ViT).

Radiology defaults that differ from the ImageNet paper, and why: ``queue_size`` 4096 (paper 65 536 for 1.28 M images;
lightly's CIFAR-10 setting); the EMA coefficient follows MoCo v3's cosine 0.99 → 1 (MoCo v2's constant 0.999 is
tuned for ~500 k ImageNet steps; runs here are 10³–10⁴ steps; set both ends to 0.999 for the paper's); the MLP
hidden width is 512 (the paper's equals ResNet-50's 2048-d features; 512 is ResNet-18's, as in lightly's CIFAR-10
example).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import concat_all_gather
from lightly.utils import dist
from pydantic import Field, model_validator
from torch import nn

from radssl.methods.base import MethodOutput, MethodParams, SSLMethod, frozen_copy
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements


class KeyQueue(nn.Module):
    """FIFO of the last ``size`` keys and the rows (stored images) they were made from; all buffers persistent.

    Starts from random unit vectors (MoCo's reference initialisation) with ``rows`` −1: made from no image, so never
    excluded as a query's own. ``push`` overwrites the oldest entries, wrapping around.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("rows", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @torch.no_grad()
    def push(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        keys, rows = keys[-self.size :], rows[-self.size :]  # a batch larger than the queue keeps its last keys
        positions = (self.pointer + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.keys[positions] = keys.to(self.keys.dtype)
        self.rows[positions] = rows.to(self.rows.dtype)
        self.pointer.copy_((self.pointer + keys.shape[0]) % self.size)

    @torch.no_grad()
    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, rows) to contrast against: a copy of the queue before this step's keys are pushed."""
        return self.keys.clone(), self.rows.clone()

    @torch.no_grad()
    def fill(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite every entry (tests set a known queue this way); the pointer stays where it is."""
        self.keys.copy_(keys)
        self.rows.copy_(rows)


def info_nce_with_queue(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float,
                        excluded: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo's InfoNCE: logits [q·k⁺, q·queue]/τ on normalised vectors, target 0; ``excluded`` (B, K) masks negatives."""
    queries = F.normalize(queries, dim=1)
    keys = F.normalize(keys, dim=1)
    positive = (queries * keys).sum(dim=1, keepdim=True)
    negatives = queries @ queue.T
    if excluded is not None:
        negatives = negatives.masked_fill(excluded, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device))


class MoCoV2Params(MethodParams):
    temperature: float = Field(0.2, gt=0.0, description="InfoNCE temperature τ (MoCo v2: 0.2)")
    queue_size: int = Field(4096, gt=0, description="negatives in the queue (paper 65536 for ImageNet); keep it "
                                                    "well below the number of pretraining images")
    projection_hidden_dim: int = Field(512, gt=0, description="MLP head hidden width (paper 2048 = ResNet-50's)")
    projection_dim: int = Field(128, gt=0, description="embedding size of queries/keys (paper 128)")
    momentum_start: float = Field(0.99, ge=0.0, le=1.0, description="EMA coefficient at step 0 (paper: 0.999)")
    momentum_end: float = Field(1.0, ge=0.0, le=1.0, description="EMA coefficient at the end, cosine schedule")
    shuffle_bn_group: int = Field(32, ge=0, description="keys are encoded in groups of about this many samples "
                                                        "(⌈B/group⌉ groups of near-equal size), each with its own "
                                                        "BN statistics (MoCo's shuffling BN: 32 per GPU); 0 = the "
                                                        "whole batch (no emulation); 1 is refused (BN needs 2)")
    exclude_own_keys: bool = Field(True, description="drop queue entries made from the query's own image or its "
                                                     "partner from its negatives (inactive when queue ≪ data)")
    gather_distributed: bool = Field(True, description="enqueue the keys of every DDP process (global queue)")

    @model_validator(mode="after")
    def _ordered(self) -> "MoCoV2Params":
        if self.momentum_end < self.momentum_start:
            raise ValueError("momentum_end must be >= momentum_start")
        if self.shuffle_bn_group == 1:
            raise ValueError("shuffle_bn_group must be 0 (off) or at least 2: BatchNorm cannot train on 1 sample")
        return self


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class MoCoV2(SSLMethod):
    name = "moco_v2"
    Params = MoCoV2Params
    family = "contrastive"
    paper = "He et al., CVPR 2020 (arXiv:1911.05722); Chen et al. 2020 (arXiv:2003.04297)"

    def __init__(self, backbone: Backbone, params: MoCoV2Params) -> None:
        super().__init__(backbone, params)
        self.projection_head = MoCoProjectionHead(
            backbone.feature_dim, params.projection_hidden_dim, params.projection_dim
        )
        self.target_backbone = frozen_copy(backbone)
        self.target_projection_head = frozen_copy(self.projection_head)
        self.queue = KeyQueue(params.queue_size, params.projection_dim)
        self._split_keys = params.shuffle_bn_group > 0 and _has_batch_norm(self.target_backbone)

    @classmethod
    def requirements(cls, params: MoCoV2Params) -> ViewRequirements:
        return ViewRequirements(spatial_dims=(2, 3))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projection_head, self.target_projection_head)]

    @torch.no_grad()
    def encode_keys(self, images: torch.Tensor) -> torch.Tensor:
        """Momentum-encoder keys; in ⌈B / shuffle_bn_group⌉ BN groups of near-equal size (shuffling BN emulated)."""
        group = self.params.shuffle_bn_group
        if self._split_keys and images.shape[0] > group:
            # Near-equal groups (sizes differ by ≤ 1, at most B // 2 groups so each has ≥ 2 samples):
            # ``split(group)`` would leave a 1-sample remainder when B % group == 1, and BatchNorm cannot train on it.
            groups = min(-(-images.shape[0] // group), images.shape[0] // 2)
            features = torch.cat([self.target_backbone(chunk) for chunk in images.tensor_split(groups)])
        else:
            features = self.target_backbone(images)
        return self.target_projection_head(features)

    def forward(self, batch: ViewBatch) -> MethodOutput:
        first, second = batch.views
        queries = self.projection_head(self.backbone(first)).float()
        keys = F.normalize(self.encode_keys(second).float(), dim=1)
        key_rows = batch.rows if batch.partner_rows is None else batch.partner_rows
        if self.params.gather_distributed and dist.world_size() > 1:
            all_keys, all_rows = concat_all_gather(keys.contiguous()), concat_all_gather(key_rows.contiguous())
        else:
            all_keys, all_rows = keys, key_rows
        negatives, negative_rows = self.queue.contents()
        excluded = None
        if self.params.exclude_own_keys:
            excluded = (negative_rows[None, :] == batch.rows[:, None]) | (negative_rows[None, :] == key_rows[:, None])
        loss = info_nce_with_queue(queries, keys, negatives, self.params.temperature, excluded)
        if self.training:  # the current keys become the next steps' negatives (after the loss, as MoCo)
            self.queue.push(all_keys, all_rows)
        with torch.no_grad():
            positive = F.cosine_similarity(queries, keys).mean()
        return {"loss": loss, "positive_similarity": positive}
