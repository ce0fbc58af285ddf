"""Time batched SSL augmentation backends: radssl BatchAugmenter vs kornia vs torchvision v2.

Why: ``radssl.views.augment`` is our own code only because it is faster; this benchmark is the evidence and
re-checks it whenever torch/kornia/torchvision change. Every backend runs the same recipe (random resized
crop, horizontal flip, rotation, brightness/contrast/gamma, Gaussian blur, Gaussian noise) with *per-sample*
random parameters on a (B, 1, S, S) float batch on CPU:

- ``radssl``: ``BatchAugmenter`` (one affine warp + elementwise intensity + grouped-conv blur + noise).
- ``kornia-slice`` / ``kornia-resample``: ``kornia.augmentation.AugmentationSequential`` with the two
  ``RandomResizedCrop`` cropping modes (slice = crop by index then resize; resample = one warp).
  Differences: kornia's brightness is additive, its noise std is fixed (no per-sample range; we use the top
  of our range).
- ``torchvision-loop``: ``torchvision.transforms.v2`` called once per sample in a Python loop. v2 draws ONE
  parameter set per call, so this loop is the only per-sample equivalent.
- ``torchvision-batch`` (reference only, NOT equivalent): v2 on the whole batch, every sample sharing one
  crop/flip/rotation/jitter — a floor for what v2's kernels cost without the loop.

Usage::

    python benchmarks/augment_backends.py --quick              # < 60 s on a shared 2-core machine
                                                               # (times the torchvision loop on 32 samples
                                                               #  and scales it to the batch)
    python benchmarks/augment_backends.py --sizes 64 128 --repeats 20
    python benchmarks/augment_backends.py --quick --threads 1 2  # shared machine: 1-thread rows stay meaningful

Writes ``benchmarks/results/augment_backends.json`` atomically (machine info included) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from radssl.atomic import write_text_atomic
from radssl.views.augment import AugmentationParams, BatchAugmenter

Augment = Callable[[torch.Tensor, int], torch.Tensor]
"""A backend: (images, seed) -> augmented images of the output size."""

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "augment_backends.json"
ALL_BACKENDS = ("radssl", "kornia-slice", "kornia-resample", "torchvision-loop", "torchvision-batch")
PER_SAMPLE = {
    "radssl": True,
    "kornia-slice": True,
    "kornia-resample": True,
    "torchvision-loop": True,
    "torchvision-batch": False,
}


def _blur_kernel_size(params: AugmentationParams) -> int:
    """Odd kernel covering ±3 sigma of the largest sigma, as BatchAugmenter uses."""
    return 2 * math.ceil(3.0 * params.blur_sigma[1]) + 1


def build_radssl(params: AugmentationParams, size: int) -> Augment:
    augmenter = BatchAugmenter(params, (size, size))

    def run(images: torch.Tensor, seed: int) -> torch.Tensor:
        return augmenter(images, torch.Generator(device=images.device).manual_seed(seed))

    return run


def build_kornia(params: AugmentationParams, size: int, cropping_mode: str) -> Augment:
    import kornia.augmentation as K

    kernel = min(_blur_kernel_size(params), 2 * (size // 2) - 1)
    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop(
            (size, size), scale=params.crop_scale, ratio=params.crop_ratio, cropping_mode=cropping_mode, p=1.0
        ),
        K.RandomHorizontalFlip(p=params.hflip_p),
        K.RandomRotation(degrees=params.rotation_degrees, p=1.0),
        K.RandomBrightness(brightness=(1.0 - params.brightness, 1.0 + params.brightness), p=params.intensity_p),
        K.RandomContrast(contrast=(1.0 - params.contrast, 1.0 + params.contrast), p=params.intensity_p),
        K.RandomGamma(gamma=params.gamma, p=params.intensity_p),
        K.RandomGaussianBlur(kernel_size=kernel, sigma=params.blur_sigma, p=params.blur_p),
        K.RandomGaussianNoise(mean=0.0, std=params.noise_std[1], p=params.noise_p),
    )

    def run(images: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)  # kornia draws from the global generator
        return pipeline(images).clamp_(0.0, 1.0)

    return run


def _torchvision_pipeline(params: AugmentationParams, size: int) -> torch.nn.Module:
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF

    class RandomGamma(torch.nn.Module):
        """v2 has no random gamma; log-uniform gamma like BatchAugmenter."""

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            low, high = math.log(params.gamma[0]), math.log(params.gamma[1])
            gamma = math.exp(low + (high - low) * torch.rand(()).item())
            return TF.adjust_gamma(image, gamma)

    class RandomNoise(torch.nn.Module):
        """v2.GaussianNoise has a fixed sigma; draw it per call for the per-sample range."""

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            low, high = params.noise_std
            sigma = low + (high - low) * torch.rand(()).item()
            return TF.gaussian_noise(image, sigma=sigma, clip=True)

    kernel = min(_blur_kernel_size(params), 2 * (size // 2) - 1)
    return v2.Compose(
        [
            v2.RandomResizedCrop((size, size), scale=params.crop_scale, ratio=params.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(p=params.hflip_p),
            v2.RandomRotation(degrees=params.rotation_degrees),
            v2.RandomApply(
                [v2.ColorJitter(brightness=params.brightness, contrast=params.contrast), RandomGamma()],
                p=params.intensity_p,
            ),
            v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=params.blur_sigma)], p=params.blur_p),
            v2.RandomApply([RandomNoise()], p=params.noise_p),
        ]
    )


def build_torchvision_loop(params: AugmentationParams, size: int) -> Augment:
    pipeline = _torchvision_pipeline(params, size)

    def run(images: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([pipeline(image) for image in images])  # per-sample parameters need the loop

    return run


def build_torchvision_batch(params: AugmentationParams, size: int) -> Augment:
    pipeline = _torchvision_pipeline(params, size)

    def run(images: torch.Tensor, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return pipeline(images)

    return run


def build_backend(name: str, params: AugmentationParams, size: int) -> Augment:
    if name == "radssl":
        return build_radssl(params, size)
    if name.startswith("kornia-"):
        return build_kornia(params, size, cropping_mode=name.removeprefix("kornia-"))
    if name == "torchvision-loop":
        return build_torchvision_loop(params, size)
    if name == "torchvision-batch":
        return build_torchvision_batch(params, size)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(ALL_BACKENDS)}")


def time_backend(
    run: Augment, images: torch.Tensor, size: int, warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU milliseconds of ``repeats`` calls after ``warmup`` calls (new seed each).

    CPU time (all threads of this process) is reported too because on a shared machine wall time mostly
    measures the other jobs; CPU time is far less sensitive to them (not immune: caches are shared).
    """
    out = images
    for seed in range(warmup):
        out = run(images, seed)
    wall, cpu = [], []
    for seed in range(warmup, warmup + repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = run(images, seed)
        wall.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    if tuple(out.shape) != (images.shape[0], images.shape[1], size, size):
        raise RuntimeError(f"backend returned shape {tuple(out.shape)}, expected output size {size}")
    return wall, cpu


def machine_info(threads: Sequence[int]) -> dict[str, object]:
    import kornia
    import torchvision

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "kornia": kornia.__version__,
        "torch_threads": list(threads),
        "load_average_at_start": list(os.getloadavg()),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 3 timed calls (for shared machines)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 128], help="square output sizes in px")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2],
        help="torch.set_num_threads; several values run the grid once per value (e.g. --threads 1 2)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3, quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 10, quick 3)")
    parser.add_argument(
        "--loop-samples",
        type=int,
        default=None,
        help="torchvision-loop: time this many samples and scale to the batch (the loop is linear in the "
        "number of samples); default: the whole batch, 32 with --quick",
    )
    parser.add_argument("--backends", nargs="+", default=list(ALL_BACKENDS), choices=ALL_BACKENDS)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results path")
    return parser.parse_args(argv)


def run_grid(
    args: argparse.Namespace, params: AugmentationParams, threads: int, warmup: int, repeats: int, loop_samples: int
) -> list[dict[str, object]]:
    """Time every backend at every size with ``threads`` torch threads; print one table, return its rows."""
    torch.set_num_threads(threads)
    rows: list[dict[str, object]] = []
    print(f"\nbatch {args.batch}, 1 channel, CPU, {threads} torch threads, warm-up {warmup}, median of {repeats}")
    print(
        f"{'backend':<18} {'size':>5} {'median ms':>10} {'min ms':>9} {'ms/image':>9} {'x radssl':>9} "
        f"{'cpu ms':>9} {'cpu x':>7}  per-sample"
    )
    for size in args.sizes:
        images = torch.rand(args.batch, 1, size, size, generator=torch.Generator().manual_seed(size))
        baseline: float | None = None
        cpu_baseline: float | None = None
        for name in args.backends:
            timed_samples = loop_samples if name == "torchvision-loop" else args.batch
            run = build_backend(name, params, size)
            wall, cpu = time_backend(run, images[:timed_samples], size, warmup, repeats)
            times = [t * args.batch / timed_samples for t in wall]
            cpu_times = [t * args.batch / timed_samples for t in cpu]
            median, cpu_median = statistics.median(times), statistics.median(cpu_times)
            if name == "radssl":
                baseline, cpu_baseline = median, cpu_median
            ratio = median / baseline if baseline else None
            cpu_ratio = cpu_median / cpu_baseline if cpu_baseline else None
            rows.append(
                {
                    "backend": name,
                    "size": size,
                    "batch": args.batch,
                    "torch_threads": threads,
                    "per_sample_parameters": PER_SAMPLE[name],
                    "median_ms": round(median, 3),
                    "min_ms": round(min(times), 3),
                    "ms_per_image": round(median / args.batch, 5),
                    "times_ms": [round(t, 3) for t in times],
                    "timed_samples": timed_samples,  # < batch: times scaled by batch / timed_samples
                    "relative_to_radssl": round(ratio, 3) if ratio else None,
                    "cpu_median_ms": round(cpu_median, 3),
                    "cpu_times_ms": [round(t, 3) for t in cpu_times],
                    "cpu_relative_to_radssl": round(cpu_ratio, 3) if cpu_ratio else None,
                }
            )
            ratio_text = f"{ratio:9.2f}" if ratio else f"{'-':>9}"
            cpu_ratio_text = f"{cpu_ratio:7.2f}" if cpu_ratio else f"{'-':>7}"
            print(
                f"{name:<18} {size:>5} {median:>10.1f} {min(times):>9.1f} {median / args.batch:>9.3f} "
                f"{ratio_text} {cpu_median:>9.1f} {cpu_ratio_text}  "
                f"{'yes' if PER_SAMPLE[name] else 'NO (one set per batch)'}",
                flush=True,
            )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)
    loop_samples = min(args.batch, args.loop_samples or (32 if args.quick else args.batch))
    params = AugmentationParams()
    previous_threads = torch.get_num_threads()
    info = machine_info(args.threads)
    began = time.perf_counter()
    rows: list[dict[str, object]] = []
    try:
        for threads in args.threads:
            rows += run_grid(args, params, threads, warmup, repeats, loop_samples)
    finally:
        torch.set_num_threads(previous_threads)

    info["load_average_at_end"] = list(os.getloadavg())
    result = {
        "benchmark": "augment_backends",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "settings": {
            "batch": args.batch,
            "channels": 1,
            "device": "cpu",
            "sizes": args.sizes,
            "warmup": warmup,
            "repeats": repeats,
            "quick": args.quick,
            "torchvision_loop_timed_samples": loop_samples,
            "input": "uniform random (B, 1, S, S) float32; output size = input size",
        },
        "augmentation_params": params.model_dump(mode="json"),
        "notes": [
            "torchvision v2 on a batched tensor draws ONE parameter set per call; torchvision-loop is the "
            "per-sample equivalent (Python loop over samples), torchvision-batch is a non-equivalent reference.",
            "torchvision-loop times are measured on timed_samples samples and scaled to the batch when "
            "timed_samples < batch (the loop's cost is linear in the number of samples).",
            "kornia RandomBrightness is additive and RandomGaussianNoise has a fixed std (top of our range).",
            "cpu_* = process CPU time (all threads), less sensitive than wall time to other jobs on a shared "
            "machine; compare cpu_relative_to_radssl when load_average exceeds the core count. With more torch "
            "threads than free cores, OpenMP barriers wait for descheduled threads and every op costs a "
            "scheduler slice: then the 1-thread rows are the meaningful ones.",
            "relative_to_radssl = backend median / radssl median at the same size (>1: slower than radssl).",
        ],
        "results": rows,
        "wall_seconds": round(time.perf_counter() - began, 1),
    }
    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output} in {result['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
