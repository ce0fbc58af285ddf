"""One self-contained HTML report of a label-efficiency study, read straight from the results store.

Why one file: a study report gets mailed, attached to tickets and opened years later on machines with
no internet; so figures are embedded as base64 PNG, the CSS is inline and nothing points outside the
page. ``results.csv`` (the long-format rows) is written beside it for anyone who wants their own plots.

This module writes the prose: which numbers to say, in which words. The numbers and verdicts come from
:mod:`radssl.study.analysis` (see its docstring for the statistical choices), the figures from
:mod:`radssl.study.figures`, and the page skeleton from the Jinja2 templates of :mod:`radssl.study.pages`.
The page also states the fine-tuning budget rule, the validation rule and the backbone-LR rule the cells were
computed with (from the stored study configuration and the per-cell records).
"""

from __future__ import annotations

import html
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from radssl import __version__
from radssl.atomic import write_text_atomic
from radssl.study.analysis import (
    INIT_ORDER,
    INTERNAL_TEST_SET,
    NO_PRETRAIN,
    PROTOCOL_ORDER,
    SEEDS_AND_CASES,
    SUPERVISED_INIT,
    Analysis,
    Cell,
    Gain,
    Line,
    Predictions,
    analyse,
    baseline_matches,
    compute_bands,
    curve_band,
    curve_protocols,
    gains_over,
    mean_curve,
    ordered,
    per_cell,
    point,
    primary_protocol,
    verdict,
)
from radssl.study.config import legacy_study_settings
from radssl.study.figures import curves_figure, gains_figure, size_figure
from radssl.study.formatting import (
    Names,
    by_fraction,
    esc,
    init_name,
    labels_header,
    matched_pct,
    metric_name,
    metrics_text,
    num,
    p_text,
    pct,
    protocol_name,
    signed,
    test_set_name,
)
from radssl.study.pages import Section, figure, note, render_page, table
from radssl.study.results_store import CellKey, ResultsStore

__all__ = ["render_report"]


def _gain_phrase(g: Gain, names: Names, metric: str) -> str:
    ci = (f"95% CI {signed(g.ci_low)} to {signed(g.ci_high)} over {esc(g.method)}, {p_text(g.p_value)}; "
          if g.ci_low is not None else "")
    cases = (f"{esc(g.case_method)} on the test cases alone {p_text(g.case_p)}; " if g.case_p is not None else "")
    seeds = (f"{g.n_paired} paired seed{'s' if g.n_paired != 1 else ''}" if g.n_paired
             else f"{g.n_a} vs {g.n_b} seeds, none paired")
    return (f"<strong>{esc(names.encoder(g.treatment))}</strong> {verdict(g)} {esc(names.encoder(g.baseline))}: "
            f"<strong>{signed(g.difference)} {esc(metric_name(metric))}</strong> "
            f"({ci}{cases}{seeds})")


def _headline(analysis: Analysis, names: Names, gains_random: Sequence[Gain], gains_imagenet: Sequence[Gain],
              matches: dict[tuple[Line, str], tuple[float | None, float, Line]], cost: tuple[float, float, int]) -> str:
    protocol = primary_protocol(analysis)
    if protocol is None and not analysis.reference_lines:
        return note("No finished cells with this metric yet: the report will fill in as the study runs.")
    test_set = analysis.test_sets[0]
    place = "internal test set" if test_set == INTERNAL_TEST_SET else f"test set “{esc(test_set)}”"
    sentences = _reference_sentences(analysis, names, test_set, place)
    if protocol is None:
        return '<ul class="headline">' + "".join(f"<li>{s}</li>" for s in sentences) + "</ul>"
    metric = analysis.metric_of(protocol)
    smallest = analysis.fractions[0]
    where = f"At <strong>{pct(smallest)} labels</strong> ({esc(protocol_name(protocol))}, {place}):"
    picked = [g for gains in (gains_random, gains_imagenet) for g in gains
              if g.treatment.protocol == protocol and g.test_set == test_set and g.label_fraction == smallest
              and "ssl" in g.treatment.init]
    if picked:
        items = "".join(f"<li>{_gain_phrase(g, names, metric)}.</li>" for g in picked[:6])
        sentences.append(f'{where}<ul class="sub">{items}</ul>')
    for (line, ts), (fraction, base_value, base_line) in matches.items():
        if ts != test_set or line.protocol != protocol or "ssl" not in line.init:
            continue
        baseline = (f"{esc(names.line(base_line))} with 100% labels, {esc(metric_name(metric))} "
                    f"{num(base_value)}")
        if fraction is None:
            sentences.append(f"{esc(names.line(line))} does <strong>not reach</strong> the supervised baseline "
                             f"({baseline}) within the measured label fractions.")
        else:
            sentences.append(f"{esc(names.line(line))} <strong>matches the supervised baseline</strong> "
                             f"({baseline}) with <strong>{matched_pct(analysis, fraction)}</strong> of the labels.")
    external = [t for t in analysis.test_sets if t != INTERNAL_TEST_SET]
    if external and INTERNAL_TEST_SET in analysis.test_sets:
        parts = []
        for line in (ln for ln in analysis.lines if ln.protocol == protocol):
            inside = analysis.cells[line].get((INTERNAL_TEST_SET, smallest))
            outside = analysis.cells[line].get((external[0], smallest))
            if inside and outside:
                parts.append(f"{esc(names.encoder(line))} {signed(point(outside)[0] - point(inside)[0])}")
        if parts:
            sentences.append(f"Moving from the internal test set to the external set “{esc(external[0])}” at "
                             f"{pct(smallest)} labels changes {esc(metric_name(metric))} by: "
                             + ", ".join(parts) + ".")
    cell_hours, pretrain_hours, n_runs = cost
    runs = (f"{n_runs} pretraining run{'s' if n_runs != 1 else ''} used {pretrain_hours:.2f}" if n_runs
            else "no pretraining run was recorded")
    sentences.append(f"The {len({r['cell_key'] for r in analysis.rows})} finished cells used "
                     f"{cell_hours:.2f} device-hours; {runs}.")
    return '<ul class="headline">' + "".join(f"<li>{s}</li>" for s in sentences) + "</ul>"


def _reference_sentences(analysis: Analysis, names: Names, test_set: str, place: str) -> list[str]:
    """One sentence per label-free protocol (zero-shot): each encoder's value with its interval over test cases."""
    out = []
    for protocol in analysis.protocols:
        lines = [ln for ln in analysis.lines if ln.protocol == protocol and ln in analysis.reference_lines]
        parts = []
        for line in lines:
            band = analysis.bands.get((line, test_set, 0.0))
            if band is not None:
                parts.append(f"{esc(names.encoder(line))} <strong>{num(band.mean)}</strong> "
                             f"(95% CI {num(band.low)} to {num(band.high)}, {esc(band.method)})")
        if parts:
            out.append(f"{esc(protocol_name(protocol)).capitalize()} without any training label ({place}, "
                       f"{esc(metric_name(analysis.metric_of(protocol)))}): " + "; ".join(parts) + ".")
    return out


def _gains_section(analysis: Analysis, names: Names, gains: Sequence[Gain], baseline_init: str) -> str:
    title = f"Gain over {init_name(baseline_init)}"
    if not gains:
        present = any(ln.init == baseline_init for ln in analysis.lines)
        reason = ("no other initialisation shares its protocol" if present
                  else f"the study has no “{baseline_init}” initialisation")
        return note(f"{esc(title)} skipped: {esc(reason)}.")
    # Wide table: one row per (test set, protocol, comparison), one column per label fraction.
    grouped: dict[tuple[str, str, Line, Line], dict[float, Gain]] = defaultdict(dict)
    for g in gains:
        grouped[(g.test_set, g.treatment.protocol, g.treatment, g.baseline)][g.label_fraction] = g
    order = {t: i for i, t in enumerate(analysis.test_sets)}
    rows = []
    for (test_set, protocol, a, b) in sorted(grouped, key=lambda k: (order[k[0]], analysis.protocols.index(k[1]),
                                                                       analysis.lines.index(k[2]))):
        cells = grouped[(test_set, protocol, a, b)]
        methods = sorted({g.method for g in cells.values()})
        seeds = sorted({str(g.n_paired) if g.n_paired else f"{g.n_a}/{g.n_b} (unpaired)" for g in cells.values()})
        row = [esc(test_set), esc(protocol_name(protocol)),
               f"<strong>{esc(names.encoder(a))}</strong> − {esc(names.encoder(b))}"]
        for lf in analysis.fractions:
            g = cells.get(lf)
            if g is None:
                row.append("–")
                continue
            cls = "pos" if (g.ci_low is not None and g.ci_low > 0) else \
                "neg" if (g.ci_high is not None and g.ci_high < 0) else ""
            ci = (f"<small>{signed(g.ci_low, 2)} … {signed(g.ci_high, 2)}<br>{p_text(g.p_value)}</small>"
                  if g.ci_low is not None else "<small>no test</small>")
            if g.case_p is not None or g.seed_p is not None:
                ci += (f'<br><small class="muted">cases only {p_text(g.case_p)} · seeds only {p_text(g.seed_p)}'
                       "</small>")
            tooltip = esc(f"seed SD of the paired difference: {num(g.seed_sd)}; "
                           f"{g.case_method or 'case-level test'} on the test cases alone (models fixed): "
                           f"{html.unescape(p_text(g.case_p))}; paired t over seeds alone (test set fixed): "
                           f"{html.unescape(p_text(g.seed_p))}")
            tint = f" {cls}-bg" if cls else ""
            row.append(f'<div class="cell{tint}" title="{tooltip}"><span class="{cls}">{signed(g.difference)}</span>'
                       f"<br>{ci}</div>")
        row += [esc(", ".join(methods)), esc(", ".join(seeds))]
        rows.append(row)
    headers = ["Test set", "Protocol", "Comparison"] + [f"{pct(f)} labels" for f in analysis.fractions] + [
        "CI and p over", "Paired seeds"]
    grid = table(headers, rows, numeric=tuple(range(3, 3 + len(analysis.fractions))))
    legend = (f'<p class="muted">Each cell: Δ {esc(metrics_text(analysis, curve_protocols(analysis)))} (A − B, mean of the per-seed '
              "differences), its 95% CI and p over seeds and test cases; below, for reference, the p-value of the "
              "test on the test cases alone (DeLong: the trained models held fixed) and of the paired t-test over "
              "seeds alone (the test set held fixed). Green / red: the CI over seeds and test cases excludes zero. "
              "Hover a cell for the seed SD of the difference.</p>")
    return figure(gains_figure(analysis, gains, names, title)) + legend + grid


def _generalisation_section(analysis: Analysis, names: Names) -> str:
    external = [t for t in analysis.test_sets if t != INTERNAL_TEST_SET]
    if INTERNAL_TEST_SET not in analysis.test_sets or not external:
        return note("Skipped: needs the internal test set “test” and at least one external test set.")
    out = (f"<p>Mean {esc(metrics_text(analysis))} over seeds on the internal test set → on each external "
           "set, and the change Δ = external − internal (red: the model loses performance on data from elsewhere)."
           "</p>")
    columns = ([0.0] if analysis.reference_lines else []) + analysis.fractions
    for t in external:
        rows = []
        for line in analysis.lines:
            row = [esc(names.encoder(line)), esc(protocol_name(line.protocol))]
            for lf in columns:
                inside = analysis.cells[line].get((INTERNAL_TEST_SET, lf))
                outside = analysis.cells[line].get((t, lf))
                if not inside or not outside:
                    row.append("–")
                    continue
                m_in, m_out = point(inside)[0], point(outside)[0]
                cls = "neg" if m_out < m_in else "pos"
                row.append(f'<span class="{cls}">{signed(m_out - m_in)}</span><br>'
                           f"<small>{num(m_in)} → {num(m_out)}</small>")
            rows.append(row)
        out += f"<h3>internal → {esc(t)}</h3>" + table(
            ["Initialisation", "Protocol"] + [labels_header(f) for f in columns], rows,
            numeric=tuple(range(2, 2 + len(columns))))
    return out


def _matching_section(analysis: Analysis, names: Names,
                      matches: dict[tuple[Line, str], tuple[float | None, float, Line]]) -> str:
    if not matches:
        return note(f"Skipped: needs “{SUPERVISED_INIT}” cells with 100% labels (the fully supervised baseline).")
    headers = ["Initialisation", "Protocol"] + [esc(t) for t in analysis.test_sets]
    rows = []
    for line in analysis.lines:
        if not any((line, t) in matches for t in analysis.test_sets):
            continue
        row = [esc(names.encoder(line)), esc(protocol_name(line.protocol))]
        for t in analysis.test_sets:
            if (line, t) not in matches:
                row.append("–")
                continue
            fraction, _, _ = matches[(line, t)]
            if fraction is None:
                best = max(mean_curve(analysis, line, t).values())
                row.append(f'<span class="muted">not reached (best {num(best)})</span>')
            else:
                row.append(f"<strong>{matched_pct(analysis, fraction)}</strong>")
        rows.append(row)
    baselines = sorted({(t, names.line(b), v) for (_, t), (_, v, b) in matches.items()})
    described = "; ".join(f"{esc(t)}: {esc(n)} = {num(v)}" for t, n, v in baselines)
    return (f"<p>Smallest label fraction at which the mean {esc(metrics_text(analysis, curve_protocols(analysis)))} reaches the fully "
            f"supervised baseline trained on 100% of the labels ({described}). Crossings are interpolated "
            "linearly on the log-fraction axis; a curve that starts above the baseline reports its smallest "
            "measured fraction.</p>" + table(headers, rows, numeric=tuple(range(2, len(headers)))))


def _finetune_rules(analysis: Analysis, names: Names, stored: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    finetune = (stored.get("protocols") or {}).get("finetune")
    if not finetune:
        return ["<strong>Fine-tuning</strong>: not part of this study."]
    recorded = set(raw)
    items = []
    rule = finetune.get("steps_per_epoch")
    budget = per_cell(analysis, "finetune_budget_steps")
    steps = by_fraction(budget, ("finetune",))
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
    run = by_fraction(per_cell(analysis, "finetune_steps"), ("finetune",))
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
        chosen = per_cell(analysis, "backbone_lr_scale")
        counts: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
        for (init, pretrain, protocol, _), values in chosen.items():
            if protocol == "finetune":
                for v in values:
                    counts[names.encoder(Line(init, pretrain, protocol))][v] += 1
        picked = "; ".join(f"{esc(enc)}: " + ", ".join(f"{v:g}× in {n}" for v, n in sorted(c.items()))
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


def _validation_rule(analysis: Analysis, stored: dict[str, Any], raw: dict[str, Any]) -> str:
    rule = stored.get("validation", "full")
    images = by_fraction(per_cell(analysis, "val_images"),
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


def _other_protocol_rules(analysis: Analysis, names: Names, stored: dict[str, Any]) -> list[str]:
    """Budget and selection rules of segmentation protocols; what label-free protocols (zero-shot) did."""
    items = []
    for protocol, options in (stored.get("protocols") or {}).items():
        if not isinstance(options, dict):
            continue
        title = esc(protocol_name(protocol)).capitalize()
        if protocol.startswith("segmentation"):
            epochs = int(options.get("epochs", 0))
            rule = options.get("steps_per_epoch", "full")
            planned = by_fraction(per_cell(analysis, "finetune_budget_steps"), (protocol,))
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
                chosen = per_cell(analysis, "encoder_lr_scale")
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
            listed = "; ".join(f"{esc(k)}: " + " / ".join(f"“{esc(t)}”" for t in v) for k, v in prompts.items())
            items.append(f"<strong>{title}</strong>: no training labels — each class is described by prompts "
                         f"({listed}); an image–text encoder scores each test case by its similarity to each class. "
                         "Recorded once per image–text encoder and test set (label fraction 0, the study’s seed: "
                         "the only randomness is the pretraining run’s) and drawn as a horizontal reference line; "
                         "encoders without a text tower are skipped.")
    return items


def _methods_section(analysis: Analysis, names: Names, config: dict[str, Any] | None) -> str:
    """The rules the cells were computed with, and what every interval and p-value covers."""
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


def _numbers_table(analysis: Analysis, names: Names) -> str:
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
                    esc(test_set), esc(names.encoder(line)), esc(protocol_name(line.protocol)), pct(fraction),
                    esc(metric_name(analysis.metric_of(line.protocol))),
                    f"{num(band.mean)} <small>({band.n})</small>",
                    f"{num(band.low)} – {num(band.high)}<br><small>{esc(band.method)}</small>",
                    f"{num(band.seed_low)} – {num(band.seed_high)}",
                    f"{num(band.case_low)} – {num(band.case_high)}",
                    num(band.seed_sd)])
    if not rows:
        return ""
    grid = table(["Test set", "Initialisation", "Protocol", "Labels", "Metric", "Mean (seeds)",
                  "95% CI over seeds + test cases", "95% t over seeds (test set fixed)",
                  "Per-seed 95% CI over test cases (mean of bounds)", "Seed SD"], rows,
                 numeric=(5, 6, 7, 8, 9))
    return f"<details><summary>Numbers behind the curves, with every interval</summary>{grid}</details>"


def _cost_section(analysis: Analysis, names: Names, pretrain_runs: list[dict[str, Any]]) -> str:
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
    lines_named = Names([Line(*k) for k in groups])
    init_rank = {v: i for i, v in enumerate(ordered({k[0] for k in groups}, INIT_ORDER))}
    proto_rank = {v: i for i, v in enumerate(ordered({k[2] for k in groups}, PROTOCOL_ORDER))}
    for (init, pretrain, protocol), g in sorted(groups.items(), key=lambda kv: (
            proto_rank[kv[0][2]], init_rank[kv[0][0]], kv[0][1])):
        rows.append([esc(lines_named.encoder(Line(init, pretrain, protocol))),
                     "–" if pretrain.lower() in NO_PRETRAIN else esc(pretrain),
                     esc(protocol_name(protocol)), str(g["n"]), f"{g['wall'] / 3600:.2f}", f"{g['hours']:.2f}",
                     f"{g['wall'] / max(g['n'], 1) / 60:.1f}", esc(", ".join(sorted(g["devices"])))])
    total_wall = sum(g["wall"] for g in groups.values())
    total_hours = sum(g["hours"] for g in groups.values())
    rows.append(["<strong>Total</strong>", "", "", f"<strong>{len(seen)}</strong>",
                 f"<strong>{total_wall / 3600:.2f}</strong>", f"<strong>{total_hours:.2f}</strong>", "", ""])
    html_out = "<h3>Transfer cells</h3>" + table(
        ["Initialisation", "Pretraining run", "Protocol", "Cells", "Wall time (h)", "Device-hours",
         "Mean per cell (min)", "Devices"], rows, numeric=(3, 4, 5, 6))
    html_out += "<h3>Pretraining runs</h3>"
    if not pretrain_runs:
        return html_out + note("No pretraining runs recorded.")
    run_rows = []
    for run in pretrain_runs:
        wall = run["wall_time_s"] or 0.0
        seen_images = run["images_seen"]
        rate = f"{seen_images / wall:,.0f}" if seen_images and wall > 0 else "–"
        run_rows.append([esc(run["run_name"]), esc(run["device"] or "?"), f"{wall / 3600:.2f}",
                         f"{(run['device_hours'] or 0.0):.2f}", f"{seen_images:,}" if seen_images else "–", rate,
                         f"<code>{esc(run['checkpoint'] or '–')}</code>"])
    return html_out + table(["Run", "Device", "Wall time (h)", "Device-hours", "Images seen", "Images/s",
                              "Checkpoint"], run_rows, numeric=(2, 3, 4, 5))


def _provenance_section(analysis: Analysis, config: dict[str, Any] | None) -> str:
    versions: dict[str, set[str]] = defaultdict(set)
    for r in analysis.rows:
        for name, value in json.loads(r["versions_json"] or "{}").items():
            versions[name].add(str(value))
    out = ""
    if versions:
        out += "<h3>Software versions recorded with the cells</h3>" + table(
            ["Package", "Version(s)"], [[esc(k), esc(", ".join(sorted(v)))] for k, v in sorted(versions.items())])
    out += "<h3>Exact study configuration</h3>"
    if config is None:
        return out + note("No configuration was saved for this study (ResultsStore.save_study_config).")
    try:
        text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
    except Exception:  # PyYAML missing or an unrepresentable value: JSON is always possible
        text = json.dumps(config, indent=2, sort_keys=False)
    return out + f'<pre class="config">{esc(text)}</pre>'


def _secondary_section(analysis: Analysis, names: Names, predictions: Predictions) -> str:
    """Per-class Dice and HD95 of segmentation protocols: mean over seeds with the seeds + test cases interval."""
    wanted = {p for p in analysis.protocols if analysis.metric_of(p) == "dice"}
    if not wanted:
        return ""
    full_pf = {line: max(c.key.pretrain_fraction for cells in points.values() for c in cells)
               for line, points in analysis.cells.items()}
    groups: dict[tuple[Line, str], dict[tuple[str, float], list[Cell]]] = defaultdict(lambda: defaultdict(list))
    for r in analysis.rows:
        metric = r["metric"] or ""
        line = Line(r["init"], r["pretrain"], r["protocol"])
        if (r["protocol"] not in wanted or r["value"] is None or line not in full_pf
                or not (metric.startswith("dice_") or metric.startswith("hd95"))
                or r["pretrain_fraction"] != full_pf[line]):
            continue
        groups[(line, metric)][(r["test_set"], float(r["label_fraction"]))].append(
            Cell(CellKey.from_row(r), float(r["value"]), r["ci_low"], r["ci_high"], bool(r["has_predictions"]),
                  metric, bool(r.get("has_case_values"))))
    if not groups:
        return ""
    out = ("<p>Secondary segmentation metrics: Dice per foreground class and the 95th-percentile Hausdorff distance "
           "(HD95, lower is better; a structure missed or hallucinated — only one of prediction and reference empty "
           "— scores the image diagonal; cases where both are empty are undefined and left out, every mean taken on "
           "the cases defined for all seeds). Each entry: mean over seeds and its 95% interval over seeds and test "
           "cases.</p>")
    rank = {ln: i for i, ln in enumerate(analysis.lines)}
    for test_set in analysis.test_sets:
        rows = []
        for (line, metric), points in sorted(groups.items(), key=lambda kv: (rank.get(kv[0][0], 0), kv[0][1])):
            row = [esc(names.encoder(line)), esc(protocol_name(line.protocol)), esc(metric_name(metric))]
            for fraction in analysis.fractions:
                cells = points.get((test_set, fraction))
                if not cells:
                    row.append("–")
                    continue
                band = curve_band(analysis, predictions, cells)
                row.append(f"{num(band.mean)}<br><small>{num(band.low)} – {num(band.high)}</small>")
            rows.append(row)
        if rows:
            out += f"<h3>{esc(test_set_name(test_set))}</h3>" + table(
                ["Initialisation", "Protocol", "Metric"] + [labels_header(f) for f in analysis.fractions], rows,
                numeric=tuple(range(3, 3 + len(analysis.fractions))))
    return out


def render_report(store: ResultsStore, study: str, out_dir: Path, primary_metric: str | None = None) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/results.csv``; return the HTML path.

    ``primary_metric`` None: every protocol's curves show its cells' own primary metric (AUC for classification,
    Dice for segmentation); a metric name (``accuracy``) shows that metric wherever it was recorded.
    """
    out_dir = Path(out_dir)
    analysis = analyse(store, study, primary_metric)
    names = Names(analysis.lines)
    predictions = Predictions(store, study)
    pretrain_runs = store.pretrain_runs(study)
    config = store.study_config(study)

    compute_bands(analysis, predictions)
    vs_random = gains_over(analysis, predictions, "random", [ln for ln in analysis.lines if ln.init != "random"])
    vs_imagenet = gains_over(analysis, predictions, "imagenet",
                         [ln for ln in analysis.lines if ln.init not in ("random", "imagenet")])
    matches = baseline_matches(analysis)
    unique_cells = {r["cell_key"]: r for r in analysis.rows}
    cell_hours = sum((r["device_hours"] or 0.0) for r in unique_cells.values())
    pretrain_hours = sum((r["device_hours"] or 0.0) for r in pretrain_runs)

    metric = metrics_text(analysis)
    analysis.notes[:0] = [f"Study note: {n}" for n in store.study_notes(study)]
    sections: list[tuple[str, str, str]] = []
    sections.append(("summary", "Headline", _headline(analysis, names, vs_random, vs_imagenet, matches,
                                                      (cell_hours, pretrain_hours, len(pretrain_runs)))))
    if analysis.lines:
        sections.append(("methods", "How the numbers were made", _methods_section(analysis, names, config)))
        sections.append(("curves", "Label efficiency",
                         figure(curves_figure(analysis, names)) + _numbers_table(analysis, names)))
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
            sections.append(("pretrain-size", "Pretraining-set size", figure(size_figure(analysis, names))))
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
    page_sections = [Section(anchor, title, (method_note if anchor == "gain-random" else "") + content)
                     for anchor, title, content in sections]
    kpis = [(str(len(unique_cells)), "cells"), (str(len(analysis.seeds)), "seeds"),
            (str(len(analysis.test_sets)), "test sets"),
            (str(len({ln.encoder for ln in analysis.lines})), "initialisations"),
            (f"{cell_hours + pretrain_hours:.1f}", "device-hours")]
    page = render_page(
        title=f"{study} — radssl study report", heading=study,
        subtitle=f"Label-efficiency study · primary metric {metric} · generated {time.strftime('%Y-%m-%d %H:%M')}",
        sections=page_sections, kpis=kpis, notes=list(dict.fromkeys(analysis.notes)),
        footer=f"radssl {__version__} · data: results.csv beside this file")
    store.export_csv(study, out_dir / "results.csv")
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    return path
