"""Pretraining img/s with the images resident on the device vs streamed from a memory-mapped cache.

Same model, same batch, same steps, the real engine (``radssl.engine.pretrain``) with the prefetch on; only
``train.device_cache`` differs (``always`` vs ``never``). The images are written to a memory-mapped ``.npy`` first,
as the file cache serves them, so the streamed arm really reads pages of a file (warm page cache: the archive that
does not fit the *device* but fits the host's page cache — the common GPU case). Rounds are interleaved
(resident, streamed, streamed, resident, …) so a machine's drift hits both arms alike; per-step img/s comes from the
engine's metrics log with the warm-up steps dropped; the arm's rate is the median over rounds of per-round medians.
Target (issue 18): streamed ≥ 0.9 × resident.

Writes ``benchmarks/results/scale_stream.json`` (atomically; ``--output`` to change).

Usage: python benchmarks/scale_stream.py [--quick] [--size 28] [--backbone resnet18] [--stem small|standard]
       [--batch-size 128] [--steps 10] [--warmup 3] [--rounds 3] [--threads N] [--device auto|cpu|cuda]
``--quick``: 2 rounds of 3 + 1 steps at batch 32 — a check that it runs, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import bench_device, bench_engine, load_store  # noqa: E402  (a sibling benchmark script)

from radssl.atomic import write_text_atomic  # noqa: E402
from radssl.provenance import device_description, package_versions  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "scale_stream.json"
MODES = {"resident": "always", "streamed": "never"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script runs")
    parser.add_argument("--data-root")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--stem", choices=["small", "standard"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.batch_size = 3, 1, 2, min(args.batch_size, 32)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be ≥ 1, --warmup ≥ 0")
    return args


def measure(args: argparse.Namespace) -> dict:
    store = load_store(args)
    per_round: dict[str, list[float]] = {mode: [] for mode in MODES}
    per_step: dict[str, list[list[float]]] = {mode: [] for mode in MODES}
    for index in range(args.rounds):
        order = list(MODES) if index % 2 == 0 else list(reversed(MODES))
        for mode in order:
            result = bench_engine(args, store, device_cache=MODES[mode], prefetch=True)
            per_round[mode].append(result["images_per_s"])
            per_step[mode].append(result["per_step"])
            print(f"round {index + 1}/{args.rounds} {mode:<9} {result['images_per_s']:8.1f} img/s", flush=True)
    rates = {mode: statistics.median(values) for mode, values in per_round.items()}
    ratio = rates["streamed"] / rates["resident"]
    device = bench_device(args)
    return {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": store.name,
        "image_shape": list(store.image_shape),
        "images": len(store.pretrain_indices()),
        "machine": {"device": device_description(device), "cpu_count": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "versions": package_versions(),
        "images_per_s": rates,
        "per_round_images_per_s": per_round,
        "per_step_images_per_s": per_step,
        "streamed_over_resident": ratio,
        "target_met": {"streamed >= 0.9 x resident": ratio >= 0.9},
        "quick": args.quick,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = measure(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(record, indent=2))
    rates = record["images_per_s"]
    print(f"resident {rates['resident']:.1f} img/s   streamed {rates['streamed']:.1f} img/s   "
          f"streamed/resident = {record['streamed_over_resident']:.2f} (target ≥ 0.9)")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
