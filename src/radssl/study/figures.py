"""The study's figures (matplotlib, rendered off-screen to embedded PNG): label-efficiency curves with their
bands, gains with intervals, and the pretraining-set-size effect. They draw what :mod:`radssl.study.analysis`
computed; they compute nothing of their own beyond seed means for the size figure.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from radssl.study.analysis import Analysis, Band, Gain, Line, curve_protocols, point
from radssl.study.formatting import Names, metric_name, pct, protocol_name, test_set_name
from radssl.study.pages import EmbeddedFigure

RC = {
    "font.size": 9.5, "axes.titlesize": 10.5, "axes.titleweight": "bold", "axes.labelsize": 9.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#9aa5b1", "axes.linewidth": 0.8,
    "axes.grid": True, "grid.color": "#e4e7eb", "grid.linewidth": 0.8, "xtick.color": "#52606d",
    "ytick.color": "#52606d", "axes.labelcolor": "#323f4b", "text.color": "#1f2933", "legend.frameon": False,
    "font.family": "DejaVu Sans",
}



def fraction_axis(ax: Any, fractions: Sequence[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(fractions)
    ax.set_xticklabels([pct(f) for f in fractions])
    ax.minorticks_off()


def panel_grid(analysis: Analysis, height: float, protocols: Sequence[str] | None = None) -> tuple[Any, Any]:
    rows, cols = len(protocols if protocols is not None else analysis.protocols), len(analysis.test_sets)
    fig = Figure(figsize=(min(4.6 * cols, 13.5), height * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey="row")
    return fig, axes


def band_tuple(band: Band) -> tuple[float, float, float]:
    return band.mean, band.low, band.high


def curves_figure(analysis: Analysis, names: Names) -> EmbeddedFigure:
    with matplotlib.rc_context(RC):
        fig, axes = panel_grid(analysis, 3.1)
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
                    points = sorted((lf, band_tuple(analysis.bands[(line, ts, lf)]), cells)
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
                    fraction_axis(ax, analysis.fractions)
                ax.set_title(f"{test_set_name(test_set)} · {protocol_name(protocol)}")
                if c == 0:
                    ax.set_ylabel(metric_name(analysis.metric_of(protocol)))
                if r == len(analysis.protocols) - 1:
                    ax.set_xlabel("labelled training data (log scale)")
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 6))
        metrics = " / ".join(dict.fromkeys(metric_name(analysis.metric_of(p)) for p in analysis.protocols))
        reference = (" Dashed horizontal lines: label-free protocols (zero-shot), one value per encoder with its "
                     "95% interval over test cases." if analysis.reference_lines else "")
        return EmbeddedFigure.from_matplotlib(fig, f"{metrics} versus label fraction",
                            f"{metrics} versus the fraction of labelled training data. Lines: "
                            "mean over seeds; dots: single seeds; bands: 95% interval over seeds and test cases "
                            "(label subsets, training runs and test-case sampling; test cases only with one seed, "
                            f"seeds only where no predictions were stored).{reference}")


def gains_figure(analysis: Analysis, gains: Sequence[Gain], names: Names, title: str) -> EmbeddedFigure:
    protocols = curve_protocols(analysis)
    with matplotlib.rc_context(RC):
        fig, axes = panel_grid(analysis, 2.5, protocols)
        handles: dict[str, Any] = {}
        groups: dict[tuple[Line, Line], list[Gain]] = defaultdict(list)
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
                fraction_axis(ax, analysis.fractions)
                ax.set_title(f"{test_set_name(test_set)} · {protocol_name(protocol)}")
                if c == 0:
                    ax.set_ylabel(f"Δ {metric_name(analysis.metric_of(protocol))}")
                if r == len(protocols) - 1:
                    ax.set_xlabel("labelled training data (log scale)")
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 4))
        return EmbeddedFigure.from_matplotlib(fig, title, f"{title}: difference of the seed means (paired by seed) with its 95% "
                                        "CI over seeds and test cases (method per row in the table).")


def size_figure(analysis: Analysis, names: Names) -> EmbeddedFigure:
    lines = [ln for ln in analysis.lines if ln in analysis.size_cells][:6]
    cols = len(analysis.test_sets)
    cmap = colormaps["viridis"]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(min(4.6 * cols, 13.5), 2.8 * len(lines) + 0.6), layout="constrained")
        axes = fig.subplots(len(lines), cols, squeeze=False, sharey="row")
        for r, line in enumerate(lines):
            sizes = analysis.size_cells[line]
            pfs = sorted({pf for (_, _, pf) in sizes})
            for c, test_set in enumerate(analysis.test_sets):
                ax = axes[r][c]
                for k, lf in enumerate(analysis.fractions):
                    pts = [(pf, point(sizes[(test_set, lf, pf)])[0]) for pf in pfs if (test_set, lf, pf) in sizes]
                    if pts:
                        colour = cmap(0.1 + 0.75 * k / max(1, len(analysis.fractions) - 1))
                        ax.plot(*zip(*pts, strict=True), "-o", color=colour, lw=1.8, ms=4, label=f"{pct(lf)} labels")
                fraction_axis(ax, pfs)
                ax.set_title(f"{names.line(line)} · {test_set}")
                ax.set_xlabel("pretraining data used (log scale)")
                if c == 0:
                    ax.set_ylabel(metric_name(analysis.metric_of(line.protocol)))
            axes[r][0].legend(fontsize=8)
        return EmbeddedFigure.from_matplotlib(fig, "metric versus pretraining-set size",
                            "Effect of the pretraining-set size: mean over seeds at each label fraction.")


@dataclass(frozen=True)
class Series:
    """One line of a benchmark figure: (x, value, low, high) points — a non-finite bound draws no bar on that
    side — in a matplotlib ``fmt`` ("-o" a line with markers; "k--" a black dashed line); ``bars=False`` draws the
    line alone."""

    label: str
    points: Sequence[tuple[float, float, float, float]]
    fmt: str = "-o"
    bars: bool = True


def _draw_series(ax: Any, series: Series) -> None:
    x, y, low, high = (np.array([p[i] for p in series.points], dtype=float) for i in range(4))
    if not series.bars:
        ax.plot(x, y, series.fmt, lw=1.5, label=series.label)
        return
    err = np.vstack([y - low, high - y])
    ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0.0), fmt=series.fmt, ms=4, lw=1.8, capsize=2.5,
                label=series.label)


def interval_panels(panels: Mapping[str, Sequence[Series]], y_label: str, caption: str, *,
                    y_range: tuple[float, float] | None = None, reference: tuple[str, float] | None = None,
                    alt: str | None = None) -> EmbeddedFigure:
    """A figure for benchmark pages: one panel per title, each with its series on a log label-fraction axis (error
    bars from each point's interval) and an optional dashed reference line; the study report's style (``RC``)."""
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(5.2 * len(panels), 3.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, series) in zip(axes, panels.items(), strict=True):
            for line in series:
                _draw_series(ax, line)
            if reference is not None:
                ax.axhline(reference[1], color="#7a7a7a", lw=1, ls="--", label=reference[0])
            fractions = sorted({p[0] for line in series for p in line.points})
            if fractions:
                fraction_axis(ax, fractions)
            if y_range is not None:
                ax.set_ylim(*y_range)
            if title:
                ax.set_title(title)
            ax.set_xlabel("labelled training data (log scale)")
            ax.set_ylabel(y_label)
            ax.legend(fontsize=7.5)
        return EmbeddedFigure.from_matplotlib(fig, alt or f"{y_label} versus label fraction", caption)


def interval_curves(series: dict[str, Sequence[tuple[float, float, float, float]]], y_label: str,
                    y_range: tuple[float, float], reference: tuple[str, float] | None = None,
                    caption: str = "") -> EmbeddedFigure:
    """One panel of :func:`interval_panels`: one line per series of (label fraction, value, low, high)."""
    return interval_panels({"": [Series(name, points) for name, points in series.items()]}, y_label, caption,
                           y_range=y_range, reference=reference)
