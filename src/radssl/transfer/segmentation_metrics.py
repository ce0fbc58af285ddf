"""Per-case segmentation metrics: Dice per class and the 95th-percentile Hausdorff distance (HD95), via MONAI.

Why MONAI's functions (``monai.metrics.compute_dice`` and ``compute_hausdorff_distance``): they are the field's
reference implementations (used by the MSD/BraTS baselines built on MONAI), already tested upstream, and HD95 has
several definitions in the literature; using MONAI's makes our numbers comparable with MONAI-based papers. Our
tests check them against values worked out by hand on tiny masks. MONAI's HD95 is
``max(P95(d(pred surface → truth surface)), P95(d(truth surface → pred surface)))`` over the *edge voxels* of each
mask (voxels of the mask with a neighbour outside it), with Euclidean distances in mm when a spacing is given.

Empty structures (a class absent from the truth, the prediction, or both) are where papers differ most, so the
rules are fixed and reported here, following the BraTS challenge's conventions (Bakas et al. 2018, arXiv:1811.02629):

- **Dice** of a class: ``2|P∩T| / (|P| + |T|)``. Truth and prediction both empty → **1** (correctly nothing);
  truth empty but something predicted → **0** (a false detection); truth present and nothing predicted → 0.
  Dice is therefore always defined, and ``dice_mean`` (the mean over the foreground classes of one case) too.
- **HD95** of a class: both empty → **NaN** (undefined: no surface to measure), left out of the means and
  counted (``counts[...]["hd95_<class>_undefined"]``). Exactly one of them empty → the **diagonal of the image**
  in mm (the largest distance the field of view allows), as BraTS gives a missed or hallucinated tumour the worst
  possible distance rather than dropping the case (dropping would reward misses); counted as
  ``hd95_<class>_penalised``. ``hd95_mean`` of a case is the mean over its classes with a defined HD95 (NaN when
  none is).

Units: HD95 is in mm when a spacing is given (``spacing`` per case, mm per axis in the array's axis order), else in
voxels; :func:`summarise` does not mix units — the caller passes one or the other for a whole test set.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch

FOREGROUND_START = 1
"""Label 0 is the background: metrics are reported for labels 1 … K − 1."""


def metric_suffix(class_name: str) -> str:
    """A class name as a metric-name suffix: lower case, runs of other characters as ``_`` (``Left HC`` → ``left_hc``)."""
    suffix = re.sub(r"[^0-9a-z]+", "_", class_name.strip().lower()).strip("_")
    return suffix or "class"


def metric_names(class_names: Sequence[str]) -> list[str]:
    """Per-case metric names for these classes: ``dice_<c>`` …, ``dice_mean``, ``hd95_<c>`` …, ``hd95_mean``."""
    suffixes = [metric_suffix(name) for name in class_names[FOREGROUND_START:]]
    if len(set(suffixes)) != len(suffixes):
        raise ValueError(f"class names {list(class_names)} give repeated metric names {suffixes}; name classes apart")
    return ([f"dice_{s}" for s in suffixes] + ["dice_mean"] + [f"hd95_{s}" for s in suffixes] + ["hd95_mean"])


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, *S) integer labels → (N, K, *S) float one-hot (MONAI's metric input format)."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def dice_per_class(prediction: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """(N, K − 1) Dice of each foreground class per case (empty-vs-empty = 1, see the module docstring)."""
    from monai.metrics import compute_dice

    _check_pair(prediction, truth)
    dice = compute_dice(one_hot(prediction, num_classes), one_hot(truth, num_classes), include_background=False,
                        ignore_empty=False, num_classes=num_classes)
    return dice.double().cpu().numpy().reshape(len(prediction), num_classes - 1)


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None) -> float:
    """The field of view's diagonal (mm with ``spacing``, else voxels): the HD95 of a missed or false structure."""
    steps = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return float(math.sqrt(float(np.sum((np.asarray(shape, dtype=np.float64) * steps) ** 2))))


def hd95_per_class(prediction: torch.Tensor, truth: torch.Tensor, num_classes: int,
                   spacing: np.ndarray | Sequence[Sequence[float]] | None = None) -> np.ndarray:
    """(N, K − 1) HD95 of each foreground class per case (NaN / diagonal rules in the module docstring).

    ``spacing``: None (voxel units) or (N, spatial_dims) mm per axis in the arrays' axis order.
    """
    from monai.metrics import compute_hausdorff_distance

    _check_pair(prediction, truth)
    n, dims = len(prediction), prediction.ndim - 1
    if spacing is not None:
        spacing = np.asarray(spacing, dtype=np.float64).reshape(n, -1)
        if spacing.shape[1] != dims or not np.isfinite(spacing).all() or (spacing <= 0).any():
            raise ValueError(f"spacing must be (N, {dims}) positive mm values, got {spacing.tolist()[:2]}…")
    out = np.full((n, num_classes - 1), np.nan)
    shape = tuple(prediction.shape[1:])
    for case in range(n):
        case_spacing = None if spacing is None else [float(s) for s in spacing[case]]
        for index, label in enumerate(range(FOREGROUND_START, num_classes)):
            predicted, present = bool((prediction[case] == label).any()), bool((truth[case] == label).any())
            if not predicted and not present:
                continue  # undefined: NaN
            if predicted != present:
                out[case, index] = image_diagonal(shape, case_spacing)
                continue
            pair = [(x[case] == label)[None, None].float() for x in (prediction, truth)]
            with warnings.catch_warnings():  # empty-mask warnings cannot occur here (both present)
                warnings.simplefilter("ignore", UserWarning)
                warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.6 deprecates an argument it passes itself
                distance = compute_hausdorff_distance(pair[0], pair[1], include_background=True, percentile=95,
                                                      spacing=case_spacing)
            out[case, index] = float(distance.reshape(-1)[0])
    return out


def case_metrics(prediction: torch.Tensor, truth: torch.Tensor, class_names: Sequence[str],
                 spacing: np.ndarray | None = None, hd95: bool = True) -> dict[str, np.ndarray]:
    """Per-case metrics ({name: (N,) array}) for integer label maps ``prediction`` and ``truth`` (N, *S).

    Names from :func:`metric_names`; ``hd95=False`` leaves the HD95 entries out (validation only needs Dice).
    """
    num_classes = len(class_names)
    suffixes = [metric_suffix(name) for name in class_names[FOREGROUND_START:]]
    metric_names(class_names)  # repeated suffixes are an error
    dice = dice_per_class(prediction, truth, num_classes)
    out: dict[str, np.ndarray] = {f"dice_{s}": dice[:, i] for i, s in enumerate(suffixes)}
    out["dice_mean"] = dice.mean(axis=1)
    if hd95:
        distance = hd95_per_class(prediction, truth, num_classes, spacing)
        out.update({f"hd95_{s}": distance[:, i] for i, s in enumerate(suffixes)})
        defined = np.isfinite(distance)
        with np.errstate(invalid="ignore"):
            out["hd95_mean"] = np.where(defined.any(1), np.nansum(distance, 1) / np.maximum(defined.sum(1), 1),
                                        np.nan)
    return out


def summarise(per_case: dict[str, np.ndarray], truth_present: dict[str, np.ndarray] | None = None,
              prediction_present: dict[str, np.ndarray] | None = None) -> tuple[dict[str, float], dict[str, int]]:
    """Means over cases (NaN left out) and counts: ``<metric>_cases`` (values in the mean) for every metric, and
    for HD95 of a class ``_undefined`` (both empty) / ``_penalised`` (one empty) when presence is given.

    ``truth_present`` / ``prediction_present`` map a metric suffix (class) to a (N,) bool array.
    """
    means: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, values in per_case.items():
        values = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(values)
        means[name] = float(values[finite].mean()) if finite.any() else float("nan")
        counts[f"{name}_cases"] = int(finite.sum())
    if truth_present is not None and prediction_present is not None:
        for suffix, present in truth_present.items():
            if f"hd95_{suffix}" not in per_case:
                continue
            predicted = prediction_present[suffix]
            counts[f"hd95_{suffix}_undefined"] = int((~present & ~predicted).sum())
            counts[f"hd95_{suffix}_penalised"] = int((present != predicted).sum())
    return means, counts


def _check_pair(prediction: torch.Tensor, truth: torch.Tensor) -> None:
    if prediction.shape != truth.shape or prediction.ndim not in (3, 4):
        raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} must be label maps of "
                         "one shape, (N, H, W) or (N, D, H, W)")
