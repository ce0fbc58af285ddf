"""Linear probe: logistic regression on frozen, standardised features, C chosen on validation AUC.

The standard frozen-feature protocol of SSL papers (e.g. Chen et al., SimCLR, ICML 2020; Kolesnikov et
al., "Revisiting self-supervised visual representation learning", CVPR 2019): the encoder is frozen, so the
probe measures how linearly separable the representation makes the diagnosis.
Implementation notes (why not ``LogisticRegressionCV`` / ``OneVsRestClassifier``):
- features are standardised with *label-free* statistics: the mean/std of every training-split row's features
  (``standardisation_feats``, passed by the caller; no labels used), the same for every arm and label fraction.
  Standardising on the labelled rows only (6 images at 1 % of BreastMNIST) made the scale itself a noisy,
  subset-dependent estimate and cost .048 test AUC on average at 1 % (issue 19, point 9);
- every C of the grid is fitted independently from zero (no warm start, no early stop on the path), exactly
  what an exhaustive scikit-learn search does, so the chosen C is the grid's best validation AUC. The earlier
  path (ascending C, warm-started, stopped after 2 C values without a better validation AUC) assumed the
  validation AUC is unimodal in C; it is not on noisy validation sets, and the skipped large-C fits are the ones
  that win with many labels (issue 19: .835 vs .889 at 100 % on identical features). ``path_patience`` is kept
  for callers that want the old early stop explicitly;
- ``max_iter`` defaults to 5000 lbfgs iterations and every fit records whether it converged
  (``ProbeResult.converged``: all fits of the chosen C; ``unconverged_Cs``: the C values whose fit hit the cap);
- multi-label tasks fit one binary model per label on the rows where that label is known (NaN = unknown),
  which ``OneVsRestClassifier`` cannot do;
- selection is on the *validation* split (never on test), by macro AUC; ties go to the smaller C (the
  stronger regularisation);
- BLAS runs single-threaded during the fits (``blas_threads``, via threadpoolctl, a scikit-learn
  dependency): each lbfgs step is a few small mat-vecs, so extra BLAS threads only spin; measured on a
  loaded 2-core machine for PneumoniaMNIST features (4708×512): 0.24 s with 1 thread vs 8.8 s with 2.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from radssl.data.store import TaskInfo
from radssl.transfer.metrics import (
    PRIMARY_METRIC,
    check_auc_defined,
    check_classes_covered,
    classification_metrics,
    labelled_mask,
)

DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse L2 strengths searched by default (features are standardised, so one grid suits all backbones)."""

Array = np.ndarray | torch.Tensor


@dataclass
class ProbeResult:
    """Outcome of one probe: chosen C, its validation AUC, and scores/metrics for every test set."""

    best_C: float
    val_metric: float
    val_metric_per_C: dict[float, float]
    scores: dict[str, np.ndarray]
    metrics: dict[str, dict[str, float]]
    wall_time_s: float
    converged: bool = True
    val_scores: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False)
    unconverged_Cs: tuple[float, ...] = ()
    """C values whose fit stopped at ``max_iter`` without converging (empty when every fit converged)."""


def _numpy(array: Array, dtype: type | None = None) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    return array.astype(dtype, copy=False) if dtype is not None else array


class _Standardiser:
    """Mean/std scaling from label-free training-split features (constant features get unit scale, not a /0)."""

    def __init__(self, features: np.ndarray) -> None:
        self.mean = features.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = features.std(axis=0, dtype=np.float64).astype(np.float32)
        self.std = np.where(std > 1e-8, std, 1.0).astype(np.float32)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std


class _ConstantModel:
    """Stands in for a label whose training rows are all one value (logistic regression cannot fit it)."""

    def __init__(self, probability: float) -> None:
        self.probability = probability

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        p = np.full(len(features), self.probability)
        return np.stack([1 - p, p], axis=1)


class _Probe:
    """One model per task (binary / multiclass) or per label (multilabel), fitted along a C path."""

    def __init__(self, task: TaskInfo, features: np.ndarray, y: np.ndarray, seed: int, max_iter: int) -> None:
        self.task, self.features, self.y = task, features, y
        self.columns = 1 if task.kind != "multilabel" else task.num_classes
        self.models: list[LogisticRegression | _ConstantModel] = []
        self.rows: list[np.ndarray] = []
        for column in range(self.columns):
            if task.kind == "multilabel":
                target = y[:, column]
                known = np.flatnonzero(~np.isnan(target))
                labels = target[known].astype(np.int64)
                self.rows.append(known)
                if len(np.unique(labels)) < 2:
                    self.models.append(_ConstantModel(float(labels.mean()) if len(labels) else 0.5))
                    continue
            self.models.append(LogisticRegression(solver="lbfgs", max_iter=max_iter, random_state=seed))

    def fit(self, C: float) -> bool:
        """Fit every model at ``C`` from scratch (no warm start); returns whether all converged."""
        converged = True
        for column, model in enumerate(self.models):
            if isinstance(model, _ConstantModel):
                continue
            if self.task.kind == "multilabel":
                rows = self.rows[column]
                features, target = self.features[rows], self.y[rows, column].astype(np.int64)
            else:
                features, target = self.features, self.y.astype(np.int64)
            model.set_params(C=C)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                model.fit(features, target)
            converged &= not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return converged

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Scores in the project's convention (binary (N,), multiclass/multilabel (N, K))."""
        if self.task.kind == "multilabel":
            return np.stack([m.predict_proba(features)[:, 1] for m in self.models], axis=1)
        model = self.models[0]
        probabilities = model.predict_proba(features)
        if self.task.kind == "binary":
            return probabilities[:, list(model.classes_).index(1)]
        full = np.zeros((len(features), self.task.num_classes))
        full[:, model.classes_.astype(np.int64)] = probabilities  # classes absent in training score 0
        return full

    def snapshot(self) -> list[LogisticRegression | _ConstantModel]:
        return copy.deepcopy(self.models)


def _fit_path(
    probe: _Probe, val_x: np.ndarray, val_y: np.ndarray, task: TaskInfo, Cs: Sequence[float], patience: int | None
) -> tuple[float, float, dict[float, float], bool, np.ndarray, tuple[float, ...]]:
    """Fit every C (ascending, each from scratch); leave ``probe`` at the best validation AUC.

    Returns (best C, its validation AUC, AUC per fitted C, whether the best fit converged, its val scores,
    the C values whose fit did not converge). ``patience`` (None = the full grid) stops after that many C values
    in a row without a better validation AUC.
    """
    per_C: dict[float, float] = {}
    best: tuple[float, float, list, bool, np.ndarray] | None = None
    without_gain = 0
    unconverged: list[float] = []
    for C in sorted(float(c) for c in Cs):
        converged = probe.fit(C)
        if not converged:
            unconverged.append(C)
        val_scores = probe.predict(val_x)
        per_C[C] = classification_metrics(task, val_y, val_scores, name="validation set")[PRIMARY_METRIC]
        if best is None or per_C[C] > best[1]:
            best = (C, per_C[C], probe.snapshot(), converged, val_scores)
            without_gain = 0
        else:
            without_gain += 1
            if patience is not None and without_gain >= patience:
                break
    assert best is not None
    best_C, metric, models, converged, val_scores = best
    probe.models = models
    return best_C, metric, per_C, converged, val_scores, tuple(unconverged)


def linear_probe(
    train_feats: Array,
    train_y: Array,
    val_feats: Array,
    val_y: Array,
    test_sets: Mapping[str, tuple[Array, Array]],
    task: TaskInfo,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    max_iter: int = 5000,
    path_patience: int | None = None,
    blas_threads: int | None = 1,
    standardisation_feats: Array | None = None,
) -> ProbeResult:
    """Fit logistic regression for each C, keep the C with the best validation AUC, score the test sets.

    ``standardisation_feats``: features of *every* training-split row (labelled or not; no labels are read), whose
    mean/std standardise all features — pass them, so every arm and label fraction is scaled alike. Without them
    the rows of ``train_feats`` are used (all of them, labelled or not), which at small label fractions is a noisy,
    subset-dependent scale. Unlabelled training rows (-1 / all-NaN) are then dropped from the fit; scores for
    val/test keep every input row (so they align with the caller's row indices).
    ``path_patience=None`` (default) fits every C; ``val_metric_per_C`` lists the C values actually fitted.
    ``blas_threads=None`` leaves the BLAS thread count alone (worth it only for very large feature sets).
    """
    start = time.perf_counter()
    if not Cs:
        raise ValueError("Cs must hold at least one regularisation strength")
    train_x, val_x = _numpy(train_feats, np.float32), _numpy(val_feats, np.float32)
    scale_x = train_x if standardisation_feats is None else _numpy(standardisation_feats, np.float32)
    if scale_x.ndim != 2 or scale_x.shape[1] != train_x.shape[1] or len(scale_x) == 0:
        raise ValueError(f"standardisation_feats have shape {tuple(scale_x.shape)}; expected (N, "
                         f"{train_x.shape[1]}) features of the training split's rows")
    train_y_np, val_y_np = _numpy(train_y), _numpy(val_y)
    keep = labelled_mask(task, train_y_np)
    train_x, train_y_np = train_x[keep], train_y_np[keep]
    tests = {name: (_numpy(x, np.float32), _numpy(y)) for name, (x, y) in test_sets.items()}
    # Every check before any fitting: a bad split fails in milliseconds, not after the grid.
    for name, y in [("validation set", val_y_np)] + [(n, y) for n, (_, y) in tests.items()]:
        check_classes_covered(task, train_y_np, y, name)
    check_auc_defined(task, val_y_np[labelled_mask(task, val_y_np)], "validation set")
    for name, (x, y) in tests.items():
        if x.shape[1] != train_x.shape[1]:
            raise ValueError(f"{name}: features have {x.shape[1]} dimensions, training features {train_x.shape[1]}")
        check_auc_defined(task, y[labelled_mask(task, y)], name)

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        standardise = _Standardiser(scale_x)
        probe = _Probe(task, standardise(train_x), train_y_np, seed, max_iter)
        best_C, val_metric, per_C, converged, val_scores, unconverged = _fit_path(
            probe, standardise(val_x), val_y_np, task, Cs, path_patience
        )
        scores = {name: probe.predict(standardise(x)) for name, (x, _) in tests.items()}
    metrics = {name: classification_metrics(task, y, scores[name], name=name) for name, (_, y) in tests.items()}
    return ProbeResult(
        best_C=best_C,
        val_metric=val_metric,
        val_metric_per_C=per_C,
        scores=scores,
        metrics=metrics,
        wall_time_s=time.perf_counter() - start,
        converged=converged,
        val_scores=val_scores,
        unconverged_Cs=unconverged,
    )
