"""Method bake-off on a MedMNIST set: a thin caller of ``radssl bakeoff`` (:mod:`radssl.study.bakeoff`).

Every method that fits the data (or ``--methods``) pretrains once at ONE stated budget — ``--budget-images N``
(equal images seen, the primary rule) or ``--budget-minutes M`` (equal measured wall-clock with ``--threads``,
calibrated per method over ``--calibration-steps`` timed steps after ``--calibration-warmup``; arms off by > 10 % are
flagged) — and is read out beside its random-init twin with a linear probe and kNN (and ``--finetune-epochs``
fine-tuning) at 1 / 10 / 100 % labels and ``--seeds``, as a study: results store, resume, statistics and HTML report
under ``--output-dir`` (default ``runs/<name>``, not the checkout's benchmarks/results), plus ``bakeoff.json``.

``--cached-only`` summarises the committed per-run results in ``benchmarks/results/runs/`` (made before
``radssl bakeoff`` existed: one child process per method × seed, each seed its own pretraining run) into
``benchmarks/results/method_bakeoff_<dataset>.json`` / ``.html``, which the README quotes; the functions below
(``summarise``, ``issue_checks``, …) read that format.

Fairness: the same backbone (ResNet-18, 1 channel, standard 7×7 stem, 28 px unless set) for every method except those
that need another family (MAE needs a ViT: it runs ViT-Ti, and its rows say so); the same budget (wall-clock
minutes, or images seen), batch size and threads for every method; hyper-parameters are each method's preset (chosen
on validation data only, see ``benchmarks/preset_sweep.py``); the probe's C is chosen on validation only. Intervals:
through ``radssl bakeoff`` the study's (over seeds and test cases; with the default ``--pretraining-runs shared``
each method pretrains once and seeds change only the label subsets and read-outs, so the pretraining run's variance
is NOT inside them; ``--pretraining-runs per_seed`` or ``--combine`` makes each seed its own pretraining run, which
puts it inside); in the committed runs 95 % t-intervals over seeds (each seed changed the pretraining run *and* the
label subsets).

The bar: lightly's own SimCLR example, as runs this repository makes and commits — ``benchmarks/lightly_bar.py``
(``--arm documented``: the example as documented; ``--arm strong``: with SGD momentum 0.9 and milder views), its run
files under ``benchmarks/results/runs/lightly_bar_<dataset>/`` at the SAME budget as the methods (equal images seen,
or equal measured wall-clock with the same threads). No number is typed in here (issue 19: the old constant was one
unseeded run nothing in the repository produced). Checked: the best method against each lightly arm at every
fraction (its mean over seeds, and paired by seed: same label subsets on both sides), with both sides' images seen;
every method beats random init at 1 %. Runs made before the budget rule (lightly at a fixed 87 steps, 1 thread:
``seed<S>_<M>min.json``) are read for a minutes budget only when no run at the rule exists, and are labelled so.
After a ``radssl bakeoff`` run, ``lightly_comparison.json`` beside ``bakeoff.json`` sets each lightly arm at the same
budget beside radssl's best (unpaired: the study's seeds vary label subsets only), images seen on both sides.
The validation rule is part of the comparison: ``radssl bakeoff`` chooses C on proportional validation rows, so
``--combine`` reads the lightly runs made with ``lightly_bar.py --validation proportional`` (``*_propval.json``) where
they exist and then pairs each method − lightly by seed (:func:`lightly_pairing`: per-seed pretraining, same rule,
same seeds); with only full-validation lightly runs the bars stay unpaired and the checks' ``pairing.why`` says so.

Usage:
  RADSSL_DATA_DIR=… python benchmarks/method_bakeoff.py --dataset breastmnist --budget-images 51200 --seeds 0 1 2
  python benchmarks/method_bakeoff.py --dataset pneumoniamnist --budget-minutes 10 --threads 2 --methods simclr byol
  python benchmarks/method_bakeoff.py --dataset breastmnist --budget-minutes 5 --cached-only   # committed runs
  python benchmarks/method_bakeoff.py --dataset breastmnist --budget-images 51200 --compare-only  # vs lightly arms
  python benchmarks/method_bakeoff.py --dataset breastmnist --tag 12800img --combine runs/a:0 runs/b:1 runs/c:2

``--combine DIR:SEED …`` pools bake-offs run separately, one per pretraining seed (``--pretrain-seed s``), with
:func:`radssl.study.bakeoff_replicates.combine_replicates`: from each folder only the cells of its pretraining seed
(extra label seeds of a wider run are left out), intervals over seeds and test cases that include the pretraining
run's variance, SSL − random paired by seed; unequal budgets, images seen, fractions, protocols or data are refused.
It writes ``benchmarks/results/<stem>.json`` / ``.html`` (this page's format, plus the pooled ``bakeoff`` record)
and prints a README-ready markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import bakeoff_lib as lib
from common import machine, mean_sd_interval, render_from_result, write_json

from radssl.atomic import write_text_atomic
from radssl.errors import ConfigError
from radssl.methods.registry import METHODS, method_class
from radssl.provenance import package_versions
from radssl.study.bakeoff import SUMMARY_FILE, BakeoffConfig, plan_bakeoff, plan_lines
from radssl.study.bakeoff_replicates import combine_replicates, run_bakeoff
from radssl.study.figures import Series, interval_panels
from radssl.study.formatting import PROTOCOL_NAMES, num, signed
from radssl.study.pages import (
    Cell,
    EmbeddedFigure,
    PageSection,
    Paragraph,
    Table,
    interval_cell,
    render_benchmark_page,
)

RESULTS = Path(__file__).parent / "results"
AUC_BOUNDS = (0.0, 1.0)  # AUC intervals on the logit scale of this range stay inside it (issue 19 point 8)
DIFFERENCE_BOUNDS = (-1.0, 1.0)  # the range of a difference of two AUCs
LIGHTLY_ARMS = ("documented", "strong")  # benchmarks/lightly_bar.py --arm


def lightly_budget_key(budget_minutes: float | None, budget_images: int | None, threads: int,
                       validation: str = "full") -> str:
    """The budget tag of benchmarks/lightly_bar.py's run files (``<N>img`` or ``<M>min<k>t``, plus ``_propval`` for
    runs whose probe chose C on the study's proportional validation rows)."""
    budget = f"{budget_images}img" if budget_images else f"{budget_minutes:g}min{threads}t"
    return budget + lib.VALIDATION_SUFFIX[validation]


def lightly_validation(run: dict[str, Any]) -> str:
    """The validation rule a lightly_bar run's probe chose C under (runs that predate the record: the full split)."""
    return (run.get("validation") or {}).get("rule", "full")


def lightly_reference_runs(runs_root: Path, dataset: str, budget_minutes: float | None, budget_images: int | None,
                           threads: int, validation: str = "full") -> dict[str, list[dict[str, Any]]]:
    """Per lightly arm, the committed runs of ``benchmarks/lightly_bar.py`` at this budget (equal images seen, or
    equal wall-clock with the same threads) read out under ``validation`` (``full`` / ``proportional``). A minutes
    budget of the documented arm with full validation falls back to the runs made before the rule
    (``seed<S>_<M>min.json``: fixed steps, 1 thread), each marked ``legacy_budget``."""
    folder = runs_root / f"lightly_bar_{dataset}"
    key = lightly_budget_key(budget_minutes, budget_images, threads, validation)
    out: dict[str, list[dict[str, Any]]] = {}
    for arm in LIGHTLY_ARMS:
        runs = [run for p in sorted(folder.glob(f"seed*_{arm}_{key}.json"))
                for run in [json.loads(p.read_text())] if lightly_validation(run) == validation]
        if not runs and arm == "documented" and budget_minutes and validation == "full":
            runs = [{**json.loads(p.read_text()), "legacy_budget": True}
                    for p in sorted(folder.glob(f"seed*_{budget_minutes:g}min.json"))]
        if runs:
            out[arm] = runs
    return out


def lightly_summary(reference_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One lightly arm's runs as a bar: mean and interval over seeds per fraction, beside its images seen."""
    images = mean_sd_interval([run["images_seen"] for run in reference_runs])
    legacy = any(run.get("legacy_budget") for run in reference_runs)
    return {
        "seeds": sorted(run["seed"] for run in reference_runs), "images_seen": images,
        "threads": sorted({run.get("threads") for run in reference_runs}, key=str),
        "budget": ("legacy: fixed step count, not set by the budget rule (rerun benchmarks/lightly_bar.py)" if legacy
                   else reference_runs[0].get("budget")),
        "validation": "/".join(sorted({lightly_validation(run) for run in reference_runs})),
        "linear": {fraction: {**mean_sd_interval([run["ssl"]["linear"][fraction]["test_auc"]
                                                       for run in reference_runs], bounds=AUC_BOUNDS),
                              "images_seen": images["mean"]}
                   for fraction in reference_runs[0]["ssl"]["linear"]}}


def lightly_pairing(rows: dict[str, dict[str, Any]], reference_runs: list[dict[str, Any]], bakeoff: dict[str, Any],
                    protocol: str = "linear") -> dict[str, Any]:
    """One method's bake-off headline rows (per fraction) minus one lightly arm, paired by seed where that is sound.

    Sound when the bake-off is per-seed (each seed its own pretraining run, like each lightly seed), its rows carry
    per-seed values, its validation rule is the lightly runs' and its seeds are theirs: seed s then means the same
    training label subset and the same validation rows on both sides, so the difference's interval over seeds (95 %
    t, bounded to [-1, 1]) drops the subset-to-subset variance two side-by-side bars carry. Otherwise the bars stay
    unpaired and ``why`` says which condition failed.
    """
    ours_rule = (bakeoff.get("validation") or {}).get("rule")
    theirs_rule = sorted({lightly_validation(run) for run in reference_runs})
    by_seed = {run["seed"]: run for run in reference_runs}
    per_seed = {f: {p["seed"]: p["value"] for p in row["ssl"].get("per_seed") or []} for f, row in rows.items()}
    seeds = sorted(by_seed)
    why = None
    if bakeoff.get("pretraining_runs") != "per_seed":
        why = "the bake-off pretrains each method once (its seeds vary only the label subsets)"
    elif ours_rule is None:
        why = "the bake-off's validation rule is not recorded"
    elif theirs_rule != [ours_rule]:
        why = f"validation rules differ: bake-off {ours_rule}, lightly {'/'.join(theirs_rule)}"
    elif not rows or any(not values for values in per_seed.values()):
        why = "the bake-off's rows carry no per-seed values"
    elif any(sorted(values) != seeds for values in per_seed.values()):
        why = f"seeds differ: bake-off {sorted(next(iter(per_seed.values())))}, lightly {seeds}"
    if why is not None:
        return {"paired": False, "why": f"unpaired: {why}", "fractions": {}}
    fractions = {}
    for fraction, values in per_seed.items():
        if any(fraction not in by_seed[s]["ssl"][protocol] for s in seeds):
            continue
        diffs = [values[s] - by_seed[s]["ssl"][protocol][fraction]["test_auc"] for s in seeds]
        fractions[fraction] = paired_difference(diffs, seeds, DIFFERENCE_BOUNDS)
    return {"paired": True, "why": f"paired by seed {seeds}: same pretraining seed, training label subset and "
                                   f"validation rows ({ours_rule}) on both sides", "fractions": fractions}


def default_methods() -> list[str]:
    names = []
    for name in sorted(METHODS):
        cls = method_class(name)
        requirements = cls.requirements(cls.Params())
        if 2 in requirements.spatial_dims and not requirements.text:
            names.append(name)
    return names


def paired_difference(diffs: list[float], seeds: list[int], bounds: tuple[float, float] | None) -> dict[str, Any]:
    """Per-seed differences (method − reference) as one paired cell: mean, 95 % t-interval over seeds (inside
    ``bounds`` — (-1, 1) for a difference of AUCs), the seeds, and whether the mean / the whole interval is above 0."""
    stat = mean_sd_interval(diffs, bounds)
    return {**stat, "seeds": seeds, "beats": stat["mean"] > 0, "confident": stat["n"] >= 2 and stat["low"] > 0}


def paired_with_reference(method_runs: list[dict[str, Any]], reference_runs: list[dict[str, Any]],
                          protocol: str = "linear", bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Method − reference test AUC per fraction, paired by seed (same seed = same label subsets on both sides).

    Only seeds both sides have enter; the interval is the 95 % t-interval of the per-seed differences, so the
    subset-to-subset variance that dominates a one-run bar cancels.
    """
    reference = {run["seed"]: run for run in reference_runs}
    common = [run for run in method_runs if run["seed"] in reference]
    out: dict[str, Any] = {}
    if not common:
        return out
    for fraction in common[0]["ssl"][protocol]:
        diffs = [run["ssl"][protocol][fraction]["test_auc"]
                 - reference[run["seed"]]["ssl"][protocol][fraction]["test_auc"] for run in common
                 if fraction in reference[run["seed"]]["ssl"][protocol]]
        out[fraction] = paired_difference(diffs, sorted(run["seed"] for run in common), bounds)
    return out


def run_protocols(method_runs: list[dict[str, Any]]) -> list[str]:
    """The read-outs every run of a method has (linear and kNN always; fine-tuning where it was asked for)."""
    return [protocol for protocol in ("linear", "knn", "finetune")
            if all(protocol in run["ssl"] and protocol in run["random_init"] for run in method_runs)]


def summarise(runs: list[dict[str, Any]],
              references: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Per-method means and intervals, the gain over each run's random init, and the checks.

    ``references``: per lightly arm (``documented``, ``strong``), its runs by ``benchmarks/lightly_bar.py`` at the
    same budget — the bars; the best method is checked against each, and every method is compared with each paired
    by seed.
    """
    references = {arm: runs_ for arm, runs_ in (references or {}).items() if runs_}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows: dict[str, Any] = {}
    for method, method_runs in sorted(by_method.items()):
        entry: dict[str, Any] = {
            "backbone": method_runs[0]["backbone"], "seeds": [r["seed"] for r in method_runs],
            "images_seen": mean_sd_interval([r["images_seen"] for r in method_runs]),
            "pretrain_wall_s": mean_sd_interval([r["pretrain_wall_s"] for r in method_runs]),
            "images_per_s": mean_sd_interval([r["pretrain_images_per_s"] for r in method_runs]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in method_runs),
            "final_loss": mean_sd_interval([r["final_loss"] for r in method_runs]),
        }
        protocols = run_protocols(method_runs)
        for arm in ("ssl", "random_init"):
            for protocol in protocols:
                for fraction in method_runs[0][arm][protocol]:
                    values = [r[arm][protocol][fraction]["test_auc"] for r in method_runs]
                    entry.setdefault(arm, {}).setdefault(protocol, {})[fraction] = mean_sd_interval(values)
        # Paired by seed: SSL − its own random init, per fraction (same seed = same label subset).
        for protocol in protocols:
            for fraction in method_runs[0]["ssl"][protocol]:
                gains = [r["ssl"][protocol][fraction]["test_auc"] - r["random_init"][protocol][fraction]["test_auc"]
                         for r in method_runs]
                entry.setdefault("gain_over_random", {}).setdefault(protocol, {})[fraction] = \
                    mean_sd_interval(gains)
        for arm, reference_runs in references.items():
            entry.setdefault("minus_lightly_paired", {})[arm] = paired_with_reference(method_runs, reference_runs)
        rows[method] = entry

    bars = {arm: lightly_summary(reference_runs) for arm, reference_runs in references.items()}
    checks = issue_checks(rows, bars)
    return {"methods": rows, "checks": checks, "lightly": bars}


def issue_checks(rows: dict[str, Any], bars: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Issue 8's two checks, on means *and* on the seed intervals, against each lightly arm's bar (``bars``: per arm,
    :func:`lightly_summary` of its runs at the same budget).

    The best method is chosen only among the methods with the most seeds: a one-seed mean is not comparable with a
    three-seed mean (a lucky seed would win). "beats" is the mean above the bar (or above zero gain); "confident" is
    the whole 95 % interval above it, which is what a reader should trust.
    """
    checks: dict[str, Any] = {}
    if not rows:
        return checks
    most_seeds = max(len(entry["seeds"]) for entry in rows.values())
    eligible = [method for method, entry in rows.items() if len(entry["seeds"]) == most_seeds]
    best = max(eligible, key=lambda m: sum(rows[m]["ssl"]["linear"][f]["mean"] for f in rows[m]["ssl"]["linear"]))
    checks["best_method_by_mean_linear_auc"] = best
    checks["best_method_chosen_among"] = {"seeds": most_seeds, "methods": eligible}
    linear = rows[best]["ssl"]["linear"]
    ours_images = rows[best]["images_seen"]["mean"]
    for arm, bar in (bars or {}).items():
        lightly_images = bar["images_seen"]["mean"]
        checks.setdefault("best_vs_lightly", {})[arm] = {
            "images_seen": {"ours": ours_images, "lightly": lightly_images,
                            "equal": bool(ours_images == lightly_images)},
            "budget": bar["budget"],
            "at_every_fraction": {
                fraction: {"ours": linear[fraction]["mean"], "low": linear[fraction]["low"],
                           "high": linear[fraction]["high"], "bar": value["mean"],
                           "beats": linear[fraction]["mean"] > value["mean"],
                           "confident": linear[fraction]["low"] > value["mean"],
                           "ours_images_seen": ours_images, "bar_images_seen": lightly_images}
                for fraction, value in bar["linear"].items() if fraction in linear},
            "paired_by_seed": rows[best].get("minus_lightly_paired", {}).get(arm, {})}
    checks["every_method_beats_random_at_1_percent"] = random_check(rows, "linear")
    if any("finetune" in entry["gain_over_random"] for entry in rows.values()):
        checks["every_method_beats_random_at_1_percent_finetuned"] = random_check(rows, "finetune")
    return checks


def headline_by_method(bakeoff: dict[str, Any], protocol: str = "linear") -> dict[str, dict[str, Any]]:
    """A bake-off record's headline rows on test set ``test`` under ``protocol``: per method, per fraction."""
    by_method: dict[str, dict[str, Any]] = {}
    for row in bakeoff.get("headline", []):
        if row["protocol"] == protocol and row["test_set"] == "test":
            by_method.setdefault(row["method"], {})[f"{float(row['label_fraction']):g}"] = row
    return by_method


def best_vs_lightly_from_bakeoff(bakeoff: dict[str, Any], references: dict[str, list[dict[str, Any]]],
                                 protocol: str = "linear") -> dict[str, Any]:
    """radssl's best method of a ``radssl bakeoff`` (its ``bakeoff.json`` headline, test set ``test``) beside each
    lightly arm at the same budget, per label fraction, images seen on both sides.

    Paired by seed (``paired_by_seed`` per fraction) only where :func:`lightly_pairing` finds it sound (a per-seed
    bake-off with the lightly runs' validation rule and seeds); otherwise unpaired — e.g. a shared bake-off pretrains
    each method once while each lightly seed is its own pretraining run — the two intervals stand side by side, only
    the means are differenced, and ``pairing.why`` says why. "Best" is the highest mean over fractions of the SSL
    arm's test AUC under ``protocol`` (as in :func:`issue_checks`).
    """
    by_method = headline_by_method(bakeoff, protocol)
    out: dict[str, Any] = {"protocol": protocol, "budget": bakeoff.get("budget"), "arms": {}}
    if not by_method:
        out["note"] = f"no {protocol} rows on test set 'test' in the bake-off's headline"
        return out
    best = max(by_method, key=lambda m: sum(r["ssl"]["mean"] for r in by_method[m].values()) / len(by_method[m]))
    out["best_method"] = best
    for arm, reference_runs in references.items():
        bar = lightly_summary(reference_runs)
        pairing = lightly_pairing(by_method[best], reference_runs, bakeoff, protocol)
        cells = {}
        for fraction, row in sorted(by_method[best].items(), key=lambda item: float(item[0])):
            if fraction not in bar["linear"]:
                continue
            theirs = bar["linear"][fraction]
            cells[fraction] = {
                "ours": {k: row["ssl"].get(k) for k in ("mean", "low", "high")},
                "ours_images_seen": row["images_seen"],
                "lightly": {k: theirs[k] for k in ("mean", "low", "high", "n")},
                "lightly_images_seen": bar["images_seen"]["mean"],
                "ours_minus_lightly": row["ssl"]["mean"] - theirs["mean"],
                "equal_images_seen": bool(row["images_seen"] == bar["images_seen"]["mean"]),
                **({"paired_by_seed": pairing["fractions"][fraction]} if fraction in pairing["fractions"] else {})}
        out["arms"][arm] = {"budget": bar["budget"], "seeds": bar["seeds"], "validation": bar["validation"],
                            "pairing": {"paired": pairing["paired"], "why": pairing["why"]}, "fractions": cells}
    return out


def matching_lightly_runs(runs_root: Path, dataset: str, budget_minutes: float | None, budget_images: int | None,
                          threads: int, validation: str | None) -> dict[str, list[dict[str, Any]]]:
    """Per lightly arm, its runs at this budget read out under the bake-off's ``validation`` rule where they exist,
    else (today's bars, then unpaired) those with full validation; legacy fixed-step runs are left out."""
    out = lightly_reference_runs(runs_root, dataset, budget_minutes, budget_images, threads)
    if validation in lib.VALIDATION_RULES and validation != "full":
        out.update(lightly_reference_runs(runs_root, dataset, budget_minutes, budget_images, threads, validation))
    return {arm: runs for arm, runs in out.items() if not any(run.get("legacy_budget") for run in runs)}


def compare_with_lightly(args: argparse.Namespace, summary_path: Path) -> Path | None:
    """Write ``lightly_comparison.json`` beside a bake-off's ``bakeoff.json`` (and print it) where lightly_bar runs
    exist at the same budget; say so and write nothing where none do."""
    bakeoff = json.loads(summary_path.read_text())
    references = matching_lightly_runs(RESULTS / "runs", args.dataset, args.budget_minutes, args.budget_images,
                                       args.threads, (bakeoff.get("validation") or {}).get("rule"))
    if not references:
        print(f"no benchmarks/lightly_bar.py runs of {args.dataset} at this budget "
              f"({lightly_budget_key(args.budget_minutes, args.budget_images, args.threads)}): run it to compare")
        return None
    comparison = best_vs_lightly_from_bakeoff(bakeoff, references)
    path = summary_path.parent / "lightly_comparison.json"
    write_json(path, comparison)
    for arm, entry in comparison["arms"].items():
        for fraction, cell in entry["fractions"].items():
            print(f"{comparison['best_method']} vs lightly {arm} at {fraction}: {cell['ours']['mean']:.3f} "
                  f"({cell['ours_images_seen']} images) vs {cell['lightly']['mean']:.3f} "
                  f"({cell['lightly_images_seen']:.0f} images)")
    return path


def random_check(rows: dict[str, Any], protocol: str) -> dict[str, Any]:
    """SSL − its own random init at 1 % labels under one read-out, paired by seed: mean and 95 % interval."""
    out: dict[str, Any] = {}
    for method, entry in rows.items():
        gain = entry["gain_over_random"].get(protocol, {}).get("0.01")
        if gain is None:
            continue
        out[method] = {"gain": gain["mean"], "low": gain["low"], "high": gain["high"], "seeds": gain["n"],
                       "beats": gain["mean"] > 0, "confident": gain["low"] > 0}
    return out


def lightly_arms(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each lightly arm's bar in a summary: ``lightly`` (per arm, this script's format), or the single
    ``lightly_example_rerun`` of the committed runs' older summaries (read as the arm ``rerun``)."""
    if summary.get("lightly"):
        return summary["lightly"]
    return {"rerun": summary["lightly_example_rerun"]} if summary.get("lightly_example_rerun") else {}


def minus_lightly(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A method's paired differences to each lightly arm (``minus_lightly_paired``, or the older summaries'
    ``minus_lightly_example_paired`` against the single rerun)."""
    if entry.get("minus_lightly_paired"):
        return entry["minus_lightly_paired"]
    return {"rerun": entry["minus_lightly_example_paired"]} if entry.get("minus_lightly_example_paired") else {}


def stat_points(per_fraction: dict[str, dict[str, float]]) -> list[tuple[float, float, float, float]]:
    return [(float(f), per_fraction[f]["mean"], per_fraction[f]["low"], per_fraction[f]["high"])
            for f in sorted(per_fraction, key=float)]


def curves_figure(record: dict[str, Any], protocols: list[str]) -> EmbeddedFigure:
    """Test AUC per read-out panel: every method (interval over seeds), the first ResNet's random init, and on the
    linear panel each lightly arm (its seeds and images seen in the legend)."""
    rows, arms = record["summary"]["methods"], lightly_arms(record["summary"])
    panels: dict[str, list[Series]] = {}
    for protocol in protocols:
        series = [Series(method, stat_points(entry["ssl"][protocol]))
                  for method, entry in rows.items() if protocol in entry["ssl"]]
        first = next((entry for entry in rows.values() if protocol in entry["random_init"]
                      and entry["backbone"].startswith("resnet")), None)
        if first:
            series.append(Series("random init (ResNet)", stat_points(first["random_init"][protocol]), "k--",
                                 bars=False))
        if protocol == "linear":
            series += [Series(f"lightly {arm} ({len(bar['seeds'])} seeds, {bar['images_seen']['mean']:.0f} images)"
                              if isinstance(bar["images_seen"], dict) else f"lightly {arm} ({len(bar['seeds'])} seeds)",
                              stat_points(bar["linear"]), style)
                       for (arm, bar), style in zip(arms.items(), ("k-.s", "k:s"))]
        panels[f"{PROTOCOL_NAMES.get(protocol, protocol)} read-out"] = series
    interval = record.get("interval", "the 95 % t-interval over seeds")
    return interval_panels(panels, "test AUC", f"Test AUC per read-out: mean over seeds with {interval}; dashed: the "
                           "random init of the first ResNet method; lightly arms on the linear panel.",
                           alt="label-efficiency curves per method")


def stat_cell(stat: dict[str, float], difference: bool = False) -> Cell:
    """Mean [95 % t-interval over seeds] where two or more seeds, else the mean alone."""
    if stat.get("n", 0) >= 2:
        return interval_cell(stat["mean"], stat["low"], stat["high"], difference=difference)
    return Cell(signed(stat["mean"]) if difference else num(stat["mean"]))


def results_table(record: dict[str, Any], protocols: list[str]) -> Table:
    """One row per method: cost, test AUC per read-out and fraction, the gain over random init at 1 %, and the
    paired difference to each lightly arm."""
    rows, arms = record["summary"]["methods"], list(lightly_arms(record["summary"]))
    missing = {"mean": float("nan")}
    fractions, shown = ("0.01", "0.1", "1"), ("1 %", "10 %", "100 %")
    headers = ["method", "backbone", "seeds", "img/s", "images seen", "peak MiB"]
    for protocol in protocols:
        headers += [f"{PROTOCOL_NAMES.get(protocol, protocol)} {f}" for f in shown]
        if protocol != "knn":
            headers.append(f"gain vs random, {PROTOCOL_NAMES.get(protocol, protocol)} 1 %")
    headers += [f"− lightly {arm}, paired, linear {f}" for arm in arms for f in shown]
    body = []
    for method, entry in rows.items():
        cells: list[Cell | str] = [method, entry["backbone"], str(len(entry["seeds"])),
                                   f"{entry['images_per_s']['mean']:.0f}", f"{entry['images_seen']['mean']:.0f}",
                                   "–" if entry.get("peak_rss_mb") is None else f"{entry['peak_rss_mb']:.0f}"]
        for protocol in protocols:
            cells += [stat_cell(entry["ssl"].get(protocol, {}).get(f, missing)) for f in fractions]
            if protocol != "knn":
                cells.append(stat_cell(entry["gain_over_random"].get(protocol, {}).get("0.01", missing), True))
        paired = minus_lightly(entry)
        cells += [stat_cell(paired.get(arm, {}).get(f, missing), True) for arm in arms for f in fractions]
        body.append(cells)
    return Table(headers, body, numeric=range(2, len(headers)))


def render_html(record: dict[str, Any]) -> str:
    """The bake-off's page (radssl's benchmark template): budget, curves, the per-method table, checks, settings."""
    rows = record["summary"]["methods"]
    protocols = [p for p in ("linear", "knn", "finetune") if any(p in entry["ssl"] for entry in rows.values())] \
        or ["linear", "knn"]
    sections = [
        PageSection("methods", "Methods at an equal budget",
                    paragraphs=[Paragraph(record["budget_statement"], "Budget")],
                    tables=[results_table(record, protocols)], fine_print=[record.get("reading", READING)],
                    figures=[curves_figure(record, protocols)]),
        PageSection("checks", "Checks", preformatted=[json.dumps(record["summary"]["checks"], indent=1)]),
        PageSection("settings", "Settings", preformatted=[json.dumps(record["settings"], indent=1)]),
    ]
    return render_benchmark_page(
        title="radssl method bake-off", heading=f"Method bake-off: {record['settings']['dataset']}",
        subtitle="Every method pretrained at one budget, read out beside its random-init twin.", sections=sections,
        machine=record["machine"], versions=record.get("versions"))


READING = ("Cells: mean test AUC over seeds [95 % t-interval over seeds; each seed changes the pretraining run and the "
           "label subsets]. C of the linear probe chosen on the validation split. Random init = each run's own "
           "starting weights. Fine-tune (where run): backbone + linear head trained end to end at each fraction, "
           "backbone LR scale chosen on validation, the same rule for SSL and random init "
           "(bakeoff_lib.finetune_readouts). \"− lightly <arm>, paired\": this method minus lightly's own SimCLR "
           "example (documented, or the strong arm: momentum 0.9, milder views; \"rerun\" in the committed runs: the "
           "documented example rerun with seeds) at the same budget (benchmarks/lightly_bar.py runs; images seen of "
           "each arm in the legend and in the checks), seed by seed, so both sides are read out on the same label "
           "subsets.")


READING_POOLED = ("Cells: mean test AUC over seeds [95 % interval over seeds and test cases, the study's statistics]; "
                  "each seed is its own pretraining run (and its own random twin, seed s) read out on label subset s, "
                  "so the interval includes the pretraining run's variance. Gain vs random: SSL − the same seed's "
                  "random twin, paired by seed. C of the linear probe chosen on the study's validation rows (rule in "
                  "Settings: validation). Lightly arms (runs at the same budget): \"− lightly <arm>, paired\" = this "
                  "method − lightly seed by seed (95 % t over seeds, bounded to [−1, 1]) where lightly's probe chose C "
                  "under the same validation rule and its seeds are the bake-off's (then seed s = the same label and "
                  "validation subsets on both sides); otherwise bars beside the mean, not paired, and the checks' "
                  "pairing says why.")


RULES_POOLED = ("equal budget: every arm (radssl's methods and lightly's arms) gets the same images seen (or "
                "measured wall-clock) with one batch size and the same torch threads — images seen are checked equal "
                "across replicates and against each lightly arm, threads are recorded per arm; choices on validation "
                "only: each method's preset is its paper's default or chosen on validation AUC (its chosen_by in "
                "radssl/presets/methods.yaml), the probe's C on validation rows, test AUC never chooses; seed "
                "variance inside every interval: each seed is its own pretraining run, random twin and label subset, "
                "intervals over seeds and test cases (lightly bars: 95 % t over seeds), bounded to the metric's "
                "range.")


def parse_replicate(text: str) -> tuple[Path, int]:
    """``DIR:SEED`` of ``--combine``: a bake-off output folder and the seed it was pretrained with."""
    directory, colon, seed = text.rpartition(":")
    if not colon or not directory or not seed.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected DIR:SEED (a bake-off output folder and the seed it "
                                         "was pretrained with, e.g. runs/method_bakeoff_breastmnist:0)")
    return Path(directory), int(seed)


def _pooled_stat(stat: dict[str, Any]) -> dict[str, Any]:
    """A pooled headline interval in this page's format (``n``, NaN bounds where there is no interval)."""
    bound = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return {"mean": float(stat["mean"]), "low": bound(stat["low"]), "high": bound(stat["high"]),
            "n": int(stat["n_seeds"]), "interval": stat["interval"], "p_value": stat.get("p_value")}


def methods_from_pooled(pooled: dict[str, Any]) -> dict[str, Any]:
    """The pooled ``bakeoff.json`` (test set ``test``) as this page's per-method rows: cost over the replicates and
    per read-out and fraction the SSL arm, its random twins and the paired gain."""
    rows: dict[str, Any] = {}
    for row in pooled["headline"]:
        if row["test_set"] != "test":
            continue
        arm = pooled["arms"][row["method"]]
        replicates = arm["replicates"]
        entry = rows.setdefault(row["method"], {
            "backbone": arm["backbone"], "seeds": list(pooled["seeds"]),
            **{key: mean_sd_interval([r[key] for r in replicates])
               for key in ("images_seen", "pretrain_wall_s", "final_loss")},
            "images_per_s": mean_sd_interval([r["images_per_s"] for r in replicates]),
            "peak_rss_mb": arm.get("peak_memory_mb"), "ssl": {}, "random_init": {}, "gain_over_random": {}})
        fraction = f"{float(row['label_fraction']):g}"
        for key, side in (("ssl", "ssl"), ("random_init", "random"), ("gain_over_random", "gain_over_random")):
            if row.get(side):
                entry[key].setdefault(row["protocol"], {})[fraction] = _pooled_stat(row[side])
    return rows


def _interval_cell(stat: dict[str, Any] | None, signed_: bool = False) -> str:
    """``mean [low, high]`` of a pooled stat (no brackets where there is no interval); "–" where there is no stat."""
    if not stat:
        return "–"
    text = (signed if signed_ else num)
    bounds = f" [{text(stat['low'])}, {text(stat['high'])}]" if math.isfinite(stat["low"]) else ""
    return text(stat["mean"]) + bounds


def _excludes_zero(stat: dict[str, Any]) -> bool:
    return math.isfinite(stat["low"]) and (stat["low"] > 0 or stat["high"] < 0)


def _table_columns(rows: dict[str, Any]) -> tuple[list[str], list[tuple[str, str]]]:
    """The label fractions and the (read-out, fraction) columns some method has, in read-out then fraction order."""
    fractions = sorted({f for entry in rows.values() for p in entry["ssl"].values() for f in p}, key=float)
    columns = [(p, f) for p in ("linear", "knn", "finetune") for f in fractions
               if any(f in entry["ssl"].get(p, {}) for entry in rows.values())]
    return fractions, columns


def markdown_table(rows: dict[str, Any]) -> str:
    """README-ready: per method images seen, img/s and per read-out and fraction the mean [95 % interval], then one
    random-init row per backbone (each method's twin), so every number of a README table is one this prints."""
    fractions, columns = _table_columns(rows)
    smallest = fractions[0] if fractions else ""
    header = ["method", "images seen", "img/s", *(f"{PROTOCOL_NAMES.get(p, p)} {float(f):.0%}" for p, f in columns),
              f"gain vs random, linear {float(smallest or 0):.0%}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in rows.items():
        lines.append("| " + " | ".join([
            method, f"{entry['images_seen']['mean']:.0f}", f"{entry['images_per_s']['mean']:.0f}",
            *(_interval_cell(entry["ssl"].get(p, {}).get(f)) for p, f in columns),
            _interval_cell(entry["gain_over_random"].get("linear", {}).get(smallest), True)]) + " |")
    twins = {entry["backbone"]: entry["random_init"] for entry in rows.values() if entry.get("random_init")}
    for backbone, random_init in twins.items():
        lines.append("| " + " | ".join([
            f"random init ({backbone})", "0", "–",
            *(_interval_cell(random_init.get(p, {}).get(f)) for p, f in columns), "–"]) + " |")
    return "\n".join(lines)


def gain_table(rows: dict[str, Any]) -> str:
    """README-ready: every method's gain over its own random-init twin, paired by seed, for every read-out and
    fraction (fine-tuning included), bold where the 95 % interval excludes 0."""
    _, columns = _table_columns(rows)
    header = ["method", *(f"gain, {PROTOCOL_NAMES.get(p, p)} {float(f):.0%}" for p, f in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in rows.items():
        cells = []
        for p, f in columns:
            stat = entry["gain_over_random"].get(p, {}).get(f)
            text = _interval_cell(stat, True)
            cells.append(f"**{text}**" if stat and _excludes_zero(stat) else text)
        lines.append("| " + " | ".join([method, *cells]) + " |")
    return "\n".join(lines)


def pair_with_lightly(rows: dict[str, Any], pooled: dict[str, Any],
                      references: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every method's linear read-out minus each lightly arm, paired by seed where :func:`lightly_pairing` finds it
    sound (stored in ``rows[method]['minus_lightly_paired'][arm]``, which the checks and the table read); returns per
    arm whether it was paired and why."""
    by_method = headline_by_method(pooled, "linear")
    out: dict[str, dict[str, Any]] = {}
    for arm, runs in references.items():
        for method, entry in rows.items():
            pairing = lightly_pairing(by_method.get(method, {}), runs, pooled)
            if pairing["paired"]:
                entry.setdefault("minus_lightly_paired", {})[arm] = pairing["fractions"]
            out[arm] = {"paired": pairing["paired"], "why": pairing["why"]}
    return out


def combine_only(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Pool replicate bake-offs (``--combine DIR:SEED …``) into ``benchmarks/results/<stem>.json`` / ``.html``."""
    try:
        pooled = combine_replicates(args.combine)
    except ConfigError as error:
        parser.error(f"--combine: {error}")
    name = (pooled.get("data") or {}).get("name")
    if name not in (None, args.dataset):
        parser.error(f"--combine: the replicates are of '{name}', not --dataset {args.dataset} (the result's name)")
    budget = pooled["budget"]
    minutes = budget["wall_clock_s"] / 60.0 if budget.get("wall_clock_s") else None
    rule = (pooled.get("validation") or {}).get("rule")
    references = matching_lightly_runs(RESULTS / "runs", args.dataset, minutes, budget.get("images_seen"),
                                       budget.get("threads", args.threads), rule)
    bars = {arm: lightly_summary(runs) for arm, runs in references.items()}
    rows = methods_from_pooled(pooled)
    pairings = pair_with_lightly(rows, pooled, references)
    checks = issue_checks(rows, bars) if rows and all("linear" in e["ssl"] for e in rows.values()) else {}
    for arm, check in checks.get("best_vs_lightly", {}).items():
        check["pairing"] = pairings[arm]
    stem = bakeoff_stem(args.dataset, args.tag)
    record = {
        "settings": {"dataset": args.dataset, "seeds": pooled["seeds"], "pretraining_runs": "per_seed",
                     "validation": pooled.get("validation"),
                     "budget": budget, "methods": list(rows), "replicates": pooled["replicates"]},
        "budget_statement": f"{pooled['budget_statement']}; {pooled['pretraining_statement']}.",
        "reading": READING_POOLED, "interval": "its 95 % interval over seeds and test cases",
        "rules": RULES_POOLED,
        "machine": machine(), "versions": package_versions(),
        "summary": {"methods": rows, "checks": checks, "lightly": bars}, "bakeoff": pooled,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{stem}.json", record)
    write_text_atomic(RESULTS / f"{stem}.html", render_html(record))
    print(markdown_table(rows))
    print()
    print(gain_table(rows))
    for arm, pairing in pairings.items():
        print(f"lightly {arm} ({bars[arm]['validation']} validation): {pairing['why']}")
    for flag in pooled["flags"]:
        print(f"FLAG: {flag}")
    print(f"wrote {RESULTS / f'{stem}.json'} and .html")
    return 0


def render_only(args: argparse.Namespace) -> int:
    """Re-render ``benchmarks/results/<stem>.html`` from its committed ``<stem>.json``; the JSON is only read."""
    page = render_from_result(RESULTS / f"{bakeoff_stem(args.dataset, args.tag)}.json", render_html)
    print(f"wrote {page}")
    return 0


def bakeoff_stem(dataset: str, tag: str) -> str:
    """The name of a bake-off's summary files and run folder (a tag keeps a variant's runs apart)."""
    return f"method_bakeoff_{dataset}{('_' + tag) if tag else ''}"


def calibration_file(runs_dir: Path, method: str, budget_key: str) -> Path | None:
    """Committed runs (pre-`radssl bakeoff` format): a method's --calibrate-only file, else its lowest finished seed's
    run, else none — where that bake-off took a method's steps from."""
    calibration = runs_dir / f"{method}_calibration_{budget_key}.json"
    if calibration.is_file():
        return calibration
    runs = sorted(runs_dir.glob(f"{method}_seed*_{budget_key}.json"),
                  key=lambda path: int(path.name[len(method) + 5:].split("_")[0]))
    return runs[0] if runs else None


def threads_text(runs: list[dict[str, Any]], default: int) -> str:
    """The torch threads the runs really used (cached runs may differ from this invocation's ``--threads``)."""
    used = sorted({int(run.get("machine", {}).get("torch_threads", default)) for run in runs}) or [default]
    return f"{'/'.join(map(str, used))} torch threads per run (a run's steps come from its calibration, not its speed)"


def bakeoff_config(args: argparse.Namespace) -> BakeoffConfig:
    """The ``radssl bakeoff`` config of this benchmark's flags: MedMNIST ``--dataset``, one budget, linear + kNN
    (+ fine-tuning) read-outs at 1 / 10 / 100 % labels, every method that fits (or ``--methods``)."""
    stem = bakeoff_stem(args.dataset, args.tag)
    budget = ({"wall_clock_s": args.budget_minutes * 60.0, "threads": args.threads} if args.budget_minutes
              else {"images_seen": args.budget_images})
    train = {"batch_size": args.batch_size, "devices": 1, "progress_bar": False, "log_every": 5}
    if not args.budget_minutes:
        train["threads"] = args.threads
    model = {"backbone": args.backbone}
    if args.backbone.startswith("resnet"):
        model["small_input"] = args.stem == "small"
    protocols: dict[str, Any] = {"linear": {}, "knn": {"k": 20}}
    if args.finetune_epochs:  # the fine-tuning read-out of bakeoff_lib: backbone LR scale chosen on validation
        protocols["finetune"] = {"epochs": args.finetune_epochs, "min_epochs": args.finetune_epochs,
                                 "backbone_lr_scale": list(lib.FINETUNE_BACKBONE_LR_SCALES)}
    data: dict[str, Any] = {"source": "medmnist", "name": args.dataset, "size": args.size, "download": False}
    if args.data_root:
        data["root"] = args.data_root
    return BakeoffConfig.model_validate({
        "name": stem, "seed": args.pretrain_seed, "output_dir": str(args.output_dir or Path("runs") / stem),
        "data": data, "model": model, "methods": args.methods or None, "budget": budget,
        "calibration": {"warmup_steps": args.calibration_warmup, "steps": args.calibration_steps},
        "train": train, "label_fractions": list(lib.FRACTIONS), "seeds": args.seeds, "protocols": protocols,
        "pretraining_runs": getattr(args, "pretraining_runs", "shared"),
    })


def summarise_cached(args: argparse.Namespace, methods: list[str]) -> int:
    """Summarise the committed per-run results (``benchmarks/results/runs/<stem>/``, the pre-``radssl bakeoff``
    format the README quotes) into ``benchmarks/results/<stem>.json`` / ``.html``; runs nothing."""
    stem = bakeoff_stem(args.dataset, args.tag)
    runs_dir = RESULTS / "runs" / stem
    budget_key = f"{args.budget_minutes}min" if args.budget_minutes else f"{args.budget_images}img"
    runs = [json.loads(path.read_text()) for method in methods for seed in args.seeds
            for path in [runs_dir / f"{method}_seed{seed}_{budget_key}.json"] if path.is_file()]
    references = lightly_reference_runs(RESULTS / "runs", args.dataset, args.budget_minutes, args.budget_images,
                                        args.threads)
    budget = (f"{args.budget_minutes:g} wall-clock minutes of pretraining per run (steps set from a calibration of "
              f"each method's img/s here, by its first seed or a --calibrate-only pass on a quiet machine; its "
              f"seeds reuse those steps)"
              if args.budget_minutes else f"{args.budget_images} images seen per run")
    record = {
        "settings": {"dataset": args.dataset, "size": args.size, "backbone": args.backbone, "stem": args.stem,
                     "batch_size": args.batch_size, "threads": args.threads, "seeds": args.seeds,
                     "budget_minutes": args.budget_minutes, "budget_images": args.budget_images,
                     "methods": methods},
        "budget_statement": f"Equal budget for every method: {budget}, batch {args.batch_size}, "
                            f"{threads_text(runs, args.threads)}; presets as shipped; linear probe C chosen on "
                            f"validation.",
        "machine": machine(),
        "versions": package_versions(),
        "summary": summarise(runs, references),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{stem}.json", record)
    write_text_atomic(RESULTS / f"{stem}.html", render_html(record))
    for method, entry in record["summary"]["methods"].items():
        linear = entry["ssl"]["linear"]
        print(f"{method:<16} {entry['backbone'][:40]:<42} "
              + " ".join(f"{linear[f]['mean']:.3f}" for f in sorted(linear, key=float))
              + f"  ({entry['images_per_s']['mean']:.0f} img/s)")
    print(json.dumps(record["summary"]["checks"], indent=1))
    seeds = {method: len(entry["seeds"]) for method, entry in record["summary"]["methods"].items()}
    print("seeds per method: " + ", ".join(f"{method} {count}" for method, count in seeds.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lib.add_data_model_arguments(parser)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-images", type=int, help="images seen per method (the primary rule)")
    budget.add_argument("--budget-minutes", type=float, help="measured wall-clock pretraining minutes per method")
    parser.add_argument("--calibration-warmup", type=int, default=5, help="wall-clock budgets: untimed steps")
    parser.add_argument("--calibration-steps", type=int, default=20, help="wall-clock budgets: timed steps (median)")
    parser.add_argument("--methods", nargs="*", help="default: every registered method that fits the data")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--pretrain-seed", type=int, default=0, help="seed of every pretraining run")
    parser.add_argument("--pretraining-runs", choices=["shared", "per_seed"], default="shared",
                        help="shared: each method pretrains once (--pretrain-seed); per_seed: each of --seeds is its "
                             "own pretraining run and random twin, pooled so intervals include pretraining variance")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="also fine-tune every encoder for this many epochs (backbone LR chosen on validation)")
    parser.add_argument("--tag", default="", help="suffix of the bake-off's name (e.g. a budget name)")
    parser.add_argument("--output-dir", type=Path, help="default: runs/<method_bakeoff_dataset[_tag]>")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="only select the methods and calibrate a wall-clock budget's steps (run this on a quiet "
                             "machine; the real run reuses the stored calibration from the same --output-dir)")
    parser.add_argument("--compare-only", action="store_true",
                        help="only compare a finished bake-off's bakeoff.json (in --output-dir) with the lightly_bar "
                             "runs at the same budget (writes lightly_comparison.json beside it)")
    parser.add_argument("--cached-only", action="store_true",
                        help="summarise the committed per-run results under benchmarks/results/runs (the format "
                             "before `radssl bakeoff`), run nothing")
    parser.add_argument("--render-only", action="store_true",
                        help="only re-render benchmarks/results/method_bakeoff_<dataset>[_<tag>].html from its "
                             "committed JSON (read, never written); needs no budget")
    parser.add_argument("--combine", nargs="+", type=parse_replicate, metavar="DIR:SEED",
                        help="pool bake-offs run one per pretraining seed (each folder's cells of that seed only) "
                             "into benchmarks/results/<stem>.json/.html; runs nothing, needs no budget")
    args = parser.parse_args(argv)
    if args.render_only:
        return render_only(args)
    if args.combine:
        return combine_only(args, parser)
    if not args.budget_minutes and not args.budget_images:
        parser.error("state one budget: --budget-images N (equal images seen, the primary rule) or --budget-minutes M "
                     "(equal measured wall-clock with --threads)")
    if args.cached_only:
        return summarise_cached(args, args.methods or default_methods())
    if args.compare_only:
        path = Path(bakeoff_config(args).output_dir) / SUMMARY_FILE
        if not path.is_file():
            parser.error(f"--compare-only: {path} does not exist; run the bake-off first (same --output-dir)")
        compare_with_lightly(args, path)
        return 0

    if args.calibrate_only:
        print("\n".join(plan_lines(plan_bakeoff(bakeoff_config(args)))))
        return 0
    path = run_bakeoff(bakeoff_config(args))
    summary = json.loads(path.read_text())
    print(f"bake-off summary: {path}")
    for report in summary["reports"].values():
        print(f"report: {report}")
    compare_with_lightly(args, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
