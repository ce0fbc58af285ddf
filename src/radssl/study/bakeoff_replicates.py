"""Per-seed pretraining replicates of a bake-off, pooled: intervals that include the pretraining run's variance.

A ``shared`` bake-off pretrains each method once, so its seeds vary only the label subsets and the read-outs; the
largest source of variance in SSL — which pretraining run you got — is outside its intervals. Here every seed ``s``
is its own replicate bake-off (``seed = s`` for the pretraining runs and the random twins, ``seeds = [s]``) in
``<output_dir>/pretrain_seed<s>/``, and :func:`combine_replicates` pools them: for each (method, protocol, test set,
fraction) one row per seed from its replicate's results store, the study's "seeds + test cases" interval over those
per-seed scores, and SSL − random paired by seed (each replicate's own random twin on the same label subset).

:func:`combine_replicates` also pools bake-offs run separately (``benchmarks/method_bakeoff.py --pretrain-seed s``,
each in its own output folder, possibly with extra label seeds): from each it takes only the cells of the seed it was
pretrained with, and refuses replicates that are not comparable (budget, methods, images seen, label fractions,
protocols or data differ; a folder without that seed, or pretrained with another) with an error naming the folder.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radssl.atomic import write_text_atomic
from radssl.data.build import build_store
from radssl.errors import ConfigError
from radssl.provenance import package_versions
from radssl.study.bakeoff import (
    CALIBRATION_FILE,
    SUMMARY_FILE,
    BakeoffConfig,
    CellSource,
    headline,
    run_one_bakeoff,
)
from radssl.study.config import legacy_study_settings
from radssl.study.plan import LABEL_FREE_FRACTION, Log, print_log
from radssl.study.results_store import ResultsStore
from radssl.study.runner import REPORT_DIR, RESULTS_FILE

__all__ = ["run_bakeoff", "replicate_dir", "replicate_config", "run_replicates", "combine_replicates",
           "PRETRAINING_STATEMENT"]

PRETRAINING_STATEMENT = ("each seed its own pretraining run: replicate s pretrains every method and initialises its "
                         "random twin with seed s and reads out on label subset s, so the intervals over seeds and "
                         "test cases include the pretraining run's variance")


def run_bakeoff(config: BakeoffConfig, log: Log = print_log, store: Any = None) -> Path:
    """``radssl bakeoff``'s entry point: one bake-off (each method pretrained once) for ``pretraining_runs: shared``,
    one replicate per seed pooled for ``per_seed``; returns the path of ``<output_dir>/bakeoff.json``. It lives here,
    beside the replicates, so that imports run one way (bakeoff → bakeoff_replicates)."""
    if config.pretraining_runs == "per_seed":
        return run_replicates(config, log, store)
    return run_one_bakeoff(config, log, store)


def replicate_dir(output_dir: Path | str, seed: int) -> Path:
    """Where the replicate of pretraining seed ``seed`` lives inside a per-seed bake-off's output folder."""
    return Path(output_dir) / f"pretrain_seed{seed}"


def replicate_config(config: BakeoffConfig, seed: int) -> BakeoffConfig:
    """The replicate bake-off of one seed: the same config with ``seed = s`` (pretraining runs and random twins),
    ``seeds = [s]`` and its own output folder; itself a ``shared`` bake-off (one pretraining run per method)."""
    raw = config.model_dump(mode="json")
    raw.update(seed=int(seed), seeds=[int(seed)], output_dir=str(replicate_dir(config.output_dir, seed)),
               pretraining_runs="shared")
    return BakeoffConfig.model_validate(raw)


def run_replicates(config: BakeoffConfig, log: Log = print_log, store: Any = None) -> Path:
    """Run one replicate bake-off per seed (each resumable, with its own studies and reports) and write the pooled
    ``<output_dir>/bakeoff.json``; returns its path. A wall-clock budget is calibrated once, in the parent's
    ``calibration.json``, and every replicate reuses it: the same steps for every replicate of a method."""
    if store is None:
        store = build_store(config.data)
    calibration = Path(config.output_dir) / CALIBRATION_FILE
    done: list[tuple[Path, int]] = []
    for seed in config.seeds:
        replicate = replicate_config(config, seed)
        log(f"radssl bakeoff: replicate of pretraining seed {seed} in {replicate.output_dir}")
        run_one_bakeoff(replicate, log, store, calibration)
        done.append((Path(replicate.output_dir), seed))
    summary = combine_replicates(done, n_boot=config.bootstrap_samples, strict=False, name=config.name)
    path = Path(config.output_dir) / SUMMARY_FILE
    write_text_atomic(path, json.dumps(summary, indent=2, default=float))
    log(f"radssl bakeoff: {len(done)} replicates pooled ({PRETRAINING_STATEMENT}) in {path}")
    for flag in summary["flags"]:
        log(f"radssl bakeoff: FLAG: {flag}")
    return path


# --------------------------------------------------------------------------------------------- reading
@dataclass
class Replicate:
    """One replicate bake-off as read back: its summary, and per backbone group the cells to pool."""

    directory: Path
    seed: int
    summary: dict[str, Any]
    sources: dict[str, CellSource] = field(default_factory=dict)
    study_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method, the engine's ``run.json`` of its pretraining run."""

    @property
    def label(self) -> str:
        return f"{self.directory} (pretraining seed {self.seed})"


def _refuse(directory: Path, problem: str) -> ConfigError:
    return ConfigError(f"{directory}: {problem}")


def _results_path(directory: Path, summary: dict[str, Any], group: str) -> Path:
    """A group's results store: ``<dir>/<group>/results.sqlite`` (the layout; the summary's recorded path may be
    relative to wherever the bake-off was started)."""
    for candidate in (directory / group / RESULTS_FILE, Path(summary.get("studies", {}).get(group, "")) / RESULTS_FILE):
        if candidate.is_file():
            return candidate
    raise _refuse(directory, f"no results store for study group '{group}' ({directory / group / RESULTS_FILE})")


def _run_json(directory: Path, group: str, method: str, checkpoint: str | None) -> dict[str, Any]:
    """A method's ``run.json`` (``<dir>/<group>/pretraining/<method>/run.json``, else beside its checkpoint)."""
    for path in (directory / group / "pretraining" / method / "run.json",
                 Path(checkpoint).parent.parent / "run.json" if checkpoint else None):
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return {}


def _read_group(replicate: Replicate, group: str, study: str) -> None:
    """Check one group's study of a replicate (pretrained with the replicate's seed, holds cells of that seed) and
    record its cell source, saved study config and its methods' run records."""
    directory, seed = replicate.directory, replicate.seed
    path = _results_path(directory, replicate.summary, group)
    with ResultsStore(path) as results:
        saved = results.study_config(study) or {}
        seeds = {r["seed"] for r in results.cells(study)
                 if r["value"] is not None and float(r["label_fraction"]) != LABEL_FREE_FRACTION}
        runs = {r["run_name"]: r for r in results.pretrain_runs(study)}
    if saved.get("seed", seed) != seed:
        raise _refuse(directory, f"study '{study}' was pretrained with seed {saved['seed']}, not {seed}")
    if seed not in seeds:
        raise _refuse(directory, f"study '{study}' has no cells of seed {seed} (it has seeds {sorted(seeds)})")
    replicate.sources[group] = CellSource(path, study, (seed,), seed)
    replicate.study_configs[group] = saved
    for method, arm in replicate.summary["arms"].items():
        if arm.get("group") != group:
            continue
        record = _run_json(directory, group, method, runs.get(method, {}).get("checkpoint"))
        if record.get("seed", seed) != seed:
            raise _refuse(directory, f"method '{method}' was pretrained with seed {record['seed']}, not {seed}")
        replicate.runs[method] = record


def read_replicate(directory: Path | str, seed: int) -> Replicate:
    """A finished bake-off folder read as the replicate of pretraining seed ``seed`` (errors name the folder)."""
    directory = Path(directory)
    path = directory / SUMMARY_FILE
    if not path.is_file():
        raise _refuse(directory, f"no {SUMMARY_FILE}: not a finished bake-off output folder")
    summary = json.loads(path.read_text())
    if summary.get("pretraining_runs") == "per_seed":
        raise _refuse(directory, "is itself a pooled per-seed bake-off: pass its pretrain_seed<s> folders")
    if summary.get("seed", seed) != seed:
        raise _refuse(directory, f"was pretrained with seed {summary['seed']}, not {seed}")
    replicate = Replicate(directory, int(seed), summary)
    studies = {arm["group"]: arm["study"] for arm in summary["arms"].values()}
    for group, study in studies.items():
        _read_group(replicate, group, study)
    return replicate


# --------------------------------------------------------------------------------------------- pooling
def validation_rule(replicate: Replicate) -> dict[str, Any]:
    """The rule that chose the read-outs' hyperparameters in a replicate's studies (``validation``, with its floor
    where proportional); a config saved before the field existed selected on the full split."""
    rules = {(s["validation"], s["validation_min_per_class"] if s["validation"] == "proportional" else None)
             for s in map(legacy_study_settings, replicate.study_configs.values())}
    if len(rules) != 1:  # none read (no study config) or groups that disagree: no single rule to pair with
        return {"rule": "mixed" if rules else None, "min_per_class": None, "per_group": sorted(rules, key=str)}
    rule, floor = next(iter(rules))
    return {"rule": rule, "min_per_class": floor}


def _comparable(replicate: Replicate) -> dict[str, Any]:
    """What must be equal in every replicate for the pooled intervals to compare like with like."""
    first_config = next(iter(replicate.study_configs.values()), {})
    return {
        "budget": replicate.summary.get("budget"),
        "methods": sorted(replicate.summary["arms"]),
        "images seen per method": {m: a.get("images_seen") for m, a in sorted(replicate.summary["arms"].items())},
        "label fractions": sorted(float(f) for f in first_config.get("label_fractions", [])),
        "validation rule": validation_rule(replicate),
        "protocols": {g: c.get("protocols") for g, c in sorted(replicate.study_configs.items())},
        "data fingerprint": sorted({r["data_fingerprint"] for r in replicate.runs.values()
                                    if r.get("data_fingerprint")}),
    }


def replicate_mismatches(replicates: list[Replicate]) -> list[str]:
    """Every way a replicate differs from the first (each naming both folders), empty when they can be pooled."""
    first = _comparable(replicates[0])
    problems = []
    for replicate in replicates[1:]:
        theirs = _comparable(replicate)
        problems += [f"{replicate.label} differs from {replicates[0].label} in {what}: {theirs[what]} vs {value}"
                     for what, value in first.items() if theirs[what] != value]
    return problems


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if v is not None]
    return statistics.fmean(finite) if finite else None


def pooled_arms(replicates: list[Replicate]) -> dict[str, dict[str, Any]]:
    """Per method: the first replicate's arm record, with images seen (None where the replicates differ), mean
    pretraining wall-clock and img/s, and each replicate's own numbers under ``replicates``."""
    arms: dict[str, dict[str, Any]] = {}
    for method, base in replicates[0].summary["arms"].items():
        per = []
        for replicate in replicates:
            arm = replicate.summary["arms"].get(method, {})
            per.append({"pretraining_seed": replicate.seed, "directory": str(replicate.directory),
                        **{k: arm.get(k) for k in ("steps", "images_seen", "pretrain_wall_s", "images_per_s",
                                                   "calibrated_images_per_s", "final_loss", "wall_clock_deviation",
                                                   "wall_clock_flagged")}})
        images = {p["images_seen"] for p in per}
        arms[method] = {
            **{k: v for k, v in base.items() if k not in ("wall_clock_deviation", "wall_clock_flagged")},
            "images_seen": next(iter(images)) if len(images) == 1 else None, "images_seen_equal": len(images) == 1,
            "steps": base.get("steps") if len({p["steps"] for p in per}) == 1 else None,
            "pretrain_wall_s": _mean([p["pretrain_wall_s"] for p in per]),
            "images_per_s": _mean([p["images_per_s"] for p in per]),
            "final_loss": _mean([p["final_loss"] for p in per]),
            "wall_clock_flagged": any(bool(p["wall_clock_flagged"]) for p in per),
            "pretraining_runs": "per_seed", "replicates": per,
        }
    return arms


def combine_replicates(replicates: list[tuple[Path | str, int]], n_boot: int | None = None, strict: bool = True,
                       name: str | None = None) -> dict[str, Any]:
    """The pooled ``bakeoff.json`` record of replicate bake-offs, one per pretraining seed.

    ``replicates``: (bake-off output folder, the seed it was pretrained with); from each folder only the cells of that
    seed enter (a folder may hold extra label seeds of a wider run). ``strict``: refuse replicates that are not
    comparable (ConfigError naming the folders); otherwise they are pooled and each difference is flagged.
    """
    if not replicates:
        raise ConfigError("combine_replicates: no replicates given (pass DIR:SEED pairs)")
    seeds = [int(seed) for _, seed in replicates]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"combine_replicates: pretraining seeds repeat ({seeds}); each replicate needs its own")
    read = [read_replicate(directory, seed) for directory, seed in replicates]
    problems = replicate_mismatches(read)
    if strict and problems:
        raise ConfigError("cannot pool these replicates: " + "; ".join(problems))
    first = read[0]
    n_boot = n_boot or int(next(iter(first.study_configs.values()), {}).get("bootstrap_samples") or 1000)
    arms = pooled_arms(read)
    rows: list[dict[str, Any]] = []
    for group in first.sources:
        members = {m: a for m, a in arms.items() if a["group"] == group}
        rows += headline([r.sources[group] for r in read], members, n_boot)
    flags = [f"unequal replicates: {p}" for p in problems]
    flags += [f"pretraining seed {r.seed}: {flag}" for r in read for flag in r.summary.get("flags", [])]
    at = {f"{group} (pretraining seed {r.seed})": r.sources[group].results_path.parent for r in read
          for group in r.sources}
    return {
        "name": name or first.summary["name"], "seeds": seeds, "pretraining_runs": "per_seed",
        "pretraining_statement": PRETRAINING_STATEMENT, "budget": first.summary["budget"],
        "data": next(iter(first.study_configs.values()), {}).get("data"), "validation": validation_rule(first),
        "budget_statement": first.summary["budget_statement"], "selection": first.summary.get("selection"),
        "seeds_note": f"each seed its own pretraining run (seeds {seeds}): replicate s pretrains every method and its "
                      "random twin with seed s and reads out on label subset s only",
        "arms": arms, "wall_clock": {str(r.seed): r.summary.get("wall_clock", {}) for r in read}, "flags": flags,
        "headline": rows, "reports": {k: str(v / REPORT_DIR / "report.html") for k, v in at.items()},
        "studies": {k: str(v) for k, v in at.items()},
        "replicates": [{"pretraining_seed": r.seed, "directory": str(r.directory),
                        "summary": str(r.directory / SUMMARY_FILE)} for r in read],
        "notes": first.summary.get("notes", []), "versions": package_versions(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
