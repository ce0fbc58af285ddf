"""Linear probe: C chosen on validation AUC, good on separable features, chance on noise, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from radssl.data.store import TaskInfo
from radssl.errors import DataError
from radssl.transfer.linear_probe import DEFAULT_CS, linear_probe
from radssl.transfer.metrics import classification_metrics

CS = (1e-3, 1e-1, 10.0)


def _clusters(n: int, k: int, d: int, shift: float, seed: int, centres_seed: int = 99):
    centres = np.random.default_rng(centres_seed).normal(size=(k, d)) * shift
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    return (rng.normal(size=(n, d)) + centres[y]).astype(np.float32), y


def test_binary_probe_selects_C_on_validation_and_separates():
    train_x, train_y = _clusters(300, 2, 32, 0.5, seed=0)
    val_x, val_y = _clusters(100, 2, 32, 0.5, seed=1)
    test_x, test_y = _clusters(200, 2, 32, 0.5, seed=2)
    result = linear_probe(
        train_x, train_y, val_x, val_y, {"test": (test_x, test_y)}, TaskInfo("binary", 2), Cs=CS, path_patience=None
    )
    assert set(result.val_metric_per_C) == set(CS)
    assert result.val_metric == max(result.val_metric_per_C.values())
    assert result.best_C == min(c for c, m in result.val_metric_per_C.items() if m == result.val_metric)
    assert result.metrics["test"]["auc"] > 0.95
    assert result.scores["test"].shape == (200,)
    # The returned validation scores come from the chosen C.
    val_auc = classification_metrics(TaskInfo("binary", 2), val_y, result.val_scores)["auc"]
    assert val_auc == pytest.approx(result.val_metric)


def test_path_stops_after_patience_without_gain():
    train_x, train_y = _clusters(200, 2, 64, 0.3, seed=3)
    val_x, val_y = _clusters(100, 2, 64, 0.3, seed=4)
    grid = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    task = TaskInfo("binary", 2)
    full = linear_probe(train_x, train_y, val_x, val_y, {}, task, Cs=grid, path_patience=None)
    short = linear_probe(train_x, train_y, val_x, val_y, {}, task, Cs=grid, path_patience=2)
    best_position = grid.index(full.best_C)
    assert best_position <= len(grid) - 4  # the full path has ≥ 2 C values past its best to skip
    assert list(short.val_metric_per_C) == list(grid[: best_position + 3])
    assert short.best_C == full.best_C and short.val_metric == full.val_metric


def test_probe_is_at_chance_on_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    y = rng.integers(0, 2, 600)
    tests = {"test": (x[400:], y[400:])}
    result = linear_probe(x[:300], y[:300], x[300:400], y[300:400], tests, TaskInfo("binary", 2), Cs=CS)
    assert abs(result.metrics["test"]["auc"] - 0.5) < 0.12


def test_validation_choice_depends_on_validation_labels():
    """Swap in validation labels that reward the other end of the C grid: the choice must follow."""
    train_x, train_y = _clusters(200, 2, 64, 0.3, seed=3)
    val_x, val_y = _clusters(100, 2, 64, 0.3, seed=4)
    task = TaskInfo("binary", 2)
    result = linear_probe(train_x, train_y, val_x, val_y, {}, task, Cs=CS, path_patience=None)
    flipped = linear_probe(train_x, train_y, val_x, 1 - val_y, {}, task, Cs=CS, path_patience=None)
    for C, metric in result.val_metric_per_C.items():
        assert flipped.val_metric_per_C[C] == pytest.approx(1 - metric)
    assert len(set(result.val_metric_per_C.values())) == len(CS)  # the grid really matters here
    assert flipped.best_C == min(result.val_metric_per_C, key=result.val_metric_per_C.get)


def test_multiclass_and_multilabel_probes_give_metrics():
    x, y = _clusters(400, 3, 16, 1.0, seed=5)
    tests = {"test": (x[300:], y[300:])}
    result = linear_probe(x[:200], y[:200], x[200:300], y[200:300], tests, TaskInfo("multiclass", 3), Cs=CS)
    assert result.scores["test"].shape == (100, 3)
    np.testing.assert_allclose(result.scores["test"].sum(1), 1.0, atol=1e-6)
    assert result.metrics["test"]["auc"] > 0.9

    labels = np.stack([y == 0, y == 1], axis=1).astype(np.float32)
    labels[::7, 1] = np.nan  # unknown labels are skipped per label
    result = linear_probe(
        x[:200], labels[:200], x[200:300], labels[200:300], {"test": (x[300:], labels[300:])},
        TaskInfo("multilabel", 2), Cs=CS,
    )
    assert result.scores["test"].shape == (100, 2)
    assert result.metrics["test"]["auc"] > 0.9


def test_test_set_with_class_unseen_in_training_is_an_error():
    x, y = _clusters(300, 3, 8, 1.0, seed=6)
    train, val = y[:200] != 2, y[200:250] != 2
    with pytest.raises(DataError, match=r"hospital-B: class 2 occurs in this evaluation set but has no example"):
        linear_probe(
            x[:200][train], y[:200][train], x[200:250][val], y[200:250][val], {"hospital-B": (x[250:], y[250:])},
            TaskInfo("multiclass", 3), Cs=CS,
        )


def test_unlabelled_training_rows_are_ignored():
    x, y = _clusters(300, 2, 8, 1.0, seed=7)
    noisy = y.copy()
    noisy[:100] = -1
    a = linear_probe(x[:200], noisy[:200], x[200:], y[200:], {}, TaskInfo("binary", 2), Cs=CS,
                     standardisation_feats=x[:200])
    b = linear_probe(x[100:200], y[100:200], x[200:], y[200:], {}, TaskInfo("binary", 2), Cs=CS,
                     standardisation_feats=x[:200])
    assert a.val_metric_per_C == pytest.approx(b.val_metric_per_C)


def test_probe_fits_the_full_grid_on_5000_by_512_features():
    """Without path stopping every C of the default grid is fitted and scored on validation.

    How long this takes is measured in ``benchmarks/linear_probe_speed.py`` (timing asserts in unit tests are
    flaky on a loaded machine)."""
    train_x, train_y = _clusters(5000, 2, 512, 0.1, seed=8)
    val_x, val_y = _clusters(500, 2, 512, 0.1, seed=9)
    train_x, val_x = np.maximum(train_x, 0), np.maximum(val_x, 0)  # ReLU-like, as pooled CNN features
    result = linear_probe(
        train_x, train_y, val_x, val_y, {"test": (val_x, val_y)}, TaskInfo("binary", 2), path_patience=None
    )
    assert sorted(result.val_metric_per_C) == sorted(DEFAULT_CS)
    assert result.metrics["test"]["auc"] > 0.8


def _sklearn_fit(train_x, train_y, scale_x, C):
    """scikit-learn's standard fit: standardised by ``scale_x``'s mean/std, from scratch, lbfgs to convergence."""
    mean, std = scale_x.mean(0, dtype=np.float64), scale_x.std(0, dtype=np.float64)
    mean, std = mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32)
    model = LogisticRegression(C=C, max_iter=5000).fit((train_x - mean) / std, train_y)
    return lambda x: model.predict_proba((x - mean) / std)[:, 1]


def test_standardisation_uses_the_label_free_training_split_statistics():
    """At a small label fraction the probe scales by every training row's features, not by the labelled few."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(400, 12)) * rng.uniform(0.2, 5.0, 12) + rng.normal(size=12) * 3).astype(np.float32)
    y = (x[:, 0] / 5 + x[:, 1] / 3 + rng.normal(size=400) > 0).astype(np.int64)
    split, labelled = x[:300], np.arange(12)  # 12 labelled rows of a 300-row training split
    val_x, val_y = x[300:], y[300:]
    result = linear_probe(split[labelled], y[labelled], val_x, val_y, {"test": (val_x, val_y)},
                          TaskInfo("binary", 2), Cs=(0.1,), standardisation_feats=split)
    unlabelled_stats = _sklearn_fit(split[labelled], y[labelled], split, 0.1)(val_x)
    labelled_stats = _sklearn_fit(split[labelled], y[labelled], split[labelled], 0.1)(val_x)
    assert np.abs(unlabelled_stats - labelled_stats).max() > 0.05  # the two scalings really differ here
    np.testing.assert_allclose(result.scores["test"], unlabelled_stats, atol=1e-4)


def test_standardisation_features_must_match_the_feature_dimension():
    x, y = _clusters(100, 2, 8, 1.0, seed=1)
    with pytest.raises(ValueError, match="standardisation_feats have shape"):
        linear_probe(x[:60], y[:60], x[60:], y[60:], {}, TaskInfo("binary", 2), standardisation_feats=x[:, :4])


@pytest.mark.parametrize("seed", [4, 15, 30, 55])
def test_C_search_finds_the_C_of_an_exhaustive_sklearn_search(seed):
    """Small noisy problems whose validation AUC is not unimodal in C (seeds 4, 15, 30: the old path stopped
    after 2 C values without a gain) or where a warm-started large-C fit stopped early (seed 55)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(100, 20)).astype(np.float32)
    y = (x @ rng.normal(size=20) * 0.4 + rng.normal(size=100) > 0).astype(np.int64)
    train_x, train_y, val_x, val_y = x[:60], y[:60], x[60:], y[60:]
    per_C = {C: roc_auc_score(val_y, _sklearn_fit(train_x, train_y, train_x, C)(val_x)) for C in DEFAULT_CS}
    best = max(sorted(per_C), key=lambda C: per_C[C])  # max keeps the first (smallest) C among ties
    result = linear_probe(train_x, train_y, val_x, val_y, {}, TaskInfo("binary", 2), standardisation_feats=train_x)
    assert result.best_C == best
    assert result.val_metric_per_C == pytest.approx(per_C, abs=1e-9)
    assert result.converged and result.unconverged_Cs == ()
