"""Intervals and tests over seeds *and* test cases (issue 7, point 4): they must cover what a study varies.

The simulations draw a population of "seeds" (each a model whose true separation d_s varies around d0 with SD
tau, as label subsets and training runs do) scored on one shared test set with a case effect shared by every
model. The estimand is the population mean AUC over seeds, Φ(d0 / sqrt(2 + tau²)) for binormal scores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from radssl.errors import DataError
from radssl.study.statistics import (
    accuracy,
    binary_auc,
    bootstrap_ci,
    case_covariance,
    combine_seed_and_case_variance,
    delong_covariance,
    delong_seed_averaged,
    seed_t_interval,
    seeds_and_cases_interval,
    seeds_and_cases_paired_test,
)


def _study(rng: np.random.Generator, seeds: int, cases: int, tau: float, d0: float = 1.0):
    """(labels, scores of arm A per seed, scores of arm B per seed) on one shared test set; A and B equal in law."""
    y = np.r_[np.zeros(cases // 2), np.ones(cases - cases // 2)].astype(int)
    shared = rng.normal(0.0, math.sqrt(0.5), cases)  # case difficulty every model sees

    def model() -> np.ndarray:
        return rng.normal(d0, tau) * y + shared + rng.normal(0.0, math.sqrt(0.5), cases)

    return y, [model() for _ in range(seeds)], [model() for _ in range(seeds)]


def test_seed_and_case_interval_covers_the_seed_averaged_auc_where_delong_alone_does_not() -> None:
    rng = np.random.default_rng(7)
    tau, d0, reps = 0.3, 1.0, 160
    truth = stats.norm.cdf(d0 / math.sqrt(2 + tau**2))
    ours = cases_only = 0
    for _ in range(reps):
        y, a, _ = _study(rng, seeds=3, cases=200, tau=tau, d0=d0)
        result = seeds_and_cases_interval(y, a, binary_auc)
        ours += result.low <= truth <= result.high
        assert result.seeds_included and result.n_seeds == 3
        aucs, cov = delong_covariance(y, np.stack(a))  # the test-case-only interval of the seed mean
        half = 1.96 * math.sqrt(cov.mean())
        cases_only += aucs.mean() - half <= truth <= aucs.mean() + half
    assert ours / reps >= 0.90, ours / reps
    assert cases_only / reps <= 0.82, cases_only / reps  # the problem the issue describes


def test_gain_test_holds_its_level_when_seeds_vary_and_delong_alone_does_not() -> None:
    rng = np.random.default_rng(11)
    reps = 160
    ours = delong = 0
    for _ in range(reps):
        y, a, b = _study(rng, seeds=3, cases=200, tau=0.3)  # no true difference between the arms
        ours += seeds_and_cases_paired_test(y, a, b, binary_auc).p_value < 0.05
        delong += delong_seed_averaged(y, a, b).p_value < 0.05
    assert ours / reps <= 0.09, ours / reps
    assert delong / reps >= 0.3, delong / reps


def test_limits_are_the_paired_t_test_and_the_delong_test() -> None:
    # No shared case covariance: exactly the t-interval and t-test over seeds.
    values = [0.05, 0.12, 0.02, 0.09]
    combined = combine_seed_and_case_variance(values, np.diag([1e-4] * 4))
    mean, low, high, p, n = seed_t_interval(values)
    assert (combined.estimate, combined.low, combined.high) == pytest.approx((mean, low, high), abs=1e-12)
    assert combined.p_value == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-6)
    # Identical seeds: exactly DeLong's interval and p of the seed-averaged contrast.
    rng = np.random.default_rng(0)
    y, a, b = _study(rng, seeds=1, cases=300, tau=0.0)
    b = [b[0] + 0.3 * y]  # a real difference
    both = seeds_and_cases_paired_test(y, a * 3, b * 3, binary_auc, bounds=None)  # the plain (unbounded) scale
    reference = delong_seed_averaged(y, a, b)
    assert both.seed_variance == 0.0 and both.seeds_included
    assert (both.estimate, both.low, both.high) == pytest.approx(
        (reference.difference, reference.ci_low, reference.ci_high), abs=1e-9)
    assert both.p_value == pytest.approx(reference.p_value, rel=1e-6, abs=1e-12)


def test_one_seed_covers_test_cases_only_and_says_so() -> None:
    rng = np.random.default_rng(3)
    y, a, _ = _study(rng, seeds=1, cases=250, tau=0.2)
    result = seeds_and_cases_interval(y, a, binary_auc, bounds=None)
    assert not result.seeds_included and math.isnan(result.seed_variance)
    _, cov = delong_covariance(y, a[0])
    assert result.high - result.low == pytest.approx(2 * 1.959964 * math.sqrt(cov[0, 0]), rel=1e-5)


def test_other_metrics_use_a_case_bootstrap_with_shared_resamples() -> None:
    rng = np.random.default_rng(5)
    y, a, _ = _study(rng, seeds=2, cases=400, tau=0.0)
    scores = [1 / (1 + np.exp(-(s - 0.5))) for s in a]
    cov = case_covariance(y, scores, accuracy, n_boot=2000, seed=0)
    assert cov.shape == (2, 2) and cov[0, 1] > 0  # shared cases make the seeds' accuracies co-vary
    # Each diagonal entry is that seed's bootstrap variance: the width of its percentile CI agrees.
    _, low, high = bootstrap_ci(y, scores[0], accuracy, n_boot=2000, seed=0)
    assert 2 * 1.96 * math.sqrt(cov[0, 0]) == pytest.approx(high - low, rel=0.1)
    with pytest.raises(DataError, match="one score vector per seed"):
        case_covariance(y, scores, accuracy, scores_b=scores[:1])
    with pytest.raises(DataError, match="one score vector per seed"):
        seeds_and_cases_paired_test(y, scores, scores[:1], accuracy)
