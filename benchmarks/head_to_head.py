"""radssl's validation-chosen SimCLR against lightly's own example, at EQUAL images seen, paired by seed.

Why this script (issue 19, points 1 and 10): a comparison is reported only when every arm got its budget the same way
in the same window. Here every arm pretrains ``--budget-images`` images with ``--threads`` torch threads on the same
training split, one pretraining run per seed (so seed variance includes the pretraining run, not only the label
subset), and every run is read out by the same code (``bakeoff_lib.readouts``: frozen features, BatchNorm statistics
re-estimated on unlabelled training images, linear probe standardised with the whole training split's label-free
statistics and C chosen on validation AUC, cosine kNN) on the same seeded label subsets. The radssl arm is the
candidate ``benchmarks/preset_sweep.py`` chose on VALIDATION AUC (its run files are reused, nothing is retrained);
the lightly arms are ``benchmarks/lightly_bar.py``'s run files at the same budget. Differences are paired by seed
(same seed = same label subsets on both sides), with 95 % t-intervals over seeds.

Usage (after the sweep, its ``--seeds 0 1 2`` confirmation, and both lightly arms ran at the same budget):
  python benchmarks/head_to_head.py --dataset breastmnist --budget-images 25600 --threads 2 \\
      --sweep-tag preset_seeds --candidates preset momentum_09
Writes benchmarks/results/head_to_head_<dataset>_<N>img.json and prints the README table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import bakeoff_lib as lib
from common import write_json
from method_bakeoff import lightly_reference_runs, paired_with_reference

from radssl.provenance import package_versions

RESULTS = Path(__file__).parent / "results"
PROTOCOLS = ("linear", "knn")
AUC_RANGE, DIFFERENCE_RANGE = (0.0, 1.0), (-1.0, 1.0)
"""AUC intervals on the logit scale of their range (issue 19 point 8): they never leave it with 3 seeds."""


def sweep_runs(runs_root: Path, stem: str, candidate: str) -> list[dict[str, Any]]:
    """The sweep's cached runs of one candidate, one per seed, in seed order."""
    runs = [json.loads(p.read_text()) for p in sorted((runs_root / stem).glob(f"{candidate}_seed*.json"))]
    return sorted(runs, key=lambda run: run["seed"])


def as_random_arm(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's random-init twin (same backbone, same starting weights, same label subsets) as an arm of its own."""
    return [{**run, "ssl": run["random_init"], "images_seen": 0, "pretrain_images_per_s": None,
             "pretrain_wall_s": None} for run in runs]


def run_threads(run: dict[str, Any]) -> int | None:
    """The torch threads a run trained with: lightly_bar records them at the top, preset_sweep in its config."""
    return run.get("threads", run.get("config", {}).get("train", {}).get("threads"))


def arm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95 % t-interval over seeds of every read-out, beside the images seen and the measured speed."""
    out: dict[str, Any] = {
        "seeds": [run["seed"] for run in runs],
        "images_seen": lib.mean_sd_interval([run["images_seen"] for run in runs]),
        "images_per_s": lib.mean_sd_interval([run.get("pretrain_images_per_s") for run in runs]),
        "pretrain_wall_s": lib.mean_sd_interval([run.get("pretrain_wall_s") for run in runs]),
        "threads": sorted({run_threads(run) for run in runs}, key=str),
    }
    for protocol in PROTOCOLS:
        out[protocol] = {fraction: lib.mean_sd_interval([run["ssl"][protocol][fraction]["test_auc"] for run in runs],
                                                        AUC_RANGE)
                         for fraction in runs[0]["ssl"][protocol]}
    return out


def head_to_head(radssl: dict[str, list[dict[str, Any]]], lightly: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Every arm's summary and each radssl arm − every other arm, paired by seed, for every read-out.

    ``radssl`` maps a candidate name to its runs; the random-init arm is the first candidate's twin (every
    candidate's twin is the same network from the same seed, read out on the same subsets)."""
    first = next(iter(radssl.values()))
    arms = {**{f"radssl_{name}": runs for name, runs in radssl.items()}, "random_init": as_random_arm(first),
            **{f"lightly_{name}": runs for name, runs in lightly.items()}}
    images = {name: {run["images_seen"] for run in runs} for name, runs in arms.items() if name != "random_init"}
    if len({value for seen in images.values() for value in seen}) != 1:
        raise SystemExit(f"arms saw unequal images {images}: not a comparison at equal images seen")
    threads = {name: {run_threads(run) for run in runs} for name, runs in arms.items() if name != "random_init"}
    if len({value for used in threads.values() for value in used}) != 1:
        raise SystemExit(f"arms ran with unequal torch threads {threads}: not the same rules for every arm")
    return {
        "arms": {name: arm_summary(runs) for name, runs in arms.items()},
        "radssl_minus": {f"{name} − {other}": {protocol: paired_with_reference(runs, other_runs, protocol,
                                                                             DIFFERENCE_RANGE)
                                                for protocol in PROTOCOLS}
                         for name, runs in arms.items() if name.startswith("radssl_")
                         for other, other_runs in arms.items() if other != name},
    }


def cell(stat: dict[str, float]) -> str:
    if stat["n"] >= 2:
        return f"{stat['mean']:.3f} [{stat['low']:.2f}, {stat['high']:.2f}]"
    return f"{stat['mean']:.3f}" if stat["n"] else "–"


def signed(stat: dict[str, float]) -> str:
    text = f"{stat['mean']:+.3f} [{stat['low']:+.2f}, {stat['high']:+.2f}]" if stat["n"] >= 2 else "–"
    return f"**{text}**" if stat["n"] >= 2 and (stat["low"] > 0 or stat["high"] < 0) else text


def markdown(record: dict[str, Any]) -> str:
    """The README table: every arm's linear and kNN AUC, its images seen and img/s, and radssl's paired gains."""
    lines = ["| arm | images seen | img/s | linear AUC 1 / 10 / 100 % | kNN AUC 1 / 10 / 100 % |",
             "| --- | --- | --- | --- | --- |"]
    for name, arm in record["result"]["arms"].items():
        speed = arm["images_per_s"]
        lines.append(f"| {name} | {arm['images_seen']['mean']:.0f} | "
                     f"{'–' if not speed['n'] else format(speed['mean'], '.0f')} | "
                     + " / ".join(cell(v) for v in arm["linear"].values()) + " | "
                     + " / ".join(cell(v) for v in arm["knn"].values()) + " |")
    lines += ["", "| difference | linear 1 / 10 / 100 % (paired by seed) | kNN 1 / 10 / 100 % |", "| --- | --- | --- |"]
    for name, diffs in record["result"]["radssl_minus"].items():
        lines.append(f"| {name} | " + " / ".join(signed(v) for v in diffs["linear"].values()) + " | "
                     + " / ".join(signed(v) for v in diffs["knn"].values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--budget-images", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--candidates", nargs="*", help="sweep candidates to set beside lightly (default: the sweep's "
                        "validation choice: its decision, else 'preset')")
    parser.add_argument("--sweep-tag", help="read the decision from the sweep summary with this tag (e.g. a seeds check)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    stem = f"preset_sweep_{args.method}_{args.dataset}_{args.budget_images}img"
    sweep_file = args.results_dir / (f"{stem}_{args.sweep_tag}.json" if args.sweep_tag else f"{stem}.json")
    if not sweep_file.is_file():
        parser.error(f"{sweep_file}: run benchmarks/preset_sweep.py at this budget first")
    sweep = json.loads(sweep_file.read_text())
    chosen = args.candidates or [sweep["winner"] if sweep["decision"]["change_preset"] else "preset"]
    radssl = {name: sweep_runs(args.results_dir / "runs", stem, name) for name in chosen}
    lightly = lightly_reference_runs(args.results_dir / "runs", args.dataset, None, args.budget_images, args.threads)
    if not all(radssl.values()) or not lightly:
        parser.error(f"need runs of {chosen} under runs/{stem}/ and lightly_bar runs at {args.budget_images} images "
                     f"(have radssl {[len(r) for r in radssl.values()]}, lightly arms {sorted(lightly)})")
    record = {
        "dataset": args.dataset, "budget": {"images": args.budget_images, "threads": args.threads},
        "radssl_arms": {name: {"method": args.method, "overrides": runs[0]["overrides"]} for name, runs in radssl.items()},
        "chosen_by": f"{sweep_file.name}: highest validation AUC (winner {sweep['winner']!r}); the preset changes only "
                     f"if the winner beats it by > {sweep['decision']['min_val_gain_to_change']}",
        "rule": "equal images seen and the same torch threads for every arm (both checked); one pretraining run "
                "per seed, so the 95 % t-intervals over seeds (on the logit scale of the AUC range, so inside it) "
                "include pretraining-seed and label-subset variance; the same read-out code and label subsets (paired by seed); radssl's candidates and the probe's C "
                "chosen on validation AUC only, test AUC never used to choose",
        "result": head_to_head(radssl, lightly), "versions": package_versions(),
    }
    record["markdown"] = markdown(record)
    write_json(args.results_dir / f"head_to_head_{args.dataset}_{args.budget_images}img.json", record)
    print(record["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
