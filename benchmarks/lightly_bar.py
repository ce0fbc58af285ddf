"""lightly's own SimCLR example on a MedMNIST set, at the SAME budget rule as radssl's bake-off, read out by its probe.

Why this script: a bar against one unseeded run, or a run at a step count copied from an issue, compares unequal
budgets (issue 19: lightly saw 22,272 images at 1 thread while radssl's SimCLR saw 51,200 at 2). Here every seed of
every arm gets its budget exactly as radssl's methods get theirs in ``radssl bakeoff`` (:mod:`radssl.study.bakeoff`,
whose ``steps_for_images`` / ``steps_for_wall_clock`` / ``wall_clock_deviations`` this script calls):

- ``--budget-images N`` (the primary rule): ``steps = ceil(N / 256)``, so lightly sees what each radssl arm sees;
- ``--budget-minutes M --threads k`` (the second table): the example's img/s is calibrated on this machine with ``k``
  threads — ``--calibration-steps`` (≥ 20) timed steps after ``--calibration-warmup`` warm-up steps, median of the
  per-step rates — and ``steps = floor(M·60 · img/s / 256)``. The calibration is stored beside the runs and reused
  by every seed (equal images for every seed, whatever the load later). After each run the measured pretraining
  wall-clock is compared with ``M`` minutes and a deviation above 10 % is flagged in the run and the summary.

Every run is then read out with exactly the bake-off's read-out (``bakeoff_lib.readouts``: linear probe with C on the
validation AUC, cosine kNN, label subsets drawn with the run's seed), so radssl's methods can be compared with it
*paired by seed*. Every number in the JSON stands beside the images seen that produced it.

Two arms (``--arm``):

- ``documented``: lightly's example as documented (``examples/pytorch/simclr.py`` in lightly-ai/lightly), with only
  what 1-channel 28 px images force: torchvision ResNet-18 (standard 7×7 stem; conv1 takes 1 channel), the pooled
  512-d vector → ``SimCLRProjectionHead(512, 512, 128)``, ``SimCLRTransform(input_size=28)`` with its default views
  (crop 0.08–1, colour jitter 0.8 at strength 1, grey 0.2, blur 0.5, h-flip) and grey normalisation (0.449 / 0.226,
  radssl's convention), ``NTXentLoss()`` (τ 0.5), SGD lr 0.06 (no momentum, no weight decay, constant), batch 256,
  shuffle, drop_last, two DataLoader workers, two forward passes per step.
- ``strong``: the strongest lightly arm seen so far (issue 19 point 10; the arm issue 8's bar came from): the same
  example with SGD momentum 0.9 and milder views — crop 0.5–1, colour jitter at strength 0.5 (``cj_strength``, as
  lightly's own CIFAR-10 benchmarks set it), no blur, no grey. Everything else as documented.

Both pretrain on the training split only, like the bake-off.

Usage:
  RADSSL_DATA_DIR=… python benchmarks/lightly_bar.py --dataset breastmnist --arm documented --budget-images 51200 \
      --seeds 0 1 2
  RADSSL_DATA_DIR=… python benchmarks/lightly_bar.py --dataset breastmnist --arm strong --budget-minutes 5 \
      --threads 2 --seeds 0 1 2
  RADSSL_DATA_DIR=… python benchmarks/lightly_bar.py --dataset breastmnist --arm strong --budget-images 12800 \
      --seeds 0 1 2 --validation proportional   # C chosen as radssl bakeoff's study does: pairs by seed with it
Writes benchmarks/results/lightly_bar_<dataset>_<arm>_<budget>[_propval].json (runs cached under
benchmarks/results/runs/lightly_bar_<dataset>/seed<S>_<arm>_<budget>[_propval].json, calibrations beside them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import bakeoff_lib as lib
import torch
from common import write_json
from torch import nn

from radssl.data.store import NORMALISATION_MEAN, NORMALISATION_STD
from radssl.provenance import package_versions
from radssl.study.bakeoff import steps_for_images, steps_for_wall_clock, wall_clock_deviations

RESULTS = Path(__file__).parent / "results"
BATCH_SIZE = 256  # the example's batch, kept for every arm (equal images seen = equal steps)
WALL_CLOCK_TOLERANCE = 0.10  # issue 19: flag arms whose measured pretraining time is off the budget by more
MIN_CALIBRATION_STEPS = 20  # issue 19: a 4-step median at load 3-5 set budgets 28 % off

# The two arms: what differs from lightly's documented example. ``transform`` is passed to lightly's SimCLRTransform
# (empty = its defaults), ``momentum`` to torch's SGD; lr 0.06, no weight decay and the constant schedule are shared.
ARMS: dict[str, dict[str, Any]] = {
    "documented": {"momentum": 0.0, "transform": {},
                   "what": "lightly examples/pytorch/simclr.py as documented (SGD lr 0.06 without momentum; default "
                           "views: crop 0.08-1, colour jitter 0.8 at strength 1, grey 0.2, blur 0.5), 1 channel, "
                           "28 px"},
    "strong": {"momentum": 0.9,
               "transform": {"min_scale": 0.5, "cj_strength": 0.5, "gaussian_blur": 0.0, "random_gray_scale": 0.0},
               "what": "lightly's example with SGD momentum 0.9 and milder views (crop 0.5-1, colour jitter at "
                       "strength 0.5, no blur, no grey), 1 channel, 28 px"},
}
LR = 0.06


class _PilImages(torch.utils.data.Dataset):
    """The stored uint8 images as PIL greyscale images through lightly's transform (what the example's dataset does)."""

    def __init__(self, images: torch.Tensor, transform: Any) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        from PIL import Image

        pixels = self.images[index, 0]
        if pixels.dtype != torch.uint8:
            pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return self.transform(Image.fromarray(pixels.numpy(), mode="L"))


class _Pooled(nn.Module):
    """The example's backbone (ResNet-18 without its fc) returning the flat pooled vector the read-out expects."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images).flatten(start_dim=1)


def build_model(seed: int) -> tuple[nn.Module, nn.Module]:
    import torchvision
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(seed)
    resnet = torchvision.models.resnet18()
    resnet.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)  # 1-channel images
    backbone = _Pooled(nn.Sequential(*list(resnet.children())[:-1]))
    return backbone, SimCLRProjectionHead(512, 512, 128)


def arm_settings(arm: str) -> dict[str, Any]:
    """The arm's settings, or a clear error naming the known arms."""
    if arm not in ARMS:
        raise SystemExit(f"--arm {arm!r}: unknown arm; choose one of {sorted(ARMS)}")
    return ARMS[arm]


def build_transform(arm: str, size: int) -> Any:
    """lightly's SimCLRTransform with the arm's changes and radssl's grey normalisation."""
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(input_size=size, normalize={"mean": [NORMALISATION_MEAN], "std": [NORMALISATION_STD]},
                           **arm_settings(arm)["transform"])


def build_optimizer(arm: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The example's SGD (lr 0.06, constant, no weight decay) with the arm's momentum."""
    return torch.optim.SGD(params, lr=LR, momentum=arm_settings(arm)["momentum"])


def train_example(store, arm: str, seed: int, steps: int, workers: int, size: int  # noqa: ANN001
                  ) -> dict[str, Any]:
    """lightly's example loop for exactly ``steps`` steps; returns the backbone, losses and per-step end times."""
    from lightly.loss import NTXentLoss

    backbone, head = build_model(seed)
    images = store.images[torch.from_numpy(store.pretrain_indices())]
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(_PilImages(images, build_transform(arm, size)), batch_size=BATCH_SIZE,
                                         shuffle=True, drop_last=True, num_workers=workers, generator=generator)
    if len(loader) == 0:
        raise SystemExit(f"{store.name}: {len(images)} pretraining images, fewer than one batch of {BATCH_SIZE}")
    criterion = NTXentLoss()
    optimizer = build_optimizer(arm, list(backbone.parameters()) + list(head.parameters()))
    backbone.train(), head.train()
    losses: list[float] = []
    ends: list[float] = []
    started = time.perf_counter()
    while len(losses) < steps:
        for x0, x1 in loader:
            loss = criterion(head(backbone(x0)), head(backbone(x1)))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            ends.append(time.perf_counter() - started)
            if len(losses) >= steps:
                break
    return {"backbone": backbone, "losses": losses, "step_ends_s": ends,
            "pretrain_images_available": int(images.shape[0])}


def step_rates(step_ends_s: list[float], batch_size: int = BATCH_SIZE) -> list[float]:
    """Images/s of every step (its batch over the time since the previous step ended; the first from the start)."""
    durations = [b - a for a, b in zip([0.0, *step_ends_s[:-1]], step_ends_s)]
    return [batch_size / max(d, 1e-9) for d in durations]


def calibrate(store, arm: str, seed: int, workers: int, size: int, warmup: int, timed: int  # noqa: ANN001
              ) -> dict[str, Any]:
    """The example's images/s here: ``warmup`` untimed + ``timed`` timed steps, median per-step rate (the bake-off's
    rule, :func:`radssl.study.bakeoff.calibrate`); the whole-window rate is kept beside it for the record."""
    if timed < MIN_CALIBRATION_STEPS:
        raise SystemExit(f"--calibration-steps {timed}: at least {MIN_CALIBRATION_STEPS} timed steps (issue 19)")
    result = train_example(store, arm, seed, warmup + timed, workers, size)
    rates = step_rates(result["step_ends_s"])[warmup:]
    window = result["step_ends_s"][-1] - result["step_ends_s"][warmup - 1] if warmup else result["step_ends_s"][-1]
    return {"images_per_s": float(statistics.median(rates)), "timed_steps": len(rates), "warmup_steps": warmup,
            "rate_min": min(rates), "rate_max": max(rates), "window_images_per_s": timed * BATCH_SIZE / window,
            "threads": torch.get_num_threads(), "workers": workers, "batch_size": BATCH_SIZE,
            "machine": lib.machine()}


def budget_key(args: argparse.Namespace) -> str:
    """The run files' budget tag: ``<N>img`` or ``<M>min<k>t`` (a wall-clock budget is stated with its threads)."""
    return f"{args.budget_images}img" if args.budget_images else f"{args.budget_minutes:g}min{args.threads}t"


def run_tag(args: argparse.Namespace) -> str:
    """The run files' tag: ``<arm>_<budget>`` plus ``_propval`` for proportional validation, so runs read out under
    different validation rules never share a file name (the calibration, which no read-out enters, is shared)."""
    return f"{args.arm}_{budget_key(args)}{lib.VALIDATION_SUFFIX[args.validation]}"


def calibration_for(args: argparse.Namespace, store, runs_dir: Path) -> dict[str, Any]:  # noqa: ANN001
    """A wall-clock budget's calibration: the stored one of the same settings (so every seed gets the same steps),
    else a fresh one, stored atomically."""
    path = runs_dir / f"calibration_{args.arm}_{budget_key(args)}.json"
    key = {"arm": args.arm, "threads": args.threads, "workers": args.workers, "size": args.size,
           "warmup": args.calibration_warmup, "timed": args.calibration_steps, "batch_size": BATCH_SIZE}
    if path.is_file() and not args.recalibrate:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            print(f"calibration reused from {path}", flush=True)
            return stored["result"]
    print(f"[{time.strftime('%H:%M:%S')}] calibrating {args.arm} ({args.calibration_warmup} warm-up + "
          f"{args.calibration_steps} timed steps, {args.threads} threads)", flush=True)
    result = calibrate(store, args.arm, args.seeds[0] if args.seeds else 0, args.workers, args.size,
                       args.calibration_warmup, args.calibration_steps)
    write_json(path, {"key": key, "result": result})
    return result


def plan_steps(args: argparse.Namespace, calibration: dict[str, Any] | None) -> int:
    """Steps of every seed of this arm, by the bake-off's own functions (equal images / equal measured time)."""
    if args.budget_images:
        return steps_for_images(args.budget_images, BATCH_SIZE)
    return steps_for_wall_clock(args.budget_minutes * 60.0, calibration["images_per_s"], BATCH_SIZE)


def run_seed(args: argparse.Namespace, store, seed: int, out: Path, steps: int,  # noqa: ANN001
             calibration: dict[str, Any] | None) -> dict[str, Any]:
    started = time.perf_counter()
    result = train_example(store, args.arm, seed, steps, args.workers, args.size)
    wall = result["step_ends_s"][-1]
    backbone = result.pop("backbone").eval()
    record: dict[str, Any] = {
        "dataset": args.dataset, "seed": seed, "arm": args.arm, "recipe": ARMS[args.arm]["what"],
        "settings": {"lr": LR, "momentum": ARMS[args.arm]["momentum"], "transform": ARMS[args.arm]["transform"]},
        "budget": {"rule": "images_seen" if args.budget_images else "wall_clock",
                   "images_seen": args.budget_images, "minutes": args.budget_minutes, "threads": args.threads},
        "steps_from": "images seen" if args.budget_images else "calibration",
        "validation": validation_record(args.validation),
        "calibration": calibration, "workers": args.workers, "threads": args.threads, "batch_size": BATCH_SIZE,
        "steps": steps, "images_seen": steps * BATCH_SIZE, "pretrain_wall_s": wall,
        "pretrain_images_per_s": steps * BATCH_SIZE / max(wall, 1e-9), "first_loss": result["losses"][0],
        "final_loss": result["losses"][-1], "pretrain_images_available": result["pretrain_images_available"],
    }
    if args.budget_minutes:
        record["wall_clock_check"] = wall_clock_deviations(args.budget_minutes * 60.0, {f"seed{seed}": wall},
                                                           WALL_CLOCK_TOLERANCE)[f"seed{seed}"]
    record["ssl"] = lib.readouts(backbone, store, seed, validation=args.validation)
    record.update({"run_wall_s": time.perf_counter() - started, "peak_rss_mb": lib.peak_rss_mb(),
                   "machine": lib.machine()})
    write_json(out, record)
    return record


def validation_record(rule: str) -> dict[str, Any]:
    """The read-out's validation rule as recorded in run files (the floor only where it applies)."""
    from radssl.study.plan import VALIDATION_MIN_PER_CLASS

    return {"rule": rule, "min_per_class": VALIDATION_MIN_PER_CLASS if rule == "proportional" else None}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95 % t-interval over seeds of every read-out, each cell beside the images seen that produced it."""
    images = lib.mean_sd_interval([r["images_seen"] for r in runs])
    summary: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "images_seen": images,
                               "images_per_s": lib.mean_sd_interval([r["pretrain_images_per_s"] for r in runs]),
                               "pretrain_wall_s": lib.mean_sd_interval([r["pretrain_wall_s"] for r in runs])}
    checks = [r["wall_clock_check"] for r in runs if "wall_clock_check" in r]
    if checks:
        summary["wall_clock_flagged_seeds"] = [r["seed"] for r in runs if r.get("wall_clock_check", {}).get("flagged")]
    for protocol in ("linear", "knn"):
        for fraction in runs[0]["ssl"][protocol]:
            summary.setdefault(protocol, {})[fraction] = {
                **lib.mean_sd_interval([r["ssl"][protocol][fraction]["test_auc"] for r in runs]),
                "images_seen": images["mean"]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root")
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--arm", choices=sorted(ARMS), default="documented")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-images", type=int, help="images seen per run (the primary rule): ceil(N/256) steps")
    budget.add_argument("--budget-minutes", type=float, help="measured wall-clock pretraining minutes per run "
                                                              "(calibrated with --threads)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (same as radssl's arms)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calibration-warmup", type=int, default=5, help="wall-clock budgets: untimed steps")
    parser.add_argument("--calibration-steps", type=int, default=MIN_CALIBRATION_STEPS,
                        help=f"wall-clock budgets: timed steps (median; at least {MIN_CALIBRATION_STEPS})")
    parser.add_argument("--validation", choices=lib.VALIDATION_RULES, default="full",
                        help="rows that choose the probe's C: the whole validation split (full, the committed runs) "
                             "or the study's proportional rule (radssl bakeoff's default; needed to pair by seed "
                             "with a bake-off); proportional run files are tagged _propval")
    parser.add_argument("--recalibrate", action="store_true", help="ignore a stored calibration")
    parser.add_argument("--cached-only", action="store_true", help="only summarise finished runs")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="default: benchmarks/results")
    args = parser.parse_args(argv)
    if args.budget_images is not None and args.budget_images <= 0:
        parser.error(f"--budget-images {args.budget_images}: must be positive")
    if args.budget_minutes is not None and args.budget_minutes <= 0:
        parser.error(f"--budget-minutes {args.budget_minutes}: must be positive")
    if args.budget_minutes and args.calibration_steps < MIN_CALIBRATION_STEPS:
        parser.error(f"--calibration-steps {args.calibration_steps}: at least {MIN_CALIBRATION_STEPS} (issue 19)")
    torch.set_num_threads(args.threads)
    runs_dir = args.results_dir / "runs" / f"lightly_bar_{args.dataset}"
    tag = run_tag(args)
    pending = [] if args.cached_only else [s for s in args.seeds if not (runs_dir / f"seed{s}_{tag}.json").is_file()]
    if pending:
        runs_dir.mkdir(parents=True, exist_ok=True)
        store = lib.load_store(args.dataset, args.size, args.data_root)
        calibration = calibration_for(args, store, runs_dir) if args.budget_minutes else None
        steps = plan_steps(args, calibration)
        for seed in pending:
            print(f"[{time.strftime('%H:%M:%S')}] {args.dataset} lightly example ({args.arm}) seed {seed}: "
                  f"{steps} steps = {steps * BATCH_SIZE} images", flush=True)
            record = run_seed(args, store, seed, runs_dir / f"seed{seed}_{tag}.json", steps, calibration)
            check = record.get("wall_clock_check")
            if check and check["flagged"]:
                print(f"WARNING: seed {seed} pretrained {check['actual_s']:.0f} s against a {check['target_s']:.0f} s "
                      f"budget ({check['deviation']:+.0%}): rerun it on a quiet machine", flush=True)
    runs = [json.loads(p.read_text()) for p in sorted(runs_dir.glob(f"seed*_{tag}.json"))]
    if not runs:
        print(f"no finished runs in {runs_dir} matching seed*_{tag}.json", file=sys.stderr)
        return 1
    record = {"dataset": args.dataset, "arm": args.arm, "recipe": ARMS[args.arm]["what"],
              "budget": runs[0]["budget"], "validation": validation_record(args.validation),
              "protocol": "budget by radssl bakeoff's rule (images seen: ceil(N/256) steps; wall clock: median "
                          "img/s over >= 20 timed steps after warm-up, measured time checked, > 10 % flagged); "
                          "read-out = the bake-off's (linear probe C chosen on validation — the whole split, or with "
                          "--validation proportional the study's proportional rows —, kNN, label subsets drawn "
                          "with the seed); intervals are 95 % t over seeds",
              "summary": summarise(runs), "runs": runs, "versions": package_versions()}
    write_json(args.results_dir / f"lightly_bar_{args.dataset}_{tag}.json", record)
    images = record["summary"]["images_seen"]["mean"]
    for protocol in ("linear", "knn"):
        cells = [f"{f}: {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for f, v in
                 record["summary"][protocol].items()]
        print(protocol, " | ".join(cells), f"(n={len(runs)}, {images:.0f} images seen)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
