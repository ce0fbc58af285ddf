"""3D label efficiency: random vs self-supervised 3D encoders on VesselMNIST3D (classification) and MSD hippocampus
(segmentation), with the 3D runs' throughput and peak memory. CPU-sized: every number is for a small 3D CNN trained
for minutes, not for the papers' GPU-days.

(a) VesselMNIST3D (MedMNIST v3; 28³ binary vessel segments, label 1 = aneurysm; MedMNIST's own train/val/test).
    SSL: SimCLR (Chen et al., ICML 2020; radssl preset, 3D MR-style views without bias field: all-axis flips and
    quarter-turns, small tilts, crops) on the training split's volumes, ``small_cnn_3d`` (width 8, full-resolution
    first stage at 28³), one pretraining run. Read-out: frozen features, logistic regression with C chosen on the
    validation split's AUC (``radssl.transfer.linear_probe``), at 1 / 10 / 100 % of the training labels
    (stratified, nested, drawn per seed), 3 seeds (a seed draws the label subset, the probe and the random
    encoder). Paired SSL − random test over seeds and test cases. Reference (MedMNIST v2, *supervised end-to-end
    training from scratch with all labels*, ResNet-18+3D: test AUC .874; ResNet-18+ACS .930) — a linear probe on a
    frozen 0.2 M-parameter CNN is a different, much cheaper protocol, so the reference is a ceiling, not a twin.
(b) MSD Task04 hippocampus (260 MRI crops, labels 1 anterior / 2 posterior; 1 mm voxels), read through radssl's
    NIfTI source with ``mask_folder: labelsTr``, centre-cropped/padded to 40 × 56 × 40 without resampling (every
    labelled voxel of the 260 cases lies inside that box, checked), split 70/10/20 % by case. SSL: Models Genesis
    (Zhou et al., MICCAI 2019 / MedIA 2021: restoration of corrupted sub-volumes, the survey's CT/MR anchor and a
    pretext designed for segmentation transfer) on the *training* cases' images only (never validation or test),
    same ``small_cnn_3d`` (width 8, full-resolution first stage). Transfer: ``finetune_segmentation`` (U-Net
    decoder, DiceCE, 32³ patches half centred on foreground, sliding-window inference), full fine-tuning (one
    encoder-LR rule for both initialisations), at ~5 / 10 / 25 / 100 % of the labelled training cases (nested
    subsets), the same optimiser steps at every fraction, model selection on a fixed subset of validation cases;
    plus the frozen-encoder protocol at 100 %. Metric: each test case's Dice averaged over the two structures
    (``dice_mean``), per-structure Dice and HD95 (mm) beside it; SSL − random by a paired bootstrap over test cases
    and a Wilcoxon signed-rank test. Reference: nnU-Net ≈ .89 mean Dice with all cases, 3D full resolution, 1000
    epochs on a GPU (Isensee et al., Nat Methods 2021; MSD leaderboard) — a different budget by ~3 orders of
    magnitude. Caveat: MSD hippocampus has no subject ids and several crops may come from one subject, so
    case-level splits can leak subjects between training and test.
(c) Throughput and peak memory: each 3D workload (SimCLR and Models Genesis pretraining steps, segmentation training
    steps, sliding-window inference) runs alone in a fresh child process for a few steps; we report its samples/s and
    the child's peak resident memory (ru_maxrss), beside the idle baseline of a child that only imports radssl.

Budget: CPU time of this process and its children (user + system), per phase, is recorded beside wall time — the
machine (2 cores) is shared with other jobs, so wall times are inflated and only indicative. Run under ``nice -n 10``.

Usage:
  RADSSL_DATA_DIR=/path/to/data nice -n 10 python benchmarks/label_efficiency_3d.py
  RADSSL_DATA_DIR=/path/to/data python benchmarks/label_efficiency_3d.py --smoke --output /tmp/le3d.json
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import cpu_seconds as process_cpu_seconds
from common import machine as shared_machine
from common import add_render_arguments, render_from_result, write_json

from radssl.atomic import write_text_atomic
from radssl.config import load_config
from radssl.data.build import build_store
from radssl.data.splits import label_fraction_subsets
from radssl.data.store import ImageStore, TaskInfo
from radssl.engine.pretrain import backbone_for, pretrain
from radssl.models.registry import build_from_spec
from radssl.study.figures import interval_curves
from radssl.study.formatting import num
from radssl.study.pages import Cell, PageSection, Paragraph, Table, interval_cell, render_benchmark_page
from radssl.study.statistics import (
    binary_auc,
    bootstrap_ci,
    case_mean,
    paired_bootstrap,
    seed_t_interval,
    seeds_and_cases_paired_test,
    wilcoxon_paired,
)
from radssl.transfer.features import extract_features
from radssl.transfer.linear_probe import linear_probe
from radssl.transfer.segmentation import finetune_segmentation, predict_labels

HIPPOCAMPUS_CLASSES = ("background", "anterior", "posterior")
HIPPOCAMPUS_SHAPE = (40, 56, 40)
MEDMNIST_REFERENCE = {"ResNet-18+3D": 0.874, "ResNet-18+ACS": 0.930, "ResNet-50+3D": 0.907}
NNUNET_REFERENCE = 0.89


# ------------------------------------------------------------------------------------------------ bookkeeping
def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (all threads): the probes' children."""
    return process_cpu_seconds(children=True)


class Phases:
    """CPU and wall seconds per named phase."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def measure(self, name: str):  # noqa: ANN201 - a context manager
        phases = self

        class _Timer:
            def __enter__(self) -> None:
                self.cpu, self.wall = cpu_seconds(), time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                phases.cpu[name] = phases.cpu.get(name, 0.0) + cpu_seconds() - self.cpu
                phases.wall[name] = phases.wall.get(name, 0.0) + time.perf_counter() - self.wall

        return _Timer()


def machine() -> dict[str, Any]:
    return shared_machine(description=f"{os.cpu_count()}-core CPU, no GPU (cuda available: {torch.cuda.is_available()}), "
                                      "shared with other jobs; torch threads 1")


def _data_root(args: argparse.Namespace) -> Path:
    root = args.data_root or (Path(os.environ["RADSSL_DATA_DIR"]) if os.environ.get("RADSSL_DATA_DIR") else None)
    if root is None or not root.is_dir():
        raise SystemExit("set RADSSL_DATA_DIR or --data-root to the folder holding medmnist/ and msd/")
    return root


def _train_overrides(steps: int, batch: int, output_dir: Path, seed: int) -> list[str]:
    return [f"output_dir={output_dir}", f"seed={seed}", f"train.steps={steps}", f"train.batch_size={batch}",
            "train.accelerator=cpu", "train.devices=1", "train.threads=1", "train.progress_bar=false",
            f"train.log_every={max(1, steps // 10)}", f"train.checkpoint_every={steps}", "eval.enabled=false"]


# ------------------------------------------------------------------------------------------------ (a) vessels
def vessel_config(root: Path, steps: int, batch: int, output_dir: Path, seed: int = 0) -> Any:
    return load_config(None, [
        "data.source=medmnist", "data.name=vesselmnist3d", f"data.root={root / 'medmnist'}", "data.download=false",
        "method.name=simclr", "model.backbone=small_cnn_3d", "model.options.width=8", "views.modality=mr",
        "views.bias_field_p=0.0", *_train_overrides(steps, batch, output_dir, seed)])


def vessel_part(args: argparse.Namespace, root: Path, work: Path, phases: Phases) -> dict[str, Any]:
    config = vessel_config(root, args.vessel_steps, args.vessel_batch, work / "vessel-simclr")
    store = build_store(config.data)
    task = TaskInfo("binary", 2, store.task.class_names)
    labels = store.labels.numpy()
    rows = {split: store.indices(split) for split in ("train", "val", "test")}
    y_test = labels[rows["test"]]
    with phases.measure("vessel_ssl_pretraining"):
        result = pretrain(config, store)
    pretraining = {"method": "simclr (radssl preset)", "backbone": result.backbone_spec.describe(),
                   "steps": result.steps, "batch_size": args.vessel_batch, "images_seen": result.images_seen,
                   "final_loss": result.final_loss, "wall_s": round(result.wall_time_s, 1),
                   "images_per_s_wall": round(result.images_per_s, 1),
                   "pretrain_images": result.run_record.get("pretrain_images")}
    print(f"(a) SimCLR on VesselMNIST3D: {pretraining}", flush=True)
    with phases.measure("vessel_features"):
        features = {"ssl": extract_features(result.backbone, store.images, batch_size=256).numpy()}
    probes: dict[str, dict[str, dict[str, Any]]] = {"random": {}, "ssl": {}}
    for seed in args.seeds:
        with phases.measure("vessel_features"):
            torch.manual_seed(seed)
            random_features = extract_features(backbone_for(config, store), store.images, batch_size=256).numpy()
        subsets = label_fraction_subsets(labels, rows["train"], args.vessel_fractions, seed, source="vesselmnist3d")
        with phases.measure("vessel_probes"):
            for init, feats in (("random", random_features), ("ssl", features["ssl"])):
                for fraction, chosen in subsets.items():
                    probe = linear_probe(feats[chosen], labels[chosen], feats[rows["val"]], labels[rows["val"]],
                                         {"test": (feats[rows["test"]], y_test)}, task, seed=seed,
                                         standardisation_feats=feats[rows["train"]])  # label-free, whole split
                    probes[init].setdefault(str(fraction), {})[str(seed)] = {
                        "auc": binary_auc(y_test, probe.scores["test"]), "C": probe.best_C,
                        "train_cases": int(len(chosen)), "scores": probe.scores["test"]}
        print(f"(a) seed {seed}: " + "; ".join(
            f"{init} " + ", ".join(f"{float(f):.0%} {probes[init][f][str(seed)]['auc']:.3f}" for f in probes[init])
            for init in probes), flush=True)
    summary: dict[str, Any] = {"arms": {}, "ssl_minus_random": {}}
    for init, per_fraction in probes.items():
        summary["arms"][init] = {}
        for fraction, runs in per_fraction.items():
            aucs = [runs[str(s)]["auc"] for s in args.seeds]
            mean, low, high, _, n = seed_t_interval(aucs, bounds=(0.0, 1.0))
            summary["arms"][init][fraction] = {"per_seed": aucs, "mean": mean, "seed_t_interval": [low, high],
                                               "train_cases": runs[str(args.seeds[0])]["train_cases"],
                                               "C_per_seed": [runs[str(s)]["C"] for s in args.seeds]}
    for fraction in probes["ssl"]:
        a = [probes["ssl"][fraction][str(s)]["scores"] for s in args.seeds]
        b = [probes["random"][fraction][str(s)]["scores"] for s in args.seeds]
        test = seeds_and_cases_paired_test(y_test, a, b, binary_auc)
        summary["ssl_minus_random"][fraction] = {
            "mean": float(np.mean([binary_auc(y_test, x) - binary_auc(y_test, y) for x, y in zip(a, b)])),
            "seeds_and_cases_interval": [test.low, test.high], "p": test.p_value}
    return {
        "data": {"description": "VesselMNIST3D (MedMNIST v3, 28³, binary: vessel / aneurysm), MedMNIST splits",
                 "splits": {k: int(len(v)) for k, v in rows.items()},
                 "positives": {k: int(labels[v].sum()) for k, v in rows.items()}},
        "pretraining": pretraining, "summary": summary, "reference_test_auc": MEDMNIST_REFERENCE,
        "protocol": "linear probe on frozen features (logistic regression, C on validation AUC), label fractions "
                    f"{args.vessel_fractions}, seeds {args.seeds}; one SSL pretraining run (seed 0), a fresh random "
                    "encoder per seed",
    }


# ------------------------------------------------------------------------------------------------ (b) hippocampus
def hippocampus_overrides(root: Path, cache: Path) -> list[str]:
    return [
        "data.name=msd-hippocampus", "data.source.kind=nifti", f"data.source.root={root / 'msd' / 'task04_hippocampus'}",
        "data.source.pattern=imagesTr/*.nii.gz", "data.source.mask_folder=labelsTr",
        f"data.source.mask_classes=[{','.join(HIPPOCAMPUS_CLASSES)}]", "data.source.modality=MR",
        "data.source.patient_from=file", "data.preprocess.modality=mr",
        f"data.preprocess.target_size=[{','.join(map(str, HIPPOCAMPUS_SHAPE))}]", "data.preprocess.resize=crop_or_pad",
        f"data.cache_dir={cache}", "data.task.kind=none", "data.split_fractions=[0.7,0.1,0.2]", "data.split_seed=0",
    ]


def hippocampus_config(root: Path, cache: Path, steps: int, batch: int, output_dir: Path, seed: int = 0) -> Any:
    return load_config(None, [
        *hippocampus_overrides(root, cache), "method.name=models_genesis", "model.backbone=small_cnn_3d",
        "model.small_input=true", "model.options.width=8", "views.output_size=32",
        *_train_overrides(steps, batch, output_dir, seed)])


def nested_case_subsets(train_rows: np.ndarray, fractions: list[float], seed: int) -> dict[float, np.ndarray]:
    """Nested random subsets of the training cases (at least 2 cases): the first ⌈f·n⌉ of one seeded permutation."""
    order = np.random.default_rng(np.random.SeedSequence([seed, 3])).permutation(train_rows)
    return {f: np.sort(order[:max(2, math.ceil(f * len(order)))]) for f in fractions}


def _segmentation_run(backbone: torch.nn.Module, store: ImageStore, train: np.ndarray, val: np.ndarray,
                      test: np.ndarray, args: argparse.Namespace, seed: int, freeze: bool) -> dict[str, Any]:
    begin_cpu = cpu_seconds()
    result = finetune_segmentation(
        backbone, store, train, val, {"test": (store, test)}, freeze_encoder=freeze, epochs=args.seg_epochs,
        steps_per_epoch=args.seg_steps_per_epoch, batch_size=args.seg_batch, lr=args.seg_lr, encoder_lr_scale=1.0,
        patch_size=(32, 32, 32), foreground_ratio=0.5, early_stopping_patience=args.seg_patience,
        min_epochs=args.seg_min_epochs, seed=seed, sw_batch_size=4, sw_overlap=0.25)
    per_case = {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in result.per_case["test"].items()}
    return {
        "metrics": result.metrics["test"], "counts": result.counts["test"], "per_case": per_case,
        "hd95_unit": result.hd95_unit["test"], "val_dice": result.val_metric, "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "steps": result.steps, "train_cases": int(len(train)),
        "train_patches_per_s_wall": round(result.train_samples / max(result.train_seconds, 1e-9), 2),
        "wall_s": round(result.wall_time_s, 1), "cpu_s": round(cpu_seconds() - begin_cpu, 1),
        "history": [{k: round(v, 4) for k, v in h.items()} for h in result.history],
    }


def hippocampus_part(args: argparse.Namespace, root: Path, work: Path, phases: Phases) -> dict[str, Any]:
    config = hippocampus_config(root, work / "cache", args.ssl_steps, args.ssl_batch, work / "hippocampus-genesis")
    store = build_store(config.data)
    rows = {split: store.indices(split) for split in ("train", "val", "test")}
    if args.smoke:
        rows = {k: v[:n] for (k, v), n in zip(rows.items(), (12, 4, 6))}
    val = np.sort(np.random.default_rng(5).choice(rows["val"], size=min(args.val_cases, len(rows["val"])),
                                                  replace=False))
    with phases.measure("hippocampus_ssl_pretraining"):
        result = pretrain(config, store)
    pretraining = {"method": "models_genesis (radssl preset)", "backbone": result.backbone_spec.describe(),
                   "steps": result.steps, "batch_size": args.ssl_batch, "images_seen": result.images_seen,
                   "final_loss": result.final_loss, "wall_s": round(result.wall_time_s, 1),
                   "images_per_s_wall": round(result.images_per_s, 2),
                   "pretrain_images": result.run_record.get("pretrain_images")}
    print(f"(b) Models Genesis on hippocampus training cases: {pretraining}", flush=True)
    subsets = nested_case_subsets(rows["train"], args.seg_fractions, seed=0)
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for seed in args.seg_seeds:
        for fraction, train in subsets.items():
            for init in ("random", "ssl"):
                if init == "ssl":
                    backbone = result.backbone
                else:
                    torch.manual_seed(seed)
                    backbone = build_from_spec(result.backbone_spec)
                with phases.measure("hippocampus_segmentation"):
                    run = _segmentation_run(backbone, store, train, val, rows["test"], args, seed, freeze=False)
                runs.setdefault(f"finetune/{init}", {}).setdefault(str(fraction), {})[str(seed)] = run
                print(f"(b) seed {seed} {fraction:.0%} ({len(train)} cases) {init}: test Dice "
                      f"{run['metrics']['dice_mean']:.3f} (val {run['val_dice']:.3f}, epoch {run['best_epoch']}, "
                      f"{run['cpu_s']:.0f} CPU-s)", flush=True)
    for fraction in args.frozen_fractions:
        train = subsets[fraction]
        for init in ("random", "ssl"):
            torch.manual_seed(args.seg_seeds[0])
            backbone = result.backbone if init == "ssl" else build_from_spec(result.backbone_spec)
            with phases.measure("hippocampus_segmentation"):
                run = _segmentation_run(backbone, store, train, val, rows["test"], args, args.seg_seeds[0],
                                        freeze=True)
            runs.setdefault(f"frozen/{init}", {}).setdefault(str(fraction), {})[str(args.seg_seeds[0])] = run
            print(f"(b) frozen {fraction:.0%} {init}: test Dice {run['metrics']['dice_mean']:.3f}", flush=True)
    return {
        "data": {"description": "MSD Task04 hippocampus, 260 labelled MRI crops (1 mm), NIfTI source with "
                                "mask_folder labelsTr, centre crop/pad to 40×56×40 (no resampling; every labelled "
                                "voxel inside), case-level 70/10/20 % split (split_seed 0)",
                 "splits": {k: int(len(v)) for k, v in rows.items()}, "validation_cases_used": int(len(val)),
                 "caveat": "no subject ids are distributed and several crops may come from one subject: case-level "
                           "splits may leak subjects between training and test (optimistic for both arms alike)"},
        "pretraining": pretraining, "subsets": {str(f): int(len(s)) for f, s in subsets.items()},
        "runs": runs, "summary": summarise_segmentation(runs),
        "reference_mean_dice": {"nnU-Net (3D full resolution, all cases, GPU)": NNUNET_REFERENCE},
        "protocol": f"finetune_segmentation: {args.seg_epochs} epochs × {args.seg_steps_per_epoch} steps × batch "
                    f"{args.seg_batch} patches 32³ (half centred on foreground) at every fraction, lr {args.seg_lr} "
                    f"(AdamW, cosine), encoder LR scale 1.0 for both initialisations, early stopping on validation "
                    f"Dice (patience {args.seg_patience}, not before epoch {args.seg_min_epochs}), "
                    f"{len(val)} fixed validation cases, sliding-window inference (overlap 0.25, Gaussian), "
                    f"seeds {args.seg_seeds}; frozen encoder at {args.frozen_fractions}",
    }


def summarise_segmentation(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per arm × fraction: mean Dice (seed-averaged per case) with a case bootstrap CI; SSL − random paired tests."""

    def seed_averaged(arm: str, fraction: str, metric: str) -> np.ndarray:
        values = [np.asarray([np.nan if x is None else x for x in run["per_case"][metric]], dtype=np.float64)
                  for run in runs[arm][fraction].values()]
        return np.nanmean(np.stack(values), axis=0) if len(values) > 1 else values[0]

    summary: dict[str, Any] = {"arms": {}, "ssl_minus_random": {}}
    for arm, per_fraction in runs.items():
        summary["arms"][arm] = {}
        for fraction in per_fraction:
            entry: dict[str, Any] = {}
            for metric in ("dice_mean", "dice_anterior", "dice_posterior", "hd95_mean"):
                values = seed_averaged(arm, fraction, metric)
                estimate, low, high = bootstrap_ci(np.zeros(len(values)), values, case_mean, n_boot=1000,
                                                   stratified=False)
                entry[metric] = {"mean": estimate, "case_bootstrap_ci": [low, high]}
            summary["arms"][arm][fraction] = entry
    for protocol in ("finetune", "frozen"):
        if f"{protocol}/ssl" not in runs:
            continue
        summary["ssl_minus_random"][protocol] = {}
        for fraction in runs[f"{protocol}/ssl"]:
            a = seed_averaged(f"{protocol}/ssl", fraction, "dice_mean")
            b = seed_averaged(f"{protocol}/random", fraction, "dice_mean")
            paired = paired_bootstrap(np.zeros(len(a)), a, b, case_mean, n_boot=2000, stratified=False)
            wilcoxon = wilcoxon_paired([a], [b])
            summary["ssl_minus_random"][protocol][fraction] = {
                "dice_difference": paired.difference, "paired_bootstrap_ci": [paired.low, paired.high],
                "paired_bootstrap_p": paired.p_value, "wilcoxon_p": wilcoxon.p_value,
                "median_case_difference": wilcoxon.median_difference, "cases": wilcoxon.n_cases}
    return summary


# ------------------------------------------------------------------------------------------------ (c) probes
def _probe_child(kind: str, root: str, work: str, steps: int, queue: Any) -> None:
    """One workload alone in a fresh process: samples/s (wall) and this process's peak RSS."""
    torch.set_num_threads(1)
    root_path, work_path = Path(root), Path(work)
    samples, seconds = 0, 0.0
    if kind == "simclr_28":
        config = vessel_config(root_path, steps, 32, work_path / f"probe-{kind}")
        result = pretrain(config, build_store(config.data))
        samples, seconds = result.images_seen, result.wall_time_s
        unit = "volumes/s (28³, batch 32, 2 views each)"
    elif kind == "genesis_32":
        config = hippocampus_config(root_path, work_path / "cache", steps, 8, work_path / f"probe-{kind}")
        result = pretrain(config, build_store(config.data))
        samples, seconds = result.images_seen, result.wall_time_s
        unit = "volumes/s (32³ sub-volumes, batch 8)"
    elif kind in ("segmentation_train_32", "sliding_window_inference"):
        config = hippocampus_config(root_path, work_path / "cache", 1, 8, work_path / f"probe-{kind}")
        store = build_store(config.data)
        torch.manual_seed(0)
        backbone = backbone_for(config, store)
        train, val, test = store.indices("train"), store.indices("val")[:1], store.indices("test")[:1]
        run = finetune_segmentation(backbone, store, train, val, {"test": (store, test)}, epochs=1,
                                    steps_per_epoch=steps, batch_size=4, patch_size=(32, 32, 32), hd95=False)
        if kind == "segmentation_train_32":
            samples, seconds = run.train_samples, run.train_seconds
            unit = "patches/s (32³, batch 4, forward + backward + augmentation)"
        else:
            images = store.images[torch.from_numpy(store.indices("test")[:steps])]
            start = time.perf_counter()
            predict_labels(run.model, images, patch_size=(32, 32, 32), batch_size=1, sw_batch_size=4)
            samples, seconds = len(images), time.perf_counter() - start
            unit = "volumes/s (40×56×40, sliding window 32³, overlap 0.25)"
    else:  # baseline: imports only
        unit = ""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put({"kind": kind, "samples": samples, "seconds": round(seconds, 2),
               "samples_per_s": round(samples / seconds, 2) if seconds else None, "unit": unit,
               "peak_rss_mb": round(_peak_rss_kb() / 1024, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)})


def _peak_rss_kb() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across fork + exec, so a
    spawned child would report its parent's peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def resource_probes(args: argparse.Namespace, root: Path, work: Path) -> list[dict[str, Any]]:
    context = multiprocessing.get_context("spawn")
    out = []
    plan = [("baseline", 0), ("simclr_28", args.probe_steps), ("genesis_32", args.probe_steps),
            ("segmentation_train_32", args.probe_steps), ("sliding_window_inference", args.probe_steps)]
    for kind, steps in plan:
        queue = context.Queue()
        child = context.Process(target=_probe_child, args=(kind, str(root), str(work), steps, queue))
        child.start()
        result = queue.get()
        child.join()
        out.append(result)
        print(f"(c) {result}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ report
def vessel_section(vessel: dict[str, Any]) -> PageSection:
    """(a): linear-probe test AUC per arm and label fraction, the paired SSL − random row, and the curves."""
    s, p = vessel["summary"], vessel["pretraining"]
    fractions = list(s["arms"]["ssl"])
    headers = ["encoder", *(f"{float(f):.0%} ({s['arms']['ssl'][f]['train_cases']} volumes)" for f in fractions)]
    rows: list[list[Cell | str]] = [[init, *(interval_cell(s["arms"][init][f]["mean"],
                                                           *s["arms"][init][f]["seed_t_interval"]) for f in fractions)]
                                    for init in ("random", "ssl")]
    rows.append(["SSL − random", *(interval_cell(s["ssl_minus_random"][f]["mean"],
                                                 *s["ssl_minus_random"][f]["seeds_and_cases_interval"],
                                                 difference=True, after=(f"p {num(s['ssl_minus_random'][f]['p'])}",))
                                   for f in fractions)])
    curve = interval_curves({init: [(float(f), s["arms"][init][f]["mean"], *s["arms"][init][f]["seed_t_interval"])
                                    for f in fractions] for init in ("random", "ssl")}, "test AUC", (0.4, 1.0),
                            ("ResNet-18+3D .874", MEDMNIST_REFERENCE["ResNet-18+3D"]),
                            "Linear-probe test AUC, mean over seeds with the t-interval over seeds.")
    return PageSection(
        "vessel", "(a) VesselMNIST3D classification — linear probe test AUC",
        paragraphs=[f"{vessel['data']['description']}; splits {vessel['data']['splits']}, positives "
                    f"{vessel['data']['positives']}. SSL: {p['method']}, {p['backbone']}, {p['steps']} steps × batch "
                    f"{p['batch_size']} ({p['images_seen']} volumes seen), final loss {num(p['final_loss'])}.",
                    Paragraph(vessel["protocol"], "Protocol")],
        tables=[Table(headers, rows, numeric=range(1, len(headers)))],
        fine_print=["Mean over seeds [t-interval over seeds]; SSL − random: mean paired difference [interval over "
                    "seeds and test cases], p. Reference (supervised, from scratch, all labels; MedMNIST v2): "
                    "ResNet-18+3D .874, ResNet-18+ACS .930."],
        figures=[curve])


def hippocampus_cell(entry: dict[str, Any] | None) -> Cell:
    """A segmentation arm's cell: mean Dice [case bootstrap CI], then per-structure Dice and HD95."""
    if entry is None:
        return Cell("")
    d, a, b, h = (entry[m] for m in ("dice_mean", "dice_anterior", "dice_posterior", "hd95_mean"))
    return interval_cell(d["mean"], *d["case_bootstrap_ci"], strong=True,
                         after=(f"ant {num(a['mean'])} · post {num(b['mean'])} · HD95 {num(h['mean'], 1)} mm",))


def hippocampus_section(hippo: dict[str, Any]) -> PageSection:
    """(b): test mean Dice per arm and fraction, the paired SSL − random rows per protocol, and the curves."""
    s, p = hippo["summary"], hippo["pretraining"]
    fractions = list(s["arms"]["finetune/ssl"])
    headers = ["arm", *(f"{float(f):.0%} ({hippo['subsets'][f]} cases)" for f in fractions)]
    rows: list[list[Cell | str]] = [[arm, *(hippocampus_cell(s["arms"][arm].get(f)) for f in fractions)]
                                    for arm in s["arms"]]
    for protocol, per_fraction in s["ssl_minus_random"].items():
        rows.append([f"SSL − random ({protocol})", *(
            Cell("") if (e := per_fraction.get(f)) is None else
            interval_cell(e["dice_difference"], *e["paired_bootstrap_ci"], difference=True,
                          after=(f"bootstrap p {num(e['paired_bootstrap_p'])}, Wilcoxon p {num(e['wilcoxon_p'])}",))
            for f in fractions)])
    curve = interval_curves({arm: [(float(f), s["arms"][arm][f]["dice_mean"]["mean"],
                                    *s["arms"][arm][f]["dice_mean"]["case_bootstrap_ci"]) for f in fractions]
                             for arm in ("finetune/random", "finetune/ssl")}, "test mean Dice", (0.0, 1.0),
                            ("nnU-Net ≈ .89", NNUNET_REFERENCE),
                            "Test mean Dice over cases with the case-bootstrap 95 % CI.")
    return PageSection(
        "hippocampus", "(b) MSD hippocampus segmentation — test mean Dice of the two structures",
        paragraphs=[f"{hippo['data']['description']}; splits {hippo['data']['splits']}.",
                    Paragraph(hippo["data"]["caveat"], "Caveat"),
                    f"SSL: {p['method']}, {p['backbone']}, {p['steps']} steps × batch {p['batch_size']} on the "
                    f"{p['pretrain_images']} training cases' images, final loss {num(p['final_loss'])}.",
                    Paragraph(hippo["protocol"], "Protocol")],
        tables=[Table(headers, rows, numeric=range(1, len(headers)))],
        fine_print=["Mean over test cases of each case's mean Dice [case bootstrap 95 % CI]; per-structure Dice and "
                    "HD95 (mm; both-empty cases left out, a missed or hallucinated structure counts the image "
                    "diagonal). SSL − random: paired bootstrap over test cases [95 % CI] and Wilcoxon signed-rank p. "
                    "Reference: nnU-Net ≈ .89 (all cases, GPU, 1000 epochs)."],
        figures=[curve])


def render_html(payload: dict[str, Any]) -> str:
    """The page (radssl's benchmark template): (a), (b), (c) where measured, the reading and the settings."""
    sections = []
    if payload.get("vessel"):
        sections.append(vessel_section(payload["vessel"]))
    if payload.get("hippocampus"):
        sections.append(hippocampus_section(payload["hippocampus"]))
    if payload.get("resources"):
        sections.append(PageSection(
            "resources", "(c) 3D throughput and peak memory (each workload alone in a fresh process)",
            tables=[Table(["workload", "samples/s (wall)", "unit", "peak RSS MB"],
                          [[r["kind"], num(r["samples_per_s"], 2), r["unit"], str(r["peak_rss_mb"])]
                           for r in payload["resources"]], numeric=(1, 3))],
            fine_print=["Peak RSS includes the Python + torch + radssl baseline (the 'baseline' row). 1 torch thread "
                        "on a shared 2-core CPU: wall-clock rates are lower bounds."]))
    sections.append(PageSection("reading", "Reading", bullets=payload["notes"],
                                fine_print=[f"Settings: {json.dumps(payload['settings'])}"]))
    return render_benchmark_page(title="3D label efficiency",
                                 heading="3D label efficiency: random vs self-supervised 3D encoders (CPU budget)",
                                 subtitle=payload["question"], sections=sections, machine=payload["machine"],
                                 footer=[f"Budget: {payload['budget']['statement']}"])


def reading(payload: dict[str, Any]) -> list[str]:
    """Plain sentences drawn from the numbers (no claims beyond their intervals)."""
    notes = []
    vessel = payload.get("vessel")
    if vessel:
        s = vessel["summary"]
        full = s["arms"]["ssl"]["1.0"]["mean"], s["arms"]["random"]["1.0"]["mean"]
        significant = [f"{float(f):.0%}" for f, e in s["ssl_minus_random"].items()
                       if e["seeds_and_cases_interval"][0] > 0 or e["seeds_and_cases_interval"][1] < 0]
        notes.append(f"(a) With all labels the linear probe reaches test AUC {full[0]:.3f} on the SimCLR encoder and "
                     f"{full[1]:.3f} on a random one, against .874 for a supervised 3D ResNet-18 (MedMNIST v2). "
                     + (f"SSL − random intervals exclude 0 at {', '.join(significant)} labels."
                        if significant else "No SSL − random interval excludes 0."))
    hippo = payload.get("hippocampus")
    if hippo:
        s = hippo["summary"]
        found = []
        for protocol, per_fraction in s["ssl_minus_random"].items():
            for f, e in per_fraction.items():
                low, high = e["paired_bootstrap_ci"]
                if low > 0 or high < 0:
                    found.append(f"{protocol} at {float(f):.0%} ({e['dice_difference']:+.3f})")
        full = s["arms"]["finetune/ssl"]["1.0"]["dice_mean"]["mean"], s["arms"]["finetune/random"]["1.0"]["dice_mean"]["mean"]
        notes.append(f"(b) With all {hippo['subsets']['1.0']} training cases, fine-tuning reaches mean test Dice "
                     f"{full[0]:.3f} from the Models Genesis encoder and {full[1]:.3f} from a random one, against "
                     f"nnU-Net's ≈ .89 (a GPU budget ~1000× larger). "
                     + ("Paired SSL − random intervals excluding 0: " + "; ".join(found) + "."
                        if found else "No paired SSL − random interval excludes 0 at this budget."))
        notes.append("(b) " + hippo["data"]["caveat"] + ".")
        notes.append("(b) One training seed per cell (CPU budget): intervals are over test cases only, conditional on "
                     "that run; they do not cover seed-to-seed variation of the fine-tuning.")
    notes.append("Wall times and img/s were measured on a shared 2-core machine; CPU seconds are the budget.")
    return notes


def renote(payload: dict[str, Any]) -> None:
    """``--rerender``: the reading's sentences again, from the record's numbers."""
    payload["notes"] = reading(payload)


# ------------------------------------------------------------------------------------------------ main
def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return None  # per-seed test scores stay out of the JSON (they are large); AUCs and intervals are kept
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None, help="default $RADSSL_DATA_DIR")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/label_efficiency_3d.json"))
    parser.add_argument("--parts", nargs="+", default=["vessel", "hippocampus", "resources"],
                        choices=["vessel", "hippocampus", "resources"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(a) read-out seeds")
    parser.add_argument("--vessel-fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--vessel-steps", type=int, default=120)
    parser.add_argument("--vessel-batch", type=int, default=32)
    parser.add_argument("--ssl-steps", type=int, default=120, help="(b) Models Genesis steps")
    parser.add_argument("--ssl-batch", type=int, default=8)
    parser.add_argument("--seg-fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--frozen-fractions", type=float, nargs="*", default=[1.0])
    parser.add_argument("--seg-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--seg-epochs", type=int, default=5)
    parser.add_argument("--seg-steps-per-epoch", type=int, default=30)
    parser.add_argument("--seg-batch", type=int, default=4)
    parser.add_argument("--seg-lr", type=float, default=3e-3)
    parser.add_argument("--seg-patience", type=int, default=3)
    parser.add_argument("--seg-min-epochs", type=int, default=3)
    parser.add_argument("--val-cases", type=int, default=8)
    parser.add_argument("--probe-steps", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: plumbing only (a few minutes)")
    add_render_arguments(parser, "--output", rerender="rebuild notes and HTML from an existing --output")
    args = parser.parse_args()
    if args.render_only or args.rerender:
        render_from_result(args.output, render_html, renote if args.rerender else None)
        return
    if args.smoke:
        args.seeds, args.vessel_steps, args.ssl_steps, args.seg_epochs, args.seg_steps_per_epoch = [0, 1], 3, 3, 2, 2
        args.seg_min_epochs, args.val_cases, args.probe_steps, args.vessel_batch = 1, 2, 2, 16
    torch.set_num_threads(1)
    root = _data_root(args)
    host = machine()
    phases = Phases()
    total_cpu, total_wall = cpu_seconds(), time.perf_counter()
    payload: dict[str, Any] = {
        "question": "Does a self-supervised 3D encoder (SimCLR on VesselMNIST3D, Models Genesis on hippocampus MRI) "
                    "beat a random one when labels are scarce, for 3D classification (linear probe) and 3D "
                    "segmentation (fine-tuned U-Net decoder), at a CPU budget?",
        "machine": host,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="le3d-") as temporary:
        work = Path(temporary)
        if "vessel" in args.parts:
            payload["vessel"] = vessel_part(args, root, work, phases)
        if "hippocampus" in args.parts:
            payload["hippocampus"] = hippocampus_part(args, root, work, phases)
        if "resources" in args.parts:
            with phases.measure("resource_probes"):
                payload["resources"] = resource_probes(args, root, work)
    total_cpu, total_wall = cpu_seconds() - total_cpu, time.perf_counter() - total_wall
    payload["budget"] = {
        "statement": f"{total_cpu / 60:.1f} CPU-minutes in all ({total_wall / 60:.1f} wall minutes on the shared "
                     f"machine); per phase (CPU s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.cpu.items()),
        "cpu_s_total": round(total_cpu, 1), "wall_s_total": round(total_wall, 1),
        "cpu_s_by_phase": {k: round(v, 1) for k, v in phases.cpu.items()},
        "wall_s_by_phase": {k: round(v, 1) for k, v in phases.wall.items()}, "target_cpu_minutes": 40,
    }
    payload = json.loads(json.dumps(payload, default=_jsonable))
    payload["notes"] = reading(payload)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, payload, indent=1)
    write_text_atomic(args.output.with_suffix(".html"), render_html(payload))
    print(f"wrote {args.output} and {args.output.with_suffix('.html')} ({total_cpu / 60:.1f} CPU-min)")


if __name__ == "__main__":
    main()
