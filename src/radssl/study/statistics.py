"""Statistics for label-efficiency studies: bootstrap CIs, paired AUC tests, seed summaries.

Why this module exists: a study compares initialisations on the *same* test cases, so the honest
uncertainty of a difference is a *paired* one (DeLong for AUC; for metrics that are a mean of per-case values,
such as Dice, the exact paired covariance of case means and a Wilcoxon signed-rank test; a paired bootstrap
otherwise), and the
uncertainty of one trained model's number is a bootstrap over test cases. A study cell is one of several
seeds, though: each seed draws another label subset and trains the read-out again, and at small label
fractions that spread (0.03–0.10 AUC) dwarfs the test-case noise of one model. Intervals and tests of the
*seed-averaged* numbers therefore add both sources (:func:`seeds_and_cases_interval`,
:func:`seeds_and_cases_paired_test`); the test-case-only tools stay as what they are: statements about the
trained models at hand. The metrics themselves (:func:`binary_auc`, :func:`macro_auc`, :func:`accuracy`,
:func:`case_mean`, each with a ``batched`` twin for bootstrap resamples) live in :mod:`radssl.transfer.metrics`
and are re-exported here; this module computes only the statistics of them. scikit-learn's ``roc_auc_score`` is
accepted as a metric too and mapped to the batched AUC.

References
----------
- DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated receiver
  operating characteristic curves: a nonparametric approach", Biometrics 44:837-845.
- Sun & Xu (2014), "Fast implementation of DeLong's algorithm for comparing the areas under correlated
  receiver operating characteristic curves", IEEE Signal Processing Letters 21(11):1389-1393.
- Efron & Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13 (percentile intervals) and 16.
- Hall & Wilson (1991), "Two guidelines for bootstrap hypothesis testing", Biometrics 47:757-762.
- Bouthillier et al. (2021), "Accounting for variance in machine learning benchmarks", MLSys: data sampling
  and seeds are both sources of variance a comparison must include.
- Wilcoxon (1945), "Individual comparisons by ranking methods", Biometrics Bulletin 1(6):80-83.
- Satterthwaite (1946), "An approximate distribution of estimates of variance components", Biometrics
  Bulletin 2:110-114 (effective degrees of freedom of a sum of variance estimates; JCGM 100:2008 G.4).
- Pepe (2003), "The Statistical Evaluation of Medical Tests for Classification and Prediction", §5.2.3, and
  Qin & Hotilovac (2008), "Comparison of non-parametric confidence intervals for the area under the ROC curve
  of a continuous-scale diagnostic test", Stat Methods Med Res 17:207-221: Wald intervals of an AUC on the logit
  scale (delta method) stay inside [0, 1] and cover better near the bounds than untransformed ones.

Bounded metrics (AUC, accuracy, Dice in [0, 1]; their differences in [-1, 1]) get intervals computed on the
logit scale of their range and mapped back (:func:`metric_range`, ``bounds=``), so an interval never leaves the
metric's range however few seeds there are: with 2 seeds t(1) = 12.7 drew AUC bands from -0.5 to 1.7. Why a
transform and not clipping: a clipped interval still claims the same (impossible) width on one side and puts its
mass on values the metric cannot take; the logit interval is the standard Wald interval of a proportion-like
quantity and equals the plain one near the middle of the range (issue 19, point 8).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from radssl.errors import DataError
from radssl.transfer.metrics import accuracy, as_binary_labels, binary_auc, case_mean, macro_auc

__all__ = [
    "DeLongResult",
    "PairedResult",
    "SeedsAndCases",
    "WilcoxonResult",
    "accuracy",
    "bounded_scale",
    "binary_auc",
    "case_mean",
    "case_mean_covariance",
    "on_common_cases",
    "bootstrap_ci",
    "delong_covariance",
    "delong_seed_averaged",
    "delong_test",
    "difference_range",
    "fraction_matching_baseline",
    "macro_auc",
    "mean_std_over_seeds",
    "metric_range",
    "paired_bootstrap",
    "paired_bootstrap_seed_averaged",
    "case_covariance",
    "combine_seed_and_case_variance",
    "seed_t_interval",
    "seeds_and_cases_interval",
    "seeds_and_cases_paired_test",
    "wilcoxon_paired",
]

Metric = Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------------------------------
# Per-case statistics
# --------------------------------------------------------------------------------------------------


def on_common_cases(metric: Metric, vectors: Sequence[Any]) -> list[Any]:
    """For :func:`case_mean`, the per-case vectors with every case not finite in *all* of them set to NaN.

    Which cases have an undefined value (an HD95 with both masks empty) depends on each model's prediction. A mean
    over each model's own finite cases would compare models on different cases, while the case covariance and the
    Wilcoxon test can only pair the cases finite for every model; restricting every vector to the common cases
    makes the estimate, its covariance and the test use one set of cases. Other metrics: unchanged.
    """
    if metric is not case_mean or not vectors:
        return list(vectors)
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    common = np.isfinite(stacked).all(axis=0)
    return list(np.where(common[None, :], stacked, np.nan))


def case_mean_covariance(values: Any) -> np.ndarray:
    """(k, k) covariance of the case means of k per-case value vectors scored on the same cases.

    Exact for a mean: Cov(mean_a, mean_b) = Cov_cases(a_i, b_i) / n (sample covariance, ddof=1), the paired-sample
    result behind the paired t-test. Cases where any vector is non-finite are left out (they cannot be paired).
    """
    v = np.atleast_2d(np.asarray(values, dtype=np.float64))
    keep = np.isfinite(v).all(axis=0)
    n = int(keep.sum())
    if n < 2:
        raise DataError("case_mean_covariance", f"{n} case(s) have a finite value in every compared vector",
                        "a case-level interval needs at least 2 cases scored by every model")
    return np.atleast_2d(np.cov(v[:, keep])) / n


@dataclass(frozen=True)
class WilcoxonResult:
    """Wilcoxon signed-rank test of per-case differences (a minus b) being symmetric about zero."""

    statistic: float
    p_value: float
    n_cases: int
    median_difference: float


def wilcoxon_paired(values_a: Sequence[Any], values_b: Sequence[Any]) -> WilcoxonResult:
    """Wilcoxon signed-rank test on per-case differences of the seed-averaged values of two models (Wilcoxon 1945).

    ``values_a`` / ``values_b``: one per-case vector per seed (the same cases). Each case's values are averaged over
    the seeds first, so a case counts once (pooling seeds would count it once per seed). Cases where any value is
    non-finite are left out. Conditions on the trained models (the case-level test beside DeLong for AUC);
    distribution-free, so a few cases with a very different Dice do not dominate as they do a t-test. scipy's exact
    null distribution is used for small samples without ties, the normal approximation otherwise; zero
    differences are dropped (Wilcoxon's convention). All differences zero: p = 1.
    """
    a = np.atleast_2d(np.asarray([np.asarray(v, dtype=np.float64) for v in values_a]))
    b = np.atleast_2d(np.asarray([np.asarray(v, dtype=np.float64) for v in values_b]))
    if a.shape[1] != b.shape[1]:
        raise DataError("wilcoxon_paired", f"{a.shape[1]} cases vs {b.shape[1]}", "pass values of the same cases")
    keep = np.isfinite(a).all(axis=0) & np.isfinite(b).all(axis=0)
    differences = a[:, keep].mean(axis=0) - b[:, keep].mean(axis=0)
    n = int(differences.size)
    median = float(np.median(differences)) if n else math.nan
    if n == 0 or np.all(differences == 0):
        return WilcoxonResult(0.0, 1.0, n, median)
    result = stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    return WilcoxonResult(float(result.statistic), float(result.pvalue), n, median)


def _batched_version(metric: Metric, y_true: np.ndarray, y_score: np.ndarray) -> Callable[..., np.ndarray] | None:
    """A vectorised twin of ``metric`` if one is known (own metrics, or sklearn's binary roc_auc_score)."""
    batched = getattr(metric, "batched", None)
    if callable(batched):
        return batched
    if metric is roc_auc_score and np.ndim(y_true) == 1 and np.ndim(y_score) == 1:
        return binary_auc.batched  # type: ignore[attr-defined]
    return None


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


def _resample_indices(y_true: np.ndarray, n_boot: int, rng: np.random.Generator, stratified: bool) -> np.ndarray:
    """(n_boot, n) case indices; stratified resampling keeps every class's count fixed.

    Stratification applies to 1-D labels (binary or multi-class) — every resample then contains every
    class, so AUC is always defined. Multi-label (2-D) targets are resampled plainly.
    """
    y = np.asarray(y_true)
    n = y.shape[0]
    if not stratified or y.ndim != 1:
        return rng.integers(0, n, size=(n_boot, n))
    blocks = []
    for value in np.unique(y):
        members = np.flatnonzero(y == value)
        blocks.append(members[rng.integers(0, members.size, size=(n_boot, members.size))])
    return np.concatenate(blocks, axis=1)


def _metric_on_resamples(metric: Metric, y_true: np.ndarray, y_score: np.ndarray, idx: np.ndarray,
                         chunk: int = 250) -> np.ndarray:
    """Metric value per resample row (NaN where the metric is undefined for that resample)."""
    batched = _batched_version(metric, y_true, y_score)
    if batched is not None:
        # Chunked so a 10k-case test set does not build a 10k x 1000 x K float array at once.
        return np.concatenate([batched(y_true[idx[i:i + chunk]], y_score[idx[i:i + chunk]])
                               for i in range(0, idx.shape[0], chunk)])
    values = np.empty(idx.shape[0])
    for b, rows in enumerate(idx):
        try:
            values[b] = metric(y_true[rows], y_score[rows])
        except (ValueError, DataError):
            values[b] = np.nan
    return values


def _check_pair(y_true: Any, *scores: Any) -> tuple[np.ndarray, ...]:
    y = np.asarray(y_true)
    out = [y]
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        if s.shape[0] != y.shape[0]:
            raise DataError("scores", f"{s.shape[0]} scores for {y.shape[0]} labels",
                            "pass one score (row) per test case, in the same order as y_true")
        out.append(s)
    if y.shape[0] < 2:
        raise DataError("y_true", f"need at least 2 test cases to bootstrap, got {y.shape[0]}")
    return tuple(out)


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    finite = values[np.isfinite(values)]
    dropped = values.size - finite.size
    if finite.size == 0:
        raise DataError(what, "the metric was undefined on every bootstrap resample",
                        "check that the test set contains every class (use stratified=True)")
    if dropped:
        warnings.warn(f"{what}: metric undefined on {dropped}/{values.size} resamples; they were dropped",
                      RuntimeWarning, stacklevel=3)
    return finite


def bootstrap_ci(y_true: Any, y_score: Any, metric: Metric, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, stratified: bool = True) -> tuple[float, float, float]:
    """Point estimate and percentile-bootstrap ``(1 - alpha)`` CI of ``metric`` over test cases.

    The estimate is the metric on the full test set; the interval is the (alpha/2, 1-alpha/2) quantile
    pair of the metric over ``n_boot`` case resamples (Efron & Tibshirani 1993, ch. 13). Resampling is
    stratified by class for 1-D labels, so every resample has every class. Known metrics (``binary_auc``,
    ``macro_auc``, ``accuracy``, sklearn's binary ``roc_auc_score``) are evaluated on all resamples at once.
    """
    y, s = _check_pair(y_true, y_score)
    estimate = float(metric(y, s))
    rng = np.random.default_rng(seed)
    idx = _resample_indices(y, n_boot, rng, stratified)
    boots = _finite(_metric_on_resamples(metric, y, s, idx), "bootstrap_ci")
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return estimate, float(low), float(high)


@dataclass(frozen=True)
class PairedResult:
    """Paired-bootstrap comparison of one metric between two score sets on the same cases (a minus b)."""

    difference: float
    low: float
    high: float
    p_value: float


def paired_bootstrap(y_true: Any, scores_a: Any, scores_b: Any, metric: Metric, n_boot: int = 1000,
                     seed: int = 0, alpha: float = 0.05, stratified: bool = True) -> PairedResult:
    """Paired bootstrap of ``metric(a) - metric(b)``: the same resampled cases score both models.

    CI: percentile interval of the resampled differences. Two-sided p: the bootstrap distribution of
    the difference is shifted to the null (centred on zero) and p = (1 + #{|d* - d| >= |d|}) / (B + 1)
    (Hall & Wilson 1991, guideline 1; the +1 keeps p > 0 for a finite number of resamples).
    """
    return paired_bootstrap_seed_averaged(y_true, [scores_a], [scores_b], metric, n_boot, seed, alpha, stratified)


def paired_bootstrap_seed_averaged(y_true: Any, scores_a: Sequence[Any], scores_b: Sequence[Any], metric: Metric,
                                   n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                                   stratified: bool = True) -> PairedResult:
    """Paired bootstrap of mean_s metric(a_s) - mean_s metric(b_s) over seeds sharing one test set.

    Each resample of test cases scores every seed's model of both sides, so the dependence between
    seeds (same cases) is kept instead of pooling the seeds as if they were extra cases. See
    :func:`paired_bootstrap` for the CI and p-value.
    """
    if not scores_a or not scores_b:
        raise DataError("paired_bootstrap", "need at least one score vector per model")
    y, *checked = _check_pair(y_true, *scores_a, *scores_b)
    side_a, side_b = checked[:len(scores_a)], checked[len(scores_a):]
    difference = float(np.mean([metric(y, s) for s in side_a]) - np.mean([metric(y, s) for s in side_b]))
    idx = _resample_indices(y, n_boot, np.random.default_rng(seed), stratified)
    deltas = (np.mean([_metric_on_resamples(metric, y, s, idx) for s in side_a], axis=0)
              - np.mean([_metric_on_resamples(metric, y, s, idx) for s in side_b], axis=0))
    deltas = _finite(deltas, "paired_bootstrap")
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    extreme = np.count_nonzero(np.abs(deltas - difference) >= abs(difference) - 1e-12)
    p_value = min(1.0, (1 + extreme) / (deltas.size + 1))
    return PairedResult(difference, float(low), float(high), float(p_value))


# --------------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeLongResult:
    """DeLong paired comparison of two AUCs on the same cases (difference = auc_a - auc_b).

    ``var_a``, ``var_b`` and ``cov_ab`` are DeLong's (co)variance estimates of the two AUCs.
    """

    auc_a: float
    auc_b: float
    difference: float
    ci_low: float
    ci_high: float
    z: float
    p_value: float
    var_a: float = math.nan
    var_b: float = math.nan
    cov_ab: float = math.nan


def delong_covariance(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of k score vectors on the same cases and their DeLong covariance matrix (k, k).

    Fast midrank algorithm of Sun & Xu (2014): with m positives X and n negatives Y, and midranks
    T_Z (within all cases), T_X (within positives), T_Y (within negatives),
    AUC = (sum T_Z[X] - m(m+1)/2) / (mn), V10 = (T_Z[X] - T_X)/n, V01 = 1 - (T_Z[Y] - T_Y)/m, and
    S = cov(V10)/m + cov(V01)/n (DeLong 1988, eq. 5). O(k N log N) instead of O(k m n).
    """
    positive = as_binary_labels(y_true, "delong y_true")
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if s.shape[1] != positive.size:
        raise DataError("delong scores", f"{s.shape[1]} scores for {positive.size} labels",
                        "pass one score per test case, in the same order as y_true")
    x, y = s[:, positive], s[:, ~positive]
    m, n = x.shape[1], y.shape[1]
    tx = stats.rankdata(x, axis=1)
    ty = stats.rankdata(y, axis=1)
    tz = stats.rankdata(np.concatenate([x, y], axis=1), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    # ddof=1 as in DeLong's S10/S01; a single positive or negative leaves that term undefined -> 0.
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((s.shape[0], s.shape[0]))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((s.shape[0], s.shape[0]))
    return aucs, s10 / m + s01 / n


def _contrast_test(aucs: np.ndarray, cov: np.ndarray, contrast: np.ndarray, alpha: float) -> tuple[float, ...]:
    difference = float(contrast @ aucs)
    variance = float(contrast @ cov @ contrast)
    sd = math.sqrt(max(variance, 0.0))
    if sd <= 1e-15:  # identical scores (or both perfect): no evidence of a difference unless one exists
        z = 0.0 if abs(difference) <= 1e-15 else math.copysign(math.inf, difference)
        p = 1.0 if z == 0.0 else 0.0
    else:
        z = difference / sd
        p = float(2 * stats.norm.sf(abs(z)))
    half = float(stats.norm.ppf(1 - alpha / 2)) * sd
    return difference, difference - half, difference + half, z, p


def delong_test(y_true: Any, scores_a: Any, scores_b: Any, alpha: float = 0.05) -> DeLongResult:
    """DeLong (1988) two-sided test of AUC(a) = AUC(b) for two models scored on the same cases.

    z = (AUC_a - AUC_b) / sqrt(var_a + var_b - 2 cov_ab); Wald CI of the difference.
    """
    y, a, b = _check_pair(y_true, scores_a, scores_b)
    aucs, cov = delong_covariance(y, np.stack([a, b]))
    difference, low, high, z, p = _contrast_test(aucs, cov, np.array([1.0, -1.0]), alpha)
    return DeLongResult(float(aucs[0]), float(aucs[1]), difference, low, high, z, p,
                        float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1]))


def delong_seed_averaged(y_true: Any, scores_a: Sequence[Any], scores_b: Sequence[Any],
                         alpha: float = 0.05) -> DeLongResult:
    """DeLong test of the *seed-averaged* AUC of model a vs model b on one shared test set.

    Why not pool the seeds' predictions into one long vector: the same test case would then appear
    once per seed and DeLong would treat those copies as independent cases, shrinking the variance.
    Instead all 2S AUCs are estimated with their joint DeLong covariance and the contrast
    mean_s AUC_a,s - mean_s AUC_b,s is tested (DeLong 1988 allow any contrast L·theta). This treats the
    trained models as fixed and the test cases as the random sample; seed-to-seed spread is reported
    separately. With one seed per side it equals :func:`delong_test`.
    """
    if not scores_a or not scores_b:
        raise DataError("delong_seed_averaged", "need at least one score vector per model")
    y = np.asarray(y_true)
    stacked = np.stack([np.asarray(s, dtype=np.float64) for s in (*scores_a, *scores_b)])
    aucs, cov = delong_covariance(y, stacked)
    ka, kb = len(scores_a), len(scores_b)
    contrast = np.concatenate([np.full(ka, 1.0 / ka), np.full(kb, -1.0 / kb)])
    difference, low, high, z, p = _contrast_test(aucs, cov, contrast, alpha)
    wa = np.concatenate([np.full(ka, 1.0 / ka), np.zeros(kb)])
    wb = np.concatenate([np.zeros(ka), np.full(kb, 1.0 / kb)])
    return DeLongResult(float(wa @ aucs), float(wb @ aucs), difference, low, high, z, p,
                        float(wa @ cov @ wa), float(wb @ cov @ wb), float(wa @ cov @ wb))


# --------------------------------------------------------------------------------------------------
# Seeds and label-efficiency curves
# --------------------------------------------------------------------------------------------------


def mean_std_over_seeds(values: Any) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1) and count of a metric over seeds.

    Non-finite values (a failed cell) are ignored and not counted. With one seed the std is NaN, not 0:
    a single run says nothing about seed-to-seed spread.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, 0
    std = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
    return float(np.mean(v)), std, int(v.size)


def fraction_matching_baseline(curve: dict[float, float], baseline: float, tolerance: float = 0.0,
                               higher_is_better: bool = True) -> float | None:
    """Smallest label fraction at which a label-efficiency curve reaches ``baseline - tolerance``.

    ``curve`` maps label fraction (0, 1] -> mean metric over seeds (e.g. SSL init at 1%, 5%, ... labels);
    ``baseline`` is typically the fully supervised model trained on 100% of the labels.

    - Fractions are sorted; the first measured fraction whose value reaches the target is found.
    - If it is the smallest measured fraction, that fraction is returned (no extrapolation below data).
    - Otherwise the crossing is linearly interpolated between it and the previous fraction on a
      log10(fraction) axis, because label fractions are sampled roughly geometrically (1%, 5%, 10%, ...)
      and learning curves are close to linear in log-data.
    - Returns None if the curve never reaches the target (non-monotone curves: the *first* crossing wins).
    With ``higher_is_better=False`` (losses, errors) "reaches" means ``value <= baseline + tolerance``.
    """
    points = sorted((float(f), float(v)) for f, v in curve.items() if v is not None and math.isfinite(v))
    if not points:
        return None
    if any(f <= 0 for f, _ in points):
        raise DataError("fraction_matching_baseline", "label fractions must be > 0 for a log axis",
                        "pass fractions in (0, 1]")
    sign = 1.0 if higher_is_better else -1.0
    target = sign * baseline - tolerance
    previous: tuple[float, float] | None = None
    for fraction, value in points:
        value = sign * value
        if value >= target:
            if previous is None:
                return fraction
            f0, v0 = previous
            t = (target - v0) / (value - v0)
            return float(10 ** (math.log10(f0) + t * (math.log10(fraction) - math.log10(f0))))
        previous = (fraction, value)
    return None


# --------------------------------------------------------------------------------------------------
# Seeds and test cases together
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeedsAndCases:
    """A seed-averaged metric (or paired difference) with an interval over seeds *and* test cases.

    ``seed_variance`` = s²/S, the spread of the per-seed values (label subsets, read-out training randomness and
    each model's own test-case noise); NaN with one seed, which says nothing about seeds. ``case_variance`` is
    the test-case covariance the seeds *share* (they are scored on the same cases, so their spread cannot show
    it); with one seed it is that seed's whole test-case variance. See :func:`combine_seed_and_case_variance`.
    ``p_value`` is the two-sided test of estimate = 0 (meaningful for differences).
    """

    estimate: float
    low: float
    high: float
    p_value: float
    seed_variance: float
    case_variance: float
    n_seeds: int

    @property
    def seeds_included(self) -> bool:
        """False when one seed was available: the interval then covers test cases only."""
        return self.n_seeds >= 2 and math.isfinite(self.seed_variance)


def seed_t_interval(values: Any, alpha: float = 0.05, bounds: tuple[float, float] | None = None
                    ) -> tuple[float, float, float, float, int]:
    """Mean over seeds, its t-interval and the one-sample t-test p (mean = 0): (mean, low, high, p, n).

    Conditions on the test set (every seed is scored on the same cases): it covers label-subset and training
    randomness only. Fewer than two finite values give NaN bounds and p. ``bounds``: the range of the values
    (:func:`metric_range`; a difference of AUCs: (-1, 1)); the interval and, where 0 lies inside the range, the
    test are then computed on its logit scale (delta method), so the interval stays inside the range.
    """
    mean, std, n = mean_std_over_seeds(values)
    if n < 2:
        return mean, math.nan, math.nan, math.nan, n
    scale = _scale_at(bounds, mean, "seed_t_interval")
    se = std / math.sqrt(n)
    t = float(stats.t.ppf(1 - alpha / 2, n - 1))
    if scale is None:
        distance, se_scaled = abs(mean), se
        low, high = mean - t * se, mean + t * se
    else:
        se_scaled = se * scale.slope(mean)
        centre = scale.forward(mean)
        low, high = scale.interval(mean, t * se_scaled)
        distance = abs(centre - scale.forward(0.0)) if scale.contains_zero else abs(mean)
        if not scale.contains_zero:
            se_scaled = se
    if se_scaled > 0:
        p = float(2 * stats.t.sf(distance / se_scaled, n - 1))
    else:
        p = 1.0 if mean == 0 else 0.0
    return mean, low, high, p, n


def _half_width(alpha: float, seed_variance: float, case_variance: float, n_seeds: int) -> float:
    t = float(stats.t.isf(alpha / 2, n_seeds - 1)) if n_seeds >= 2 else 0.0  # isf: exact for tiny alpha
    z = float(stats.norm.isf(alpha / 2))
    return math.sqrt(t * t * seed_variance + z * z * case_variance)


def combine_seed_and_case_variance(per_seed: Any, case_covariance: Any, alpha: float = 0.05,
                                   bounds: tuple[float, float] | None = None) -> SeedsAndCases:
    """Mean of ``per_seed`` values with an interval that covers seeds and test cases.

    ``case_covariance`` is the (S, S) test-case covariance of the per-seed values (DeLong or a case bootstrap),
    with the trained models held fixed. Law of total variance: Var(mean) = Var_seeds + Var_cases; the observed
    spread over seeds, s²/S, already holds each model's *own* case noise, so only the part the seeds share — the
    mean off-diagonal covariance c — is added. The two parts have very different degrees of freedom (S − 1 and
    about the number of cases), so their 95% half-widths are combined root-sum-square,
    half = sqrt(t²(S−1) · s²/S + z² · c), rather than through one Satterthwaite df, which is liberal with 2–3
    seeds. The result is exactly the paired t-interval over seeds when the seeds share no case noise and the
    DeLong interval when all seeds agree. p inverts the interval (the α at which it touches 0). Simulated
    coverage is in ``tests/test_statistics_seeds.py``. With one seed the interval covers test cases only.

    ``bounds``: the range of the per-seed values (an AUC: (0, 1); a difference of AUCs: (-1, 1)). Both variance
    parts are then carried to the logit scale of that range by the delta method, the half-width is formed there
    and the interval mapped back (:func:`bounded_scale`), so it stays inside the range; p tests 0 on that scale
    when 0 lies inside the range. The estimate stays the plain mean.
    """
    v = np.asarray(per_seed, dtype=np.float64).ravel()
    cov = np.atleast_2d(np.asarray(case_covariance, dtype=np.float64))
    if v.size == 0 or not np.isfinite(v).all():
        raise DataError("combine_seed_and_case_variance", f"per-seed values must be finite, got {v.tolist()}",
                        "pass one finite value per seed")
    if cov.shape != (v.size, v.size):
        raise DataError("combine_seed_and_case_variance", f"case covariance of shape {cov.shape} for {v.size} seeds",
                        "pass the (S, S) covariance of the per-seed values")
    mean, n = float(v.mean()), int(v.size)
    if n == 1:
        seed_variance, case_variance = math.nan, max(float(cov[0, 0]), 0.0)
    else:
        seed_variance = float(v.var(ddof=1)) / n
        case_variance = max(float(cov.sum() - np.trace(cov)) / (n * (n - 1)), 0.0)
    a = 0.0 if math.isnan(seed_variance) else seed_variance
    if not math.isfinite(case_variance):
        return SeedsAndCases(mean, math.nan, math.nan, math.nan, seed_variance, case_variance, n)
    scale = _scale_at(bounds, mean, "combine_seed_and_case_variance")
    if scale is None:
        half = _half_width(alpha, a, case_variance, n)
        low, high = mean - half, mean + half
        distance, a_test, c_test = abs(mean), a, case_variance
    else:
        slope2 = scale.slope(mean) ** 2
        low, high = scale.interval(mean, _half_width(alpha, a * slope2, case_variance * slope2, n))
        if scale.contains_zero:  # test 0 on the same (logit) scale as the interval, so the two agree
            distance, a_test, c_test = abs(scale.forward(mean) - scale.forward(0.0)), a * slope2, case_variance * slope2
        else:  # a level (AUC): 0 is its bound, the test of 0 is meaningless; kept on the plain scale
            distance, a_test, c_test = abs(mean), a, case_variance
    if a_test + c_test <= 1e-30:
        p = 1.0 if abs(mean) <= 1e-15 else 0.0
    else:
        gap = lambda level: _half_width(level, a_test, c_test, n) - distance  # noqa: E731 - decreasing in level
        if gap(1.0 - 1e-12) >= 0:
            p = 1.0
        elif gap(1e-15) < 0:
            p = 0.0  # below 1e-15
        else:
            from scipy.optimize import brentq

            p = float(brentq(gap, 1e-15, 1.0 - 1e-12, xtol=1e-15))
    return SeedsAndCases(mean, low, high, p, seed_variance, case_variance, n)


def _is_binary_auc(metric: Metric, y: np.ndarray, scores: Sequence[np.ndarray]) -> bool:
    return (metric is binary_auc or metric is roc_auc_score) and y.ndim == 1 and all(s.ndim == 1 for s in scores)


def case_covariance(y_true: Any, scores_a: Sequence[Any], metric: Metric, scores_b: Sequence[Any] | None = None,
                    n_boot: int = 1000, seed: int = 0, stratified: bool = True) -> np.ndarray:
    """(S, S) test-case covariance of per-seed metric(a_s) (or of metric(a_s) − metric(b_s), paired by seed).

    The trained models are held fixed and the test cases resampled. Binary AUC: DeLong's joint covariance of
    every model's AUC on the shared cases. A mean of per-case values (:func:`case_mean`, e.g. Dice): the exact
    covariance of case means (:func:`case_mean_covariance`). Other metrics: the covariance over case bootstrap resamples, one
    resample scoring every seed (and both sides), so the dependence through shared cases is kept.
    """
    if not scores_a or (scores_b is not None and len(scores_b) != len(scores_a)):
        raise DataError("case_covariance", "need one score vector per seed (the same number for both models)")
    side_b = list(scores_b or [])
    y, *checked = _check_pair(y_true, *scores_a, *side_b)
    k = len(scores_a)
    contrast = np.hstack([np.eye(k), -np.eye(k)]) if side_b else np.eye(k)
    if _is_binary_auc(metric, y, checked):
        _, cov = delong_covariance(y, np.stack(checked))
        return contrast @ cov @ contrast.T
    if metric is case_mean:  # exact: the covariance of case means (no resampling needed)
        return contrast @ case_mean_covariance(np.stack(checked)) @ contrast.T
    idx = _resample_indices(y, n_boot, np.random.default_rng(seed), stratified)
    values = np.stack([_metric_on_resamples(metric, y, s, idx) for s in checked], axis=1) @ contrast.T  # (B, k)
    values = values[np.isfinite(values).all(axis=1)]
    if values.shape[0] < 2:
        raise DataError("case_covariance", "the metric was undefined on (almost) every bootstrap resample",
                        "check that the test set contains every class")
    return np.atleast_2d(np.cov(values, rowvar=False))


def seeds_and_cases_interval(y_true: Any, scores_per_seed: Sequence[Any], metric: Metric, alpha: float = 0.05,
                             n_boot: int = 1000, seed: int = 0,
                             bounds: tuple[float, float] | None | str = "auto") -> SeedsAndCases:
    """Seed-averaged ``metric`` on one test set with an interval over seeds and test cases.

    What it answers: "what would this initialisation + protocol score at this label fraction, averaged over
    label subsets and training runs, on data like this test set?" — unlike :func:`bootstrap_ci` of one seed
    (this model, other test cases) or :func:`seed_t_interval` (other models, this test set).
    ``bounds``: the metric's range; ``"auto"`` takes :func:`metric_range` of ``metric`` (AUC, accuracy: (0, 1);
    :func:`case_mean` is unknown — pass (0, 1) for Dice), None leaves the interval unbounded.
    """
    y = np.asarray(y_true)
    scores_per_seed = on_common_cases(metric, scores_per_seed)
    per_seed = [metric(y, np.asarray(s, dtype=np.float64)) for s in scores_per_seed]
    cov = case_covariance(y, scores_per_seed, metric, n_boot=n_boot, seed=seed)
    return combine_seed_and_case_variance(per_seed, cov, alpha, _resolve_bounds(bounds, metric))


def seeds_and_cases_paired_test(y_true: Any, scores_a: Sequence[Any], scores_b: Sequence[Any], metric: Metric,
                                alpha: float = 0.05, n_boot: int = 1000, seed: int = 0,
                                bounds: tuple[float, float] | None | str = "auto") -> SeedsAndCases:
    """Test of mean_s [metric(a_s) − metric(b_s)] = 0 over seeds *and* test cases; a_s, b_s paired by seed.

    Pairing by seed is right because both arms of one seed see the same label subset. A paired t-test over
    seeds alone treats the test set as fixed; DeLong on the seed-averaged contrast
    (:func:`delong_seed_averaged`) treats the trained models as fixed and can say p < 0.001 while seeds disagree
    by 0.1 AUC. This test carries both (see :func:`combine_seed_and_case_variance`). ``bounds`` is the range of
    the *metric* (as in :func:`seeds_and_cases_interval`); the difference's range (-1, 1 for an AUC) follows.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise DataError("seeds_and_cases_paired_test", f"got {len(scores_a)} and {len(scores_b)} score vectors",
                        "pass one score vector per seed for both models, in the same seed order")
    y = np.asarray(y_true)
    common = on_common_cases(metric, [*scores_a, *scores_b])
    scores_a, scores_b = common[: len(scores_a)], common[len(scores_a) :]
    differences = [metric(y, np.asarray(sa, dtype=np.float64)) - metric(y, np.asarray(sb, dtype=np.float64))
                   for sa, sb in zip(scores_a, scores_b, strict=True)]
    cov = case_covariance(y, scores_a, metric, scores_b, n_boot=n_boot, seed=seed)
    return combine_seed_and_case_variance(differences, cov, alpha, difference_range(_resolve_bounds(bounds, metric)))


# --------------------------------------------------------------------------------------------------
# Bounded metrics: intervals on the logit scale of the metric's range
# --------------------------------------------------------------------------------------------------

_UNIT_RANGE_PREFIXES = ("auc", "roc_auc", "auroc", "macro_auc", "accuracy", "balanced_accuracy", "dice")
"""Stored metric names (and ``<name>_<class>`` variants such as ``dice_left``) whose values lie in [0, 1]."""


def metric_range(metric: Metric | str) -> tuple[float, float] | None:
    """The range of a metric, a statistics function (:func:`binary_auc`, …) or a stored name (``auc``, ``dice_x``).

    (0, 1) for AUC, accuracy, balanced accuracy and Dice; None for unbounded or unknown ones (HD95, and
    :func:`case_mean`, whose per-case values may be Dice or HD95: its callers know which and pass ``bounds``).
    """
    if isinstance(metric, str):
        name = metric.lower()
        return (0.0, 1.0) if any(name == p or name.startswith(p + "_") for p in _UNIT_RANGE_PREFIXES) else None
    return (0.0, 1.0) if metric in (binary_auc, macro_auc, accuracy, roc_auc_score) else None


def difference_range(bounds: tuple[float, float] | None) -> tuple[float, float] | None:
    """The range of a difference of two values in ``bounds`` (an AUC gain: (-1, 1))."""
    return None if bounds is None else (bounds[0] - bounds[1], bounds[1] - bounds[0])


def _resolve_bounds(bounds: tuple[float, float] | None | str, metric: Metric) -> tuple[float, float] | None:
    if isinstance(bounds, str):
        if bounds != "auto":
            raise ValueError(f"bounds must be 'auto', None or (low, high), got {bounds!r}")
        return metric_range(metric)
    return bounds


@dataclass(frozen=True)
class _LogitScale:
    """g(x) = logit((x − low) / (high − low)): maps the open range onto the real line (delta-method scale)."""

    low: float
    high: float

    _EDGE = 1e-9
    """Values at a bound (AUC = 1 on every seed) are moved this far inside so g and its slope stay finite."""

    def _unit(self, x: float) -> float:
        return min(max((x - self.low) / (self.high - self.low), self._EDGE), 1.0 - self._EDGE)

    def forward(self, x: float) -> float:
        u = self._unit(x)
        return math.log(u / (1.0 - u))

    def slope(self, x: float) -> float:
        """dg/dx, the delta method's factor from the plain to the logit scale."""
        u = self._unit(x)
        return 1.0 / ((self.high - self.low) * u * (1.0 - u))

    def inverse(self, z: float) -> float:
        return self.low + (self.high - self.low) * float(0.5 * (1.0 + math.tanh(0.5 * z)))  # stable expit

    def interval(self, x: float, half_width: float) -> tuple[float, float]:
        """(low, high): g(x) ± ``half_width`` (a half-width on the logit scale) mapped back into the range."""
        if not math.isfinite(half_width):
            return math.nan, math.nan
        if half_width == 0.0:
            return x, x
        centre = self.forward(x)
        return self.inverse(centre - half_width), self.inverse(centre + half_width)

    @property
    def contains_zero(self) -> bool:
        return self.low < 0.0 < self.high


def bounded_scale(bounds: tuple[float, float]) -> _LogitScale:
    """The logit scale of a range, for callers that form their own Wald intervals of a bounded quantity."""
    low, high = float(bounds[0]), float(bounds[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"bounds must be finite with low < high, got {bounds}")
    return _LogitScale(low, high)


def _scale_at(bounds: tuple[float, float] | None, value: float, where: str) -> _LogitScale | None:
    """The logit scale of ``bounds`` after checking ``value`` lies in it (None: no bounds, the plain scale)."""
    if bounds is None:
        return None
    scale = bounded_scale(bounds)
    tolerance = 1e-9 * (scale.high - scale.low)
    if not scale.low - tolerance <= value <= scale.high + tolerance:
        raise DataError(where, f"value {value} lies outside the metric's range [{scale.low}, {scale.high}]",
                        "pass the metric's own range as bounds (or None for an unbounded metric)")
    return scale
