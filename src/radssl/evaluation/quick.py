"""End-of-pretraining check: kNN and linear-probe metrics of the frozen backbone on the labelled splits.

Not the study (``radssl study`` does that with label fractions, seeds and CIs); this answers "did pretraining
learn anything useful?" in seconds, and — with ``eval.compare_random`` — against a random-init backbone of the
same architecture, the baseline every SSL claim must beat.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radssl.atomic import write_text_atomic
from radssl.config import PretrainConfig
from radssl.data.splits import assign_patient_splits
from radssl.data.store import ImageStore
from radssl.engine.pretrain import backbone_for
from radssl.models.backbones import Backbone
from radssl.transfer.bn_stats import frozen_encoder
from radssl.transfer.features import extract_features
from radssl.transfer.knn import knn_evaluate
from radssl.transfer.linear_probe import linear_probe


CARVED_VALIDATION_FRACTION = 0.2
"""Share of training patients held out to choose the probe's C when a store has no ``val`` split."""


def _strata(store: ImageStore, rows: np.ndarray) -> np.ndarray:
    """One class index per row to stratify by (-1 = unlabelled; multilabel: the first label column)."""
    labels = store.labels[torch.from_numpy(rows)]
    if store.task.kind == "multilabel":
        first = labels[:, 0].numpy()
        return np.where(np.isnan(first), -1, first).astype(np.int64)
    return labels.numpy().astype(np.int64)


def validation_rows(
    store: ImageStore, train: np.ndarray, val: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, validation rows, a sentence saying where validation came from).

    Model selection (the probe's C) must never look at the test split. Without a ``val`` split, a seeded,
    class-stratified 20 % of the training *patients* is held out (``radssl.data.splits.assign_patient_splits``,
    so no patient is on both sides) and the probe and kNN train on the rest.
    """
    if len(val):
        return train, val, "the store's val split"
    side = assign_patient_splits(
        store.patient_id[train],
        _strata(store, train),
        (1.0 - CARVED_VALIDATION_FRACTION, CARVED_VALIDATION_FRACTION, 0.0),
        seed=seed,
        source=store.origin or store.name,
    )
    grouping = "patient-level" if (store.patient_id[train] != "").all() else "per image where no patient id is known"
    note = (
        f"carved {CARVED_VALIDATION_FRACTION:.0%} of train ({grouping}, stratified, seed {seed}) "
        "because the store has no val split"
    )
    return train[side == "train"], train[side == "val"], note


def evaluate_backbone(
    backbone: Backbone, store: ImageStore, knn_k: int, knn_temperature: float, seed: int, device: torch.device | str,
    bn_stats: str = "reestimate",
) -> dict[str, Any]:
    """kNN + linear probe on train → val/test. Returns {protocol: {split: metrics}}, timing and ``validation``.

    C is chosen on validation, never on test: the store's ``val`` split, or one carved from train
    (:func:`validation_rows`); ``validation`` says which, and is written to ``eval.json``. ``bn_stats``: the
    frozen encoder's BatchNorm statistics, re-estimated on the unlabelled pretraining rows (default, the same for
    the SSL and the random-init encoder) or the checkpoint's own (:mod:`radssl.transfer.bn_stats`).
    """
    if store.task.kind == "none":
        return {"skipped": "the dataset has no labels"}
    train, val, test = (store.indices(s) for s in ("train", "val", "test"))
    if len(train) == 0 or len(test) == 0:
        return {"skipped": "the dataset has no labelled train and test splits"}
    train, val, validation = validation_rows(store, train, val, seed)
    if len(val) == 0:
        return {"skipped": f"no validation images: {validation}", "validation": validation}
    start = time.perf_counter()
    frozen = frozen_encoder(backbone, store, bn_stats, device=device, seed=seed)
    features = extract_features(frozen, store.images, device=device)
    labels = store.labels
    feature_time = time.perf_counter() - start
    tests = {"val": (features[val], labels[val]), "test": (features[test], labels[test])}
    knn = knn_evaluate(features[train], labels[train], tests, store.task, k=knn_k, temperature=knn_temperature, device=device)
    probe = linear_probe(features[train], labels[train], features[val], labels[val], tests, store.task, seed=seed,
                         standardisation_feats=features[train])  # every training row, labelled or not
    return {
        "validation": validation,
        "knn": knn.metrics,
        "linear_probe": probe.metrics,
        "linear_probe_C": probe.best_C,
        "feature_dim": int(features.shape[1]),
        "bn_stats": bn_stats,
        "wall_time_s": round(time.perf_counter() - start, 3),
        "feature_time_s": round(feature_time, 3),
    }


def quick_evaluate(
    backbone: Backbone, store: ImageStore, config: PretrainConfig, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Evaluate the pretrained backbone (and a random-init twin when ``eval.compare_random``)."""
    result: dict[str, Any] = {
        "ssl": evaluate_backbone(backbone, store, config.eval.knn_k, config.eval.knn_temperature, config.seed, device)
    }
    if config.eval.compare_random:
        torch.manual_seed(config.seed)
        random_backbone = backbone_for(config, store).to(device)
        result["random_init"] = evaluate_backbone(
            random_backbone, store, config.eval.knn_k, config.eval.knn_temperature, config.seed, device
        )
    return result


def summary_lines(evaluation: dict[str, Any]) -> list[str]:
    """Human lines: 'linear probe test AUC 0.912 (random init 0.801)'."""
    lines = []
    ssl = evaluation.get("ssl", {})
    if ssl.get("validation"):
        lines.append(f"probe C chosen on: {ssl['validation']}")
    base = evaluation.get("random_init", {})
    for protocol, label in (("linear_probe", "linear probe"), ("knn", "kNN")):
        for split in ("val", "test"):
            metrics = ssl.get(protocol, {}).get(split)
            if not metrics:
                continue
            parts = []
            for name in ("auc", "accuracy"):
                if name in metrics:
                    text = f"{name} {metrics[name]:.3f}"
                    reference = base.get(protocol, {}).get(split, {}).get(name)
                    if reference is not None:
                        text += f" (random init {reference:.3f})"
                    parts.append(text)
            lines.append(f"{label:>12} {split:>4}: " + ", ".join(parts))
    return lines


def write_evaluation(path: Path, evaluation: dict[str, Any]) -> None:
    write_text_atomic(Path(path), json.dumps(evaluation, indent=2, default=float))


def evaluate_pretraining(result: Any, store: ImageStore, config: PretrainConfig) -> dict[str, Any] | None:
    """Quick evaluation of a finished :class:`~radssl.engine.pretrain.PretrainResult`, written to ``eval.json``.

    Called by the CLI after ``pretrain`` (the engine does not evaluate: it knows nothing of probes or labels).
    Returns None when ``eval.enabled`` is false.
    """
    backbone = result.backbone
    if not config.eval.enabled or backbone is None:
        return None
    device = next(backbone.parameters()).device
    evaluation = quick_evaluate(backbone, store, config, device=device)
    write_evaluation(Path(result.output_dir) / "eval.json", evaluation)
    return evaluation
