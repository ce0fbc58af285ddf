"""BatchNorm statistics of a frozen encoder, re-estimated on unlabelled training images (no labels).

Why: a frozen read-out (linear probe, kNN, frozen-encoder segmentation) runs the encoder in eval mode, so every
BatchNorm layer normalises with its *running* statistics. An SSL checkpoint carries statistics estimated on the
data during pretraining; a random initialisation carries BatchNorm's defaults (mean 0, variance 1), which do not
match its activations at all, and an ImageNet one carries ImageNet's. The random arm of a comparison is then
weakened by its statistics, not by its weights (issue 19, point 7: the demo's random encoder scored AUC 0.495 with
a linear probe on 100 % of the labels while its kNN scored 0.57). Re-estimating every frozen encoder's statistics
on the same unlabelled training images puts every initialisation on the same footing; it is AdaBN (Li et al.,
"Revisiting Batch Normalization For Practical Domain Adaptation", ICLR workshop 2017) applied to the target data,
and the same pass SWA uses after weight averaging (Izmailov et al., UAI 2018).

How: :func:`torch.optim.swa_utils.update_bn` — reset every BatchNorm's running statistics, set ``momentum=None``
(a cumulative average over batches instead of an exponential one), one forward pass in train mode under
``no_grad``, then restore momenta and mode. Only the running statistics change; weights and the affine
parameters are untouched. Rows: the store's pretraining rows (train + unlabelled, never an image of a val/test
patient: :meth:`radssl.data.store.ImageStore.pretrain_indices`), in one seeded order, in near-equal batches (the
cumulative average weights batches equally, so a tiny last batch would count as much as a full one).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from radssl.data.store import ImageStore, normalise_for_backbone

BNStats = Literal["checkpoint", "reestimate"]
BN_STATS_CHOICES: tuple[str, ...] = ("checkpoint", "reestimate")
"""``checkpoint``: the statistics the encoder comes with; ``reestimate``: one pass over unlabelled training images."""

__all__ = ["BNStats", "BN_STATS_CHOICES", "frozen_encoder", "has_batch_norm", "reads_frozen_encoder",
           "reestimate_bn_statistics"]


def has_batch_norm(module: nn.Module) -> bool:
    """Whether any layer keeps running statistics (BatchNorm 1d/2d/3d, SyncBatchNorm)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in module.modules())


def _batches(images: torch.Tensor, rows: np.ndarray, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Normalised input batches of ``rows`` in near-equal sizes (at most ``batch_size``)."""
    chunks = max(1, int(np.ceil(len(rows) / batch_size)))
    for chunk in np.array_split(rows, chunks):
        yield normalise_for_backbone(images[torch.from_numpy(chunk)].to(device, non_blocking=True))


def reestimate_bn_statistics(backbone: nn.Module, images: torch.Tensor, rows: np.ndarray | None = None,
                             batch_size: int = 256, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
    """A copy of ``backbone`` whose BatchNorm running statistics come from one pass over ``images[rows]``.

    The caller's module is left as it was (weights, statistics, mode). A backbone without BatchNorm (ViT) is
    returned as an unchanged copy. Batches hold at least 2 images (train-mode BatchNorm needs 2).
    """
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (train-mode BatchNorm), got {batch_size}")
    rows = np.arange(images.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) < 2:
        raise ValueError(f"re-estimating BatchNorm statistics needs at least 2 images, got {len(rows)}")
    device = torch.device(device)
    frozen = copy.deepcopy(backbone).to(device)
    if not has_batch_norm(frozen):
        return frozen.eval()
    order = rows[np.random.default_rng(seed).permutation(len(rows))]
    with torch.no_grad():
        update_bn(_batches(images, order, batch_size, device), frozen)
    return frozen.eval()


def frozen_encoder(backbone: nn.Module, store: ImageStore, bn_stats: str, device: str | torch.device = "cpu",
                   batch_size: int = 256, seed: int = 0) -> nn.Module:
    """The encoder a frozen read-out uses under the study's ``bn_stats`` rule (the same rule for every init).

    ``checkpoint`` returns ``backbone`` itself; ``reestimate`` a copy with statistics from the store's
    pretraining rows (unlabelled use of training images only; no labels, no val/test patient).
    """
    if bn_stats not in BN_STATS_CHOICES:
        raise ValueError(f"bn_stats must be one of {list(BN_STATS_CHOICES)}, got {bn_stats!r}")
    if bn_stats == "checkpoint":
        return backbone
    return reestimate_bn_statistics(backbone, store.images, store.pretrain_indices(), batch_size, device, seed)


def reads_frozen_encoder(protocol: Any) -> bool:
    """Whether a protocol reads the encoder frozen: frozen features (linear, kNN) or a frozen-encoder decoder."""
    return bool(getattr(protocol, "frozen_features", False) or getattr(protocol, "freeze_encoder", False))
