"""How the study's numbers read: names, numbers, p-values and small HTML pieces shared by every page.

Kept apart from :mod:`radssl.study.analysis` (which computes) so a number is formatted one way everywhere —
the study report, the bake-off and the benchmark pages.
"""

from __future__ import annotations

import html
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from radssl.study.analysis import INTERNAL_TEST_SET, Analysis, Line
from radssl.transfer.protocols import PROTOCOLS, protocol_class

INIT_NAMES = {"random": "Random", "imagenet": "ImageNet", "ssl": "SSL", "imagenet+ssl": "ImageNet+SSL"}
PROTOCOL_NAMES = {"linear": "linear probe", "knn": "kNN", "finetune": "fine-tune"}
METRIC_NAMES = {"auc": "AUC", "accuracy": "accuracy", "macro_auc": "macro AUC", "f1": "F1", "dice": "Dice",
                "hd95": "HD95"}
# Okabe & Ito (2008) colour-blind-safe palette; random stays neutral grey.
INIT_COLOURS = {"random": "#7a7a7a", "imagenet": "#0072B2", "ssl": "#E69F00", "imagenet+ssl": "#009E73"}
SPARE_COLOURS = ("#D55E00", "#CC79A7", "#56B4E9", "#8E6C8A", "#F0E442", "#332288", "#44AA99")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def pct(fraction: float) -> str:
    return "no labels" if fraction == 0 else f"{100 * fraction:.3g}%"


def num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}".replace("-", "−")


def p_text(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if value < 0.001:
        return "p&lt;0.001"  # HTML context
    return f"p={value:.3f}" if value < 0.1 else f"p={value:.2f}"


def labels_header(fraction: float) -> str:
    return "no labels" if fraction == 0 else f"{pct(fraction)} labels"


def matched_pct(analysis: Analysis, fraction: float) -> str:
    """'≤1%' when reached at the smallest measured fraction (no extrapolation), else '≈7.3%'."""
    if analysis.fractions and fraction <= analysis.fractions[0]:
        return f"≤{pct(fraction)}"
    if fraction in analysis.fractions:
        return pct(fraction)
    return f"≈{100 * fraction:.2g}%"


def metric_name(metric: str) -> str:
    if metric in METRIC_NAMES:
        return METRIC_NAMES[metric]
    for prefix in ("dice_", "hd95_"):
        if metric.startswith(prefix):
            return f"{METRIC_NAMES[prefix[:-1]]} ({metric[len(prefix):]})"
    return metric


def metrics_text(analysis: "Analysis", protocols: Sequence[str] | None = None) -> str:
    """The metric name(s) of these protocols' curves, e.g. "AUC" or "AUC / Dice"."""
    chosen = analysis.protocols if protocols is None else protocols
    return " / ".join(dict.fromkeys(metric_name(analysis.metric_of(p)) for p in chosen)) or \
        metric_name(analysis.metric)


def init_name(init: str) -> str:
    return INIT_NAMES.get(init, init)


def protocol_name(protocol: str) -> str:
    if protocol in PROTOCOL_NAMES:
        return PROTOCOL_NAMES[protocol]
    if protocol in PROTOCOLS:  # a registered protocol names itself (its title)
        try:
            return protocol_class(protocol).title or protocol
        except Exception:  # an unimportable plugin must not break a report of stored results
            return protocol
    return protocol


def test_set_name(test_set: str) -> str:
    return f"{test_set} (internal)" if test_set == INTERNAL_TEST_SET else f"{test_set} (external)"


class Names:
    """Readable, unambiguous labels and stable colours for encoders and lines."""

    def __init__(self, lines: Sequence[Line]) -> None:
        pretrains: dict[str, set[str]] = defaultdict(set)
        for line in lines:
            pretrains[line.init].add(line.pretrain)
        self._ambiguous = {init for init, runs in pretrains.items() if len(runs) > 1}
        self.colours: dict[tuple[str, str], str] = {}
        spare = iter(SPARE_COLOURS * 4)
        for line in lines:
            if line.encoder in self.colours:
                continue
            own = INIT_COLOURS.get(line.init)
            self.colours[line.encoder] = own if own and own not in self.colours.values() else next(spare)

    def encoder(self, line: Line) -> str:
        name = init_name(line.init)
        return f"{name} ({line.pretrain})" if line.init in self._ambiguous else name

    def line(self, line: Line) -> str:
        return f"{self.encoder(line)}, {protocol_name(line.protocol)}"




def value_range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:,.0f}" if low == high else f"{low:,.0f}–{high:,.0f}"


def by_fraction(records: dict[tuple[str, str, str, float], list[float]], protocols: Sequence[str]) -> str:
    """'1%: 296, 10%: 296, 100%: 296' over every cell of the given protocols."""
    merged: dict[float, list[float]] = defaultdict(list)
    for (_, _, protocol, fraction), values in records.items():
        if protocol in protocols:
            merged[fraction] += values
    return ", ".join(f"{pct(f)}: {value_range(v)}" for f, v in sorted(merged.items()))
