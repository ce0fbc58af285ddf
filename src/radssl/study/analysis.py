"""What a label-efficiency study concludes: curves, bands, gains and verdicts, read from the results store.

Numbers only — no HTML, no formatting (``formatting.py``, ``figures.py`` and ``report.py`` present them), so the
analysis is tested on its own and any page, table or benchmark can reuse it.

Statistical choices (also stated in the report, section "How the numbers were made"):
- A curve point is the mean over seeds (each seed: another label subset and another read-out training run, all
  scored on the same test cases). Its band covers *both* sources of variation: the spread over seeds and the
  test-case variance the seeds share (:func:`radssl.study.statistics.seeds_and_cases_interval`). Beside it the
  table lists the t-interval over seeds (given this test set) and the mean of the seeds' bootstrap CIs over test
  cases (given each trained model).
- Gains (A − B) pair the arms by seed (same label subset) and are tested over seeds and test cases
  (:func:`radssl.study.statistics.seeds_and_cases_paired_test`). Shown with it, labelled as such: DeLong on
  the seed-averaged contrast (binary AUC; a paired case bootstrap for other metrics), which treats the trained
  models as fixed, and the paired t-test over seeds, which treats the test set as fixed. Without stored
  predictions only the seed t-test is possible.
- "Matches the supervised baseline": the smallest label fraction at which a curve reaches the mean
  metric of random-init fine-tuning with 100% labels (log-fraction interpolation,
  :func:`radssl.study.statistics.fraction_matching_baseline`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radssl.study.results_store import CellKey, ResultsStore
from radssl.study.statistics import (
    SeedsAndCases,
    delong_seed_averaged,
    difference_range,
    fraction_matching_baseline,
    mean_std_over_seeds,
    metric_range,
    paired_bootstrap_seed_averaged,
    seed_t_interval,
    seeds_and_cases_interval,
    seeds_and_cases_paired_test,
    wilcoxon_paired,
)
from radssl.transfer.metrics import accuracy, binary_auc, case_mean, macro_auc

INTERNAL_TEST_SET = "test"
SUPERVISED_INIT = "random"
SUPERVISED_PROTOCOL = "finetune"
SUPERVISED_PROTOCOLS = {"auc": "finetune", "dice": "segmentation_finetune"}
"""The fully supervised baseline's protocol per primary metric (random init, 100% labels)."""
PROTOCOL_ORDER = ("linear", "finetune", "knn", "segmentation_finetune", "segmentation_frozen", "zero_shot")
INIT_ORDER = ("random", "imagenet", "ssl", "imagenet+ssl")
AUC_METRICS = {"auc", "roc_auc", "auroc", "macro_auc"}
NO_PRETRAIN = {"", "none", "-", "null"}
N_BOOT = 1000
SEEDS_AND_CASES = "seeds + test cases"
CASES_ONLY = "test cases only (1 seed)"
SEEDS_ONLY = "seeds only (no predictions stored)"


@dataclass(frozen=True, order=True)
class Line:
    """One curve: an encoder initialisation (+ the pretraining run it came from) read out by one protocol."""

    init: str
    pretrain: str
    protocol: str

    @property
    def encoder(self) -> tuple[str, str]:
        return self.init, self.pretrain


@dataclass
class Cell:
    key: CellKey
    value: float
    ci_low: float | None
    ci_high: float | None
    has_predictions: bool
    metric: str = "auc"
    has_case_values: bool = False


@dataclass
class Gain:
    treatment: Line
    baseline: Line
    test_set: str
    label_fraction: float
    difference: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    method: str
    n_a: int
    n_b: int
    seed_sd: float
    n_paired: int = 0
    seed_p: float | None = None
    """Paired t-test over seeds alone (conditions on the test set)."""
    case_p: float | None = None
    """DeLong / paired case bootstrap of the seed-averaged contrast alone (conditions on the trained models)."""
    case_method: str = ""


@dataclass
class Band:
    """A curve point: mean over seeds and its intervals (see the module doc for what each one covers)."""

    mean: float
    n: int
    low: float
    high: float
    method: str
    seed_low: float = math.nan
    seed_high: float = math.nan
    case_low: float = math.nan
    case_high: float = math.nan
    seed_sd: float = math.nan


@dataclass
class Analysis:
    study: str
    metric: str
    rows: list[dict[str, Any]]
    cells: dict[Line, dict[tuple[str, float], list[Cell]]] = field(default_factory=dict)
    size_cells: dict[Line, dict[tuple[str, float, float], list[Cell]]] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    test_sets: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bands: dict[tuple[Line, str, float], Band] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    """Metric of each protocol's curves (its cells' primary metric, or the one asked for)."""
    reference_lines: set[Line] = field(default_factory=set)
    """Lines of label-free protocols (zero-shot: label fraction 0): drawn as horizontal reference lines."""

    def metric_of(self, protocol: str) -> str:
        return self.metrics.get(protocol, self.metric)


def ordered(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def analyse(store: ResultsStore, study: str, metric: str | None) -> Analysis:
    """Group a study's rows into curves. ``metric`` None: every cell's own primary metric (AUC for classification
    protocols, Dice for segmentation, …); a name: that metric for every protocol that recorded it."""
    rows = store.cells(study)
    wanted = (lambda r: r["metric"] == r["primary_metric"]) if metric is None else (lambda r: r["metric"] == metric)
    chosen = [r for r in rows if wanted(r) and r["value"] is not None]
    primaries = sorted({r["primary_metric"] for r in chosen}) or [metric or "auc"]
    analysis = Analysis(study, metric or primaries[0], rows)
    if rows and not chosen:
        available = sorted({r["metric"] for r in rows if r["metric"]})
        analysis.notes.append(f"No cell has the metric “{metric}”; available: {', '.join(available) or 'none'}.")
    by_line: dict[Line, list[Cell]] = defaultdict(list)
    for r in chosen:
        cell = Cell(CellKey.from_row(r), float(r["value"]), r["ci_low"], r["ci_high"], bool(r["has_predictions"]),
                     r["metric"], bool(r.get("has_case_values")))
        by_line[Line(r["init"], r["pretrain"], r["protocol"])].append(cell)
        analysis.metrics.setdefault(r["protocol"], r["metric"])
    for line, cells in by_line.items():
        # Curves use the full pretraining set (largest pretraining fraction); smaller ones feed the
        # pretraining-set-size section.
        full = max(c.key.pretrain_fraction for c in cells)
        curve: dict[tuple[str, float], list[Cell]] = defaultdict(list)
        sizes: dict[tuple[str, float, float], list[Cell]] = defaultdict(list)
        for c in cells:
            if c.key.pretrain_fraction == full:
                curve[(c.key.test_set, c.key.label_fraction)].append(c)
            sizes[(c.key.test_set, c.key.label_fraction, c.key.pretrain_fraction)].append(c)
        analysis.cells[line] = dict(curve)
        if all(c.key.label_fraction == 0.0 for c in cells):
            analysis.reference_lines.add(line)
        elif len({c.key.pretrain_fraction for c in cells}) > 1:
            analysis.size_cells[line] = dict(sizes)
    init_rank = {init: i for i, init in enumerate(ordered({ln.init for ln in by_line}, INIT_ORDER))}
    proto_rank = {p: i for i, p in enumerate(ordered({ln.protocol for ln in by_line}, PROTOCOL_ORDER))}
    analysis.lines = sorted(by_line, key=lambda ln: (proto_rank[ln.protocol], init_rank[ln.init], ln.pretrain))
    test_sets = {r["test_set"] for r in chosen}
    analysis.test_sets = ([INTERNAL_TEST_SET] if INTERNAL_TEST_SET in test_sets else []) + sorted(
        test_sets - {INTERNAL_TEST_SET})
    analysis.protocols = list(proto_rank)
    analysis.fractions = sorted({float(r["label_fraction"]) for r in chosen if float(r["label_fraction"]) > 0})
    analysis.seeds = sorted({int(r["seed"]) for r in chosen})
    return analysis


def point(cells: Sequence[Cell]) -> tuple[float, float, float, int]:
    """Mean over seeds with a fallback band (t-interval over seeds, else the mean of the seeds' case CIs).

    The report's bands come from :func:`compute_bands` (seeds and test cases); this fallback serves the
    pretraining-size figure and callers without predictions.
    """
    mean, _, n = mean_std_over_seeds([c.value for c in cells])
    if n >= 2:
        _, low, high, _, _ = seed_t_interval([c.value for c in cells], bounds=metric_range(cells[0].metric))
        return mean, low, high, n
    lows = [c.ci_low for c in cells if c.ci_low is not None]
    highs = [c.ci_high for c in cells if c.ci_high is not None]
    if lows and len(lows) == len(highs) == len(cells):
        return mean, float(np.mean(lows)), float(np.mean(highs)), n
    return mean, math.nan, math.nan, n


def metric_function(metric: str, y_true: np.ndarray, y_score: np.ndarray, per_case: bool = False) -> Any:
    """The statistics function of a stored metric for these per-case outputs, or None (no case-level method).

    ``per_case``: the outputs are per-case values of the metric itself (Dice, HD95): its set value is their mean.
    """
    if per_case:
        return case_mean
    if metric in AUC_METRICS:
        return macro_auc if y_true.ndim == 2 or y_score.ndim == 2 else binary_auc
    if metric == "accuracy":
        return accuracy
    return None


def aligned_predictions(predictions: "Predictions", cells: Sequence[Cell]
                         ) -> tuple[np.ndarray, list[np.ndarray], bool] | None:
    """(y_true, one score array per cell, per-case values?) when every cell stored per-case outputs of the same
    cases, else None. Per-case values (Dice, …) come with zeros as ``y_true`` (one stratum)."""
    loaded = [predictions.get(c) for c in cells]
    if not loaded or any(p is None for p in loaded):
        return None
    per_case = {p[2] for p in loaded}
    if len(per_case) != 1:
        return None
    y_true = loaded[0][0]
    if not all(p[0].shape == y_true.shape and np.array_equal(p[0], y_true) for p in loaded):
        return None
    if per_case == {True}:
        return y_true, [p[1] for p in loaded], True
    binary = [binary_scores(y_true, p[1]) for p in loaded]
    if all(b is not None for b in binary):
        return y_true, [np.asarray(b) for b in binary], False
    return y_true, [p[1] for p in loaded], False


def curve_band(analysis: Analysis, predictions: "Predictions", cells: Sequence[Cell]) -> Band:
    values = [c.value for c in cells]
    mean, sd, n = mean_std_over_seeds(values)
    band = Band(mean, n, math.nan, math.nan, "–", seed_sd=sd)
    if n >= 2:
        _, band.seed_low, band.seed_high, _, _ = seed_t_interval(values, bounds=metric_range(cells[0].metric))
    lows = [c.ci_low for c in cells if c.ci_low is not None]
    highs = [c.ci_high for c in cells if c.ci_high is not None]
    if lows and len(lows) == len(highs) == len(cells):
        band.case_low, band.case_high = float(np.mean(lows)), float(np.mean(highs))
    aligned = aligned_predictions(predictions, cells)
    function = None if aligned is None else metric_function(cells[0].metric, aligned[0], aligned[1][0], aligned[2])
    if aligned is not None and function is not None:
        try:
            result = seeds_and_cases_interval(aligned[0], aligned[1], function, n_boot=N_BOOT, seed=0,
                                              bounds=metric_range(cells[0].metric))
        except Exception as error:  # a metric undefined on this test set: fall back below
            analysis.notes.append(f"Seeds + test cases interval skipped for one curve point: {error}")
        else:
            band.mean, band.low, band.high = result.estimate, result.low, result.high
            band.method = SEEDS_AND_CASES if result.seeds_included else CASES_ONLY
            return band
    if n >= 2:
        band.low, band.high, band.method = band.seed_low, band.seed_high, SEEDS_ONLY
    return band


def compute_bands(analysis: Analysis, predictions: "Predictions") -> None:
    """Every curve point's mean and intervals, computed once (figures and tables read ``analysis.bands``)."""
    for line, points in analysis.cells.items():
        for (test_set, fraction), cells in points.items():
            analysis.bands[(line, test_set, fraction)] = curve_band(analysis, predictions, cells)


def mean_curve(analysis: Analysis, line: Line, test_set: str) -> dict[float, float]:
    return {lf: point(cells)[0] for (ts, lf), cells in analysis.cells.get(line, {}).items() if ts == test_set}


def matching_line(analysis: Analysis, treatment: Line, baseline_init: str) -> Line | None:
    """The baseline curve compared with ``treatment``: same protocol, same pretraining run if it has one."""
    candidates = [ln for ln in analysis.lines if ln.init == baseline_init and ln.protocol == treatment.protocol]
    if not candidates:
        return None
    same_run = [ln for ln in candidates if ln.pretrain == treatment.pretrain]
    return (same_run or sorted(candidates))[0]


class Predictions:
    """Loads per-case outputs lazily, once per cell: (y_true, scores or values, per-case values?)."""

    def __init__(self, store: ResultsStore, study: str) -> None:
        self._store, self._study, self._cache = store, study, {}

    def get(self, cell: Cell) -> tuple[np.ndarray, np.ndarray, bool] | None:
        key = (cell.key.key, cell.metric)
        if key not in self._cache:
            if cell.has_case_values:  # the metric's own per-case values (Dice, HD95, …)
                values = self._store.case_values(self._study, cell.key)[cell.metric]
                self._cache[key] = (np.zeros(len(values), dtype=np.int64), values, True)
            elif cell.has_predictions:
                stored = self._store.predictions(self._study, cell.key)
                self._cache[key] = None if stored is None else (stored.y_true, stored.y_score, False)
            else:
                self._cache[key] = None
        return self._cache[key]


def binary_scores(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray | None:
    """The positive-class score of a binary task (1-D, or column 1 of two), else None."""
    if y_true.ndim != 1 or not np.all(np.isin(np.unique(y_true), [0, 1])):
        return None
    if y_score.ndim == 1:
        return y_score
    if y_score.ndim == 2 and y_score.shape[1] == 2:
        return y_score[:, 1]
    if y_score.ndim == 2 and y_score.shape[1] == 1:
        return y_score[:, 0]
    return None


def compare(analysis: Analysis, predictions: Predictions, a: Line, b: Line, test_set: str,
             fraction: float) -> Gain | None:
    """Seed-averaged difference A − B, paired by seed, tested over seeds and test cases (see module doc)."""
    cells_a = analysis.cells.get(a, {}).get((test_set, fraction), [])
    cells_b = analysis.cells.get(b, {}).get((test_set, fraction), [])
    if not cells_a or not cells_b:
        return None
    by_seed_b = {c.key.seed: c for c in cells_b}
    pairs = [(c, by_seed_b[c.key.seed]) for c in sorted(cells_a, key=lambda c: c.key.seed) if c.key.seed in by_seed_b]
    paired = [ca.value - cb.value for ca, cb in pairs]
    seed_sd = mean_std_over_seeds(paired)[1]
    difference = float(np.mean([c.value for c in cells_a]) - np.mean([c.value for c in cells_b]))
    gain = Gain(a, b, test_set, fraction, difference, None, None, None, "–", len(cells_a), len(cells_b), seed_sd,
                 n_paired=len(pairs))
    seed_interval = seed_t_interval(paired, bounds=difference_range(metric_range(cells_a[0].metric))) \
        if len(paired) >= 2 else None
    if seed_interval is not None:
        gain.seed_p = seed_interval[3]
    if not pairs:
        return gain
    gain.difference = float(np.mean(paired))

    aligned = aligned_predictions(predictions, [ca for ca, _ in pairs] + [cb for _, cb in pairs])
    function = None if aligned is None else metric_function(pairs[0][0].metric, aligned[0], aligned[1][0],
                                                             aligned[2])
    if aligned is not None and function is not None:
        y_true, scores, _ = aligned
        side_a, side_b = scores[:len(pairs)], scores[len(pairs):]
        try:
            if function is binary_auc:
                r = delong_seed_averaged(y_true, side_a, side_b)
                gain.case_p, gain.case_method = r.p_value, "DeLong"
            elif function is case_mean:  # per-case values (Dice): distribution-free signed-rank test
                w = wilcoxon_paired(side_a, side_b)
                gain.case_p, gain.case_method = w.p_value, "Wilcoxon signed-rank"
            else:
                rb = paired_bootstrap_seed_averaged(y_true, side_a, side_b, function, n_boot=N_BOOT, seed=0)
                gain.case_p, gain.case_method = rb.p_value, "paired case bootstrap"
            both: SeedsAndCases = seeds_and_cases_paired_test(y_true, side_a, side_b, function, n_boot=N_BOOT,
                                                              seed=0, bounds=metric_range(pairs[0][0].metric))
        except Exception as error:  # a metric undefined on this test set: report without a case-level test
            analysis.notes.append(f"Case-level test skipped for {test_set} at {100 * fraction:.3g}% labels: {error}")
        else:
            gain.difference, gain.ci_low, gain.ci_high, gain.p_value = both.estimate, both.low, both.high, \
                both.p_value
            gain.method = SEEDS_AND_CASES if both.seeds_included else CASES_ONLY
            return gain
    if seed_interval is not None:  # no usable predictions: the seeds are the only replicates
        _, gain.ci_low, gain.ci_high, gain.p_value, _ = seed_interval
        gain.method = SEEDS_ONLY
    return gain


def gains_over(analysis: Analysis, predictions: Predictions, baseline_init: str,
           treatments: Sequence[Line]) -> list[Gain]:
    out = []
    for line in treatments:
        base = matching_line(analysis, line, baseline_init)
        if base is None:
            continue
        for test_set in analysis.test_sets:
            for fraction in analysis.fractions:
                gain = compare(analysis, predictions, line, base, test_set, fraction)
                if gain is not None:
                    out.append(gain)
    return out


def curve_protocols(analysis: Analysis) -> list[str]:
    """Protocols with label-efficiency curves (not only label-free reference lines)."""
    return [p for p in analysis.protocols
            if any(ln.protocol == p and ln not in analysis.reference_lines for ln in analysis.lines)]


def primary_protocol(analysis: Analysis) -> str | None:
    curves = curve_protocols(analysis)
    return curves[0] if curves else None


def supervised_baseline(analysis: Analysis, test_set: str, protocol: str) -> tuple[Line, float] | None:
    """Random-init full fine-tuning with 100% labels for the protocol's metric (classification: ``finetune``,
    segmentation: ``segmentation_finetune``), or the line's own protocol when nobody fine-tuned."""
    metric = analysis.metric_of(protocol)
    supervised = SUPERVISED_PROTOCOLS.get(metric, SUPERVISED_PROTOCOL)
    for proto in (supervised, protocol):
        if analysis.metric_of(proto) != metric:
            continue
        for line in analysis.lines:
            if line.init == SUPERVISED_INIT and line.protocol == proto:
                cells = analysis.cells[line].get((test_set, 1.0))
                if cells:
                    return line, point(cells)[0]
    return None


def baseline_matches(analysis: Analysis) -> dict[tuple[Line, str], tuple[float | None, float, Line]]:
    out = {}
    for test_set in analysis.test_sets:
        for line in analysis.lines:
            if line in analysis.reference_lines:  # label-free: no label fraction to find
                continue
            base = supervised_baseline(analysis, test_set, line.protocol)
            if base is None or base[0] == line:
                continue
            curve = mean_curve(analysis, line, test_set)
            if curve:
                out[(line, test_set)] = (fraction_matching_baseline(curve, base[1]), base[1], base[0])
    return out


def per_cell(analysis: Analysis, name: str) -> dict[tuple[str, str, str, float], list[float]]:
    """A per-cell record (e.g. ``val_images``) by (init, pretrain, protocol, label fraction), one value per seed.

    Test sets of one protocol run share these records, so each (…, pretraining fraction, seed) counts once.
    """
    seen: set[tuple[Any, ...]] = set()
    out: dict[tuple[str, str, str, float], list[float]] = defaultdict(list)
    for r in analysis.rows:
        if r["metric"] != name or r["value"] is None:
            continue
        key = (r["init"], r["pretrain"], r["protocol"], float(r["label_fraction"]), r["pretrain_fraction"], r["seed"])
        if key in seen:
            continue
        seen.add(key)
        out[key[:4]].append(float(r["value"]))
    return dict(out)


def verdict(g: Gain) -> str:
    if g.ci_low is not None and g.ci_low > 0:
        return "beats"
    if g.ci_high is not None and g.ci_high < 0:
        return "trails"
    return "is not distinguishable from"
