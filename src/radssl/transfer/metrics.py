"""Diagnostic-task metrics (AUC, accuracy, balanced accuracy) with checks that make AUC meaningful.

Score conventions used by every transfer protocol (probe, kNN, fine-tune):
- binary: ``y_score`` (N,) probability of class 1 (an (N, 2) array is accepted; column 1 is used);
- multiclass: (N, K) class probabilities (rows sum to 1);
- multilabel: (N, K) independent per-label probabilities; ``y_true`` (N, K) 0/1 with NaN = unknown.

AUC is undefined for a class with no positive (or no negative) example in the evaluated set; instead of
sklearn's generic failure or a silent NaN, :class:`~radssl.errors.DataError` names the set and the class.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from radssl.data.store import TaskInfo
from radssl.errors import DataError

PRIMARY_METRIC = "auc"
"""The metric that selects hyper-parameters and early-stopping epochs (on the validation split)."""

MissingClassPolicy = Literal["raise", "skip"]


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def class_name(task: TaskInfo, index: int) -> str:
    """Readable class name for messages: ``'pneumonia' (class 1)`` or ``class 1``."""
    if index < len(task.class_names):
        return f"'{task.class_names[index]}' (class {index})"
    return f"class {index}"


def labelled_mask(task: TaskInfo, y: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows with a label: ``y >= 0`` for binary/multiclass; any known (non-NaN) label for multilabel."""
    y = _numpy(y)
    if task.kind == "multilabel":
        return ~np.isnan(y.astype(np.float64)).all(axis=1)
    return y >= 0


def classes_present(task: TaskInfo, y: np.ndarray | torch.Tensor) -> set[int]:
    """Classes with at least one example (multilabel: labels with at least one known positive)."""
    y = _numpy(y)
    if task.kind == "multilabel":
        return {int(k) for k in np.flatnonzero(np.nansum(y.astype(np.float64), axis=0) > 0)}
    return {int(c) for c in np.unique(y[y >= 0])}


def check_classes_covered(
    task: TaskInfo, train_y: np.ndarray | torch.Tensor, eval_y: np.ndarray | torch.Tensor, eval_name: str
) -> None:
    """Raise when ``eval_name`` holds a class the training labels never show (a model cannot score it)."""
    unseen = sorted(classes_present(task, eval_y) - classes_present(task, train_y))
    if unseen:
        names = ", ".join(class_name(task, c) for c in unseen)
        raise DataError(
            eval_name,
            f"{names} occurs in this evaluation set but has no example in the training labels",
            "draw the training subset stratified by class (radssl.data.splits.label_fraction_subsets) "
            "or remove that class from the task",
        )


def check_auc_defined(task: TaskInfo, y_true: np.ndarray | torch.Tensor, name: str = "evaluation set") -> None:
    """Raise when some class (or label) has no positive or no negative example in ``y_true``."""
    problems = _undefined_auc_columns(task, _numpy(y_true))
    if problems:
        raise DataError(
            name,
            "AUC is undefined: " + "; ".join(problem for _, problem in problems),
            "use a larger or stratified evaluation split (radssl.data.splits.assign_patient_splits), "
            "or pass on_missing_class='skip' to average AUC over the classes that can be scored",
        )


def _undefined_auc_columns(task: TaskInfo, y_true: np.ndarray) -> list[tuple[int, str]]:
    problems: list[tuple[int, str]] = []
    if task.kind == "binary":
        labelled = y_true[y_true >= 0]
        for c in (0, 1):
            if not (labelled == c).any():
                problems.append((c, f"{class_name(task, c)} has no example in this set"))
    elif task.kind == "multiclass":
        labelled = y_true[y_true >= 0]
        for c in range(task.num_classes):
            if not (labelled == c).any():
                problems.append((c, f"{class_name(task, c)} has no example in this set"))
    elif task.kind == "multilabel":
        for c in range(task.num_classes):
            column = y_true[:, c].astype(np.float64)
            known = column[~np.isnan(column)]
            if not (known == 1).any() or not (known == 0).any():
                kind = "positive" if not (known == 1).any() else "negative"
                problems.append((c, f"label {class_name(task, c)} has no {kind} example in this set"))
    else:
        raise ValueError(f"task kind '{task.kind}' has no classification metrics")
    return problems


def classification_metrics(
    task: TaskInfo,
    y_true: np.ndarray | torch.Tensor,
    y_score: np.ndarray | torch.Tensor,
    name: str = "evaluation set",
    on_missing_class: MissingClassPolicy = "raise",
) -> dict[str, float]:
    """AUC and accuracies for one evaluated set; ``name`` appears in error messages.

    binary: ``auc``, ``accuracy`` (probability ≥ 0.5), ``balanced_accuracy``;
    multiclass: macro one-vs-rest ``auc``, ``accuracy`` (arg-max), ``balanced_accuracy``;
    multilabel: macro ``auc`` over labels, ``accuracy`` = mean over labels of per-label accuracy (≥ 0.5),
    ignoring unknown (NaN) labels. Unlabelled rows (-1 / all-NaN) are ignored.
    ``on_missing_class='skip'`` averages AUC over the scorable classes instead of raising (AUC is NaN when
    none is) and adds ``auc_classes``, the number of classes averaged.
    """
    y_true = _numpy(y_true)
    y_score = _numpy(y_score).astype(np.float64)
    if task.kind == "binary" and y_score.ndim == 2 and y_score.shape[1] == 2:
        y_score = y_score[:, 1]
    keep = labelled_mask(task, y_true)
    if len(y_true) != len(y_score):
        raise ValueError(f"{name}: {len(y_true)} labels but {len(y_score)} scores")
    y_true, y_score = y_true[keep], y_score[keep]
    if len(y_true) == 0:
        raise DataError(name, "no labelled rows to evaluate")
    if not np.isfinite(y_score).all():
        raise DataError(name, "scores contain NaN or inf", "check the model for a diverged training run")
    problems = _undefined_auc_columns(task, y_true)
    if problems and on_missing_class == "raise":
        check_auc_defined(task, y_true, name)
    skipped = {column for column, _ in problems}
    metrics: dict[str, float] = {}
    if task.kind == "binary":
        y_true = y_true.astype(np.int64)
        predicted = (y_score >= 0.5).astype(np.int64)
        auc_classes = 0 if skipped else 1
        metrics["auc"] = float(roc_auc_score(y_true, y_score)) if not skipped else float("nan")
        metrics["accuracy"] = float(accuracy_score(y_true, predicted))
        metrics["balanced_accuracy"] = float(balanced_accuracy_score(y_true, predicted))
    elif task.kind == "multiclass":
        y_true = y_true.astype(np.int64)
        if y_score.ndim != 2 or y_score.shape[1] != task.num_classes:
            raise ValueError(f"{name}: multiclass scores need shape (N, {task.num_classes}), got {y_score.shape}")
        aucs = [
            roc_auc_score(y_true == c, y_score[:, c]) for c in range(task.num_classes) if c not in skipped
        ]
        predicted = y_score.argmax(axis=1)
        metrics["auc"] = float(np.mean(aucs)) if aucs else float("nan")
        metrics["accuracy"] = float(accuracy_score(y_true, predicted))
        metrics["balanced_accuracy"] = float(balanced_accuracy_score(y_true, predicted))
        auc_classes = len(aucs)
    else:  # multilabel
        if y_score.shape != y_true.shape:
            raise ValueError(f"{name}: multilabel scores need shape {y_true.shape}, got {y_score.shape}")
        aucs, accuracies = [], []
        for c in range(task.num_classes):
            known = ~np.isnan(y_true[:, c].astype(np.float64))
            truth, score = y_true[known, c].astype(np.int64), y_score[known, c]
            if len(truth):
                accuracies.append(accuracy_score(truth, score >= 0.5))
            if c not in skipped:
                aucs.append(roc_auc_score(truth, score))
        metrics["auc"] = float(np.mean(aucs)) if aucs else float("nan")
        metrics["accuracy"] = float(np.mean(accuracies))
        auc_classes = len(aucs)
    if on_missing_class == "skip":
        metrics["auc_classes"] = float(auc_classes)
    return metrics
