"""Classification metrics: values against hand computations, and clear errors where AUC is undefined."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radssl.data.store import TaskInfo
from radssl.errors import DataError
from radssl.transfer.metrics import check_classes_covered, classification_metrics

BINARY = TaskInfo("binary", 2, ("normal", "pneumonia"))


def test_binary_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, -1])  # the unlabelled row is ignored
    score = np.array([0.1, 0.6, 0.4, 0.9, 0.5])
    metrics = classification_metrics(BINARY, y, score)
    # Positive/negative pairs: (0.4 vs 0.1 ✓, 0.4 vs 0.6 ✗, 0.9 vs both ✓) → 3/4.
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["accuracy"] == pytest.approx(0.5)  # predictions 0,1,0,1
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    # (N, 2) probabilities and torch tensors are accepted.
    two = torch.tensor(np.stack([1 - score, score], 1))
    assert classification_metrics(BINARY, torch.tensor(y), two)["auc"] == pytest.approx(0.75)


def test_multiclass_macro_auc_and_accuracy():
    task = TaskInfo("multiclass", 3)
    y = np.array([0, 1, 2, 2])
    score = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    metrics = classification_metrics(task, y, score)
    assert metrics["accuracy"] == pytest.approx(0.75)
    # Class 0 AUC: positive 0.8 vs negatives 0.2, 0.1, 0.5 → 1; class 1: 1; class 2: 0.7,0.4 vs 0.1,0.1 → 1.
    assert metrics["auc"] == pytest.approx(1.0)
    score[3] = [0.9, 0.05, 0.05]  # now class 0's positive (0.8) ranks below a negative (0.9)
    assert classification_metrics(task, y, score)["auc"] < 1.0


def test_multilabel_ignores_unknown_labels():
    task = TaskInfo("multilabel", 2, ("effusion", "nodule"))
    y = np.array([[0, 1], [1, 0], [1, np.nan], [0, 1]], dtype=np.float32)
    score = np.array([[0.2, 0.9], [0.8, 0.1], [0.7, 0.99], [0.3, 0.6]])
    metrics = classification_metrics(task, y, score)
    assert metrics["auc"] == pytest.approx(1.0)
    assert metrics["accuracy"] == pytest.approx(1.0)
    score[2, 1] = np.nan  # an unknown label's score is irrelevant... but NaN scores are still rejected
    with pytest.raises(DataError, match="NaN"):
        classification_metrics(task, y, score)


def test_missing_class_names_the_class_and_set():
    with pytest.raises(DataError, match=r"external-test: AUC is undefined: 'pneumonia' \(class 1\) has no example"):
        classification_metrics(BINARY, np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]), name="external-test")
    task = TaskInfo("multiclass", 3, ("a", "b", "c"))
    with pytest.raises(DataError, match=r"'c' \(class 2\)"):
        classification_metrics(task, np.array([0, 1]), np.full((2, 3), 1 / 3))
    skipped = classification_metrics(
        task, np.array([0, 1]), np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2]]), on_missing_class="skip"
    )
    assert skipped["auc"] == pytest.approx(1.0) and skipped["auc_classes"] == 2


def test_class_unseen_in_training_is_named():
    task = TaskInfo("multiclass", 3, ("a", "b", "c"))
    with pytest.raises(DataError, match=r"site-B: 'c' \(class 2\) occurs in this evaluation set but has no example"):
        check_classes_covered(task, np.array([0, 1, 1]), np.array([0, 2]), "site-B")
    check_classes_covered(task, np.array([0, 1, 2]), np.array([0, 2]), "site-B")
