"""Intervals of bounded metrics stay inside their range (issue 19, point 8).

With 2 seeds the seeds + test-cases interval uses t(1) = 12.7; on the plain scale the demo's report drew AUC bands
from -0.5 to 1.7 and headlined "+0.124 AUC (95% CI -0.990 to +1.237)". On the logit scale of the metric's range
(delta method) the interval is inside [0, 1] for a level and inside [-1, 1] for a gain, and equal to the plain one
where the range does not bind.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from radssl.errors import DataError
from radssl.study.statistics import (
    accuracy,
    binary_auc,
    case_mean,
    combine_seed_and_case_variance,
    difference_range,
    macro_auc,
    metric_range,
    seed_t_interval,
    seeds_and_cases_interval,
    seeds_and_cases_paired_test,
)


def _two_seeds(rng: np.random.Generator, cases: int = 120):
    """Two seeds per arm that disagree a lot (as 2 demo seeds do): separations 0.3 and 3.0 for A, 0.2/0.4 for B."""
    y = np.r_[np.zeros(cases // 2), np.ones(cases - cases // 2)].astype(int)
    a = [d * y + rng.normal(size=cases) for d in (0.3, 3.0)]
    b = [d * y + rng.normal(size=cases) for d in (0.2, 0.4)]
    return y, a, b


def test_two_seed_auc_interval_and_gain_interval_stay_in_range():
    y, a, b = _two_seeds(np.random.default_rng(0))
    plain = seeds_and_cases_interval(y, a, binary_auc, bounds=None)
    assert plain.high > 1.0 or plain.low < 0.0  # the problem: the plain interval leaves [0, 1]
    bounded = seeds_and_cases_interval(y, a, binary_auc)  # "auto": binary_auc is an AUC
    assert 0.0 < bounded.low < bounded.estimate < bounded.high < 1.0
    assert bounded.estimate == pytest.approx(plain.estimate)
    gain_plain = seeds_and_cases_paired_test(y, a, b, binary_auc, bounds=None)
    assert gain_plain.low < -1.0 or gain_plain.high > 1.0
    gain = seeds_and_cases_paired_test(y, a, b, binary_auc)
    assert -1.0 < gain.low < gain.estimate < gain.high < 1.0
    assert 0.0 <= gain.p_value <= 1.0 and (gain.low < 0.0 < gain.high) == (gain.p_value > 0.05)


def test_seed_t_interval_respects_bounds_and_agrees_with_its_test():
    values = [0.55, 0.98]
    _, low, high, _, _ = seed_t_interval(values)
    assert high > 1.0
    mean, low, high, _, n = seed_t_interval(values, bounds=(0.0, 1.0))
    assert 0.0 < low < mean < high < 1.0 and n == 2
    gains = [0.2, 0.9, 0.5]
    _, low, high, p, _ = seed_t_interval(gains, bounds=(-1.0, 1.0))
    assert -1.0 < low < high < 1.0 and (low > 0.0) == (p < 0.05)


def test_bounded_interval_equals_the_plain_one_where_the_range_does_not_bind():
    values = [0.499, 0.501, 0.5005]
    cov = np.full((3, 3), 1e-8) + np.eye(3) * 1e-8
    plain = combine_seed_and_case_variance(values, cov)
    bounded = combine_seed_and_case_variance(values, cov, bounds=(0.0, 1.0))
    assert (bounded.low, bounded.high) == pytest.approx((plain.low, plain.high), abs=1e-6)
    at_top = combine_seed_and_case_variance([1.0, 1.0], np.zeros((2, 2)), bounds=(0.0, 1.0))
    assert at_top.low == at_top.high == 1.0  # no spread at the bound: a point, not NaN


def test_values_outside_the_declared_range_are_an_error():
    with pytest.raises(DataError, match=r"outside the metric's range \[0.0, 1.0\]"):
        combine_seed_and_case_variance([1.2, 0.9], np.eye(2) * 1e-4, bounds=(0.0, 1.0))


def test_metric_ranges():
    for metric in (binary_auc, macro_auc, accuracy, roc_auc_score, "auc", "macro_auc", "accuracy", "dice",
                   "dice_left_ventricle", "balanced_accuracy"):
        assert metric_range(metric) == (0.0, 1.0), metric
    for metric in (case_mean, "hd95", "hd95_left", "loss", "auc2"):
        assert metric_range(metric) is None, metric
    assert difference_range((0.0, 1.0)) == (-1.0, 1.0) and difference_range(None) is None


def test_dice_means_get_bounded_intervals_when_the_caller_says_so():
    rng = np.random.default_rng(1)
    dice = [np.clip(rng.normal(m, 0.05, 40), 0, 1) for m in (0.9, 0.99)]
    bounded = seeds_and_cases_interval(np.zeros(40), dice, case_mean, bounds=metric_range("dice"))
    assert 0.0 < bounded.low < bounded.high < 1.0
    assert math.isfinite(seeds_and_cases_interval(np.zeros(40), dice, case_mean).high)  # unbounded by default
