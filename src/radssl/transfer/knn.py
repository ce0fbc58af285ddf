"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of Wu et al., "Unsupervised feature learning via non-parametric instance discrimination"
(CVPR 2018), as used by DINO (Caron et al., ICCV 2021): features are L2-normalised, each query takes its k
most cosine-similar training samples, and neighbour j votes for its label with weight exp(s_j / T).
No training and no hyper-parameter fitting, so it is a cheap, low-variance read-out of representation
quality that complements the linear probe. Written in torch (not scikit-learn) because the similarity
matrix is one matmul per query chunk, which runs on the GPU beside the features and never materialises
the full N_query × N_train matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from radssl.data.store import TaskInfo
from radssl.transfer.metrics import check_auc_defined, check_classes_covered, classification_metrics, labelled_mask

Array = np.ndarray | torch.Tensor


def _tensor(array: Array, device: torch.device | None) -> torch.Tensor:
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
    return tensor.to(device) if device is not None else tensor


@torch.no_grad()
def knn_classify(
    train_feats: Array,
    train_y: Array,
    query_feats: Array,
    task: TaskInfo,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Similarity-weighted kNN scores for ``query_feats`` in the project's score convention.

    binary → (N,) probability of class 1; multiclass → (N, K) vote shares; multilabel → (N, K) weighted mean
    of the neighbours' known labels. Unlabelled training rows are ignored. Computation runs on ``device``
    (default: the training features' device), ``chunk_size`` queries at a time.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = torch.device(device) if device is not None else None
    train = _tensor(train_feats, device).float()
    labels = _tensor(train_y, train.device)
    keep = torch.from_numpy(labelled_mask(task, labels.cpu().numpy())).to(train.device)
    train, labels = train[keep], labels[keep]
    if train.shape[0] == 0:
        raise ValueError("kNN needs at least one labelled training sample")
    train = F.normalize(train, dim=1)
    k = min(k, train.shape[0])
    if task.kind == "multilabel":
        values = labels.float()
        known = (~torch.isnan(values)).float()
        targets = torch.cat([torch.nan_to_num(values, nan=0.0), known], dim=1)  # (N, 2K): sums and counts
    else:
        targets = F.one_hot(labels.long(), task.num_classes).float()
    queries = _tensor(query_feats, None)
    outputs: list[torch.Tensor] = []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = F.normalize(queries[start : start + chunk_size].to(train.device).float(), dim=1)
        similarity, neighbours = (chunk @ train.T).topk(k, dim=1)
        # Subtracting the row maximum leaves the normalised weights unchanged and keeps exp() finite.
        weights = ((similarity - similarity[:, :1]) / temperature).exp()
        votes = (weights.unsqueeze(2) * targets[neighbours]).sum(dim=1)
        if task.kind == "multilabel":
            sums, counts = votes.chunk(2, dim=1)
            outputs.append(torch.where(counts > 0, sums / counts.clamp_min(1e-12), torch.full_like(sums, 0.5)))
        else:
            outputs.append(votes / votes.sum(dim=1, keepdim=True))
    scores = torch.cat(outputs).cpu().double().numpy()
    return scores[:, 1] if task.kind == "binary" else scores


@dataclass
class KnnResult:
    """kNN scores and metrics for every test set (no hyper-parameters are fitted)."""

    k: int
    temperature: float
    scores: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]


def knn_evaluate(
    train_feats: Array,
    train_y: Array,
    test_sets: Mapping[str, tuple[Array, Array]],
    task: TaskInfo,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device | None = None,
) -> KnnResult:
    """:func:`knn_classify` plus :func:`~radssl.transfer.metrics.classification_metrics` per test set."""
    train_y_np = train_y.cpu().numpy() if isinstance(train_y, torch.Tensor) else np.asarray(train_y)
    for name, (_, y) in test_sets.items():
        y_np = y.cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
        check_classes_covered(task, train_y_np, y_np, name)
        check_auc_defined(task, y_np[labelled_mask(task, y_np)], name)
    scores, metrics = {}, {}
    for name, (x, y) in test_sets.items():
        scores[name] = knn_classify(train_feats, train_y, x, task, k=k, temperature=temperature, device=device)
        metrics[name] = classification_metrics(task, y, scores[name], name=name)
    return KnnResult(k=k, temperature=temperature, scores=scores, metrics=metrics)
