"""The quick evaluation after pretraining chooses the probe's C on validation, never on the test split."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from support import make_tiny_store
from torch import nn

from radssl.evaluation.quick import evaluate_backbone, validation_rows


def _pooled() -> nn.Module:
    """A parameter-free 'backbone': 4×4 average-pooled pixels (16 features) — enough for a probe to separate."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())


def _store_without_val(seed: int = 0):
    store = make_tiny_store(n=120, seed=seed)
    split = np.where(store.split == "val", "train", store.split)  # a source that gives only train/test
    return replace(store, split=split, _fingerprint=None)


def test_without_val_split_validation_is_carved_from_train_patients():
    store = _store_without_val()
    train = store.indices("train")
    kept, val, note = validation_rows(store, train, store.indices("val"), seed=0)
    assert "carved 20% of train" in note and "patient-level" in note and "no val split" in note
    assert set(kept.tolist()) | set(val.tolist()) == set(train.tolist()) and not set(kept) & set(val)
    assert not set(store.patient_id[kept]) & set(store.patient_id[val]), "a patient on both sides"
    assert len(set(store.patient_id[val])) == round(0.2 * len(set(store.patient_id[train])))
    labels = store.labels.numpy()
    assert set(labels[val].tolist()) == {0, 1}  # stratified: both classes to compute a validation AUC on
    again = validation_rows(store, train, store.indices("val"), seed=0)[1]
    other = validation_rows(store, train, store.indices("val"), seed=1)[1]
    assert np.array_equal(val, again) and not np.array_equal(val, other)


def test_existing_val_split_is_used_as_is():
    store = make_tiny_store(n=120)
    train, val = store.indices("train"), store.indices("val")
    kept, chosen, note = validation_rows(store, train, val, seed=0)
    assert np.array_equal(kept, train) and np.array_equal(chosen, val) and note == "the store's val split"


def test_probe_choice_does_not_look_at_test_labels():
    store = _store_without_val()
    test = torch.from_numpy(store.indices("test"))
    flipped_labels = store.labels.clone()
    flipped_labels[test] = 1 - flipped_labels[test]
    flipped = replace(store, labels=flipped_labels, _fingerprint=None)
    a = evaluate_backbone(_pooled(), store, knn_k=5, knn_temperature=0.07, seed=0, device="cpu")
    b = evaluate_backbone(_pooled(), flipped, knn_k=5, knn_temperature=0.07, seed=0, device="cpu")
    assert a["validation"].startswith("carved 20% of train")
    assert a["linear_probe_C"] == b["linear_probe_C"]
    assert a["linear_probe"]["val"] == b["linear_probe"]["val"]
    assert a["linear_probe"]["test"]["auc"] == 1.0 - b["linear_probe"]["test"]["auc"]  # test only scores


def test_quick_evaluation_reads_every_encoder_with_reestimated_batchnorm_statistics(monkeypatch) -> None:
    """Issue 19, point 7: the random-init twin must not be read with BatchNorm's default statistics."""
    import radssl.evaluation.quick as quick

    seen = []
    real = quick.extract_features

    def recording(module, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(module)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(quick, "extract_features", recording)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    store = make_tiny_store(n=96)
    result = evaluate_backbone(backbone, store, knn_k=5, knn_temperature=0.07, seed=0, device="cpu")
    assert result["bn_stats"] == "reestimate" and seen[-1] is not backbone
    assert not torch.allclose(seen[-1][1].running_var, torch.ones(4))  # data statistics, not the defaults
    assert torch.equal(backbone[1].running_var, torch.ones(4))  # the caller's encoder is left as it was
    evaluate_backbone(backbone, store, knn_k=5, knn_temperature=0.07, seed=0, device="cpu", bn_stats="checkpoint")
    assert seen[-1] is backbone
