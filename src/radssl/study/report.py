"""One self-contained HTML report of a label-efficiency study, read straight from the results store.

Why one file: a study report gets mailed, attached to tickets and opened years later on machines with
no internet; so figures are embedded as base64 PNG, the CSS is inline and nothing points outside the
page. ``results.csv`` (the long-format rows) is written beside it for anyone who wants their own plots.

Statistical choices (also stated in the page, section "How the numbers were made"):
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
- The page states the fine-tuning budget rule, the validation rule and the backbone-LR rule the cells were
  computed with (from the stored study configuration and the per-cell records).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radssl.atomic import write_text_atomic
from radssl.study.results_store import CellKey, ResultsStore
from radssl.study.statistics import (
    SeedsAndCases,
    accuracy,
    binary_auc,
    case_mean,
    delong_seed_averaged,
    difference_range,
    fraction_matching_baseline,
    macro_auc,
    mean_std_over_seeds,
    metric_range,
    paired_bootstrap_seed_averaged,
    seed_t_interval,
    seeds_and_cases_interval,
    seeds_and_cases_paired_test,
    wilcoxon_paired,
)

__all__ = ["render_report"]

INTERNAL_TEST_SET = "test"
SUPERVISED_INIT = "random"
SUPERVISED_PROTOCOL = "finetune"
SUPERVISED_PROTOCOLS = {"auc": "finetune", "dice": "segmentation_finetune"}
"""The fully supervised baseline's protocol per primary metric (random init, 100% labels)."""
_PROTOCOL_ORDER = ("linear", "finetune", "knn", "segmentation_finetune", "segmentation_frozen", "zero_shot")
_INIT_ORDER = ("random", "imagenet", "ssl", "imagenet+ssl")
_INIT_NAMES = {"random": "Random", "imagenet": "ImageNet", "ssl": "SSL", "imagenet+ssl": "ImageNet+SSL"}
_PROTOCOL_NAMES = {"linear": "linear probe", "knn": "kNN", "finetune": "fine-tune"}
_METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "macro_auc": "macro AUC", "f1": "F1", "dice": "Dice",
                 "hd95": "HD95"}
_LOWER_IS_BETTER_PREFIXES = ("hd95",)
_AUC_METRICS = {"auc", "roc_auc", "auroc", "macro_auc"}
# Okabe & Ito (2008) colour-blind-safe palette; random stays neutral grey.
_INIT_COLOURS = {"random": "#7a7a7a", "imagenet": "#0072B2", "ssl": "#E69F00", "imagenet+ssl": "#009E73"}
_SPARE_COLOURS = ("#D55E00", "#CC79A7", "#56B4E9", "#8E6C8A", "#F0E442", "#332288", "#44AA99")
_NO_PRETRAIN = {"", "none", "-", "null"}
_N_BOOT = 1000


# ------------------------------------------------------------------------------------------------------
# Data model
# ------------------------------------------------------------------------------------------------------


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
class _Cell:
    key: CellKey
    value: float
    ci_low: float | None
    ci_high: float | None
    has_predictions: bool
    metric: str = "auc"
    has_case_values: bool = False


@dataclass
class _Gain:
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
class _Band:
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
class _Analysis:
    study: str
    metric: str
    rows: list[dict[str, Any]]
    cells: dict[Line, dict[tuple[str, float], list[_Cell]]] = field(default_factory=dict)
    size_cells: dict[Line, dict[tuple[str, float, float], list[_Cell]]] = field(default_factory=dict)
    lines: list[Line] = field(default_factory=list)
    test_sets: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bands: dict[tuple[Line, str, float], _Band] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)
    """Metric of each protocol's curves (its cells' primary metric, or the one asked for)."""
    reference_lines: set[Line] = field(default_factory=set)
    """Lines of label-free protocols (zero-shot: label fraction 0): drawn as horizontal reference lines."""

    def metric_of(self, protocol: str) -> str:
        return self.metrics.get(protocol, self.metric)


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def _analyse(store: ResultsStore, study: str, metric: str | None) -> _Analysis:
    """Group a study's rows into curves. ``metric`` None: every cell's own primary metric (AUC for classification
    protocols, Dice for segmentation, …); a name: that metric for every protocol that recorded it."""
    rows = store.cells(study)
    wanted = (lambda r: r["metric"] == r["primary_metric"]) if metric is None else (lambda r: r["metric"] == metric)
    chosen = [r for r in rows if wanted(r) and r["value"] is not None]
    primaries = sorted({r["primary_metric"] for r in chosen}) or [metric or "auc"]
    analysis = _Analysis(study, metric or primaries[0], rows)
    if rows and not chosen:
        available = sorted({r["metric"] for r in rows if r["metric"]})
        analysis.notes.append(f"No cell has the metric “{metric}”; available: {', '.join(available) or 'none'}.")
    by_line: dict[Line, list[_Cell]] = defaultdict(list)
    for r in chosen:
        cell = _Cell(CellKey.from_row(r), float(r["value"]), r["ci_low"], r["ci_high"], bool(r["has_predictions"]),
                     r["metric"], bool(r.get("has_case_values")))
        by_line[Line(r["init"], r["pretrain"], r["protocol"])].append(cell)
        analysis.metrics.setdefault(r["protocol"], r["metric"])
    for line, cells in by_line.items():
        # Curves use the full pretraining set (largest pretraining fraction); smaller ones feed the
        # pretraining-set-size section.
        full = max(c.key.pretrain_fraction for c in cells)
        curve: dict[tuple[str, float], list[_Cell]] = defaultdict(list)
        sizes: dict[tuple[str, float, float], list[_Cell]] = defaultdict(list)
        for c in cells:
            if c.key.pretrain_fraction == full:
                curve[(c.key.test_set, c.key.label_fraction)].append(c)
            sizes[(c.key.test_set, c.key.label_fraction, c.key.pretrain_fraction)].append(c)
        analysis.cells[line] = dict(curve)
        if all(c.key.label_fraction == 0.0 for c in cells):
            analysis.reference_lines.add(line)
        elif len({c.key.pretrain_fraction for c in cells}) > 1:
            analysis.size_cells[line] = dict(sizes)
    init_rank = {init: i for i, init in enumerate(_order({ln.init for ln in by_line}, _INIT_ORDER))}
    proto_rank = {p: i for i, p in enumerate(_order({ln.protocol for ln in by_line}, _PROTOCOL_ORDER))}
    analysis.lines = sorted(by_line, key=lambda ln: (proto_rank[ln.protocol], init_rank[ln.init], ln.pretrain))
    test_sets = {r["test_set"] for r in chosen}
    analysis.test_sets = ([INTERNAL_TEST_SET] if INTERNAL_TEST_SET in test_sets else []) + sorted(
        test_sets - {INTERNAL_TEST_SET})
    analysis.protocols = list(proto_rank)
    analysis.fractions = sorted({float(r["label_fraction"]) for r in chosen if float(r["label_fraction"]) > 0})
    analysis.seeds = sorted({int(r["seed"]) for r in chosen})
    return analysis


# ------------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(fraction: float) -> str:
    return "no labels" if fraction == 0 else f"{100 * fraction:.3g}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}".replace("-", "−")


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if value < 0.001:
        return "p&lt;0.001"  # HTML context
    return f"p={value:.3f}" if value < 0.1 else f"p={value:.2f}"


def _labels_header(fraction: float) -> str:
    return "no labels" if fraction == 0 else f"{_pct(fraction)} labels"


def _matched_pct(analysis: _Analysis, fraction: float) -> str:
    """'≤1%' when reached at the smallest measured fraction (no extrapolation), else '≈7.3%'."""
    if analysis.fractions and fraction <= analysis.fractions[0]:
        return f"≤{_pct(fraction)}"
    if fraction in analysis.fractions:
        return _pct(fraction)
    return f"≈{100 * fraction:.2g}%"


def _metric_name(metric: str) -> str:
    if metric in _METRIC_NAMES:
        return _METRIC_NAMES[metric]
    for prefix in ("dice_", "hd95_"):
        if metric.startswith(prefix):
            return f"{_METRIC_NAMES[prefix[:-1]]} ({metric[len(prefix):]})"
    return metric


def _metrics_text(analysis: "_Analysis", protocols: Sequence[str] | None = None) -> str:
    """The metric name(s) of these protocols' curves, e.g. "AUC" or "AUC / Dice"."""
    chosen = analysis.protocols if protocols is None else protocols
    return " / ".join(dict.fromkeys(_metric_name(analysis.metric_of(p)) for p in chosen)) or \
        _metric_name(analysis.metric)


def _init_name(init: str) -> str:
    return _INIT_NAMES.get(init, init)


def _protocol_name(protocol: str) -> str:
    if protocol in _PROTOCOL_NAMES:
        return _PROTOCOL_NAMES[protocol]
    from radssl.transfer.protocols import PROTOCOLS, protocol_class

    if protocol in PROTOCOLS:  # a registered protocol names itself (its title)
        try:
            return protocol_class(protocol).title or protocol
        except Exception:  # an unimportable plugin must not break a report of stored results
            return protocol
    return protocol


def _test_set_name(test_set: str) -> str:
    return f"{test_set} (internal)" if test_set == INTERNAL_TEST_SET else f"{test_set} (external)"


class _Names:
    """Readable, unambiguous labels and stable colours for encoders and lines."""

    def __init__(self, lines: Sequence[Line]) -> None:
        pretrains: dict[str, set[str]] = defaultdict(set)
        for line in lines:
            pretrains[line.init].add(line.pretrain)
        self._ambiguous = {init for init, runs in pretrains.items() if len(runs) > 1}
        self.colours: dict[tuple[str, str], str] = {}
        spare = iter(_SPARE_COLOURS * 4)
        for line in lines:
            if line.encoder in self.colours:
                continue
            own = _INIT_COLOURS.get(line.init)
            self.colours[line.encoder] = own if own and own not in self.colours.values() else next(spare)

    def encoder(self, line: Line) -> str:
        name = _init_name(line.init)
        return f"{name} ({line.pretrain})" if line.init in self._ambiguous else name

    def line(self, line: Line) -> str:
        return f"{self.encoder(line)}, {_protocol_name(line.protocol)}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (),
           caption: str | None = None) -> str:
    """An HTML table; cells are pre-escaped HTML; ``numeric`` column indices are right-aligned."""
    numeric = set(numeric)
    head = "".join(f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>" for r in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f'<div class="table-wrap"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


# ------------------------------------------------------------------------------------------------------
# Numbers
# ------------------------------------------------------------------------------------------------------


def _point(cells: Sequence[_Cell]) -> tuple[float, float, float, int]:
    """Mean over seeds with a fallback band (t-interval over seeds, else the mean of the seeds' case CIs).

    The report's bands come from :func:`_bands` (seeds and test cases); this fallback serves the
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


SEEDS_AND_CASES = "seeds + test cases"
CASES_ONLY = "test cases only (1 seed)"
SEEDS_ONLY = "seeds only (no predictions stored)"


def _metric_function(metric: str, y_true: np.ndarray, y_score: np.ndarray, per_case: bool = False) -> Any:
    """The statistics function of a stored metric for these per-case outputs, or None (no case-level method).

    ``per_case``: the outputs are per-case values of the metric itself (Dice, HD95): its set value is their mean.
    """
    if per_case:
        return case_mean
    if metric in _AUC_METRICS:
        return macro_auc if y_true.ndim == 2 or y_score.ndim == 2 else binary_auc
    if metric == "accuracy":
        return accuracy
    return None


def _aligned_predictions(predictions: "_Predictions", cells: Sequence[_Cell]
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
    binary = [_binary_scores(y_true, p[1]) for p in loaded]
    if all(b is not None for b in binary):
        return y_true, [np.asarray(b) for b in binary], False
    return y_true, [p[1] for p in loaded], False


def _band(analysis: _Analysis, predictions: "_Predictions", cells: Sequence[_Cell]) -> _Band:
    values = [c.value for c in cells]
    mean, sd, n = mean_std_over_seeds(values)
    band = _Band(mean, n, math.nan, math.nan, "–", seed_sd=sd)
    if n >= 2:
        _, band.seed_low, band.seed_high, _, _ = seed_t_interval(values, bounds=metric_range(cells[0].metric))
    lows = [c.ci_low for c in cells if c.ci_low is not None]
    highs = [c.ci_high for c in cells if c.ci_high is not None]
    if lows and len(lows) == len(highs) == len(cells):
        band.case_low, band.case_high = float(np.mean(lows)), float(np.mean(highs))
    aligned = _aligned_predictions(predictions, cells)
    function = None if aligned is None else _metric_function(cells[0].metric, aligned[0], aligned[1][0], aligned[2])
    if aligned is not None and function is not None:
        try:
            result = seeds_and_cases_interval(aligned[0], aligned[1], function, n_boot=_N_BOOT, seed=0,
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


def _bands(analysis: _Analysis, predictions: "_Predictions") -> None:
    """Every curve point's mean and intervals, computed once (figures and tables read ``analysis.bands``)."""
    for line, points in analysis.cells.items():
        for (test_set, fraction), cells in points.items():
            analysis.bands[(line, test_set, fraction)] = _band(analysis, predictions, cells)


def _curve(analysis: _Analysis, line: Line, test_set: str) -> dict[float, float]:
    return {lf: _point(cells)[0] for (ts, lf), cells in analysis.cells.get(line, {}).items() if ts == test_set}


def _matching_line(analysis: _Analysis, treatment: Line, baseline_init: str) -> Line | None:
    """The baseline curve compared with ``treatment``: same protocol, same pretraining run if it has one."""
    candidates = [ln for ln in analysis.lines if ln.init == baseline_init and ln.protocol == treatment.protocol]
    if not candidates:
        return None
    same_run = [ln for ln in candidates if ln.pretrain == treatment.pretrain]
    return (same_run or sorted(candidates))[0]


class _Predictions:
    """Loads per-case outputs lazily, once per cell: (y_true, scores or values, per-case values?)."""

    def __init__(self, store: ResultsStore, study: str) -> None:
        self._store, self._study, self._cache = store, study, {}

    def get(self, cell: _Cell) -> tuple[np.ndarray, np.ndarray, bool] | None:
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


def _binary_scores(y_true: np.ndarray, y_score: np.ndarray) -> np.ndarray | None:
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


def _compare(analysis: _Analysis, predictions: _Predictions, a: Line, b: Line, test_set: str,
             fraction: float) -> _Gain | None:
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
    gain = _Gain(a, b, test_set, fraction, difference, None, None, None, "–", len(cells_a), len(cells_b), seed_sd,
                 n_paired=len(pairs))
    seed_interval = seed_t_interval(paired, bounds=difference_range(metric_range(cells_a[0].metric))) \
        if len(paired) >= 2 else None
    if seed_interval is not None:
        gain.seed_p = seed_interval[3]
    if not pairs:
        return gain
    gain.difference = float(np.mean(paired))

    aligned = _aligned_predictions(predictions, [ca for ca, _ in pairs] + [cb for _, cb in pairs])
    function = None if aligned is None else _metric_function(pairs[0][0].metric, aligned[0], aligned[1][0],
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
                rb = paired_bootstrap_seed_averaged(y_true, side_a, side_b, function, n_boot=_N_BOOT, seed=0)
                gain.case_p, gain.case_method = rb.p_value, "paired case bootstrap"
            both: SeedsAndCases = seeds_and_cases_paired_test(y_true, side_a, side_b, function, n_boot=_N_BOOT,
                                                              seed=0, bounds=metric_range(pairs[0][0].metric))
        except Exception as error:  # a metric undefined on this test set: report without a case-level test
            analysis.notes.append(f"Case-level test skipped for {test_set} at {_pct(fraction)}: {error}")
        else:
            gain.difference, gain.ci_low, gain.ci_high, gain.p_value = both.estimate, both.low, both.high, \
                both.p_value
            gain.method = SEEDS_AND_CASES if both.seeds_included else CASES_ONLY
            return gain
    if seed_interval is not None:  # no usable predictions: the seeds are the only replicates
        _, gain.ci_low, gain.ci_high, gain.p_value, _ = seed_interval
        gain.method = SEEDS_ONLY
    return gain


def _gains(analysis: _Analysis, predictions: _Predictions, baseline_init: str,
           treatments: Sequence[Line]) -> list[_Gain]:
    out = []
    for line in treatments:
        base = _matching_line(analysis, line, baseline_init)
        if base is None:
            continue
        for test_set in analysis.test_sets:
            for fraction in analysis.fractions:
                gain = _compare(analysis, predictions, line, base, test_set, fraction)
                if gain is not None:
                    out.append(gain)
    return out


def _curve_protocols(analysis: _Analysis) -> list[str]:
    """Protocols with label-efficiency curves (not only label-free reference lines)."""
    return [p for p in analysis.protocols
            if any(ln.protocol == p and ln not in analysis.reference_lines for ln in analysis.lines)]


def _primary_protocol(analysis: _Analysis) -> str | None:
    curves = _curve_protocols(analysis)
    return curves[0] if curves else None


def _supervised_baseline(analysis: _Analysis, test_set: str, protocol: str) -> tuple[Line, float] | None:
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
                    return line, _point(cells)[0]
    return None


# ------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------

_RC = {
    "font.size": 9.5, "axes.titlesize": 10.5, "axes.titleweight": "bold", "axes.labelsize": 9.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#9aa5b1", "axes.linewidth": 0.8,
    "axes.grid": True, "grid.color": "#e4e7eb", "grid.linewidth": 0.8, "xtick.color": "#52606d",
    "ytick.color": "#52606d", "axes.labelcolor": "#323f4b", "text.color": "#1f2933", "legend.frameon": False,
    "font.family": "DejaVu Sans",
}


def _figure_html(fig: Any, alt: str, caption: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, facecolor="white", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _fraction_axis(ax: Any, fractions: Sequence[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([_pct(f) for f in fractions])
    ax.minorticks_off()


def _panel_grid(analysis: _Analysis, height: float, protocols: Sequence[str] | None = None) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    rows, cols = len(protocols if protocols is not None else analysis.protocols), len(analysis.test_sets)
    fig = Figure(figsize=(min(4.6 * cols, 13.5), height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey="row")
    return fig, axes


def _band_tuple(band: _Band) -> tuple[float, float, float]:
    return band.mean, band.low, band.high


def _curves_figure(analysis: _Analysis, names: _Names) -> str:
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig, axes = _panel_grid(analysis, 3.1)
        handles: dict[str, Any] = {}
        span = (analysis.fractions[0], analysis.fractions[-1]) if analysis.fractions else (0.01, 1.0)
        for r, protocol in enumerate(analysis.protocols):
            for c, test_set in enumerate(analysis.test_sets):
                ax = axes[r][c]
                for line in (ln for ln in analysis.lines if ln.protocol == protocol):
                    colour = names.colours[line.encoder]
                    if line in analysis.reference_lines:  # label-free: one value, drawn across the label axis
                        band = analysis.bands.get((line, test_set, 0.0))
                        if band is None:
                            continue
                        handle = ax.axhline(band.mean, color=colour, lw=2, ls="--", zorder=3)
                        if math.isfinite(band.low) and math.isfinite(band.high):
                            ax.axhspan(band.low, band.high, color=colour, alpha=0.12, lw=0, zorder=1)
                        ax.set_xlim(span[0] / 1.3, span[1] * 1.3)
                        handles.setdefault(f"{names.encoder(line)} (no labels)", handle)
                        continue
                    points = sorted((lf, _band_tuple(analysis.bands[(line, ts, lf)]), cells)
                                    for (ts, lf), cells in analysis.cells[line].items() if ts == test_set)
                    if not points:
                        continue
                    x = np.array([p[0] for p in points])
                    mean, low, high = (np.array([p[1][i] for p in points]) for i in range(3))
                    (handle,) = ax.plot(x, mean, "-o", color=colour, lw=2, ms=4.5, zorder=3)
                    ax.fill_between(x, low, high, color=colour, alpha=0.16, lw=0, zorder=1)
                    seeds_x = [lf for lf, _, cells in points for _ in cells]
                    seeds_y = [cell.value for _, _, cells in points for cell in cells]
                    ax.scatter(seeds_x, seeds_y, s=9, color=colour, alpha=0.45, lw=0, zorder=2)
                    handles.setdefault(names.encoder(line), handle)
                if analysis.fractions:
                    _fraction_axis(ax, analysis.fractions)
                ax.set_title(f"{_test_set_name(test_set)} · {_protocol_name(protocol)}")
                if c == 0:
                    ax.set_ylabel(_metric_name(analysis.metric_of(protocol)))
                if r == len(analysis.protocols) - 1:
                    ax.set_xlabel("labelled training data (log scale)")
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 6))
        metrics = " / ".join(dict.fromkeys(_metric_name(analysis.metric_of(p)) for p in analysis.protocols))
        reference = (" Dashed horizontal lines: label-free protocols (zero-shot), one value per encoder with its "
                     "95% interval over test cases." if analysis.reference_lines else "")
        return _figure_html(fig, f"{metrics} versus label fraction",
                            f"{metrics} versus the fraction of labelled training data. Lines: "
                            "mean over seeds; dots: single seeds; bands: 95% interval over seeds and test cases "
                            "(label subsets, training runs and test-case sampling; test cases only with one seed, "
                            f"seeds only where no predictions were stored).{reference}")


def _gains_figure(analysis: _Analysis, gains: Sequence[_Gain], names: _Names, title: str) -> str:
    import matplotlib

    protocols = _curve_protocols(analysis)
    with matplotlib.rc_context(_RC):
        fig, axes = _panel_grid(analysis, 2.5, protocols)
        handles: dict[str, Any] = {}
        groups: dict[tuple[Line, Line], list[_Gain]] = defaultdict(list)
        for g in gains:
            groups[(g.treatment, g.baseline)].append(g)
        for r, protocol in enumerate(protocols):
            for c, test_set in enumerate(analysis.test_sets):
                ax = axes[r][c]
                ax.axhline(0, color="#52606d", lw=1, zorder=1)
                for k, ((a, b), items) in enumerate(groups.items()):
                    items = sorted((g for g in items if g.test_set == test_set and a.protocol == protocol),
                                   key=lambda g: g.label_fraction)
                    if not items:
                        continue
                    x = np.array([g.label_fraction for g in items]) * (1 + 0.04 * (k - (len(groups) - 1) / 2))
                    y = np.array([g.difference for g in items])
                    low = np.array([g.ci_low if g.ci_low is not None else np.nan for g in items])
                    high = np.array([g.ci_high if g.ci_high is not None else np.nan for g in items])
                    colour = names.colours[a.encoder]
                    err = np.vstack([y - low, high - y])
                    handle = ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0), fmt="-o", color=colour,
                                         ms=4.5, lw=1.8, capsize=2.5, zorder=3)
                    handles.setdefault(f"{names.encoder(a)} − {names.encoder(b)}", handle)
                _fraction_axis(ax, analysis.fractions)
                ax.set_title(f"{_test_set_name(test_set)} · {_protocol_name(protocol)}")
                if c == 0:
                    ax.set_ylabel(f"Δ {_metric_name(analysis.metric_of(protocol))}")
                if r == len(protocols) - 1:
                    ax.set_xlabel("labelled training data (log scale)")
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 4))
        return _figure_html(fig, title, f"{_esc(title)}: difference of the seed means (paired by seed) with its 95% "
                                        "CI over seeds and test cases (method per row in the table).")


def _size_figure(analysis: _Analysis, names: _Names) -> str:
    import matplotlib
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    lines = [ln for ln in analysis.lines if ln in analysis.size_cells][:6]
    cols = len(analysis.test_sets)
    cmap = colormaps["viridis"]
    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(min(4.6 * cols, 13.5), 2.8 * len(lines) + 0.6), layout="constrained")
        axes = fig.subplots(len(lines), cols, squeeze=False, sharey="row")
        for r, line in enumerate(lines):
            sizes = analysis.size_cells[line]
            pfs = sorted({pf for (_, _, pf) in sizes})
            for c, test_set in enumerate(analysis.test_sets):
                ax = axes[r][c]
                for k, lf in enumerate(analysis.fractions):
                    pts = [(pf, _point(sizes[(test_set, lf, pf)])[0]) for pf in pfs if (test_set, lf, pf) in sizes]
                    if pts:
                        colour = cmap(0.1 + 0.75 * k / max(1, len(analysis.fractions) - 1))
                        ax.plot(*zip(*pts, strict=True), "-o", color=colour, lw=1.8, ms=4, label=f"{_pct(lf)} labels")
                _fraction_axis(ax, pfs)
                ax.set_title(f"{names.line(line)} · {test_set}")
                ax.set_xlabel("pretraining data used (log scale)")
                if c == 0:
                    ax.set_ylabel(_metric_name(analysis.metric_of(line.protocol)))
            axes[r][0].legend(fontsize=8)
        return _figure_html(fig, "metric versus pretraining-set size",
                            "Effect of the pretraining-set size: mean over seeds at each label fraction.")


# ------------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------------


def _verb(g: _Gain) -> str:
    if g.ci_low is not None and g.ci_low > 0:
        return "beats"
    if g.ci_high is not None and g.ci_high < 0:
        return "trails"
    return "is not distinguishable from"


def _gain_phrase(g: _Gain, names: _Names, metric: str) -> str:
    ci = (f"95% CI {_signed(g.ci_low)} to {_signed(g.ci_high)} over {_esc(g.method)}, {_p(g.p_value)}; "
          if g.ci_low is not None else "")
    cases = (f"{_esc(g.case_method)} on the test cases alone {_p(g.case_p)}; " if g.case_p is not None else "")
    seeds = (f"{g.n_paired} paired seed{'s' if g.n_paired != 1 else ''}" if g.n_paired
             else f"{g.n_a} vs {g.n_b} seeds, none paired")
    return (f"<strong>{_esc(names.encoder(g.treatment))}</strong> {_verb(g)} {_esc(names.encoder(g.baseline))}: "
            f"<strong>{_signed(g.difference)} {_esc(_metric_name(metric))}</strong> "
            f"({ci}{cases}{seeds})")


def _headline(analysis: _Analysis, names: _Names, gains_random: Sequence[_Gain], gains_imagenet: Sequence[_Gain],
              matches: dict[tuple[Line, str], tuple[float | None, float, Line]], cost: tuple[float, float, int]) -> str:
    protocol = _primary_protocol(analysis)
    if protocol is None and not analysis.reference_lines:
        return _note("No finished cells with this metric yet: the report will fill in as the study runs.")
    test_set = analysis.test_sets[0]
    place = "internal test set" if test_set == INTERNAL_TEST_SET else f"test set “{_esc(test_set)}”"
    sentences = _reference_sentences(analysis, names, test_set, place)
    if protocol is None:
        return '<ul class="headline">' + "".join(f"<li>{s}</li>" for s in sentences) + "</ul>"
    metric = analysis.metric_of(protocol)
    smallest = analysis.fractions[0]
    where = f"At <strong>{_pct(smallest)} labels</strong> ({_esc(_protocol_name(protocol))}, {place}):"
    picked = [g for gains in (gains_random, gains_imagenet) for g in gains
              if g.treatment.protocol == protocol and g.test_set == test_set and g.label_fraction == smallest
              and "ssl" in g.treatment.init]
    if picked:
        items = "".join(f"<li>{_gain_phrase(g, names, metric)}.</li>" for g in picked[:6])
        sentences.append(f'{where}<ul class="sub">{items}</ul>')
    for (line, ts), (fraction, base_value, base_line) in matches.items():
        if ts != test_set or line.protocol != protocol or "ssl" not in line.init:
            continue
        baseline = (f"{_esc(names.line(base_line))} with 100% labels, {_esc(_metric_name(metric))} "
                    f"{_num(base_value)}")
        if fraction is None:
            sentences.append(f"{_esc(names.line(line))} does <strong>not reach</strong> the supervised baseline "
                             f"({baseline}) within the measured label fractions.")
        else:
            sentences.append(f"{_esc(names.line(line))} <strong>matches the supervised baseline</strong> "
                             f"({baseline}) with <strong>{_matched_pct(analysis, fraction)}</strong> of the labels.")
    external = [t for t in analysis.test_sets if t != INTERNAL_TEST_SET]
    if external and INTERNAL_TEST_SET in analysis.test_sets:
        parts = []
        for line in (ln for ln in analysis.lines if ln.protocol == protocol):
            inside = analysis.cells[line].get((INTERNAL_TEST_SET, smallest))
            outside = analysis.cells[line].get((external[0], smallest))
            if inside and outside:
                parts.append(f"{_esc(names.encoder(line))} {_signed(_point(outside)[0] - _point(inside)[0])}")
        if parts:
            sentences.append(f"Moving from the internal test set to the external set “{_esc(external[0])}” at "
                             f"{_pct(smallest)} labels changes {_esc(_metric_name(metric))} by: "
                             + ", ".join(parts) + ".")
    cell_hours, pretrain_hours, n_runs = cost
    runs = (f"{n_runs} pretraining run{'s' if n_runs != 1 else ''} used {pretrain_hours:.2f}" if n_runs
            else "no pretraining run was recorded")
    sentences.append(f"The {len({r['cell_key'] for r in analysis.rows})} finished cells used "
                     f"{cell_hours:.2f} device-hours; {runs}.")
    return '<ul class="headline">' + "".join(f"<li>{s}</li>" for s in sentences) + "</ul>"


def _reference_sentences(analysis: _Analysis, names: _Names, test_set: str, place: str) -> list[str]:
    """One sentence per label-free protocol (zero-shot): each encoder's value with its interval over test cases."""
    out = []
    for protocol in analysis.protocols:
        lines = [ln for ln in analysis.lines if ln.protocol == protocol and ln in analysis.reference_lines]
        parts = []
        for line in lines:
            band = analysis.bands.get((line, test_set, 0.0))
            if band is not None:
                parts.append(f"{_esc(names.encoder(line))} <strong>{_num(band.mean)}</strong> "
                             f"(95% CI {_num(band.low)} to {_num(band.high)}, {_esc(band.method)})")
        if parts:
            out.append(f"{_esc(_protocol_name(protocol)).capitalize()} without any training label ({place}, "
                       f"{_esc(_metric_name(analysis.metric_of(protocol)))}): " + "; ".join(parts) + ".")
    return out


def _gains_section(analysis: _Analysis, names: _Names, gains: Sequence[_Gain], baseline_init: str) -> str:
    title = f"Gain over {_init_name(baseline_init)}"
    if not gains:
        present = any(ln.init == baseline_init for ln in analysis.lines)
        reason = ("no other initialisation shares its protocol" if present
                  else f"the study has no “{baseline_init}” initialisation")
        return _note(f"{_esc(title)} skipped: {_esc(reason)}.")
    # Wide table: one row per (test set, protocol, comparison), one column per label fraction.
    grouped: dict[tuple[str, str, Line, Line], dict[float, _Gain]] = defaultdict(dict)
    for g in gains:
        grouped[(g.test_set, g.treatment.protocol, g.treatment, g.baseline)][g.label_fraction] = g
    order = {t: i for i, t in enumerate(analysis.test_sets)}
    rows = []
    for (test_set, protocol, a, b) in sorted(grouped, key=lambda k: (order[k[0]], analysis.protocols.index(k[1]),
                                                                       analysis.lines.index(k[2]))):
        cells = grouped[(test_set, protocol, a, b)]
        methods = sorted({g.method for g in cells.values()})
        seeds = sorted({str(g.n_paired) if g.n_paired else f"{g.n_a}/{g.n_b} (unpaired)" for g in cells.values()})
        row = [_esc(test_set), _esc(_protocol_name(protocol)),
               f"<strong>{_esc(names.encoder(a))}</strong> − {_esc(names.encoder(b))}"]
        for lf in analysis.fractions:
            g = cells.get(lf)
            if g is None:
                row.append("–")
                continue
            cls = "pos" if (g.ci_low is not None and g.ci_low > 0) else \
                "neg" if (g.ci_high is not None and g.ci_high < 0) else ""
            ci = (f"<small>{_signed(g.ci_low, 2)} … {_signed(g.ci_high, 2)}<br>{_p(g.p_value)}</small>"
                  if g.ci_low is not None else "<small>no test</small>")
            if g.case_p is not None or g.seed_p is not None:
                ci += (f'<br><small class="muted">cases only {_p(g.case_p)} · seeds only {_p(g.seed_p)}'
                       "</small>")
            tooltip = _esc(f"seed SD of the paired difference: {_num(g.seed_sd)}; "
                           f"{g.case_method or 'case-level test'} on the test cases alone (models fixed): "
                           f"{html.unescape(_p(g.case_p))}; paired t over seeds alone (test set fixed): "
                           f"{html.unescape(_p(g.seed_p))}")
            tint = f" {cls}-bg" if cls else ""
            row.append(f'<div class="cell{tint}" title="{tooltip}"><span class="{cls}">{_signed(g.difference)}</span>'
                       f"<br>{ci}</div>")
        row += [_esc(", ".join(methods)), _esc(", ".join(seeds))]
        rows.append(row)
    headers = ["Test set", "Protocol", "Comparison"] + [f"{_pct(f)} labels" for f in analysis.fractions] + [
        "CI and p over", "Paired seeds"]
    table = _table(headers, rows, numeric=tuple(range(3, 3 + len(analysis.fractions))))
    legend = (f'<p class="muted">Each cell: Δ {_esc(_metrics_text(analysis, _curve_protocols(analysis)))} (A − B, mean of the per-seed '
              "differences), its 95% CI and p over seeds and test cases; below, for reference, the p-value of the "
              "test on the test cases alone (DeLong: the trained models held fixed) and of the paired t-test over "
              "seeds alone (the test set held fixed). Green / red: the CI over seeds and test cases excludes zero. "
              "Hover a cell for the seed SD of the difference.</p>")
    return _gains_figure(analysis, gains, names, title) + legend + table


def _generalisation_section(analysis: _Analysis, names: _Names) -> str:
    external = [t for t in analysis.test_sets if t != INTERNAL_TEST_SET]
    if INTERNAL_TEST_SET not in analysis.test_sets or not external:
        return _note("Skipped: needs the internal test set “test” and at least one external test set.")
    out = (f"<p>Mean {_esc(_metrics_text(analysis))} over seeds on the internal test set → on each external "
           "set, and the change Δ = external − internal (red: the model loses performance on data from elsewhere)."
           "</p>")
    columns = ([0.0] if analysis.reference_lines else []) + analysis.fractions
    for t in external:
        rows = []
        for line in analysis.lines:
            row = [_esc(names.encoder(line)), _esc(_protocol_name(line.protocol))]
            for lf in columns:
                inside = analysis.cells[line].get((INTERNAL_TEST_SET, lf))
                outside = analysis.cells[line].get((t, lf))
                if not inside or not outside:
                    row.append("–")
                    continue
                m_in, m_out = _point(inside)[0], _point(outside)[0]
                cls = "neg" if m_out < m_in else "pos"
                row.append(f'<span class="{cls}">{_signed(m_out - m_in)}</span><br>'
                           f"<small>{_num(m_in)} → {_num(m_out)}</small>")
            rows.append(row)
        out += f"<h3>internal → {_esc(t)}</h3>" + _table(
            ["Initialisation", "Protocol"] + [_labels_header(f) for f in columns], rows,
            numeric=tuple(range(2, 2 + len(columns))))
    return out


def _matches(analysis: _Analysis) -> dict[tuple[Line, str], tuple[float | None, float, Line]]:
    out = {}
    for test_set in analysis.test_sets:
        for line in analysis.lines:
            if line in analysis.reference_lines:  # label-free: no label fraction to find
                continue
            base = _supervised_baseline(analysis, test_set, line.protocol)
            if base is None or base[0] == line:
                continue
            curve = _curve(analysis, line, test_set)
            if curve:
                out[(line, test_set)] = (fraction_matching_baseline(curve, base[1]), base[1], base[0])
    return out


def _matching_section(analysis: _Analysis, names: _Names,
                      matches: dict[tuple[Line, str], tuple[float | None, float, Line]]) -> str:
    if not matches:
        return _note(f"Skipped: needs “{SUPERVISED_INIT}” cells with 100% labels (the fully supervised baseline).")
    headers = ["Initialisation", "Protocol"] + [_esc(t) for t in analysis.test_sets]
    rows = []
    for line in analysis.lines:
        if not any((line, t) in matches for t in analysis.test_sets):
            continue
        row = [_esc(names.encoder(line)), _esc(_protocol_name(line.protocol))]
        for t in analysis.test_sets:
            if (line, t) not in matches:
                row.append("–")
                continue
            fraction, _, _ = matches[(line, t)]
            if fraction is None:
                best = max(_curve(analysis, line, t).values())
                row.append(f'<span class="muted">not reached (best {_num(best)})</span>')
            else:
                row.append(f"<strong>{_matched_pct(analysis, fraction)}</strong>")
        rows.append(row)
    baselines = sorted({(t, names.line(b), v) for (_, t), (_, v, b) in matches.items()})
    described = "; ".join(f"{_esc(t)}: {_esc(n)} = {_num(v)}" for t, n, v in baselines)
    return (f"<p>Smallest label fraction at which the mean {_esc(_metrics_text(analysis, _curve_protocols(analysis)))} reaches the fully "
            f"supervised baseline trained on 100% of the labels ({described}). Crossings are interpolated "
            "linearly on the log-fraction axis; a curve that starts above the baseline reports its smallest "
            "measured fraction.</p>" + _table(headers, rows, numeric=tuple(range(2, len(headers)))))


def _per_cell(analysis: _Analysis, name: str) -> dict[tuple[str, str, str, float], list[float]]:
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


def _range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:,.0f}" if low == high else f"{low:,.0f}–{high:,.0f}"


def _by_fraction(records: dict[tuple[str, str, str, float], list[float]], protocols: Sequence[str]) -> str:
    """'1%: 296, 10%: 296, 100%: 296' over every cell of the given protocols."""
    merged: dict[float, list[float]] = defaultdict(list)
    for (_, _, protocol, fraction), values in records.items():
        if protocol in protocols:
            merged[fraction] += values
    return ", ".join(f"{_pct(f)}: {_range(v)}" for f, v in sorted(merged.items()))


def _finetune_rules(analysis: _Analysis, names: _Names, stored: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    finetune = (stored.get("protocols") or {}).get("finetune")
    if not finetune:
        return ["<strong>Fine-tuning</strong>: not part of this study."]
    recorded = set(raw)
    items = []
    rule = finetune.get("steps_per_epoch")
    budget = _per_cell(analysis, "finetune_budget_steps")
    steps = _by_fraction(budget, ("finetune",))
    old = "" if "steps_per_epoch" in recorded else " (rule not recorded: the study predates it; radssl then ran one " \
                                                   "pass over the subset per epoch)"
    epochs = int(finetune["epochs"])
    epochs_text = f"{epochs} epoch{'s' if epochs != 1 else ''}"
    if rule == "full":
        text = (f"every label fraction gets the <strong>same number of optimiser steps</strong>: {epochs_text} "
                "of as many steps as one pass over the full training split (batch "
                f"{finetune['batch_size']}; small subsets are cycled with fresh augmentations)")
    elif rule == "subset":
        text = (f"{epochs_text} of one pass over the label-fraction subset each, so the budget "
                "<strong>grows with the label fraction</strong> and a curve mixes more labels with more training"
                f"{old}")
    else:
        text = (f"every label fraction gets the <strong>same number of optimiser steps</strong>: {epochs_text} of "
                f"exactly {rule} steps each (batch {finetune['batch_size']}; validation after each)")
    if steps:
        text += f"; planned steps per cell: {steps}"
    patience = finetune.get("early_stopping_patience")
    if patience:
        text += (f". Validation after every epoch; early stopping after {patience} epochs without a better "
                 f"validation AUC, never before epoch {min(int(finetune.get('min_epochs', 1)), epochs)}")
    else:
        text += ". No early stopping; the epoch with the best validation AUC is kept"
    run = _by_fraction(_per_cell(analysis, "finetune_steps"), ("finetune",))
    if run:
        text += f"; steps actually run: {run}"
    items.append(f"<strong>Fine-tuning budget</strong>: {text}.")

    scales = finetune.get("backbone_lr_scale")
    random_scale = finetune.get("random_backbone_lr_scale")
    if random_scale is not None:
        items.append(f'<span class="neg">Backbone learning rate: different per initialisation</span> — random '
                     f"init used {random_scale}× the head LR, pretrained encoders {scales}× (the study predates the "
                     "one-rule setting): fine-tuning gains mix initialisation with hyper-parameters.")
    elif isinstance(scales, list) and len(scales) > 1:
        chosen = _per_cell(analysis, "backbone_lr_scale")
        counts: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
        for (init, pretrain, protocol, _), values in chosen.items():
            if protocol == "finetune":
                for v in values:
                    counts[names.encoder(Line(init, pretrain, protocol))][v] += 1
        picked = "; ".join(f"{_esc(enc)}: " + ", ".join(f"{v:g}× in {n}" for v, n in sorted(c.items()))
                           for enc, c in counts.items())
        items.append("<strong>Backbone learning rate</strong>: the same rule for every initialisation — each cell "
                     f"fine-tunes once per candidate scale {', '.join(f'{v:g}' for v in scales)} (× the head LR "
                     f"{finetune.get('lr')}) and keeps the one with the best validation AUC"
                     + (f". Chosen: {picked}." if picked else "."))
    else:
        value = scales[0] if isinstance(scales, list) else scales
        items.append(f"<strong>Backbone learning rate</strong>: {value}× the head LR {finetune.get('lr')} for every "
                     "initialisation.")
    return items


def _validation_rule(analysis: _Analysis, stored: dict[str, Any], raw: dict[str, Any]) -> str:
    rule = stored.get("validation", "full")
    images = _by_fraction(_per_cell(analysis, "val_images"),
                          ("linear", "finetune", "segmentation_frozen", "segmentation_finetune"))
    if rule == "proportional":
        text = ("<strong>proportional</strong>: each cell selects its model (probe C; fine-tuning epoch and "
                "backbone LR) on the same fraction of the validation split as of the training labels — drawn per "
                "seed, stratified, nested and patient-grouped like the training subsets — with at least "
                f"{stored.get('validation_min_per_class')} images per class")
    else:
        text = ("<strong>full</strong>: every cell selects its model on the whole validation split, whatever its "
                "label fraction (an optimistic setting at small fractions: a team with 1% of the labels rarely "
                "has the full validation set)")
        if "validation" not in raw:
            text += " — rule not recorded: the study predates it and radssl then always used the full split"
    if images:
        text += f"; validation images per cell: {images}"
    return f"<strong>Validation (model selection)</strong>: {text}."


def _other_protocol_rules(analysis: _Analysis, names: _Names, stored: dict[str, Any]) -> list[str]:
    """Budget and selection rules of segmentation protocols; what label-free protocols (zero-shot) did."""
    items = []
    for protocol, options in (stored.get("protocols") or {}).items():
        if not isinstance(options, dict):
            continue
        title = _esc(_protocol_name(protocol)).capitalize()
        if protocol.startswith("segmentation"):
            epochs = int(options.get("epochs", 0))
            rule = options.get("steps_per_epoch", "full")
            planned = _by_fraction(_per_cell(analysis, "finetune_budget_steps"), (protocol,))
            if rule == "subset":
                text = f"{epochs} epochs of one pass over the subset each (the budget grows with the label fraction)"
            else:
                what = "one pass over the whole training split" if rule == "full" else f"exactly {rule} steps"
                text = (f"the <strong>same number of optimiser steps</strong> at every label fraction: {epochs} epochs "
                        f"of {what} (batch {options.get('batch_size')})")
            if planned:
                text += f"; planned steps per cell: {planned}"
            text += (f"; early stopping on validation Dice after {options.get('early_stopping_patience')} epochs "
                     f"without gain, never before epoch {min(int(options.get('min_epochs', 1)), epochs)}")
            scales = options.get("encoder_lr_scale")
            if protocol == "segmentation_frozen":
                text += "; encoder frozen (only the U-Net decoder trains)"
            elif isinstance(scales, list) and len(scales) > 1:
                chosen = _per_cell(analysis, "encoder_lr_scale")
                picked = sorted({v for (_, _, p, _), values in chosen.items() if p == protocol for v in values})
                text += (f"; encoder LR scale chosen on validation Dice per cell from {', '.join(f'{v:g}' for v in scales)}"
                         f" for every initialisation (chosen: {', '.join(f'{v:g}' for v in picked) or '–'})")
            elif scales:
                value = scales[0] if isinstance(scales, list) else scales
                text += f"; encoder LR {value}× the decoder LR {options.get('lr')} for every initialisation"
            items.append(f"<strong>{title}</strong>: {text}. Metric: Dice per case averaged over the foreground "
                         "classes (a case where a class is absent from both prediction and reference counts 1).")
        elif protocol == "zero_shot":
            prompts = options.get("prompts") or {}
            listed = "; ".join(f"{_esc(k)}: " + " / ".join(f"“{_esc(t)}”" for t in v) for k, v in prompts.items())
            items.append(f"<strong>{title}</strong>: no training labels — each class is described by prompts "
                         f"({listed}); an image–text encoder scores each test case by its similarity to each class. "
                         "Recorded once per image–text encoder and test set (label fraction 0, the study’s seed: "
                         "the only randomness is the pretraining run’s) and drawn as a horizontal reference line; "
                         "encoders without a text tower are skipped.")
    return items


def _methods_section(analysis: _Analysis, names: _Names, config: dict[str, Any] | None) -> str:
    """The rules the cells were computed with, and what every interval and p-value covers."""
    from radssl.study.config import legacy_study_settings

    items = []
    if config is None:
        items.append("No configuration was saved with these results: the fine-tuning budget, validation and "
                     "learning-rate rules cannot be stated.")
    else:
        stored = legacy_study_settings(config)
        raw_finetune = (config.get("protocols") or {}).get("finetune") or {}
        others = _other_protocol_rules(analysis, names, stored)
        if raw_finetune or not others:
            items += _finetune_rules(analysis, names, stored, raw_finetune)
        items += others
        items.append(_validation_rule(analysis, stored, config))
    seeds = len(analysis.seeds)
    items.append(
        "<strong>Seeds</strong>: each seed draws another label subset (and validation subset) and trains the read-out "
        "again; every encoder is the same across seeds (pretraining ran once), so the spread over seeds is label "
        f"sampling plus read-out training noise. This study has {seeds} seed{'s' if seeds != 1 else ''}"
        + ("; with so few, any interval that includes seed variation is wide by necessity." if 1 < seeds < 5 else
           "; seed-to-seed variation cannot be estimated, so every interval covers test cases only." if seeds == 1
           else "."))
    intervals = [
        f"<strong>95% CI over {SEEDS_AND_CASES}</strong> (curve bands, gains, the headline): the uncertainty of a "
        "seed-averaged number as an estimate of what this initialisation and protocol achieve at this label "
        "budget on data like the test set. It adds the spread over seeds (t with S−1 degrees of freedom) and the "
        "test-case variance the seeds share (DeLong for AUC, a case bootstrap otherwise), half-widths combined "
        "root-sum-square. Its p-value tests “no difference” with both sources included. Bounded metrics (AUC, "
        "accuracy, Dice; their gains) get it on the logit scale of their range, mapped back, so it stays inside "
        "[0, 1] (gains: [−1, 1]); so do the t-intervals over seeds.",
        "<strong>t-interval over seeds</strong>: holds the test set fixed — other label subsets and training runs, "
        "these test cases.",
        "<strong>Per-seed test-case CI</strong> (percentile bootstrap over test cases, stratified by class): holds "
        "each trained model fixed — this model, other test cases. The table shows the mean of the seeds’ bounds.",
        "<strong>“cases only” p</strong> (DeLong on the seed-averaged AUC contrast with the joint covariance of "
        "every seed’s AUC; a paired case bootstrap for other metrics): conditions on the trained models. It "
        "answers “are these particular models different on this population of cases?”, not “does the "
        "initialisation help?” — it ignores label-subset and training variation and can be tiny while seeds "
        "disagree.",
        "<strong>“seeds only” p</strong> (paired t-test over seeds of the per-seed differences): conditions on the "
        "test set.",
    ]
    return ('<ul class="headline">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"
            + "<h3>What each interval and p-value covers</h3><ul>" + "".join(f"<li>{i}</li>" for i in intervals)
            + "</ul>")


def _numbers_table(analysis: _Analysis, names: _Names) -> str:
    """The curve points with every interval side by side (inside a collapsible block)."""
    rows = []
    for test_set in analysis.test_sets:
        for line in analysis.lines:
            fractions = [0.0] if line in analysis.reference_lines else analysis.fractions
            for fraction in fractions:
                band = analysis.bands.get((line, test_set, fraction))
                if band is None:
                    continue
                rows.append([
                    _esc(test_set), _esc(names.encoder(line)), _esc(_protocol_name(line.protocol)), _pct(fraction),
                    _esc(_metric_name(analysis.metric_of(line.protocol))),
                    f"{_num(band.mean)} <small>({band.n})</small>",
                    f"{_num(band.low)} – {_num(band.high)}<br><small>{_esc(band.method)}</small>",
                    f"{_num(band.seed_low)} – {_num(band.seed_high)}",
                    f"{_num(band.case_low)} – {_num(band.case_high)}",
                    _num(band.seed_sd)])
    if not rows:
        return ""
    table = _table(["Test set", "Initialisation", "Protocol", "Labels", "Metric", "Mean (seeds)",
                    "95% CI over seeds + test cases", "95% t over seeds (test set fixed)",
                    "Per-seed 95% CI over test cases (mean of bounds)", "Seed SD"], rows,
                   numeric=(5, 6, 7, 8, 9))
    return f"<details><summary>Numbers behind the curves, with every interval</summary>{table}</details>"


def _cost_section(analysis: _Analysis, names: _Names, pretrain_runs: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    seen: set[str] = set()
    for r in analysis.rows:
        if r["cell_key"] in seen:  # rows are per metric; count each cell once
            continue
        seen.add(r["cell_key"])
        g = groups.setdefault((r["init"], r["pretrain"], r["protocol"]),
                              {"n": 0, "wall": 0.0, "hours": 0.0, "devices": set()})
        g["n"] += 1
        g["wall"] += r["wall_time_s"] or 0.0
        g["hours"] += r["device_hours"] or 0.0
        g["devices"].add(r["device"] or "?")
    rows = []
    lines_named = _Names([Line(*k) for k in groups])
    init_rank = {v: i for i, v in enumerate(_order({k[0] for k in groups}, _INIT_ORDER))}
    proto_rank = {v: i for i, v in enumerate(_order({k[2] for k in groups}, _PROTOCOL_ORDER))}
    for (init, pretrain, protocol), g in sorted(groups.items(), key=lambda kv: (
            proto_rank[kv[0][2]], init_rank[kv[0][0]], kv[0][1])):
        rows.append([_esc(lines_named.encoder(Line(init, pretrain, protocol))),
                     "–" if pretrain.lower() in _NO_PRETRAIN else _esc(pretrain),
                     _esc(_protocol_name(protocol)), str(g["n"]), f"{g['wall'] / 3600:.2f}", f"{g['hours']:.2f}",
                     f"{g['wall'] / max(g['n'], 1) / 60:.1f}", _esc(", ".join(sorted(g["devices"])))])
    total_wall = sum(g["wall"] for g in groups.values())
    total_hours = sum(g["hours"] for g in groups.values())
    rows.append(["<strong>Total</strong>", "", "", f"<strong>{len(seen)}</strong>",
                 f"<strong>{total_wall / 3600:.2f}</strong>", f"<strong>{total_hours:.2f}</strong>", "", ""])
    html_out = "<h3>Transfer cells</h3>" + _table(
        ["Initialisation", "Pretraining run", "Protocol", "Cells", "Wall time (h)", "Device-hours",
         "Mean per cell (min)", "Devices"], rows, numeric=(3, 4, 5, 6))
    html_out += "<h3>Pretraining runs</h3>"
    if not pretrain_runs:
        return html_out + _note("No pretraining runs recorded.")
    run_rows = []
    for run in pretrain_runs:
        wall = run["wall_time_s"] or 0.0
        seen_images = run["images_seen"]
        rate = f"{seen_images / wall:,.0f}" if seen_images and wall > 0 else "–"
        run_rows.append([_esc(run["run_name"]), _esc(run["device"] or "?"), f"{wall / 3600:.2f}",
                         f"{(run['device_hours'] or 0.0):.2f}", f"{seen_images:,}" if seen_images else "–", rate,
                         f"<code>{_esc(run['checkpoint'] or '–')}</code>"])
    return html_out + _table(["Run", "Device", "Wall time (h)", "Device-hours", "Images seen", "Images/s",
                              "Checkpoint"], run_rows, numeric=(2, 3, 4, 5))


def _provenance_section(analysis: _Analysis, config: dict[str, Any] | None) -> str:
    versions: dict[str, set[str]] = defaultdict(set)
    for r in analysis.rows:
        for name, value in json.loads(r["versions_json"] or "{}").items():
            versions[name].add(str(value))
    out = ""
    if versions:
        out += "<h3>Software versions recorded with the cells</h3>" + _table(
            ["Package", "Version(s)"], [[_esc(k), _esc(", ".join(sorted(v)))] for k, v in sorted(versions.items())])
    out += "<h3>Exact study configuration</h3>"
    if config is None:
        return out + _note("No configuration was saved for this study (ResultsStore.save_study_config).")
    try:
        import yaml

        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
    except Exception:  # PyYAML missing or an unrepresentable value: JSON is always possible
        text = json.dumps(config, indent=2, sort_keys=False)
    return out + f'<pre class="config">{_esc(text)}</pre>'


_CSS = """
:root{--ink:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--card:#fff;--accent:#0072B2;
--pos:#1a7f37;--neg:#b42318;--zebra:#f7f9fc}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif;-webkit-font-smoothing:antialiased}
main{max-width:1180px;margin:0 auto;padding:28px 22px 60px}
header{background:linear-gradient(120deg,#0b3d5c,#0072B2);color:#fff;border-radius:14px;padding:26px 30px;
margin-bottom:22px;box-shadow:0 6px 20px rgba(11,61,92,.18)}
header h1{margin:0 0 4px;font-size:28px;letter-spacing:-.01em}
header p{margin:0;opacity:.85}
.kpis{display:flex;flex-wrap:wrap;gap:12px;margin-top:18px}
.kpi{background:rgba(255,255,255,.12);border-radius:10px;padding:8px 14px;min-width:120px}
.kpi b{display:block;font-size:21px;font-variant-numeric:tabular-nums}
.kpi span{font-size:12px;text-transform:uppercase;letter-spacing:.06em;opacity:.85}
nav{margin:0 0 18px;font-size:14px;display:flex;flex-wrap:wrap;gap:4px 18px}
nav a{color:var(--accent);text-decoration:none;white-space:nowrap}
nav a:hover{text-decoration:underline}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:20px 26px;margin:0 0 20px;
box-shadow:0 1px 3px rgba(31,41,51,.05)}
h2{margin:0 0 12px;font-size:20px;letter-spacing:-.01em}
h3{margin:22px 0 8px;font-size:15px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
ul.headline{margin:0;padding-left:20px}
ul.headline li{margin:6px 0;font-size:16px}
ul.headline ul.sub{margin:4px 0 0;padding-left:20px}
ul.headline ul.sub li{margin:3px 0;font-size:15px}
figure{margin:10px 0 18px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{color:var(--muted);font-size:13px;margin-top:6px;text-align:center}
.table-wrap{overflow-x:auto;margin:8px 0}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th{background:#eef2f7;text-align:left;font-weight:600;padding:7px 10px;border-bottom:2px solid #cbd2d9;
white-space:nowrap}
td{padding:6px 10px;border-bottom:1px solid var(--line)}
tbody tr:nth-child(even){background:var(--zebra)}
tbody tr:hover{background:#eaf3fb}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td .cell{margin:-3px -6px;padding:3px 6px;border-radius:6px;line-height:1.3}
.pos-bg{background:#e7f5ec}.neg-bg{background:#fdecea}
.pos{color:var(--pos);font-weight:600}.neg{color:var(--neg);font-weight:600}.muted{color:var(--muted)}
small{color:var(--muted)}
.note{background:#fff8e6;border-left:4px solid #E69F00;padding:8px 12px;border-radius:6px;color:#5c4400;
font-size:14px}
details summary{cursor:pointer;color:var(--muted);font-size:14px;margin:6px 0}
pre.config{background:#0f1b26;color:#d9e2ec;padding:16px 18px;border-radius:10px;overflow:auto;font-size:12.5px;
line-height:1.5}
code{font-size:12.5px}
footer{color:var(--muted);font-size:12.5px;text-align:center;margin-top:26px}
"""


def _secondary_section(analysis: _Analysis, names: _Names, predictions: _Predictions) -> str:
    """Per-class Dice and HD95 of segmentation protocols: mean over seeds with the seeds + test cases interval."""
    wanted = {p for p in analysis.protocols if analysis.metric_of(p) == "dice"}
    if not wanted:
        return ""
    full_pf = {line: max(c.key.pretrain_fraction for cells in points.values() for c in cells)
               for line, points in analysis.cells.items()}
    groups: dict[tuple[Line, str], dict[tuple[str, float], list[_Cell]]] = defaultdict(lambda: defaultdict(list))
    for r in analysis.rows:
        metric = r["metric"] or ""
        line = Line(r["init"], r["pretrain"], r["protocol"])
        if (r["protocol"] not in wanted or r["value"] is None or line not in full_pf
                or not (metric.startswith("dice_") or metric.startswith("hd95"))
                or r["pretrain_fraction"] != full_pf[line]):
            continue
        groups[(line, metric)][(r["test_set"], float(r["label_fraction"]))].append(
            _Cell(CellKey.from_row(r), float(r["value"]), r["ci_low"], r["ci_high"], bool(r["has_predictions"]),
                  metric, bool(r.get("has_case_values"))))
    if not groups:
        return ""
    out = ("<p>Secondary segmentation metrics: Dice per foreground class and the 95th-percentile Hausdorff distance "
           "(HD95, lower is better; cases where it is undefined — an empty prediction or reference — are left out "
           "of its mean). Each entry: mean over seeds and its 95% interval over seeds and test cases.</p>")
    rank = {ln: i for i, ln in enumerate(analysis.lines)}
    for test_set in analysis.test_sets:
        rows = []
        for (line, metric), points in sorted(groups.items(), key=lambda kv: (rank.get(kv[0][0], 0), kv[0][1])):
            row = [_esc(names.encoder(line)), _esc(_protocol_name(line.protocol)), _esc(_metric_name(metric))]
            for fraction in analysis.fractions:
                cells = points.get((test_set, fraction))
                if not cells:
                    row.append("–")
                    continue
                band = _band(analysis, predictions, cells)
                row.append(f"{_num(band.mean)}<br><small>{_num(band.low)} – {_num(band.high)}</small>")
            rows.append(row)
        if rows:
            out += f"<h3>{_esc(_test_set_name(test_set))}</h3>" + _table(
                ["Initialisation", "Protocol", "Metric"] + [_labels_header(f) for f in analysis.fractions], rows,
                numeric=tuple(range(3, 3 + len(analysis.fractions))))
    return out


def render_report(store: ResultsStore, study: str, out_dir: Path, primary_metric: str | None = None) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/results.csv``; return the HTML path.

    ``primary_metric`` None: every protocol's curves show its cells' own primary metric (AUC for classification,
    Dice for segmentation); a metric name (``accuracy``) shows that metric wherever it was recorded.
    """
    from radssl import __version__

    out_dir = Path(out_dir)
    analysis = _analyse(store, study, primary_metric)
    names = _Names(analysis.lines)
    predictions = _Predictions(store, study)
    pretrain_runs = store.pretrain_runs(study)
    config = store.study_config(study)

    _bands(analysis, predictions)
    vs_random = _gains(analysis, predictions, "random", [ln for ln in analysis.lines if ln.init != "random"])
    vs_imagenet = _gains(analysis, predictions, "imagenet",
                         [ln for ln in analysis.lines if ln.init not in ("random", "imagenet")])
    matches = _matches(analysis)
    unique_cells = {r["cell_key"]: r for r in analysis.rows}
    cell_hours = sum((r["device_hours"] or 0.0) for r in unique_cells.values())
    pretrain_hours = sum((r["device_hours"] or 0.0) for r in pretrain_runs)

    metric = _esc(_metrics_text(analysis))
    analysis.notes[:0] = [f"Study note: {n}" for n in store.study_notes(study)]
    sections: list[tuple[str, str, str]] = []
    sections.append(("summary", "Headline", _headline(analysis, names, vs_random, vs_imagenet, matches,
                                                      (cell_hours, pretrain_hours, len(pretrain_runs)))))
    if analysis.lines:
        sections.append(("methods", "How the numbers were made", _methods_section(analysis, names, config)))
        sections.append(("curves", "Label efficiency",
                         _curves_figure(analysis, names) + _numbers_table(analysis, names)))
        secondary = _secondary_section(analysis, names, predictions)
        if secondary:
            sections.append(("secondary", "Per-class Dice and HD95", secondary))
        sections.append(("gain-random", "Gain over random initialisation",
                         _gains_section(analysis, names, vs_random, "random")))
        sections.append(("gain-imagenet", "Gain over ImageNet initialisation",
                         _gains_section(analysis, names, vs_imagenet, "imagenet")))
        sections.append(("generalisation", "Internal vs external test sets",
                         _generalisation_section(analysis, names)))
        sections.append(("matching", "Labels needed to match full supervision",
                         _matching_section(analysis, names, matches)))
        if analysis.size_cells:
            sections.append(("pretrain-size", "Pretraining-set size", _size_figure(analysis, names)))
    sections.append(("cost", "Compute cost", _cost_section(analysis, names, pretrain_runs)))
    sections.append(("config", "Provenance", _provenance_section(analysis, config)))

    method_note = (
        "<p class=\"muted\">How to read the tests: a gain is the mean over seeds of the paired per-seed difference "
        "A − B (both arms of a seed share its label subset and its test cases). Its CI and p cover seeds and test "
        "cases together: the spread of the differences over seeds plus the test-case variance they share (DeLong "
        "for binary AUC; pooling the seeds’ predictions instead would count each case once per seed). The "
        "“cases only” p (DeLong on the seed-averaged contrast) holds the trained models fixed and the “seeds "
        "only” p holds the test set fixed; neither alone says whether the initialisation helps. See “How the "
        "numbers were made”.</p>")
    body = []
    for anchor, title, content in sections:
        extra = method_note if anchor == "gain-random" else ""
        body.append(f'<section id="{anchor}"><h2>{_esc(title)}</h2>{extra}{content}</section>')
    notes = "".join(_note(_esc(n)) for n in dict.fromkeys(analysis.notes))
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    kpis = [(str(len(unique_cells)), "cells"), (str(len(analysis.seeds)), "seeds"),
            (str(len(analysis.test_sets)), "test sets"),
            (str(len({ln.encoder for ln in analysis.lines})), "initialisations"),
            (f"{cell_hours + pretrain_hours:.1f}", "device-hours")]
    kpi_html = "".join(f'<div class="kpi"><b>{v}</b><span>{_esc(k)}</span></div>' for v, k in kpis)
    generated = time.strftime("%Y-%m-%d %H:%M")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(study)} — radssl study report</title><style>{_CSS}</style></head><body><main>"
        f"<header><h1>{_esc(study)}</h1><p>Label-efficiency study · primary metric {metric} · generated "
        f"{generated}</p><div class=\"kpis\">{kpi_html}</div></header>"
        f"<nav>{nav}</nav>{notes}{''.join(body)}"
        f"<footer>radssl {_esc(__version__)} · data: results.csv beside this file</footer></main></body></html>\n")
    store.export_csv(study, out_dir / "results.csv")
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    return path
