"""Dice and HD95 (radssl.transfer.segmentation_metrics) against values worked out by hand on tiny masks.

HD95 by hand: the edge voxels of a mask are its voxels with a 4-neighbour (6 in 3D) outside it; d(A→B) lists, for
each edge voxel of A, the distance to the nearest edge voxel of B; HD95 = max(P95(d(P→T)), P95(d(T→P))) with the
linear-interpolation percentile (P95 of n sorted values = value at rank 0.95·(n − 1), interpolated).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radssl.transfer.segmentation_metrics import (
    case_metrics,
    dice_per_class,
    hd95_per_class,
    image_diagonal,
    metric_names,
    summarise,
)


def _labels(*maps: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(maps)).long()


def _squares() -> tuple[torch.Tensor, torch.Tensor]:
    """Truth: 3×3 square at rows 2–4, cols 2–4; prediction: the same square moved 2 columns right (cols 4–6)."""
    truth = np.zeros((9, 9), np.int64)
    truth[2:5, 2:5] = 1
    prediction = np.zeros((9, 9), np.int64)
    prediction[2:5, 4:7] = 1
    return _labels(prediction), _labels(truth)


def test_dice_of_overlapping_squares_is_two_thirds_of_the_overlap() -> None:
    prediction, truth = _squares()
    # |P ∩ T| = 3 (column 4), |P| = |T| = 9: Dice = 2·3 / 18 = 1/3
    assert dice_per_class(prediction, truth, 2) == pytest.approx(np.array([[1 / 3]]))
    assert dice_per_class(truth, truth, 2) == pytest.approx(np.array([[1.0]]))


def test_dice_per_class_and_its_mean_on_a_three_label_map() -> None:
    truth = np.zeros((4, 6), np.int64)
    truth[:, :2] = 1  # 8 voxels of class 1
    truth[:, 4:] = 2  # 8 voxels of class 2
    prediction = truth.copy()
    prediction[0, :2] = 0  # class 1: 6 of 8 found, nothing extra → 2·6 / (6 + 8) = 6/7
    prediction[:, 3] = 2  # class 2: all 8 found plus 4 extra → 2·8 / (12 + 8) = 0.8
    values = case_metrics(_labels(prediction), _labels(truth), ("background", "Head", "body part"), hd95=False)
    assert list(values) == ["dice_head", "dice_body_part", "dice_mean"]
    assert values["dice_head"] == pytest.approx([6 / 7])
    assert values["dice_body_part"] == pytest.approx([0.8])
    assert values["dice_mean"] == pytest.approx([(6 / 7 + 0.8) / 2])


def test_dice_empty_structure_rules() -> None:
    empty = np.zeros((5, 5), np.int64)
    present = empty.copy()
    present[1:3, 1:3] = 1
    prediction, truth = _labels(empty, present, empty), _labels(empty, empty, present)
    # both empty → 1 (correctly nothing); predicted but absent → 0; present but missed → 0
    assert dice_per_class(prediction, truth, 2)[:, 0] == pytest.approx([1.0, 0.0, 0.0])


def test_hd95_of_shifted_squares_by_hand_in_voxels_and_mm() -> None:
    prediction, truth = _squares()
    # Edges = the 8 border voxels of each square. d(P→T): P's column 4 lies on T's border (3 × 0), column 5 (rows 2
    # and 4: the centre (3, 5) is not an edge) is 1 away (2 × 1), column 6 is 2 away (3 × 2): sorted
    # [0, 0, 0, 1, 1, 2, 2, 2], P95 at rank 0.95·7 = 6.65 → 2. Symmetric, so HD95 = 2 voxels.
    assert hd95_per_class(prediction, truth, 2) == pytest.approx(np.array([[2.0]]))
    # The shift is along W: with 2 mm columns (and 1 mm rows) every distance doubles → 4 mm.
    assert hd95_per_class(prediction, truth, 2, spacing=[[1.0, 2.0]]) == pytest.approx(np.array([[4.0]]))
    # Along H the spacing changes nothing here (all nearest edges are in the same row).
    assert hd95_per_class(prediction, truth, 2, spacing=[[5.0, 1.0]]) == pytest.approx(np.array([[2.0]]))


def test_hd95_interpolates_the_95th_percentile_and_ignores_a_lone_outlier_unlike_hd() -> None:
    truth = np.zeros((5, 12), np.int64)
    truth[0, :10] = 1  # a 1-voxel-thick line: all 10 voxels are edges
    prediction = truth.copy()
    prediction[3, 0] = 1  # one stray voxel 3 rows away
    # d(P→T) = ten 0s and one 3 (n = 11): P95 at rank 0.95·10 = 9.5 → 0.5·0 + 0.5·3 = 1.5; d(T→P) all 0.
    assert hd95_per_class(_labels(prediction), _labels(truth), 2) == pytest.approx(np.array([[1.5]]))
    # 2 mm rows: the stray voxel is 6 mm away → 3 mm.
    assert hd95_per_class(_labels(prediction), _labels(truth), 2, spacing=[[2.0, 1.0]]) == pytest.approx(np.array([[3.0]]))


def test_hd95_in_3d_by_hand() -> None:
    truth = np.zeros((4, 4, 12), np.int64)
    truth[0, 0, :10] = 1
    prediction = truth.copy()
    prediction[2, 0, 0] = 1  # 2 slices away in depth
    spacing = [[3.0, 1.0, 1.0]]  # 3 mm slices: 6 mm → P95 = 0.5·6 = 3 mm
    assert hd95_per_class(_labels(prediction), _labels(truth), 2, spacing=spacing) == pytest.approx(np.array([[3.0]]))
    assert dice_per_class(_labels(prediction), _labels(truth), 2) == pytest.approx(np.array([[2 * 10 / 21]]))


def test_hd95_empty_rules_nan_when_both_empty_diagonal_when_one_is() -> None:
    empty = np.zeros((6, 8), np.int64)
    present = empty.copy()
    present[2:4, 2:4] = 1
    prediction, truth = _labels(empty, present, empty), _labels(empty, empty, present)
    values = hd95_per_class(prediction, truth, 2, spacing=[[1.0, 1.0], [2.0, 0.5], [1.0, 1.0]])
    assert math.isnan(values[0, 0])  # both empty: undefined
    assert values[1, 0] == pytest.approx(math.hypot(6 * 2.0, 8 * 0.5))  # false detection: the image diagonal (mm)
    assert values[2, 0] == pytest.approx(math.hypot(6, 8))  # missed structure: the diagonal
    assert image_diagonal((6, 8), None) == pytest.approx(10.0)


def test_summaries_leave_nan_out_and_count_undefined_and_penalised_cases() -> None:
    empty = np.zeros((6, 8), np.int64)
    present = empty.copy()
    present[2:4, 2:4] = 1
    shifted = np.roll(present, 1, axis=1)
    prediction = _labels(empty, present, empty, shifted)
    truth = _labels(empty, empty, present, present)
    values = case_metrics(prediction, truth, ("background", "lesion"))
    assert list(values) == metric_names(("background", "lesion"))
    assert math.isnan(values["hd95_mean"][0])  # the case's only class is undefined → its mean too
    present_t = {"lesion": (truth == 1).flatten(1).any(1).numpy()}
    present_p = {"lesion": (prediction == 1).flatten(1).any(1).numpy()}
    means, counts = summarise(values, present_t, present_p)
    # Dice: 1 (both empty), 0, 0, 2·2/8 = 0.5 → mean 0.375 over 4 cases
    assert means["dice_lesion"] == pytest.approx(0.375) and counts["dice_lesion_cases"] == 4
    # HD95: NaN, 10, 10, 1 → mean of the 3 defined values
    assert means["hd95_lesion"] == pytest.approx((10 + 10 + 1) / 3) and counts["hd95_lesion_cases"] == 3
    assert counts["hd95_lesion_undefined"] == 1 and counts["hd95_lesion_penalised"] == 2


def test_metric_names_refuse_classes_that_collide() -> None:
    with pytest.raises(ValueError, match="repeated metric names"):
        metric_names(("background", "Left HC", "left-hc"))
    with pytest.raises(ValueError, match="label maps of one shape"):
        dice_per_class(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long), 2)
