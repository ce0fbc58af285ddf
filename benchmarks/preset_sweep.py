"""Preset sweep: choose a method's radiology preset on VALIDATION data only, at a stated CPU budget.

Each candidate is a set of config overrides (``views.*``, ``optim.*``, ``method.*``) on top of the method's current
preset. Every candidate is pretrained at the same budget (wall-clock minutes on this machine, or images seen) with
the same backbone, batch and seed(s), then read out by a frozen-feature linear probe whose C is chosen on the
validation split. The selection score is the candidate's mean *validation* AUC over the label fractions
(1 / 10 / 100 %) and seeds; test AUC is recorded too but never used to choose. The winner is what the method's
``preset`` should hold for that budget class; the JSON says which values were chosen and from what.

Candidates come from a JSON file: ``{"method": "simclr", "candidates": {"name": ["key=value", ...], ...}}``
(see ``benchmarks/sweeps/``). Runs are cached per candidate and seed, so a killed sweep resumes.

Usage:
  RADSSL_DATA_DIR=… python benchmarks/preset_sweep.py benchmarks/sweeps/simclr.json --dataset breastmnist \
      --budget-minutes 2 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import bakeoff_lib as lib

from radssl.atomic import write_text_atomic
from radssl.provenance import package_versions

RESULTS = Path(__file__).parent / "results"


def score(run: dict[str, Any], split: str) -> float:
    key = "val_auc" if split == "val" else "test_auc"
    values = [entry[key] for entry in run["ssl"]["linear"].values()]
    return float(sum(values) / len(values))


def decide(scored: dict[str, Any], winner: str | None, margin: float) -> dict[str, Any]:
    """Whether the sweep changes the shipped preset.

    A margin fixed in the sweep file before running (``min_val_gain_to_change``) guards against adopting noise: the
    preset changes only if the winner beats the candidate named "preset" (the shipped one) by more than it. A sweep
    without a "preset" candidate has nothing to compare with, and its winner is adopted.
    """
    baseline = scored.get("preset")
    gain = scored[winner]["val_score"]["mean"] - baseline["val_score"]["mean"] if winner and baseline else None
    return {"min_val_gain_to_change": margin, "winner_gain_over_preset": gain,
            "change_preset": bool(winner and winner != "preset" and (gain is None or gain > margin))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", type=Path, nargs="?")
    lib.add_common_arguments(parser)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    args = parser.parse_args(argv)
    if args.child:
        return lib.child_main(args)
    spec = json.loads(args.candidates.read_text())
    method = spec["method"]
    if not args.budget_minutes and not args.budget_images:
        parser.error("give --budget-minutes or --budget-images")
    budget_key = f"{args.budget_minutes:g}min" if args.budget_minutes else f"{args.budget_images}img"
    stem = f"preset_sweep_{method}_{args.dataset}_{budget_key}"
    # Runs are cached per (method, dataset, budget, candidate name, seed), shared by every sweep file of that method:
    # a follow-up file (its "tag" names its summary) adds seeds to a few candidates without rerunning the others.
    summary_stem = f"{stem}_{spec['tag']}" if spec.get("tag") else stem
    results: dict[str, Any] = {}
    for name, overrides in spec["candidates"].items():
        runs = []
        for seed in args.seeds:
            args.method = method
            out = RESULTS / "runs" / stem / f"{name}_seed{seed}.json"
            if out.is_file() and json.loads(out.read_text()).get("overrides") != list(overrides):
                raise SystemExit(f"{out}: cached run of candidate {name!r} has other overrides than "
                                 f"{args.candidates}; rename the candidate or delete the stale run")
            run = lib.run_in_child(Path(__file__), args, method, seed, out, list(overrides))
            if run is not None:
                runs.append(run)
        if not runs:
            results[name] = {"overrides": overrides, "failed": True}
            continue
        results[name] = {
            "overrides": overrides,
            "val_score": lib.mean_sd_interval([score(r, "val") for r in runs]),
            "test_score_not_used_for_selection": lib.mean_sd_interval([score(r, "test") for r in runs]),
            "images_seen": lib.mean_sd_interval([r["images_seen"] for r in runs]),
            "images_per_s": lib.mean_sd_interval([r["pretrain_images_per_s"] for r in runs]),
            "final_loss": lib.mean_sd_interval([r["final_loss"] for r in runs]),
            "linear_val_auc_by_fraction": {f: [r["ssl"]["linear"][f]["val_auc"] for r in runs]
                                           for f in runs[0]["ssl"]["linear"]},
        }
    scored = {n: r for n, r in results.items() if not r.get("failed")}
    winner = max(scored, key=lambda n: scored[n]["val_score"]["mean"]) if scored else None
    decision = decide(scored, winner, float(spec.get("min_val_gain_to_change", 0.0)))
    margin, gain = decision["min_val_gain_to_change"], decision["winner_gain_over_preset"]
    record = {
        "method": method, "dataset": args.dataset,
        "budget": {"minutes": args.budget_minutes, "images": args.budget_images},
        "settings": {"backbone": args.backbone, "stem": args.stem, "size": args.size, "batch_size": args.batch_size,
                     "threads": args.threads, "seeds": args.seeds},
        "selection_rule": "highest mean validation AUC of the linear probe (C on validation) over 1/10/100 % labels "
                          "and seeds; test AUC recorded but not used",
        "winner": winner, "winner_overrides": scored[winner]["overrides"] if winner else None, "decision": decision,
        "candidates": results, "machine": lib.machine(), "versions": package_versions(),
    }
    write_text_atomic(RESULTS / f"{summary_stem}.json", json.dumps(record, indent=2, default=float))
    for name, entry in sorted(scored.items(), key=lambda item: -item[1]["val_score"]["mean"]):
        print(f"{name:<28} val {entry['val_score']['mean']:.4f}   (test {entry['test_score_not_used_for_selection']['mean']:.4f}, "
              f"{entry['images_seen']['mean']:.0f} images)")
    print(f"winner: {winner}; change the preset: {decision['change_preset']} "
          f"(gain over the preset {gain if gain is not None else float('nan'):+.4f}, margin {margin})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
