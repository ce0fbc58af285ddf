"""Patient-level splits and nested, stratified label-fraction subsets (radssl.data.splits).

Every property a label-efficiency curve relies on: no patient on two sides of a split, subsets drawn only from
training patients and never cutting a patient in half, 1 % ⊂ 10 % ⊂ 100 %, class proportions kept, and the
same seed giving the same rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radssl.data.splits import assign_patient_splits, label_fraction_subsets, load_subsets, save_subsets
from radssl.errors import DataError


def _cohort(positives: int = 60, negatives: int = 240, per_patient: int = 3, seed: int = 0):
    """(patient_id, labels) per image: imbalanced (20 % positive patients), several images per patient."""
    rng = np.random.default_rng(seed)
    patient_label = np.array([1] * positives + [0] * negatives)
    rng.shuffle(patient_label)
    patients = np.repeat([f"P{i:04d}" for i in range(len(patient_label))], per_patient)
    labels = np.repeat(patient_label, per_patient)
    order = rng.permutation(len(patients))  # rows of one patient are not adjacent, as in real exports
    return patients[order], labels[order]


def _patients(patient_id: np.ndarray, rows: np.ndarray) -> set[str]:
    return set(patient_id[rows].tolist())


# ----------------------------------------------------------------------------------------- patient splits
def test_patient_splits_never_share_a_patient_and_cover_every_row():
    patient_id, labels = _cohort()
    split = assign_patient_splits(patient_id, labels, (0.7, 0.1, 0.2), seed=0)
    assert split.shape == labels.shape and set(split.tolist()) == {"train", "val", "test"}
    sides = {name: _patients(patient_id, np.flatnonzero(split == name)) for name in ("train", "val", "test")}
    assert not sides["train"] & sides["val"] and not sides["train"] & sides["test"] and not sides["val"] & sides["test"]
    for patient in np.unique(patient_id):  # every image of a patient is on one side
        assert len(set(split[patient_id == patient].tolist())) == 1


def test_patient_splits_are_stratified_per_class():
    patient_id, labels = _cohort(positives=60, negatives=240)
    split = assign_patient_splits(patient_id, labels, (0.7, 0.1, 0.2), seed=1)
    for label, n_patients in ((1, 60), (0, 240)):
        for name, fraction in (("val", 0.1), ("test", 0.2)):
            rows = np.flatnonzero((split == name) & (labels == label))
            assert len(_patients(patient_id, rows)) == round(fraction * n_patients), (label, name)


def test_patient_splits_depend_only_on_the_seed():
    patient_id, labels = _cohort()
    a = assign_patient_splits(patient_id, labels, seed=5)
    b = assign_patient_splits(patient_id, labels, seed=5)
    c = assign_patient_splits(patient_id, labels, seed=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rows_without_patient_id_are_their_own_group():
    patient_id = np.array([""] * 40 + ["P1"] * 10)
    labels = np.array([0, 1] * 20 + [1] * 10)
    split = assign_patient_splits(patient_id, labels, (0.5, 0.25, 0.25), seed=0)
    assert len(set(split[patient_id == "P1"].tolist())) == 1  # the real patient stays together
    assert len(set(split[:40].tolist())) == 3  # anonymous images spread over every split, one by one


def test_small_strata_still_reach_every_split():
    patient_id = np.array([f"P{i}" for i in range(13)])
    labels = np.array([1, 1, 1] + [0] * 10)  # 3 positive patients
    split = assign_patient_splits(patient_id, labels, (0.7, 0.1, 0.2), seed=0)
    assert sorted(split[labels == 1].tolist()) == ["test", "train", "val"]


def test_split_fractions_must_sum_to_one():
    with pytest.raises(DataError, match=r"do not sum to 1"):
        assign_patient_splits(np.array(["a", "b"]), np.array([0, 1]), (0.5, 0.3, 0.3), source="toy.csv")


# ----------------------------------------------------------------------------------------- label fractions
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 1.0)


def _train_rows(seed: int = 0):
    patient_id, labels = _cohort(positives=100, negatives=400, per_patient=2, seed=seed)
    split = assign_patient_splits(patient_id, labels, (0.7, 0.1, 0.2), seed=seed)
    return patient_id, labels, split, np.flatnonzero(split == "train")


def test_label_fractions_are_nested_and_end_with_all_training_rows():
    patient_id, labels, _, train = _train_rows()
    subsets = label_fraction_subsets(labels, train, FRACTIONS, seed=0, patient_id=patient_id)
    assert list(subsets) == sorted(FRACTIONS)
    for small, large in zip(FRACTIONS, FRACTIONS[1:]):
        assert set(subsets[small].tolist()) < set(subsets[large].tolist()), (small, large)
    assert np.array_equal(subsets[1.0], np.sort(train))
    assert all(np.array_equal(rows, np.sort(rows)) for rows in subsets.values())


def test_label_fractions_take_whole_training_patients_only():
    patient_id, labels, split, train = _train_rows()
    subsets = label_fraction_subsets(labels, train, FRACTIONS, seed=3, patient_id=patient_id)
    held_out = _patients(patient_id, np.flatnonzero(split != "train"))
    for fraction, rows in subsets.items():
        assert set(split[rows].tolist()) == {"train"}
        assert not _patients(patient_id, rows) & held_out
        chosen = _patients(patient_id, rows)
        complete = {p for p in chosen if set(np.flatnonzero(patient_id == p)) <= set(rows.tolist())}
        assert complete == chosen, f"fraction {fraction} cut a patient's images in two"


def test_label_fractions_keep_class_proportions():
    patient_id, labels, _, train = _train_rows()
    subsets = label_fraction_subsets(labels, train, FRACTIONS, seed=0, patient_id=patient_id)
    per_class_train = {c: int(np.sum(labels[train] == c)) for c in (0, 1)}
    for fraction, rows in subsets.items():
        for c, total in per_class_train.items():
            count = int(np.sum(labels[rows] == c))
            # smallest whole-patient prefix reaching fraction × class images (2 images per patient), never 0
            assert max(2, fraction * total) <= count < max(2, fraction * total) + 2, (fraction, c, count)


def test_label_fractions_depend_only_on_the_seed():
    patient_id, labels, _, train = _train_rows()
    a = label_fraction_subsets(labels, train, FRACTIONS, seed=7, patient_id=patient_id)
    b = label_fraction_subsets(labels, train, FRACTIONS, seed=7, patient_id=patient_id)
    c = label_fraction_subsets(labels, train, FRACTIONS, seed=8, patient_id=patient_id)
    assert all(np.array_equal(a[f], b[f]) for f in FRACTIONS)
    assert not np.array_equal(a[0.1], c[0.1])


def test_label_fraction_errors_name_the_source():
    patient_id, labels, _, train = _train_rows()
    with pytest.raises(DataError, match=r"toy: label fraction 0(\.0)? is outside"):
        label_fraction_subsets(labels, train, [0.0, 0.5], seed=0, patient_id=patient_id, source="toy")
    with pytest.raises(DataError, match=r"training split is empty"):
        label_fraction_subsets(labels, np.array([], dtype=np.int64), [0.5], seed=0, source="toy")
    unlabelled = labels.copy()
    unlabelled[train[0]] = -1
    with pytest.raises(DataError, match=r"no label \(-1\)"):
        label_fraction_subsets(unlabelled, train, [0.5], seed=0, patient_id=patient_id, source="toy")


def test_subsets_round_trip_through_their_file(tmp_path: Path):
    patient_id, labels, _, train = _train_rows()
    subsets = label_fraction_subsets(labels, train, FRACTIONS, seed=0, patient_id=patient_id)
    path = tmp_path / "subsets.json"
    save_subsets(path, subsets, {"fingerprint": "abc", "seed": 0})
    loaded, meta = load_subsets(path)
    assert meta == {"fingerprint": "abc", "seed": 0}
    assert set(loaded) == set(subsets) and all(np.array_equal(loaded[f], subsets[f]) for f in subsets)


# ---------------------------------------------------------------------------------- pretraining rows (leakage)
def _store_with_splits(split: list[str], patients: list[str]):
    import torch

    from radssl.data.store import ImageStore, TaskInfo

    n = len(split)
    labels = torch.tensor([-1 if s == "unlabelled" else i % 2 for i, s in enumerate(split)], dtype=torch.int64)
    return ImageStore("toy", torch.zeros(n, 1, 4, 4, dtype=torch.uint8), labels, np.asarray(split, dtype="<U10"),
                      np.asarray(patients), TaskInfo("binary", 2))


def test_pretraining_never_sees_an_image_of_a_val_or_test_patient():
    """A source's own splits (or a carved val split) can put a test patient's unlabelled images in pretraining."""
    split = ["train", "train", "unlabelled", "unlabelled", "test", "val", "unlabelled", "train", "unlabelled"]
    patients = ["A", "A", "A", "T", "T", "V", "V", "", ""]
    store = _store_with_splits(split, patients)
    assert store.pretrain_indices().tolist() == [0, 1, 2, 7, 8]  # T's and V's unlabelled images are dropped
    assert store.held_out_patient_rows().tolist() == [3, 6]
    assert store.describe()["pretrain_rows_of_held_out_patients"] == 2  # run.json's "data" records describe()
    clean = _store_with_splits(["train", "unlabelled", "test"], ["A", "A", "B"])
    assert clean.pretrain_indices().tolist() == [0, 1] and len(clean.held_out_patient_rows()) == 0
    assert "pretrain_rows_of_held_out_patients" not in clean.describe()


def test_pretrain_rows_of_the_engine_drop_held_out_patients():
    from radssl.engine.pretrain import pretrain_rows

    store = _store_with_splits(["unlabelled", "test", "train", "train"], ["T", "T", "A", "B"])
    assert pretrain_rows(store, 1.0, seed=0).tolist() == [2, 3]
