"""3D pretraining throughput and memory: SimCLR on volumes with each registered 3D backbone at 28³ and 64³.

For every (backbone, size) a child process (so peak memory is per configuration) measures
  (a) radssl end to end — the real engine: volumes on the device → batched 3D views (``views.modality: ct``:
      crop, flips on 3 axes, quarter-turns, tilts, window jitter, blur, noise, one affine warp) → SimCLR step;
      img/s is the engine's own per-step metric with warm-up steps dropped; peak RSS of the process during it;
  (b) model only — the same model and optimiser on pre-made view tensors (the ceiling for (a));
  (b2) as (b) with ``torch.channels_last_3d`` memory format (the engine uses channels-last only for 2D today).
"img/s" counts volumes (each gives two views). On a shared machine wall-clock rates measure the load as much as
the code, so every rate is also given per CPU-second of this process (``*_per_cpu_s``; with ``--threads 1`` that is
what an uncontended core would do, give or take memory-bandwidth contention). Data: the embedded synthetic CT-like volumes at the size (there is
no 64³ VesselMNIST3D here; the model cost does not depend on the content). Writes
``benchmarks/results/throughput_3d.json`` (machine, load average, versions) and prints a table.

Usage: nice -n 10 python benchmarks/throughput_3d.py [--threads 2] [--steps 3] [--warmup 1]
       [--only small_cnn_3d:28 ...]   # a subset of backbone:size pairs
Batch sizes per configuration are in ``BATCH`` (small enough for the slow ones to finish on 2 CPU cores), and the
slowest configurations take fewer steps (``SHORT``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "throughput_3d.json"
BACKBONES = ("small_cnn_3d", "segresnet_encoder_3d", "resnet18_3d")
SIZES = (28, 64)
BATCH = {
    ("small_cnn_3d", 28): 32, ("small_cnn_3d", 64): 16,
    ("segresnet_encoder_3d", 28): 16, ("segresnet_encoder_3d", 64): 4,
    ("resnet18_3d", 28): 4, ("resnet18_3d", 64): 2,
}
SHORT = {("resnet18_3d", 28): (2, 1), ("resnet18_3d", 64): (1, 0)}
"""(steps, warm-up steps) for configurations whose one step costs minutes of CPU (full-width ResNet-18 with the
small stem); the others use ``--steps`` / ``--warmup``."""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _rss_mb() -> float:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(backbone: str, size: int, batch: int, steps: int, warmup: int, threads: int) -> dict:
    """One configuration, in this process: (a), then (b) and (b2)."""
    import torch

    from radssl.config import load_config
    from radssl.data.synthetic3d import SyntheticVolumeSpec, make_synthetic_volume_store
    from radssl.engine.optim import build_optimizer
    from radssl.engine.pretrain import build_pretraining_method, pretrain
    from radssl.views.batch import ViewBatch

    torch.set_num_threads(threads)
    store = make_synthetic_volume_store(SyntheticVolumeSpec(n_patients=max(8, batch), volumes_per_patient=2,
                                                            volume_size=size))
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [
            f"output_dir={Path(tmp) / 'run'}", f"model.backbone={backbone}", "method.name=simclr",
            "views.modality=ct", "train.accelerator=cpu", "train.devices=1", f"train.steps={steps + warmup}",
            f"train.batch_size={batch}", f"train.threads={threads}", "train.log_every=1",
            "train.checkpoint_every=100000", "train.progress_bar=false", "eval.enabled=false", "optim.optimizer=sgd",
        ])
        spec = config.model.spec_for(store.channels, store.image_shape)
        rss_before = _rss_mb()
        start, cpu_start = time.perf_counter(), time.process_time()
        pretrain(config, store=store)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        peak_a = _peak_rss_mb()
        rows = (Path(tmp) / "run" / "metrics.csv").read_text().splitlines()
        column = rows[0].split(",").index("images_per_s")
        rates = [float(r.split(",")[column]) for r in rows[1 + warmup:]]

    def model_only(memory_format: torch.memory_format) -> tuple[list[float], list[float]]:
        """(wall img/s, img per CPU-second) per measured step."""
        torch.manual_seed(0)
        method = build_pretraining_method(config, store).to(memory_format=memory_format)
        optimizer = build_optimizer(method, config.optim, 0.01)
        views = [torch.randn(batch, store.channels, size, size, size).contiguous(memory_format=memory_format)
                 for _ in range(2)]
        wall_rates, cpu_rates = [], []
        for index in range(steps + warmup):
            began, cpu_began = time.perf_counter(), time.process_time()
            loss = method(ViewBatch(views=views, rows=torch.arange(batch)))["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())
            if index >= warmup:
                wall_rates.append(batch / (time.perf_counter() - began))
                cpu_rates.append(batch / (time.process_time() - cpu_began))
        return wall_rates, cpu_rates

    plain, plain_cpu = model_only(torch.contiguous_format)
    channels_last, channels_last_cpu = model_only(torch.channels_last_3d)
    parameters = sum(p.numel() for p in build_pretraining_method(config, store).backbone.parameters())
    return {
        "backbone": backbone, "size": size, "batch_size": batch, "threads": threads,
        "backbone_spec": spec.to_dict(), "backbone_parameters": parameters,
        "a_end_to_end_images_per_s": statistics.median(rates), "a_per_step": rates, "a_wall_s": wall,
        "a_cpu_s": cpu, "a_images_per_cpu_s_including_setup": batch * (steps + warmup) / cpu,
        "a_rss_before_mb": rss_before, "a_peak_rss_mb": peak_a, "a_peak_rss_increase_mb": peak_a - rss_before,
        "b_model_only_images_per_s": statistics.median(plain), "b_per_step": plain,
        "b_model_only_images_per_cpu_s": statistics.median(plain_cpu),
        "b2_channels_last_3d_images_per_s": statistics.median(channels_last), "b2_per_step": channels_last,
        "b2_channels_last_3d_images_per_cpu_s": statistics.median(channels_last_cpu),
        "peak_rss_mb_all_phases": _peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: meaningful on a shared machine)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="backbone:size pairs, e.g. small_cnn_3d:28")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # backbone:size:batch, run in this process
    args = parser.parse_args(argv)

    if args.child:
        backbone, size, batch = args.child.split(":")
        print(json.dumps(measure(backbone, int(size), int(batch), args.steps, args.warmup, args.threads)))
        return 0

    load_start = os.getloadavg()
    pairs = [(b, s) for b in BACKBONES for s in SIZES]
    if args.only:
        pairs = [(p.split(":")[0], int(p.split(":")[1])) for p in args.only]
    results = []
    for backbone, size in pairs:
        batch = BATCH.get((backbone, size), 4)
        steps, warmup = SHORT.get((backbone, size), (args.steps, args.warmup))
        print(f"{backbone} {size}³ batch {batch}, {steps} steps after {warmup} warm-up ...", flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", f"{backbone}:{size}:{batch}",
                               "--threads", str(args.threads), "--steps", str(steps),
                               "--warmup", str(warmup)], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            results.append({"backbone": backbone, "size": size, "batch_size": batch, "error": done.stderr[-500:]})
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    from radssl.atomic import write_text_atomic
    from radssl.provenance import package_versions

    record = {
        "what": "SimCLR pretraining on synthetic CT-like volumes; img/s = volumes per second (2 views each)",
        "settings": {"threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                     "short_configurations": {f"{b}:{s}": v for (b, s), v in SHORT.items()}},
        "machine": {"processor": _cpu_name(), "cpu_count": os.cpu_count(), "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg()},
        "versions": package_versions(),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(record, indent=2))
    print(f"{'backbone':<22}{'size':>5}{'batch':>6}{'(a) img/s':>11}{'(a)/cpu-s':>11}{'(b)/cpu-s':>11}"
          f"{'(b2)/cpu-s':>12}{'peak RSS MB':>13}{'Δ RSS MB':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['backbone']:<22}{r['size']:>5}{r['batch_size']:>6}  failed")
            continue
        print(f"{r['backbone']:<22}{r['size']:>5}{r['batch_size']:>6}{r['a_end_to_end_images_per_s']:>11.2f}"
              f"{r['a_images_per_cpu_s_including_setup']:>11.2f}{r['b_model_only_images_per_cpu_s']:>11.2f}"
              f"{r['b2_channels_last_3d_images_per_cpu_s']:>12.2f}{r['a_peak_rss_mb']:>13.0f}"
              f"{r['a_peak_rss_increase_mb']:>10.0f}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
