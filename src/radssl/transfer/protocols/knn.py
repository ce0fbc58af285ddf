"""kNN protocol: similarity-weighted k nearest neighbours on frozen features (Wu et al., CVPR 2018; DINO)."""

from __future__ import annotations

import torch
from pydantic import Field

from radssl.transfer.knn import knn_evaluate
from radssl.transfer.protocols.base import Protocol, ProtocolContext, ProtocolOutcome, ProtocolParams
from radssl.transfer.protocols.linear import classification_outputs, frozen_feature_sets


class KnnParams(ProtocolParams):
    """Similarity-weighted kNN on frozen features (Wu et al. 2018)."""

    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0.0)


class KnnProtocol(Protocol):
    name = "knn"
    title = "kNN"
    Params = KnnParams
    frozen_features = True
    selects_on_validation = False  # nothing is fitted or selected
    paper = "Wu et al., Unsupervised feature learning via non-parametric instance discrimination, CVPR 2018"

    def run(self, context: ProtocolContext) -> ProtocolOutcome:
        params: KnnParams = self.params  # type: ignore[assignment]
        internal, tests = frozen_feature_sets(context)
        train = torch.from_numpy(context.train_rows)
        result = knn_evaluate(internal[train], context.store.labels[train], tests, context.store.task, k=params.k,
                              temperature=params.temperature, device=context.device)
        return ProtocolOutcome(classification_outputs(context, result.scores, result.metrics),
                               {"k": float(min(params.k, len(context.train_rows)))})
