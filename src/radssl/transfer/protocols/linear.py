"""Linear probe protocol: logistic regression on frozen features, C chosen on the validation rows' AUC.

The standard frozen-feature read-out of SSL papers (Chen et al., SimCLR, ICML 2020; Kolesnikov et al., CVPR 2019);
see :mod:`radssl.transfer.linear_probe` for the fitting details.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator

from radssl.transfer.linear_probe import linear_probe
from radssl.transfer.protocols.base import (
    CaseOutputs,
    Protocol,
    ProtocolContext,
    ProtocolOutcome,
    ProtocolParams,
)


class LinearParams(ProtocolParams):
    """Logistic regression on frozen features; C chosen on the validation split's AUC."""

    Cs: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], min_length=1)
    max_iter: int = Field(5000, gt=0)

    @field_validator("Cs")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(c <= 0 for c in values):
            raise ValueError("every C must be > 0")
        return values


def frozen_feature_sets(context: ProtocolContext) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The internal store's features and (features, labels) of every test set, from the shared cache."""
    assert context.features is not None, "frozen-feature protocols get context.features"
    internal = context.features(context.store)
    tests = {}
    for name, (store, rows) in context.test_sets.items():
        features = internal if store is context.store else context.features(store)
        index = torch.from_numpy(rows)
        tests[name] = (features[index], store.labels[index])
    return internal, tests


def training_split_features(context: ProtocolContext, internal: torch.Tensor) -> torch.Tensor:
    """Features of every row of the store's training split (labelled or not; no labels read).

    The linear probe standardises with these, so the scale is the same for every arm, label fraction and seed
    (issue 19, point 9); the cell's validation rows are never part of the training split.
    """
    return internal[torch.from_numpy(context.store.indices("train"))]


def classification_outputs(context: ProtocolContext, scores: dict, metrics: dict) -> dict[str, CaseOutputs]:
    """Per test set: its labels, the protocol's scores and the balanced accuracy."""
    outputs = {}
    for name, (store, rows) in context.test_sets.items():
        outputs[name] = CaseOutputs(
            y_true=store.labels[torch.from_numpy(rows)].numpy(), y_score=scores[name],
            metrics={"balanced_accuracy": float(metrics[name].get("balanced_accuracy", float("nan")))})
    return outputs


class LinearProbeProtocol(Protocol):
    name = "linear"
    title = "linear probe"
    Params = LinearParams
    frozen_features = True
    paper = "Kolesnikov et al., Revisiting self-supervised visual representation learning, CVPR 2019"

    def run(self, context: ProtocolContext) -> ProtocolOutcome:
        params: LinearParams = self.params  # type: ignore[assignment]
        internal, tests = frozen_feature_sets(context)
        labels = context.store.labels
        train, val = torch.from_numpy(context.train_rows), torch.from_numpy(context.val_rows)
        result = linear_probe(internal[train], labels[train], internal[val], labels[val], tests, context.store.task,
                              Cs=params.Cs, seed=context.seed, max_iter=params.max_iter,
                              standardisation_feats=training_split_features(context, internal))
        return ProtocolOutcome(classification_outputs(context, result.scores, result.metrics),
                               {"val_auc": result.val_metric, "selected_C": result.best_C,
                                "val_images": float(len(context.val_rows))})
