"""Tests of radssl.study.statistics against independent reference computations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from radssl.errors import DataError
from radssl.study.statistics import (
    accuracy,
    binary_auc,
    bootstrap_ci,
    delong_covariance,
    delong_seed_averaged,
    delong_test,
    fraction_matching_baseline,
    macro_auc,
    mean_std_over_seeds,
    paired_bootstrap,
    paired_bootstrap_seed_averaged,
)


def _scores(n: int = 120, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary labels and two correlated score vectors (b shares noise with a)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    shared = rng.normal(size=n)
    a = 1.0 * y + shared + 0.5 * rng.normal(size=n)
    b = 0.6 * y + shared + 0.8 * rng.normal(size=n)
    if ties:  # coarse scores: many ties within and across classes exercise the midranks
        a, b = np.round(a), np.round(b * 2) / 2
    return y, a, b


def _delong_reference(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Direct O(m·n) structural components of DeLong et al. (1988) with the Mann-Whitney kernel psi."""
    pos = [s[y == 1] for s in scores]
    neg = [s[y == 0] for s in scores]
    m, n = pos[0].size, neg[0].size
    v10, v01, aucs = [], [], []
    for x, z in zip(pos, neg, strict=True):
        psi = (x[:, None] > z[None, :]).astype(float) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(axis=1))  # V10(X_i) = 1/n sum_j psi(X_i, Y_j)
        v01.append(psi.mean(axis=0))  # V01(Y_j) = 1/m sum_i psi(X_i, Y_j)
    k = len(scores)
    s10, s01 = np.zeros((k, k)), np.zeros((k, k))
    for r in range(k):
        for c in range(k):
            s10[r, c] = np.sum((v10[r] - aucs[r]) * (v10[c] - aucs[c])) / (m - 1)
            s01[r, c] = np.sum((v01[r] - aucs[r]) * (v01[c] - aucs[c])) / (n - 1)
    return np.array(aucs), s10 / m + s01 / n


@pytest.mark.parametrize("ties", [False, True])
def test_delong_matches_direct_structural_components(ties: bool) -> None:
    y, a, b = _scores(ties=ties)
    ref_auc, ref_cov = _delong_reference(y, [a, b])
    aucs, cov = delong_covariance(y, np.stack([a, b]))
    np.testing.assert_allclose(aucs, ref_auc, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, atol=1e-12, rtol=1e-10)

    result = delong_test(y, a, b)
    variance = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    z = (ref_auc[0] - ref_auc[1]) / math.sqrt(variance)
    p = math.erfc(abs(z) / math.sqrt(2))  # two-sided normal p without scipy
    assert result.var_a == pytest.approx(ref_cov[0, 0], abs=1e-12)
    assert result.cov_ab == pytest.approx(ref_cov[0, 1], abs=1e-12)
    assert abs(result.z - z) < 1e-10
    assert abs(result.p_value - p) < 1e-10
    half = 1.959963984540054 * math.sqrt(variance)
    assert result.ci_low == pytest.approx(result.difference - half, abs=1e-10)
    assert result.ci_high == pytest.approx(result.difference + half, abs=1e-10)


def test_delong_aucs_equal_sklearn_and_identical_scores_give_p_one() -> None:
    y, a, b = _scores(n=301, seed=3)
    result = delong_test(y, a, b)
    assert result.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert result.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert result.difference == pytest.approx(result.auc_a - result.auc_b, abs=1e-15)
    same = delong_test(y, a, a.copy())
    assert same.difference == 0.0 and same.z == 0.0 and same.p_value == 1.0
    # A clearly better model on 300 cases is detected; a monotone transform changes nothing.
    assert result.p_value < 0.01 and result.ci_low > 0
    monotone = delong_test(y, np.exp(a), a)
    assert monotone.difference == pytest.approx(0.0, abs=1e-15) and monotone.p_value == pytest.approx(1.0)


def test_delong_seed_averaged_is_the_contrast_of_all_aucs() -> None:
    y, a1, b1 = _scores(n=150, seed=1)
    rng = np.random.default_rng(9)
    a2, b2 = a1 + 0.7 * rng.normal(size=y.size), b1 + 0.7 * rng.normal(size=y.size)
    single = delong_seed_averaged(y, [a1], [b1])
    assert single == delong_test(y, a1, b1)

    result = delong_seed_averaged(y, [a1, a2], [b1, b2])
    ref_auc, ref_cov = _delong_reference(y, [a1, a2, b1, b2])
    contrast = np.array([0.5, 0.5, -0.5, -0.5])
    assert result.difference == pytest.approx(contrast @ ref_auc, abs=1e-12)
    z = (contrast @ ref_auc) / math.sqrt(contrast @ ref_cov @ contrast)
    assert result.z == pytest.approx(z, abs=1e-10)
    # Pooling the seeds as if they were extra cases would understate the variance.
    pooled = delong_test(np.concatenate([y, y]), np.concatenate([a1, a2]), np.concatenate([b1, b2]))
    assert abs(pooled.z) > abs(result.z)


def test_binary_auc_errors_name_the_missing_class() -> None:
    with pytest.raises(DataError, match="only the negative class"):
        binary_auc(np.zeros(5), np.arange(5.0))
    with pytest.raises(DataError, match="0/1"):
        binary_auc(np.array([0, 2, 1]), np.arange(3.0))


def test_bootstrap_ci_vectorised_equals_loop() -> None:
    # (Its speed belongs in a benchmark, not in a unit test on a shared machine.)
    y, a, _ = _scores(n=600, seed=4)
    fast = bootstrap_ci(y, a, roc_auc_score, n_boot=1000, seed=7)
    slow = bootstrap_ci(y, a, lambda t, s: roc_auc_score(t, s), n_boot=200, seed=7)  # no batched twin
    fast200 = bootstrap_ci(y, a, binary_auc, n_boot=200, seed=7)
    np.testing.assert_allclose(fast200, slow, atol=1e-12)
    assert fast[0] == pytest.approx(roc_auc_score(y, a))
    assert fast[1] < fast[0] < fast[2]
    assert bootstrap_ci(y, a, roc_auc_score, n_boot=1000, seed=7) == fast  # deterministic under the seed
    # The percentile interval agrees with DeLong's analytic standard error (within bootstrap noise).
    delong_half = 1.96 * math.sqrt(delong_covariance(y, a[None])[1][0, 0])
    assert (fast[2] - fast[1]) / 2 == pytest.approx(delong_half, rel=0.2)


def test_bootstrap_ci_stratified_keeps_both_classes() -> None:
    rng = np.random.default_rng(5)
    y = np.zeros(60, dtype=int)
    y[:2] = 1  # two positives: ~13% of plain resamples have none
    s = rng.normal(size=60) + y
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est, low, high = bootstrap_ci(y, s, binary_auc, n_boot=300, stratified=True)
    assert low <= est <= high
    with pytest.warns(RuntimeWarning, match="undefined on"):
        bootstrap_ci(y, s, binary_auc, n_boot=300, stratified=False)


def test_bootstrap_ci_shrinks_with_more_cases() -> None:
    widths = []
    for n in (100, 1600):
        y, a, _ = _scores(n=n, seed=11)
        _, low, high = bootstrap_ci(y, a, binary_auc, n_boot=400, seed=0)
        widths.append(high - low)
    assert widths[0] / widths[1] == pytest.approx(4.0, rel=0.35)  # width ~ 1/sqrt(n)


def test_paired_bootstrap() -> None:
    y, a, b = _scores(n=300, seed=2)
    result = paired_bootstrap(y, a, b, binary_auc, n_boot=500, seed=0)
    delong = delong_test(y, a, b)
    assert result.difference == pytest.approx(delong.difference)
    assert result.low > 0 and result.p_value < 0.01
    assert result.low == pytest.approx(delong.ci_low, abs=0.03)
    same = paired_bootstrap(y, a, a, binary_auc, n_boot=200, seed=0)
    assert same.difference == 0.0 and same.p_value == 1.0
    # A non-AUC metric through the per-resample loop and its batched twin agree exactly.
    pa, pb = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
    looped = paired_bootstrap(y, pa, pb, lambda t, s: accuracy(t, s), n_boot=100, seed=3)
    batched = paired_bootstrap(y, pa, pb, accuracy, n_boot=100, seed=3)
    assert looped == batched
    assert batched.difference == pytest.approx(accuracy_score(y, pa >= 0.5) - accuracy_score(y, pb >= 0.5))


def test_mean_std_over_seeds() -> None:
    values = [0.71, 0.74, 0.69, float("nan")]
    mean, std, n = mean_std_over_seeds(values)
    assert n == 3
    assert mean == pytest.approx(np.mean(values[:3]))
    assert std == pytest.approx(np.std(values[:3], ddof=1))
    one = mean_std_over_seeds([0.8])
    assert one[0] == 0.8 and math.isnan(one[1]) and one[2] == 1
    assert mean_std_over_seeds([])[2] == 0


def test_fraction_matching_baseline_interpolates_on_log_axis() -> None:
    curve = {0.1: 0.8, 0.01: 0.6, 1.0: 0.9}
    # 0.7 lies halfway between 0.6 (1%) and 0.8 (10%) -> geometric mean of the fractions.
    assert fraction_matching_baseline(curve, 0.7) == pytest.approx(math.sqrt(0.01 * 0.1))
    assert fraction_matching_baseline(curve, 0.5) == 0.01  # already reached at the smallest fraction
    assert fraction_matching_baseline(curve, 0.95) is None
    assert fraction_matching_baseline(curve, 0.95, tolerance=0.05) == pytest.approx(1.0)
    # First crossing wins for a non-monotone curve; lower-is-better flips the comparison.
    assert fraction_matching_baseline({0.01: 0.5, 0.1: 0.9, 0.5: 0.7, 1.0: 0.95}, 0.9) == pytest.approx(0.1)
    assert fraction_matching_baseline({0.01: 0.4, 0.1: 0.2}, 0.3, higher_is_better=False) == pytest.approx(
        math.sqrt(0.01 * 0.1))


def test_multiclass_and_multilabel_auc_and_accuracy() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3))
    logits[np.arange(200), y] += 1.0
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert macro_auc(y, prob) == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    assert accuracy(y, prob) == pytest.approx(accuracy_score(y, prob.argmax(axis=1)))
    labels = (rng.random((200, 4)) < 0.3).astype(int)
    scores = labels + rng.normal(size=(200, 4))
    assert macro_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores, average="macro"))
    est, low, high = bootstrap_ci(y, prob, macro_auc, n_boot=200)
    assert low < est < high
    with pytest.raises(DataError, match=r"class/label \[2\] has no positive"):
        macro_auc(np.where(y == 2, 0, y), prob)
    with pytest.raises(DataError, match="class ids"):
        macro_auc(y + 1, prob)


def test_paired_bootstrap_seed_averaged_keeps_cases_paired_across_seeds() -> None:
    y, a1, b1 = _scores(n=200, seed=6)
    rng = np.random.default_rng(1)
    a2, b2 = a1 + rng.normal(size=y.size), b1 + rng.normal(size=y.size)
    result = paired_bootstrap_seed_averaged(y, [a1, a2], [b1, b2], binary_auc, n_boot=400, seed=0)
    expected = (roc_auc_score(y, a1) + roc_auc_score(y, a2) - roc_auc_score(y, b1) - roc_auc_score(y, b2)) / 2
    assert result.difference == pytest.approx(expected)
    delong = delong_seed_averaged(y, [a1, a2], [b1, b2])
    assert result.low == pytest.approx(delong.ci_low, abs=0.03)
    assert result.high == pytest.approx(delong.ci_high, abs=0.03)
    assert paired_bootstrap_seed_averaged(y, [a1], [b1], binary_auc, n_boot=50, seed=2) == paired_bootstrap(
        y, a1, b1, binary_auc, n_boot=50, seed=2)
