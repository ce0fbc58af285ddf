"""Patient-level splits and nested, stratified label-fraction subsets.

Why nested: a label-efficiency curve compares 1 %, 10 %, 100 % of labels. If the 1 % set is not inside the
10 % set, the curve mixes "more labels" with "different labels" and gets noisier. For one seed, each class's
training images (or patients) are shuffled once and every fraction takes a prefix of that order, so
1 % ⊂ 5 % ⊂ 10 % ⊂ … by construction. Grouping by patient keeps every image of a patient on one side.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from radssl.atomic import write_text_atomic
from radssl.errors import DataError


def _stratum_of_group(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique groups, each group's majority label (its stratum) and the inverse index rows→group."""
    unique_groups, inverse = np.unique(groups, return_inverse=True)
    strata = np.zeros(len(unique_groups), dtype=np.int64)
    for g in range(len(unique_groups)):
        values, counts = np.unique(labels[inverse == g], return_counts=True)
        strata[g] = values[np.argmax(counts)]
    return unique_groups, strata, inverse


def _row_groups(rows: np.ndarray, patient_id: np.ndarray | None) -> np.ndarray:
    """Patient ids of ``rows``; an image with no patient id is its own group."""
    if patient_id is None:
        return rows.astype(str)
    ids = patient_id[rows].astype(str)
    return np.where(ids == "", np.char.add("__row", rows.astype(str)), ids)


def label_fraction_subsets(
    labels: np.ndarray,
    train_rows: np.ndarray,
    fractions: Sequence[float],
    seed: int | Sequence[int],
    patient_id: np.ndarray | None = None,
    source: str = "dataset",
    min_rows_per_class: int = 1,
) -> dict[float, np.ndarray]:
    """Stratified, seeded, nested subsets of ``train_rows`` for each label fraction in (0, 1].

    ``labels`` is indexed by row (class index; multilabel tasks pass any single stratification column).
    Each fraction keeps at least one patient per class present, and errors when a class would vanish.
    ``min_rows_per_class`` is a floor: every class keeps patients until it holds at least that many rows
    (or all of its rows), e.g. so that a proportional validation subset still defines an AUC. The floor is
    the same for every fraction, so nesting holds. ``seed`` may be a sequence (numpy ``SeedSequence``
    entropy), e.g. ``[seed, 1]`` for a second, independent stream of the same seed.
    Returns sorted row indices per fraction.
    """
    train_rows = np.asarray(train_rows, dtype=np.int64)
    if len(train_rows) == 0:
        raise DataError(source, "the training split is empty; no label-fraction subset can be drawn")
    if min_rows_per_class < 1:
        raise DataError(source, f"min_rows_per_class must be ≥ 1, got {min_rows_per_class}")
    for fraction in fractions:
        if not 0.0 < float(fraction) <= 1.0:
            raise DataError(source, f"label fraction {fraction} is outside (0, 1]")
    row_labels = np.asarray(labels)[train_rows]
    if (row_labels < 0).any():
        raise DataError(source, "some training rows have no label (-1); label fractions need labelled rows")
    groups = _row_groups(train_rows, patient_id)
    unique_groups, strata, inverse = _stratum_of_group(row_labels, groups)
    rng = np.random.default_rng(seed)
    # One shuffled order of groups per stratum; fractions take prefixes of it (nesting by construction).
    orders = {int(s): rng.permutation(np.flatnonzero(strata == s)) for s in np.unique(strata)}
    group_sizes = np.bincount(inverse, minlength=len(unique_groups))
    subsets: dict[float, np.ndarray] = {}
    for fraction in sorted(float(f) for f in fractions):
        chosen: list[np.ndarray] = []
        for stratum, order in orders.items():
            target = fraction * group_sizes[order].sum()
            cumulative = np.cumsum(group_sizes[order])
            count = max(1, int(np.searchsorted(cumulative, target - 1e-9) + 1))
            floor = int(np.searchsorted(cumulative, min_rows_per_class - 1e-9) + 1)  # first prefix with enough rows
            count = min(max(count, floor), len(order))
            if count < 1:
                raise DataError(source, f"label fraction {fraction} leaves class {stratum} with no example")
            chosen.append(order[:count])
        keep_groups = np.concatenate(chosen)
        mask = np.isin(inverse, keep_groups)
        subsets[fraction] = np.sort(train_rows[mask])
    return subsets


def assign_patient_splits(
    patient_id: np.ndarray,
    labels: np.ndarray,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    source: str = "dataset",
) -> np.ndarray:
    """Assign ``train``/``val``/``test`` per patient, stratified by each patient's majority label.

    No patient appears in two splits. Rows without a patient id are their own group. Unlabelled rows
    (label -1) form their own stratum.
    """
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise DataError(source, f"split fractions {fractions} do not sum to 1")
    rows = np.arange(len(patient_id))
    groups = _row_groups(rows, patient_id)
    unique_groups, strata, inverse = _stratum_of_group(np.asarray(labels), groups)
    rng = np.random.default_rng(seed)
    group_split = np.empty(len(unique_groups), dtype=object)
    names = ("train", "val", "test")
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        n = len(members)
        n_val = int(round(fractions[1] * n))
        n_test = int(round(fractions[2] * n))
        if n >= 3:  # keep every non-empty split represented where the stratum allows it
            n_val = max(n_val, 1 if fractions[1] > 0 else 0)
            n_test = max(n_test, 1 if fractions[2] > 0 else 0)
        n_train = max(n - n_val - n_test, 0)
        cuts = (n_train, n_train + n_val)
        for position, group in enumerate(members):
            group_split[group] = names[0] if position < cuts[0] else names[1] if position < cuts[1] else names[2]
    return np.asarray(group_split[inverse], dtype="<U10")


def save_subsets(path: Path, subsets: dict[float, np.ndarray], meta: dict[str, object]) -> None:
    """Write subsets as JSON (fraction → row indices) atomically, with the data fingerprint in ``meta``."""
    payload = {"meta": meta, "subsets": {repr(k): v.tolist() for k, v in subsets.items()}}
    write_text_atomic(path, json.dumps(payload))


def load_subsets(path: Path) -> tuple[dict[float, np.ndarray], dict[str, object]]:
    """Read subsets written by :func:`save_subsets`."""
    payload = json.loads(Path(path).read_text())
    subsets = {float(k): np.asarray(v, dtype=np.int64) for k, v in payload["subsets"].items()}
    return subsets, payload["meta"]
