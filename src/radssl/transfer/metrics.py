"""Diagnostic-task metrics (AUC, accuracy, balanced accuracy, the mean of per-case values) with checks that make
AUC meaningful. The one home of these metrics: :mod:`radssl.study.statistics` only puts intervals and tests on them
(per-case segmentation metrics, Dice and HD95, are in :mod:`radssl.transfer.segmentation_metrics`).

Two families, for two callers:
- :func:`classification_metrics` scores one evaluated set for the transfer protocols (model selection, early
  stopping, the metrics recorded beside a cell): scikit-learn's ``roc_auc_score`` / ``accuracy_score``, with
  unlabelled rows and (multilabel) unknown labels left out and a policy for classes AUC cannot score.
- :func:`binary_auc`, :func:`macro_auc`, :func:`accuracy` and :func:`case_mean` are the study's metrics
  ``metric(y_true, y_score) -> float``; each carries a ``batched`` twin that scores many bootstrap resamples at
  once (own code, see :func:`_batched_auc`: one rank pass over all resamples instead of a thousand sklearn calls).
  Their AUC is the Mann-Whitney form of the same area (equal to ``roc_auc_score`` up to float rounding).

Score conventions used by every transfer protocol (probe, kNN, fine-tune):
- binary: ``y_score`` (N,) probability of class 1 (an (N, 2) array is accepted; column 1 is used);
- multiclass: (N, K) class probabilities (rows sum to 1);
- multilabel: (N, K) independent per-label probabilities; ``y_true`` (N, K) 0/1 with NaN = unknown.

AUC is undefined for a class with no positive (or no negative) example in the evaluated set; instead of
sklearn's generic failure or a silent NaN, :class:`~radssl.errors.DataError` names the set and the class.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats
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


# --------------------------------------------------------------------------------------------------
# The study's metrics: metric(y_true, y_score) -> float, each with a ``batched`` twin for bootstrap resamples
# --------------------------------------------------------------------------------------------------


def as_binary_labels(y_true: np.ndarray, source: str) -> np.ndarray:
    """Validate binary labels and return them as a boolean array (True = positive class)."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise DataError(source, f"expected 1-D binary labels, got shape {y.shape}", "pass one label per case")
    values = np.unique(y)
    if not np.all(np.isin(values, [0, 1])):
        raise DataError(
            source,
            f"binary labels must be 0/1 (or bool), got values {values[:10].tolist()}",
            "map the positive class to 1 and the negative class to 0",
        )
    if values.size < 2:
        present = "positive" if values.size and values[0] == 1 else "negative"
        raise DataError(
            source,
            f"AUC is undefined: only the {present} class is present in y_true ({y.size} cases)",
            "evaluate on a test set that contains both classes",
        )
    return y.astype(bool)


def _batched_auc(positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of many resamples at once via midranks (Mann-Whitney U); rows without both classes -> NaN.

    Own code rather than a loop over ``roc_auc_score`` because one ``rankdata(axis=1)`` over a
    (n_boot, n) matrix is ~100x faster than 1000 sklearn calls.
    """
    ranks = stats.rankdata(scores, axis=-1)
    n_pos = positive.sum(axis=-1).astype(np.float64)
    n_neg = positive.shape[-1] - n_pos
    rank_sum = np.where(positive, ranks, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def binary_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve for binary labels (ties count one half), with a clear error if a class is absent."""
    positive = as_binary_labels(y_true, "binary_auc y_true")
    score = np.asarray(y_score, dtype=np.float64)
    if score.shape != positive.shape:
        raise DataError("binary_auc y_score", f"shape {score.shape} does not match y_true {positive.shape}",
                        "pass one score per case (probability of the positive class)")
    return float(_batched_auc(positive[None], score[None])[0])


def _binary_auc_batched(y_true_b: np.ndarray, y_score_b: np.ndarray) -> np.ndarray:
    return _batched_auc(np.asarray(y_true_b).astype(bool), np.asarray(y_score_b, dtype=np.float64))


binary_auc.batched = _binary_auc_batched  # type: ignore[attr-defined]


def _check_multiclass(y_true: np.ndarray, y_score: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return (y_true, y_score, multilabel) after checking shapes; y_score must be (N, K)."""
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if s.ndim != 2:
        raise DataError(source, f"expected scores of shape (N, K), got {s.shape}",
                        "pass one column per class (softmax probabilities or logits)")
    if y.shape[0] != s.shape[0]:
        raise DataError(source, f"y_true has {y.shape[0]} cases but y_score has {s.shape[0]}",
                        "pass the scores of the same test cases")
    if y.ndim == 2:
        if y.shape != s.shape:
            raise DataError(source, f"multi-label y_true shape {y.shape} != y_score shape {s.shape}",
                            "pass one 0/1 column per label")
        return y, s, True
    if y.ndim != 1:
        raise DataError(source, f"y_true must be 1-D class ids or 2-D 0/1 labels, got shape {y.shape}")
    if not np.all((y >= 0) & (y < s.shape[1]) & (y == np.round(y))):
        raise DataError(source, f"class ids must be integers in [0, {s.shape[1]}), got {np.unique(y)[:10].tolist()}",
                        "encode classes as 0..K-1 matching the score columns")
    return y.astype(np.int64), s, False


def macro_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Macro one-vs-rest AUC for multi-class (y_true: class ids) or multi-label (y_true: (N, K) 0/1).

    Every class must be present (and, one-vs-rest, absent) in y_true: a class with no positives has no
    AUC, and silently dropping it would make numbers from different test sets incomparable.
    """
    y, s, multilabel = _check_multiclass(y_true, y_score, "macro_auc")
    positive = (y != 0) if multilabel else (y[:, None] == np.arange(s.shape[1])[None, :])
    n_pos = positive.sum(axis=0)
    bad = np.flatnonzero((n_pos == 0) | (n_pos == positive.shape[0]))
    if bad.size:
        what = "no positive" if n_pos[bad[0]] == 0 else "only positive"
        raise DataError(
            "macro_auc y_true",
            f"class/label {bad.tolist()} has {what} cases, so its one-vs-rest AUC is undefined",
            "evaluate on a test set where every class is present, or drop that class from the task",
        )
    return float(np.mean(_batched_auc(positive.T, s.T)))


def _macro_auc_batched(y_true_b: np.ndarray, y_score_b: np.ndarray) -> np.ndarray:
    y_true_b = np.asarray(y_true_b)
    n_classes = y_score_b.shape[-1]
    per_class = []
    for k in range(n_classes):
        positive = (y_true_b[..., k] != 0) if y_true_b.ndim == 3 else (y_true_b == k)
        per_class.append(_batched_auc(positive, y_score_b[..., k]))
    return np.mean(np.stack(per_class, axis=0), axis=0)


macro_auc.batched = _macro_auc_batched  # type: ignore[attr-defined]


def case_mean(y_true: Any, values: Any) -> float:
    """Mean of per-case metric values (each case's Dice, HD95, …), ignoring cases where the value is undefined.

    The metric of protocols that score each case on its own (segmentation): the set's metric is the mean over cases,
    so every tool here that takes a ``metric(y_true, y_score)`` works for it with ``y_score`` = the per-case values
    (``y_true`` is ignored; pass zeros of the same length). Non-finite values (NaN: undefined for that case, e.g.
    an HD95 where prediction and reference are both empty; an HD95 with exactly one of them empty is the image
    diagonal, finite — :mod:`radssl.transfer.segmentation_metrics`) are left out. Where models are compared or
    averaged over seeds, every mean is taken on the cases finite for all of them (:func:`on_common_cases`). Its case
    covariance is computed exactly, not by a bootstrap (:func:`case_covariance`).
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    return float(v[finite].mean()) if finite.any() else math.nan


def _case_mean_batched(y_true_b: np.ndarray, values_b: np.ndarray) -> np.ndarray:
    v = np.asarray(values_b, dtype=np.float64)
    finite = np.isfinite(v)
    count = finite.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(finite, v, 0.0).sum(axis=-1) / count, np.nan)


case_mean.batched = _case_mean_batched  # type: ignore[attr-defined]


def accuracy(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Accuracy from scores: argmax for (N, K) multi-class, 0.5 threshold for binary (N,) or multi-label (N, K).

    Multi-label accuracy is the mean over all (case, label) decisions (Hamming accuracy).
    """
    s = np.asarray(y_score, dtype=np.float64)
    y = np.asarray(y_true)
    if s.ndim == 1:
        if y.shape != s.shape:
            raise DataError("accuracy", f"y_true shape {y.shape} != y_score shape {s.shape}")
        return float(np.mean((s >= 0.5) == (y != 0)))
    y, s, multilabel = _check_multiclass(y, s, "accuracy")
    if multilabel:
        return float(np.mean((s >= 0.5) == (y != 0)))
    return float(np.mean(np.argmax(s, axis=1) == y))


def _accuracy_batched(y_true_b: np.ndarray, y_score_b: np.ndarray) -> np.ndarray:
    y_true_b = np.asarray(y_true_b)
    if y_score_b.ndim == 2 or y_true_b.ndim == 3:  # binary (B, n) or multi-label (B, n, K)
        correct = (y_score_b >= 0.5) == (y_true_b != 0)
        return correct.reshape(correct.shape[0], -1).mean(axis=1)
    return np.mean(np.argmax(y_score_b, axis=-1) == y_true_b, axis=1)


accuracy.batched = _accuracy_batched  # type: ignore[attr-defined]
