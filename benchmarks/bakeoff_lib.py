"""Shared pieces of the method bake-off and the preset sweep: one pretraining run at a stated budget, read out by a
frozen-feature linear probe (C chosen on validation) and kNN at several label fractions — and, with
``--finetune-epochs``, end-to-end fine-tuning — in a child process.

Why a child process per run: the peak memory of a run is the process's high-water mark (``VmHWM``), which only a
fresh process measures for that run alone; and a crash or a kill loses one run, not the bake-off. Each child writes
its result JSON atomically; a parent that finds the file skips the run, so a killed bake-off resumes.

Budget: ``--budget-minutes M`` is wall-clock pretraining time on this machine, the budget the issue's bar is stated
in. A short calibration run (a few steps after a warm-up step) measures the method's images/s, and the real run gets
``floor(M·60·img/s / batch)`` steps, so the LR schedule knows its length in advance and every method gets the same
minutes. A method is calibrated once, by its first seed's run; its other seeds reuse those steps (same images seen
for every seed, whatever else the machine was doing then). The actual wall time and images seen are recorded.
``--budget-images N`` gives every method the same number of images instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import machine, mean_sd_interval  # noqa: F401 (re-exported to the bake-off scripts)

from radssl.atomic import write_text_atomic

FRACTIONS = (0.01, 0.1, 1.0)





def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark in MiB (Linux ``VmHWM``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def load_store(dataset: str, size: int, data_root: str | None):  # noqa: ANN201 - ImageStore
    from radssl.data.medmnist import load_medmnist

    root = data_root or os.environ.get("RADSSL_DATA_DIR")
    if not root:
        raise SystemExit("set --data-root or RADSSL_DATA_DIR to a folder with the MedMNIST .npz files")
    return load_medmnist(dataset, size=size, root=Path(root), allow_download=False)


def method_model(method: str, backbone: str, stem: str) -> dict[str, Any]:
    """The model section for a method: the common backbone, or the first family a method insists on (MAE: ViT)."""
    from radssl.methods.registry import method_class

    cls = method_class(method)
    families = cls.requirements(cls.Params()).backbone_families
    if families is not None and backbone not in families:
        return {"backbone": families[0]}
    return {"backbone": backbone, "small_input": stem == "small"} if backbone.startswith("resnet") \
        else {"backbone": backbone}


def pretrain_config(method: str, model: dict[str, Any], steps: int, batch: int, seed: int, threads: int,
                    output_dir: Path, overrides: list[str]):  # noqa: ANN201 - PretrainConfig
    from radssl.config import load_config

    base = [
        f"output_dir={output_dir}", f"seed={seed}", f"method.name={method}",
        f"model={json.dumps(model)}",
        "train.accelerator=cpu" if not torch.cuda.is_available() else "train.accelerator=cuda",
        "train.devices=1", f"train.steps={steps}", f"train.batch_size={batch}", f"train.threads={threads}",
        f"train.checkpoint_every={max(steps, 1)}", "train.log_every=5", "train.progress_bar=false",
        "eval.enabled=false",
    ]
    return load_config(None, base + list(overrides))


def calibrate_images_per_s(store, method: str, model: dict[str, Any], batch: int, threads: int,  # noqa: ANN001
                           overrides: list[str], steps: int = 4) -> float:
    """Images/s of the method's engine step here: ``steps`` timed steps after one warm-up step."""
    from radssl.engine.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        config = pretrain_config(method, model, steps + 1, batch, 0, threads, Path(tmp) / "calibration", overrides)
        config = config.model_copy(update={"train": config.train.model_copy(update={"log_every": 1})})
        pretrain(config, store=store)
        rows = (Path(tmp) / "calibration" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        rates = [float(r.split(",")[header.index("images_per_s")]) for r in rows[2:]]  # drop the warm-up step
    return float(np.median(rates))


def fraction_subsets(store, seed: int) -> dict[float, np.ndarray]:  # noqa: ANN001
    """The seeded, stratified, nested training-label subsets every read-out of a run uses."""
    from radssl.data.splits import label_fraction_subsets

    return label_fraction_subsets(store.labels.numpy(), store.indices("train"), FRACTIONS, seed, store.patient_id,
                                  source=store.name)


VALIDATION_RULES = ("full", "proportional")
"""Which validation rows choose the probe's C: the whole split at every fraction (``full``, the committed runs'
rule), or the study's ``validation: proportional`` rule (``radssl.study.plan.proportional_validation_rows``)."""
VALIDATION_SUFFIX = {"full": "", "proportional": "_propval"}
"""The run files' budget-key suffix per validation rule, so runs read out under different rules never mix."""


def validation_subsets(store, seed: int, validation: str = "full") -> dict[float, np.ndarray]:  # noqa: ANN001
    """Per label fraction, the validation rows that choose the probe's C under ``validation`` (see
    :data:`VALIDATION_RULES`); ``proportional`` is exactly the study's draw (same strata, ``[seed, 1]`` stream, floor
    ``validation_min_per_class`` = its default), so these rows equal a ``radssl bakeoff`` study's for the same seed."""
    from radssl.study.plan import proportional_validation_rows, subset_strata

    if validation not in VALIDATION_RULES:
        raise ValueError(f"validation {validation!r}: expected one of {VALIDATION_RULES}")
    val = store.indices("val")
    if validation == "full":
        return {fraction: val for fraction in FRACTIONS}
    return proportional_validation_rows(subset_strata(store, store.indices("train")), val, FRACTIONS, seed,
                                        store.patient_id,
                                        source=f"{store.name} [validation: proportional, seed {seed}]")


def readouts(backbone, store, seed: int, device: str = "cpu",  # noqa: ANN001
             bn_stats: str = "reestimate", validation: str = "full") -> dict[str, Any]:
    """Linear probe (C on validation AUC) and kNN test AUC at each label fraction, subsets seeded by ``seed``.

    ``bn_stats``: the frozen encoder's BatchNorm statistics — re-estimated on the unlabelled training images (the
    study's default, the same for every arm) or the checkpoint's own (``radssl.transfer.bn_stats``).
    ``validation``: the rows that choose C (:func:`validation_subsets`; ``full`` = the whole split, as committed runs).
    """
    from radssl.transfer.bn_stats import frozen_encoder
    from radssl.transfer.features import extract_features
    from radssl.transfer.knn import knn_evaluate
    from radssl.transfer.linear_probe import linear_probe

    features = extract_features(frozen_encoder(backbone, store, bn_stats, device, seed=seed), store.images,
                                device=device)
    labels = store.labels
    train, test = store.indices("train"), store.indices("test")
    subsets = fraction_subsets(store, seed)
    val_rows = validation_subsets(store, seed, validation)
    tests = {"test": (features[test], labels[test])}
    out: dict[str, Any] = {"linear": {}, "knn": {}, "bn_stats": bn_stats, "validation": validation}
    for fraction, rows in subsets.items():
        index, val = torch.from_numpy(rows), torch.from_numpy(np.asarray(val_rows[fraction], dtype=np.int64))
        probe = linear_probe(features[index], labels[index], features[val], labels[val], tests, store.task,
                             seed=seed, standardisation_feats=features[train])  # label-free, whole train split
        knn = knn_evaluate(features[index], labels[index], tests, store.task, k=min(20, len(rows)))
        out["linear"][f"{fraction:g}"] = {"test_auc": probe.metrics["test"]["auc"], "val_auc": probe.val_metric,
                                          "C": probe.best_C, "train_images": int(len(rows)),
                                          "val_images": int(len(val))}
        out["knn"][f"{fraction:g}"] = {"test_auc": knn.metrics["test"]["auc"], "train_images": int(len(rows))}
    return out


FINETUNE_BACKBONE_LR_SCALES = (0.1, 1.0)
"""Backbone-LR candidates of the fine-tuning read-out, chosen on validation AUC for every initialisation alike."""


def finetune_readouts(backbone, store, seed: int, epochs: int, batch_size: int = 128,  # noqa: ANN001
                      device: str = "cpu") -> dict[str, Any]:
    """End-to-end fine-tuning test AUC at each label fraction (same seeded subsets as :func:`readouts`).

    Why a fourth read-out: restorative and masked-image pretraining (Models Genesis, MAE) are meant to be
    fine-tuned (Zhou et al., MedIA 2021; He et al., CVPR 2022); frozen linear/kNN read-outs alone judge them by a use
    they were not built for. Protocol, the same for SSL and random init: AdamW, head LR 1e-3, backbone LR scale from
    :data:`FINETUNE_BACKBONE_LR_SCALES` chosen on validation AUC, ``epochs`` epochs of one full training-split pass
    each at every fraction (small subsets are cycled: the fractions compare labels, not optimiser steps), the
    best-validation epoch restored before the test split is scored.
    """
    from radssl.transfer.finetune import finetune

    train, val, test = (store.indices(s) for s in ("train", "val", "test"))
    subsets = fraction_subsets(store, seed)
    full_pass = max(1, math.ceil(len(train) / batch_size))
    out: dict[str, Any] = {}
    for fraction, rows in subsets.items():
        tried = []
        for scale in FINETUNE_BACKBONE_LR_SCALES:
            result = finetune(backbone, store, rows, val, {"test": (store, test)}, epochs=epochs,
                              batch_size=batch_size, backbone_lr_scale=scale, early_stopping_patience=None,
                              steps_per_epoch=full_pass, seed=seed, device=device)
            tried.append({"backbone_lr_scale": scale, "val_auc": float(result.val_metric),
                          "test_auc": float(result.metrics["test"]["auc"]), "best_epoch": result.best_epoch,
                          "steps": result.steps_run, "wall_s": result.wall_time_s})
        chosen = select_on_validation(tried)
        out[f"{fraction:g}"] = {**chosen, "train_images": int(len(rows)), "candidates": tried}
    return out


def select_on_validation(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the best validation AUC (ties: the first listed); test AUC never enters the choice."""
    return dict(max(candidates, key=lambda c: c["val_auc"]))  # max keeps the first of equal keys


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """One (method, seed) run in this process: calibrate, pretrain at the budget, read out SSL and random init."""
    from radssl.engine.pretrain import pretrain
    from radssl.models.registry import build_from_spec

    torch.set_num_threads(args.threads)
    store = load_store(args.dataset, args.size, args.data_root)
    model = method_model(args.method, args.backbone, args.stem)
    overrides = list(args.override or [])
    started = time.perf_counter()
    calibration_from = args.calibration_from
    if args.budget_minutes and calibration_from:
        # Another seed of this method was calibrated already: reuse its rate and steps, so every seed of a method
        # sees the same images (seed variance is then not confounded with the machine's load when it ran).
        reference = json.loads(Path(calibration_from).read_text())
        rate, steps = float(reference["calibrated_images_per_s"]), int(reference["steps"])
    elif args.budget_minutes:
        rate = calibrate_images_per_s(store, args.method, model, args.batch_size, args.threads, overrides)
        steps = max(1, math.floor(args.budget_minutes * 60.0 * rate / args.batch_size))
        if args.calibrate_only:
            return {"dataset": args.dataset, "method": args.method, "calibrated_images_per_s": rate,
                    "steps": steps, "batch_size": args.batch_size, "budget": {"minutes": args.budget_minutes},
                    "threads": args.threads, "machine": machine()}
    else:
        rate = float("nan")
        steps = max(1, math.ceil(args.budget_images / args.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        config = pretrain_config(args.method, model, steps, args.batch_size, args.seed, args.threads,
                                 Path(tmp) / "run", overrides)
        result = pretrain(config, store=store)
        pretrain_wall = result.wall_time_s
        spec = result.backbone_spec
        ssl = readouts(result.backbone.eval(), store, args.seed)
        if args.finetune_epochs:
            ssl["finetune"] = finetune_readouts(result.backbone, store, args.seed, args.finetune_epochs)
        metrics = (Path(tmp) / "run" / "metrics.csv").read_text().splitlines()
    torch.manual_seed(args.seed)  # the run's own starting point, as the engine builds it
    random_backbone = build_from_spec(spec)
    random = readouts(random_backbone.eval(), store, args.seed)
    if args.finetune_epochs:
        random["finetune"] = finetune_readouts(random_backbone, store, args.seed, args.finetune_epochs)
    header = metrics[0].split(",")
    losses = [float(r.split(",")[header.index("loss")]) for r in metrics[1:]]
    return {
        "dataset": args.dataset, "method": args.method, "seed": args.seed, "overrides": overrides,
        "backbone": spec.describe(), "backbone_spec": spec.to_dict(),
        "budget": {"minutes": args.budget_minutes, "images": args.budget_images},
        "finetune_epochs": args.finetune_epochs,
        "calibrated_images_per_s": rate, "calibration_from": str(calibration_from) if calibration_from else None,
        "steps": steps, "batch_size": args.batch_size,
        "images_seen": steps * args.batch_size, "pretrain_wall_s": pretrain_wall,
        "pretrain_images_per_s": steps * args.batch_size / max(pretrain_wall, 1e-9),
        "first_loss": losses[0] if losses else None, "final_loss": result.final_loss,
        "config": config.to_dict(), "peak_rss_mb": peak_rss_mb(),
        "run_wall_s": time.perf_counter() - started,
        "ssl": ssl, "random_init": random, "machine": machine(),
    }


def child_command(script: Path, args: argparse.Namespace, method: str, seed: int, out: Path,
                  overrides: list[str], calibration_from: Path | None = None) -> list[str]:
    command = [sys.executable, str(script), "--child", "--dataset", args.dataset, "--size", str(args.size),
               "--method", method, "--seed", str(seed), "--backbone", args.backbone, "--stem", args.stem,
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--child-output", str(out)]
    if args.data_root:
        command += ["--data-root", args.data_root]
    command += ["--budget-minutes", str(args.budget_minutes)] if args.budget_minutes else \
        ["--budget-images", str(args.budget_images)]
    if calibration_from is not None:
        command += ["--calibration-from", str(calibration_from)]
    if args.calibrate_only:
        command += ["--calibrate-only"]
    if args.finetune_epochs:
        command += ["--finetune-epochs", str(args.finetune_epochs)]
    for text in overrides:
        command += ["--override", text]
    return command


def run_in_child(script: Path, args: argparse.Namespace, method: str, seed: int, out: Path,
                 overrides: list[str], calibration_from: Path | None = None) -> dict[str, Any] | None:
    """The run's result JSON (computed in a child process unless it already exists); None if the child failed.

    ``calibration_from``: a finished run of the same method (another seed) whose calibrated steps this run reuses.
    """
    if out.is_file():
        return json.loads(out.read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    command = child_command(script, args, method, seed, out, overrides, calibration_from)
    print(f"[{time.strftime('%H:%M:%S')}] {args.dataset} {method} seed {seed} {' '.join(overrides)}", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0 or not out.is_file():
        print(completed.stdout[-2000:] + completed.stderr[-4000:], file=sys.stderr, flush=True)
        return None
    return json.loads(out.read_text())


def add_data_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The MedMNIST set, image size, backbone, batch and threads every bake-off script takes, with one set of
    defaults (28 px, ResNet-18 standard stem, batch 256, 2 threads)."""
    parser.add_argument("--data-root")
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--stem", choices=["small", "standard"], default="standard")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_model_arguments(parser)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-minutes", type=float, help="wall-clock pretraining minutes per run")
    budget.add_argument("--budget-images", type=int, help="images seen per run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--calibration-from", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="also fine-tune SSL and random init end to end for this many full-split epochs at each "
                             "label fraction (backbone LR chosen on validation); 0 = frozen read-outs only")
    parser.add_argument("--calibrate-only", action="store_true",
                        help="only measure each method's img/s and write its step count for the budget (run this on "
                             "a quiet machine; the runs then reuse those steps, so they may share the machine)")


def child_main(args: argparse.Namespace) -> int:
    record = run_child(args)
    write_text_atomic(args.child_output, json.dumps(record, indent=2, default=float))
    return 0


