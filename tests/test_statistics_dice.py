"""Statistics of metrics that are a mean of per-case values (Dice, HD95): hand-made values with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from radssl.errors import DataError
from radssl.study.statistics import (
    bootstrap_ci,
    case_covariance,
    case_mean,
    case_mean_covariance,
    on_common_cases,
    seeds_and_cases_interval,
    seeds_and_cases_paired_test,
    wilcoxon_paired,
)

Z = 1.959963984540054  # Φ⁻¹(0.975)


def test_case_mean_leaves_undefined_cases_out_and_its_batched_twin_agrees() -> None:
    values = np.array([0.8, np.nan, 0.6, np.inf, 1.0])
    assert case_mean(None, values) == pytest.approx(0.8)
    assert math.isnan(case_mean(None, np.array([np.nan, np.nan])))
    batch = np.array([[0.8, np.nan, 0.6, 0.2], [np.nan, np.nan, np.nan, np.nan], [1.0, 0.0, 0.5, 0.5]])
    np.testing.assert_allclose(case_mean.batched(None, batch), [1.6 / 3, np.nan, 0.5])


def test_case_mean_covariance_is_the_case_covariance_over_n() -> None:
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 4.0, 4.0])
    # By hand: deviations (−1.5, −.5, .5, 1.5) and (−1, −1, 1, 1): Σ = 4 → cov 4/3 → /4 cases = 1/3;
    # var(a) = 5/3 → 5/12; var(b) = 4/3 → 1/3.
    np.testing.assert_allclose(case_mean_covariance([a, b]), [[5 / 12, 1 / 3], [1 / 3, 1 / 3]])
    # A case that is undefined for either model is left out of both (it cannot be paired).
    np.testing.assert_allclose(case_mean_covariance([np.append(a, np.nan), np.append(b, 9.0)]),
                               [[5 / 12, 1 / 3], [1 / 3, 1 / 3]])
    # case_covariance uses the exact formula for case_mean (no bootstrap: identical for any seed or n_boot).
    np.testing.assert_allclose(case_covariance(np.zeros(4), [a, b], case_mean, n_boot=10, seed=1),
                               [[5 / 12, 1 / 3], [1 / 3, 1 / 3]])
    with pytest.raises(DataError, match="at least 2 cases"):
        case_mean_covariance([np.array([1.0, np.nan]), np.array([np.nan, 2.0])])


def test_one_seed_paired_dice_difference_is_the_paired_z_interval_over_cases() -> None:
    a = np.array([0.8, 0.9, 0.7, 0.6])
    b = np.array([0.7, 0.6, 0.8, 0.5])  # per-case differences 0.1, 0.3, −0.1, 0.1
    result = seeds_and_cases_paired_test(np.zeros(4), [a], [b], case_mean)
    # mean 0.1; sample variance of the differences 0.08/3, of their mean 0.08/3/4 = 1/150.
    se = math.sqrt(1 / 150)
    assert result.estimate == pytest.approx(0.1)
    assert (result.low, result.high) == pytest.approx((0.1 - Z * se, 0.1 + Z * se))
    assert result.p_value == pytest.approx(2 * stats.norm.sf(0.1 / se), rel=1e-6)  # 0.2207
    assert result.case_variance == pytest.approx(1 / 150) and not result.seeds_included


def test_two_seeds_add_the_seed_spread_to_the_shared_case_variance() -> None:
    b = np.array([0.5, 0.5, 0.5, 0.5])
    a = [b + [0.1, 0.3, -0.1, 0.1], b + [0.2, 0.4, 0.0, 0.2]]  # per-seed mean differences 0.1 and 0.2
    result = seeds_and_cases_paired_test(np.zeros(4), a, [b, b], case_mean)
    seed_variance = np.var([0.1, 0.2], ddof=1) / 2  # 0.0025
    shared = 1 / 150  # the two seeds' differences co-vary exactly as each varies
    half = math.sqrt(stats.t.ppf(0.975, 1) ** 2 * seed_variance + Z ** 2 * shared)
    assert result.estimate == pytest.approx(0.15)
    assert result.seed_variance == pytest.approx(seed_variance) and result.case_variance == pytest.approx(shared)
    assert (result.low, result.high) == pytest.approx((0.15 - half, 0.15 + half))
    interval = seeds_and_cases_interval(np.zeros(4), a, case_mean)
    assert interval.estimate == pytest.approx(0.5 + 0.15)


def test_every_hd95_mean_is_taken_on_the_cases_defined_for_all_models_and_seeds() -> None:
    # Undefined (NaN: both masks empty) on different cases per model/seed; the cases defined for all: 0, 2, 4, 5.
    a = [np.array([4.0, np.nan, 6.0, 100.0, 2.0, 3.0]), np.array([5.0, 7.0, 5.0, 90.0, 3.0, 5.0])]
    b = [np.array([3.0, 2.0, 5.0, np.nan, 1.0, 1.0]), np.array([4.0, 3.0, 4.0, 80.0, 2.0, 2.0])]
    common = [0, 2, 4, 5]
    result = seeds_and_cases_paired_test(np.zeros(6), a, b, case_mean)
    by_hand = np.mean([a[s][common].mean() - b[s][common].mean() for s in range(2)])  # (1.25 + 1.5) / 2
    assert result.estimate == pytest.approx(by_hand) == pytest.approx(1.375)
    # Each model's own finite cases would give a different (wrong) estimate: case 3 (100 / 90) enters one side only.
    own = np.mean([case_mean(None, a[s]) - case_mean(None, b[s]) for s in range(2)])
    assert abs(own - by_hand) > 1.0
    # The covariance is on the same cases as the estimate.
    diffs = np.stack([a[s][common] - b[s][common] for s in range(2)])
    assert result.case_variance == pytest.approx(np.cov(diffs)[0, 1] / len(common))
    # One model over seeds: its seeds' common cases (0, 2, 3, 4, 5).
    interval = seeds_and_cases_interval(np.zeros(6), a, case_mean)
    assert interval.estimate == pytest.approx(np.mean([a[s][[0, 2, 3, 4, 5]].mean() for s in range(2)]))
    # Other metrics are left as they are.
    assert on_common_cases(lambda y, s: 0.0, a)[0] is a[0]


def test_wilcoxon_signed_rank_on_seed_averaged_case_differences() -> None:
    base = np.full(5, 0.5)
    # All five differences positive: W− = 0, exact two-sided p = 2 / 2⁵ = 0.0625.
    up = wilcoxon_paired([base + [0.1, 0.2, 0.3, 0.4, 0.5]], [base])
    assert (up.statistic, up.p_value, up.n_cases) == (0.0, pytest.approx(0.0625), 5)
    # Seeds are averaged per case first: these two seeds average to differences (−0.1, .2, .3, .4, .5):
    # the smallest |d| is negative, W− = 1, p = 2 · 2/32 = 0.125.
    seeds = [base + [-0.2, 0.1, 0.3, 0.4, 0.6], base + [0.0, 0.3, 0.3, 0.4, 0.4]]
    mixed = wilcoxon_paired(seeds, [base, base])
    assert mixed.statistic == 1.0 and mixed.p_value == pytest.approx(0.125)
    assert mixed.median_difference == pytest.approx(0.3)
    # Undefined cases are left out; all-equal values give p = 1.
    assert wilcoxon_paired([np.array([np.nan, 0.4, 0.4])], [np.array([0.1, 0.4, 0.4])]).p_value == 1.0


def test_bootstrap_ci_of_case_mean_brackets_the_mean() -> None:
    values = np.linspace(0.3, 0.9, 40)
    estimate, low, high = bootstrap_ci(np.zeros(40), values, case_mean, n_boot=500, seed=0, stratified=False)
    assert estimate == pytest.approx(0.6)
    se = values.std(ddof=1) / math.sqrt(40)
    assert low < 0.6 < high and (high - low) == pytest.approx(2 * Z * se, rel=0.2)
