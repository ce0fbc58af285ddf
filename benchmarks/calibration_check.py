"""Does a wall-clock calibration miss its run, or does the machine move between them? (issue 19 point 2)

A wall-clock bake-off (``method_bakeoff.py --budget-minutes M``) calibrates every method once, then runs each one
minutes to an hour later; on the 2-core CPU some arms then ran 10–21 % off their budget. This script separates the
two explanations. For each method and repeat it calibrates the arm exactly as the bake-off does and, with no time
between, pretrains it for the steps that calibration gives (:func:`radssl.study.bakeoff.check_calibration`),
measuring the run's wall-clock as the bake-off does. A calibration that measured the wrong loop misses here too;
a machine whose speed drifts misses only with a lag. ``--lagged BAKEOFF_JSON`` sets the per-seed deviations of a
finished wall-clock bake-off (calibrated once, run later) beside the immediate ones, and what steps set from the
previous replicate's measured run rate would have given (identical runs minutes apart: the noise floor no
calibration gets under).

Writes ``benchmarks/results/calibration_check_<dataset>.json``.

Usage:
  RADSSL_DATA_DIR=… python benchmarks/calibration_check.py --dataset breastmnist --budget-minutes 1.5 \\
      --methods moco_v3 models_genesis simclr --repeats 1 \\
      --lagged benchmarks/results/method_bakeoff_breastmnist_1.5min.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bakeoff_lib import add_data_model_arguments
from common import machine, write_json
from method_bakeoff import bakeoff_config

from radssl.data.build import build_store
from radssl.study.bakeoff import check_calibration, select_methods

RESULTS = Path(__file__).parent / "results"


def cpu_steal_s() -> float | None:
    """Seconds this virtual machine's CPUs have waited for the host (``steal`` in ``/proc/stat``), None off Linux:
    a host that lends the cores elsewhere shows here, and would slow every arm without any code changing."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def summarise_checks(records: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Per method and overall: mean and largest |deviation| of run wall-clock from the budget, and how many runs
    were off by more than ``tolerance``."""
    def block(rows: list[dict[str, Any]]) -> dict[str, Any]:
        deviations = [float(r["deviation"]) for r in rows]
        return {"runs": len(rows), "mean_deviation": statistics.fmean(deviations),
                "mean_abs_deviation": statistics.fmean(abs(d) for d in deviations),
                "max_abs_deviation": max(abs(d) for d in deviations),
                "flagged": sum(abs(d) > tolerance for d in deviations)}

    if not records:
        raise ValueError("no calibration checks to summarise")
    methods = sorted({r["method"] for r in records})
    return {"tolerance": tolerance, "overall": block(records),
            "per_method": {m: block([r for r in records if r["method"] == m]) for m in methods}}


def lagged_deviations(bakeoff: dict[str, Any], methods: list[str] | None = None) -> list[dict[str, Any]]:
    """Each replicate's deviation from a pooled wall-clock bake-off JSON (calibrated once, run later), as records
    :func:`summarise_checks` reads."""
    arms = bakeoff.get("bakeoff", bakeoff)["arms"]
    out = []
    for method, arm in sorted(arms.items()):
        if methods and method not in methods:
            continue
        for replicate in arm.get("replicates") or [arm]:
            if replicate.get("wall_clock_deviation") is None:
                continue
            out.append({"method": method, "pretraining_seed": replicate.get("pretraining_seed"),
                        "calibrated_images_per_s": replicate.get("calibrated_images_per_s"),
                        "run_images_per_s": replicate.get("images_per_s"),
                        "deviation": float(replicate["wall_clock_deviation"])})
    if not out:
        raise ValueError("the bake-off record holds no wall-clock deviations (was it run with --budget-minutes?)")
    return out


def previous_replicate_deviations(bakeoff: dict[str, Any], methods: list[str] | None = None
                                  ) -> list[dict[str, Any]]:
    """What the proposed fix would have given, read from a finished per-seed wall-clock bake-off: each replicate's
    steps set from the PREVIOUS replicate's measured run rate (the run's own loop, in the run's own process). Its
    wall-clock would have been ``budget × previous rate / this rate``, so the deviation is their ratio − 1 (steps
    rounding left out). Where identical runs minutes apart differ by more than the tolerance, no calibration of
    any length can hold every arm to it."""
    arms = bakeoff.get("bakeoff", bakeoff)["arms"]
    out = []
    for method, arm in sorted(arms.items()):
        if methods and method not in methods:
            continue
        replicates = [r for r in arm.get("replicates") or [] if r.get("images_per_s")]
        for previous, current in zip(replicates, replicates[1:], strict=False):
            out.append({"method": method, "pretraining_seed": current.get("pretraining_seed"),
                        "predicted_from_seed": previous.get("pretraining_seed"),
                        "previous_images_per_s": previous["images_per_s"],
                        "run_images_per_s": current["images_per_s"],
                        "deviation": float(previous["images_per_s"]) / float(current["images_per_s"]) - 1.0})
    if not out:
        raise ValueError("the bake-off record holds fewer than two replicates with measured rates")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_model_arguments(parser)
    parser.add_argument("--budget-minutes", type=float, required=True)
    parser.add_argument("--calibration-warmup", type=int, default=5)
    parser.add_argument("--calibration-steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lagged", type=Path, help="a pooled wall-clock bake-off JSON to compare with")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    lagged = previous = None
    if args.lagged:  # read before compute: a wrong path fails now, not after the runs
        pooled = json.loads(args.lagged.read_text())
        lagged = lagged_deviations(pooled, args.methods)
        previous = previous_replicate_deviations(pooled, args.methods)
    settings = argparse.Namespace(**vars(args), budget_images=None, tag="calibration_check", finetune_epochs=0,
                                  pretrain_seed=args.seed, output_dir=None, seeds=[args.seed],
                                  pretraining_runs="shared")
    config = bakeoff_config(settings)
    store = build_store(config.data)
    import torch

    torch.set_num_threads(args.threads)
    arms, excluded = select_methods(config, store)
    if excluded:
        parser.error(f"left out, they do not fit the data: {excluded}")
    records = []
    for repeat in range(args.repeats):
        for method, arm in arms.items():
            steal_before = cpu_steal_s()
            record = {**check_calibration(config, arm, store), "repeat": repeat}
            steal_after = cpu_steal_s()
            record["cpu_steal_s"] = None if steal_before is None or steal_after is None else steal_after - steal_before
            records.append(record)
            print(f"{method:<15} calibrated {record['calibrated_images_per_s']:.1f} img/s → {record['steps']} steps; "
                  f"ran {record['run_wall_s']:.1f} s at {record['run_images_per_s']:.1f} img/s "
                  f"({record['deviation']:+.1%})", flush=True)
    tolerance = config.wall_clock_tolerance
    result: dict[str, Any] = {
        "what": "calibration then an immediate run of the calibrated steps, per method and repeat",
        "dataset": args.dataset, "budget_s": config.budget.wall_clock_s, "threads": args.threads,
        "batch_size": args.batch_size, "backbone": args.backbone, "stem": args.stem,
        "calibration": config.calibration.model_dump(mode="json"), "records": records,
        "immediate": summarise_checks(records, tolerance), "machine": machine(),
    }
    if lagged is not None:
        result["lagged"] = {"source": str(args.lagged), "records": lagged,
                            "summary": summarise_checks(lagged, tolerance)}
        result["previous_replicate"] = {"source": str(args.lagged), "records": previous,
                                        "summary": summarise_checks(previous, tolerance)}
    path = args.output or RESULTS / f"calibration_check_{args.dataset}.json"
    write_json(path, result)
    summary = result["immediate"]["overall"]
    print(f"immediate: mean |deviation| {summary['mean_abs_deviation']:.1%}, {summary['flagged']}/{summary['runs']} "
          f"beyond ±{tolerance:.0%}; written to {path}")
    if lagged is not None:
        summary = result["lagged"]["summary"]["overall"]
        print(f"lagged ({args.lagged.name}): mean |deviation| {summary['mean_abs_deviation']:.1%}, "
              f"{summary['flagged']}/{summary['runs']} beyond ±{tolerance:.0%}")
        summary = result["previous_replicate"]["summary"]["overall"]
        print(f"steps from the previous replicate's measured rate: mean |deviation| "
              f"{summary['mean_abs_deviation']:.1%}, {summary['flagged']}/{summary['runs']} beyond ±{tolerance:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
