"""Pretraining throughput: is the model step, not data loading, the bottleneck?

Measures, for the same backbone, batch size and SimCLR objective, in one process run:
  (a) radssl end to end — the real engine (``radssl.engine.pretrain``): store on device (resident) → batched
      on-device augmentation → model step, with the step settings chosen here (channels_last, threads, optional
      compile) and the next step's views prefetched while the current one computes (``train.prefetch``);
  (a0) the same without the prefetch (views built between steps): what the prefetch buys;
  (a2) the same as (a), streamed (``train.device_cache=never``): each step's rows read from the images in a
      memory-mapped ``.npy`` (as the file cache serves them) into pinned memory on CUDA;
  (b) model only — the same model and optimiser on pre-made view tensors (the ceiling for (a));
  (c) lightly's standard pipeline as documented — ``lightly.transforms.SimCLRTransform`` (1-channel settings) on
      PIL images in ``DataLoader`` worker processes, feeding the same model with default torch settings;
  (c2) the same lightly data pipeline feeding the model with radssl's model settings (channels_last, the same
      thread count), so that a/c2 isolates the data path and a/c adds the model settings a user would not touch.
Targets on a 2-core CPU: (a) ≥ 0.95 × (b), (a2) ≥ 0.9 × (a), (a) ≥ 1.5 × (c) (issue 18) and (a) ≥ (c2)
(issue 19: the like-for-like data path). ``--summarise-interleaved DIR`` pools one-arm runs made in a mirrored
order (b a c2 c c c2 a b) into medians, ratios and targets. On a GPU every arm
runs on it (``--device``; (c)/(c2) copy the DataLoader's pinned batches to it). Writes ``benchmarks/results/throughput.json``
(``--stem`` picks the ResNet stem: ``small`` 3×3 stride 1, or ``standard`` 7×7 stride 2 + max-pool, the fast one on
CPU for 28 px images; ``--output`` names the file so both can be kept).

Usage: python benchmarks/throughput.py [--data-root DIR] [--dataset pneumoniamnist] [--backbone resnet18]
       [--stem small|standard] [--batch-size 128] [--steps 12] [--warmup 3] [--workers 2] [--compile]
       [--device auto|cpu|cuda] [--arms a,a0,a2,b,c,c2]
Without ``--data-root``/``$RADSSL_DATA_DIR`` (or with ``--synthetic``) it uses the embedded synthetic images.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radssl.atomic import write_text_atomic
from radssl.config import load_config
from radssl.data.store import ImageStore
from radssl.engine.optim import build_optimizer
from radssl.engine.pretrain import build_pretraining_method, pretrain
from radssl.provenance import package_versions

RESULTS = Path(__file__).parent / "results" / "throughput.json"
ARMS = {"a": "a_radssl_end_to_end", "a0": "a0_radssl_no_prefetch", "a2": "a2_radssl_streamed", "b": "b_model_only",
        "c": "c_lightly_as_documented", "c2": "c2_lightly_same_model_settings"}


def load_store(args: argparse.Namespace) -> ImageStore:
    root = args.data_root or os.environ.get("RADSSL_DATA_DIR")
    if root and not args.synthetic:
        from radssl.data.medmnist import load_medmnist

        return load_medmnist(args.dataset, size=args.size, root=Path(root), allow_download=False)
    from radssl.data.synthetic import SyntheticSpec, make_synthetic_store

    return make_synthetic_store(SyntheticSpec(n_patients=400, images_per_patient=4, image_size=args.size))


def bench_device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def make_config(args: argparse.Namespace, output_dir: Path, steps: int, channels_last: bool, compile_: bool,
                extra: tuple[str, ...] = ()):
    return load_config(
        None,
        [
            f"output_dir={output_dir}",
            f"model.backbone={args.backbone}",
            *([] if args.stem is None else [f"model.small_input={str(args.stem == 'small').lower()}"]),
            "method.name=simclr",
            f"train.accelerator={bench_device(args).type}",
            "train.devices=1",
            f"train.steps={steps}",
            f"train.batch_size={args.batch_size}",
            f"train.channels_last={str(channels_last).lower()}",
            f"train.compile={str(compile_).lower()}",
            f"train.threads={args.threads}",
            "train.log_every=1",
            "train.checkpoint_every=100000",
            "train.progress_bar=false",
            "eval.enabled=false",
            "optim.optimizer=sgd",
            *extra,
        ],
    )


def steady_rate(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def memmapped(store: ImageStore, directory: Path) -> ImageStore:
    """The store with its images in a memory-mapped ``.npy`` under ``directory``, as the file cache serves them."""
    from dataclasses import replace

    path = directory / "images.npy"
    np.save(path, store.images.numpy())
    return replace(store, images=torch.from_numpy(np.lib.format.open_memmap(path, mode="c")))


def bench_engine(args: argparse.Namespace, store: ImageStore, device_cache: str = "always",
                 prefetch: bool = True) -> dict:
    """(a) the real engine; per-step img/s read from its metrics log, warm-up steps dropped."""
    with tempfile.TemporaryDirectory() as tmp:
        extra = (f"train.device_cache={device_cache}", f"train.prefetch={str(prefetch).lower()}")
        if device_cache == "never":
            store = memmapped(store, Path(tmp))
        config = make_config(args, Path(tmp) / "run", args.steps + args.warmup, args.channels_last, args.compile,
                             extra)
        start = time.perf_counter()
        pretrain(config, store=store)
        total = time.perf_counter() - start
        rows = (Path(tmp) / "run" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        column = header.index("images_per_s")
        rates = [float(r.split(",")[column]) for r in rows[1 + args.warmup :]]
    return {"images_per_s": steady_rate(rates), "per_step": rates, "wall_s_including_setup": total,
            "device_cache": device_cache, "prefetch": prefetch}


def _loss(model, views: list[torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
    from radssl.views.batch import ViewBatch

    return model(ViewBatch(views=list(views), rows=torch.arange(views[0].shape[0], device=views[0].device)))["loss"]


def _timed_model_steps(model, optimizer, batches, warmup: int, batch_size: int) -> list[float]:  # noqa: ANN001
    rates = []
    for index, views in enumerate(batches):
        start = time.perf_counter()
        loss = _loss(model, views)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        if index >= warmup:
            rates.append(batch_size / (time.perf_counter() - start))
    return rates


def bench_model_only(args: argparse.Namespace, store: ImageStore) -> dict:
    """(b) model + optimiser on pre-made normalised views (no data path at all)."""
    config = make_config(args, Path("unused"), args.steps, args.channels_last, args.compile)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = build_pretraining_method(config, store)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    device = bench_device(args)
    method = method.to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(method, config.optim, 0.01)
    model = torch.compile(method) if args.compile else method
    shape = (args.batch_size, store.channels, *store.image_shape)
    views = [torch.randn(shape, device=device).contiguous(memory_format=memory_format) for _ in range(2)]
    rates = _timed_model_steps(model, optimizer, (views for _ in range(args.steps + args.warmup)), args.warmup, args.batch_size)
    return {"images_per_s": steady_rate(rates), "per_step": rates}


class _PILDataset(torch.utils.data.Dataset):
    """Stored uint8 images as PIL greyscale images through a transform, as a torchvision dataset would."""

    def __init__(self, images: np.ndarray, transform) -> None:  # noqa: ANN001
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):  # noqa: ANN204
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index], mode="L"))


def bench_lightly(args: argparse.Namespace, store: ImageStore, model_settings: bool) -> dict:
    """(c) lightly's SimCLRTransform in DataLoader workers + the same model; (c2) with radssl's model settings."""
    from lightly.transforms import SimCLRTransform

    threads = args.threads if model_settings else args.default_threads
    channels_last = args.channels_last and model_settings
    torch.set_num_threads(threads)
    transform = SimCLRTransform(
        input_size=store.image_shape[-1],
        cj_prob=0.8, cj_bright=0.4, cj_contrast=0.4, cj_sat=0.0, cj_hue=0.0,  # no colour ops on 1 channel
        min_scale=0.35, random_gray_scale=0.0, gaussian_blur=0.5, rr_prob=1.0, rr_degrees=10.0,
        normalize={"mean": [0.449], "std": [0.226]},
    )
    rows = store.pretrain_indices()
    dataset = _PILDataset(store.images[rows, 0].numpy(), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
        persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0),
        pin_memory=bench_device(args).type == "cuda",
    )
    config = make_config(args, Path("unused"), args.steps, channels_last, False)
    torch.manual_seed(0)
    method = build_pretraining_method(config, store)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    device = bench_device(args)
    method = method.to(device=device, memory_format=memory_format)
    optimizer = build_optimizer(method, config.optim, 0.01)
    needed = args.steps + args.warmup

    def batches():  # noqa: ANN202
        produced = 0
        while produced < needed:
            for views in loader:
                yield views
                produced += 1
                if produced >= needed:
                    return

    rates = []
    iterator = batches()
    for index in range(needed):
        start = time.perf_counter()
        views = next(iterator)  # includes waiting for the workers: that is the point of (c)
        views = [v.to(device, non_blocking=True).contiguous(memory_format=memory_format) for v in views]
        loss = _loss(method, views)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        if index >= args.warmup:
            rates.append(args.batch_size / (time.perf_counter() - start))
    return {"images_per_s": steady_rate(rates), "per_step": rates, "workers": args.workers, "threads": threads,
            "channels_last": channels_last}


TARGETS = {"a_over_b": 0.95, "a2_over_a": 0.9, "a_over_c": 1.5, "a_over_c2": 1.0}


def targets_met(ratios: dict[str, float | None]) -> dict[str, bool]:
    """Each target: end to end ≥ 0.95 × model only (the model step is the bottleneck), streamed ≥ 0.9 × resident,
    ≥ 1.5 × lightly as documented, and ≥ 1.0 × lightly with the same model settings (issue 19 point 4: the
    like-for-like arm isolates the data path, which must never be the slower one). An arm not run fails its target."""
    return {f"{key} >= {bound:g}": (ratios.get(key) or 0) >= bound for key, bound in TARGETS.items()}


def ratios_of(rate: dict[str, float]) -> dict[str, float | None]:
    """The ratios the targets read, from images/s per arm key (a, a0, a2, b, c, c2); None where an arm is missing."""
    def ratio(top: str, bottom: str) -> float | None:
        return rate[top] / rate[bottom] if top in rate and bottom in rate else None
    return {"a_over_b": ratio("a", "b"), "a0_over_b": ratio("a0", "b"), "a2_over_a": ratio("a2", "a"),
            "a2_over_b": ratio("a2", "b"), "a_over_c": ratio("a", "c"), "a_over_c2": ratio("a", "c2")}


def summarise_interleaved(directory: Path) -> dict:
    """Pool one-arm runs made in an interleaved order (``run<i>_<arm>.json``, e.g. b a c2 c c c2 a b): each arm's
    median images/s over its runs, the ratios and targets on those medians.

    One process per arm and a mirrored order put every arm early and late in the window, so neither the machine's
    drift nor an arm's place in the process (the first arm's first steps were the slowest) favours one arm.
    """
    runs = sorted(directory.glob("run*_*.json"), key=lambda path: int(path.stem[3:].split("_")[0]))
    if not runs:
        raise SystemExit(f"{directory}: no run<i>_<arm>.json files")
    by_key = {name: key for key, name in ARMS.items()}
    order, rates = [], {}
    for path in runs:
        results = json.loads(path.read_text())["results"]
        if len(results) != 1:
            raise SystemExit(f"{path}: {len(results)} arms in one run; interleaved runs hold one arm each")
        (name, result), = results.items()
        order.append(by_key[name])
        rates.setdefault(by_key[name], []).append(float(result["images_per_s"]))
    median = {key: statistics.median(values) for key, values in rates.items()}
    ratios = ratios_of(median)
    return {"order": order, "images_per_s": rates, "median_images_per_s": median, "ratios": ratios,
            "targets_met": targets_met(ratios), "runs": [path.name for path in runs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarise-interleaved", type=Path, metavar="DIR",
                        help="pool the one-arm runs in DIR (run<i>_<arm>.json) into DIR/summary.json and stop")
    parser.add_argument("--data-root")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--stem", choices=["small", "standard"], help="ResNet stem (default: automatic by size)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (c)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for (a)/(b)")
    parser.add_argument("--default-threads", type=int, default=torch.get_num_threads(), help="torch threads for (c)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in (a)/(b)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where every arm runs (auto: cuda when available)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.summarise_interleaved:
        summary = summarise_interleaved(args.summarise_interleaved)
        write_text_atomic(args.summarise_interleaved / "summary.json", json.dumps(summary, indent=2))
        print(json.dumps({k: summary[k] for k in ("median_images_per_s", "ratios", "targets_met")}, indent=2))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {list(ARMS)}")

    store = load_store(args)
    runners = {
        "a": lambda: bench_engine(args, store),
        "a0": lambda: bench_engine(args, store, prefetch=False),
        "a2": lambda: bench_engine(args, store, device_cache="never"),
        "b": lambda: bench_model_only(args, store),
        "c": lambda: bench_lightly(args, store, model_settings=False),
        "c2": lambda: bench_lightly(args, store, model_settings=True),
    }
    results = {ARMS[arm]: runners[arm]() for arm in ARMS if arm in arms}
    rate = {arm: results[ARMS[arm]]["images_per_s"] if ARMS[arm] in results else float("nan") for arm in ARMS}
    a, a0, a2, b, c, c2 = (rate[k] for k in ("a", "a0", "a2", "b", "c", "c2"))
    ratios = ratios_of({key: value for key, value in rate.items() if value == value})  # NaN: arm not run
    targets = targets_met(ratios)
    record = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": store.name,
        "image_shape": list(store.image_shape),
        "backbone_spec": make_config(args, Path("unused"), 1, False, False).model.spec_for(
            store.channels, store.image_shape).to_dict(),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "device": str(bench_device(args)),
        },
        "versions": package_versions(),
        "results": results,
        "ratios": ratios,
        "targets_met": targets,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(record, indent=2))
    print(f"{'pipeline':<34}{'img/s':>10}")
    rows = (("(a) radssl end-to-end", a), ("(a0) radssl, no prefetch", a0), ("(a2) radssl, streamed", a2),
            ("(b) model only, pre-made tensors", b), ("(c) lightly as documented", c),
            ("(c2) lightly, radssl model settings", c2))
    for name, value in rows:
        print(f"{name:<38}{value:>10.1f}")
    shown = {key: "n/a" if value is None else f"{value:.2f}" for key, value in ratios.items()}
    print("   ".join(f"{key.replace('_over_', '/')} = {value}"
                       + (f" (target ≥ {TARGETS[key]:g})" if key in TARGETS else "") for key, value in shown.items()))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
