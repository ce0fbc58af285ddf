"""Weighted kNN: agrees with a direct reference implementation, near-perfect on clustered features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radssl.data.store import TaskInfo
from radssl.errors import DataError
from radssl.transfer.knn import knn_classify, knn_evaluate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """Tiny tensors: one thread beats two on a shared 2-core machine (overrides conftest's setting)."""
    torch.set_num_threads(1)



def _reference(train, labels, query, k, temperature, classes):
    """Direct per-query loop of Wu et al. 2018's weighted vote."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = []
    for q in query:
        similarity = train @ (q / np.linalg.norm(q))
        nearest = np.argsort(-similarity)[:k]
        votes = np.zeros(classes)
        for j in nearest:
            votes[labels[j]] += np.exp(similarity[j] / temperature)
        out.append(votes / votes.sum())
    return np.array(out)


def test_matches_reference_and_is_chunk_invariant():
    rng = np.random.default_rng(0)
    train, labels, query = rng.normal(size=(50, 6)), rng.integers(0, 3, 50), rng.normal(size=(7, 6))
    task = TaskInfo("multiclass", 3)
    expected = _reference(train, labels, query, k=5, temperature=0.1, classes=3)
    got = knn_classify(train, labels, query, task, k=5, temperature=0.1, chunk_size=3)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    whole = knn_classify(torch.tensor(train), torch.tensor(labels), torch.tensor(query), task, k=5, temperature=0.1)
    np.testing.assert_allclose(got, whole, atol=1e-6)


def test_clustered_features_give_near_perfect_auc():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 32)) * 3
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 32)) + centres[y]
    unlabelled = y.copy()
    unlabelled[:20] = -1  # ignored, not treated as a class
    result = knn_evaluate(x[:300], unlabelled[:300], {"test": (x[300:], y[300:])}, TaskInfo("binary", 2), k=20)
    assert result.scores["test"].shape == (100,)
    assert result.metrics["test"]["auc"] > 0.99


def test_multilabel_votes_skip_unknown_labels():
    train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([[1, np.nan], [1, 0], [0, 1]], dtype=np.float32)
    query = np.array([[1.0, 0.05]])
    scores = knn_classify(train, labels, query, TaskInfo("multilabel", 2), k=2, temperature=0.07)
    # The two nearest neighbours are rows 0 and 1: label 0 is positive for both; label 1 is known only for
    # row 1 (negative), so its score is exactly 0, not diluted by the unknown.
    np.testing.assert_allclose(scores, [[1.0, 0.0]], atol=1e-6)


def test_k_larger_than_training_set_and_bad_arguments():
    train, labels = np.eye(3), np.array([0, 1, 1])
    scores = knn_classify(train, labels, np.eye(3), TaskInfo("binary", 2), k=50, temperature=1.0)
    assert scores.shape == (3,) and scores[1] > scores[0]
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(train, labels, train, TaskInfo("binary", 2), temperature=0)
    with pytest.raises(DataError, match="class 2"):
        knn_evaluate(train, labels, {"test": (train, np.array([0, 1, 2]))}, TaskInfo("multiclass", 3))
