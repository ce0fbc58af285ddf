"""Slice-pair positives vs plain two-view SimCLR at an equal budget, on VesselMNIST3D read as 2D slice stacks.

Question: on volumes used as stacks of 2D slices, does pairing a slice with a neighbouring slice of the same volume
(``views.pairing: {kind: slice, max_offset: k}``; Zeng et al., MICCAI 2021 use slice position the same way) give a
better frozen representation than SimCLR's two augmentations of one slice (Chen et al., ICML 2020)?

Set-up (every arm alike except ``views.pairing``):
- data: VesselMNIST3D (MedMNIST v3; 28³ binary vessel masks, label 1 = aneurysm) through ``data.slices: {axis: 0,
  keep: nonempty}``: one row per non-empty axial slice. A slice's label is its *volume's* label (a weak label: an
  edge slice of an aneurysm segment may not show the aneurysm). Splits are MedMNIST's, by volume; a slice carries
  its volume as patient id, so label subsets are drawn by volume and no volume is on two sides.
- pretraining: radssl's SimCLR (its radiology preset), the same backbone, the same ``steps × batch`` images seen
  and the same seeds for both arms; only the second view's source row differs.
- read-out: frozen features, logistic regression with C chosen on the validation split's AUC (all validation
  volumes), at 1 / 10 / 100 % of the training volumes (stratified, seeded, nested per seed; the same volumes for
  every arm of a seed). Two levels: *volume* (mean of a volume's slice features → one case per volume; the label
  really is a volume label) and *slice* (each slice a case with its volume's label; slices of a volume are
  correlated, so only the seed interval is given there). A random-init encoder of the same architecture is the
  floor.
- intervals: t over seeds (3 seeds: wide by necessity); for the volume level also the interval over seeds *and*
  test volumes (``radssl.study.statistics.seeds_and_cases_interval``) and the paired slice − two_view test.

Budget: CPU time (user + system of this process, all threads) is measured per phase and recorded beside wall time;
the machine is shared, so wall time is not the budget. Run under ``nice -n 10``.

Usage:
  RADSSL_DATA_DIR=/path/with/medmnist nice -n 10 python benchmarks/pairing_bakeoff.py
  python benchmarks/pairing_bakeoff.py --smoke --output /tmp/pairing.json       # plumbing only, a minute
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import cpu_seconds
from common import machine as shared_machine
from common import add_render_arguments, render_from_result, write_json

from radssl.atomic import write_text_atomic
from radssl.config import MedMNISTData, load_config
from radssl.data.build import build_store
from radssl.data.slices import SlicesConfig
from radssl.data.splits import label_fraction_subsets
from radssl.data.store import ImageStore, TaskInfo
from radssl.engine.pretrain import backbone_for, pretrain
from radssl.study.formatting import num
from radssl.study.pages import Cell, PageSection, Paragraph, Table, interval_cell, render_benchmark_page
from radssl.study.statistics import binary_auc, seed_t_interval, seeds_and_cases_interval, seeds_and_cases_paired_test
from radssl.transfer.features import extract_features
from radssl.transfer.linear_probe import linear_probe

ARMS = ("two_view", "slice_pairs")
FLOOR = "random_init"
LEVELS = ("volume", "slice")


def machine() -> dict[str, Any]:
    return shared_machine(description=f"{os.cpu_count()}-core CPU, no GPU, shared with other jobs (load average at "
                                      "start recorded)")


def pretrain_arm(store: ImageStore, arm: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One SimCLR pretraining run; returns its backbone, cost and the logged cross-image share."""
    pairing = (["views.pairing.kind=slice", f"views.pairing.max_offset={args.max_offset}"]
               if arm == "slice_pairs" else [])
    config = load_config(None, [
        f"output_dir={out / f'{arm}-seed{seed}'}", f"seed={seed}", "method.name=simclr",
        "data.name=vesselmnist3d", "data.download=false", "data.slices.axis=0",
        f"model.backbone={args.backbone}", *([] if args.backbone != "resnet18" else ["model.small_input=false"]),
        f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.accelerator=cpu",
        "train.devices=1", f"train.threads={args.threads}", "train.progress_bar=false",
        f"train.log_every={max(1, args.steps // 10)}", f"train.checkpoint_every={args.steps * 10}",
        "eval.enabled=false", *pairing,
    ])
    cpu, wall = cpu_seconds(), time.perf_counter()
    result = pretrain(config, store)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    with open(result.output_dir / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    shares = [float(r["cross_image_share"]) for r in rows if r.get("cross_image_share")]
    return {
        "backbone": result.backbone,
        "config": config,
        "record": {
            "steps": result.steps, "batch_size": args.batch_size, "images_seen": result.images_seen,
            "final_loss": result.final_loss, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "images_per_s_wall": round(result.images_seen / max(wall, 1e-9), 1),
            "cross_image_share": float(np.mean(shares)) if shares else 0.0,
            "pairing_coverage": result.run_record.get("pairing_coverage"),
            "backbone": result.backbone_spec.describe(),
        },
    }


def volume_features(features: torch.Tensor, volume_row: np.ndarray, n_volumes: int) -> np.ndarray:
    """Mean of each volume's slice features (volumes without a kept slice get zeros; VesselMNIST3D has none)."""
    index = torch.from_numpy(volume_row)
    sums = torch.zeros(n_volumes, features.shape[1]).index_add_(0, index, features)
    counts = torch.bincount(index, minlength=n_volumes).clamp(min=1).unsqueeze(1)
    return (sums / counts).numpy()


def probe_all(features: torch.Tensor, store: ImageStore, volumes: dict[str, Any], subsets: dict[float, np.ndarray],
              seed: int) -> dict[str, dict[float, dict[str, Any]]]:
    """Test AUC (and test scores) per level and label fraction; C chosen on the validation split."""
    task = TaskInfo("binary", 2, store.task.class_names)
    labels = store.labels.numpy()
    split = store.split
    volume_row = store.meta["volume_row"]
    v_features = volume_features(features, volume_row, volumes["n"])
    v_labels, v_split = volumes["labels"], volumes["split"]
    feats = features.numpy()
    out: dict[str, dict[float, dict[str, Any]]] = {level: {} for level in LEVELS}
    for fraction, chosen in subsets.items():
        # volume level: one case per volume
        val, test = np.flatnonzero(v_split == "val"), np.flatnonzero(v_split == "test")
        result = linear_probe(v_features[chosen], v_labels[chosen], v_features[val], v_labels[val],
                              {"test": (v_features[test], v_labels[test])}, task, seed=seed,
                              standardisation_feats=v_features[v_split == "train"])  # label-free, whole split
        out["volume"][fraction] = {"auc": binary_auc(v_labels[test], result.scores["test"]), "C": result.best_C,
                                   "scores": result.scores["test"], "train_cases": int(len(chosen))}
        # slice level: the slices of the same training volumes; each slice carries its volume's label
        rows = np.flatnonzero(np.isin(volume_row, chosen))
        val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
        result = linear_probe(feats[rows], labels[rows], feats[val], labels[val],
                              {"test": (feats[test], labels[test])}, task, seed=seed,
                              standardisation_feats=feats[split == "train"])  # label-free, whole split
        out["slice"][fraction] = {"auc": binary_auc(labels[test], result.scores["test"]), "C": result.best_C,
                                  "train_cases": int(len(rows))}
    return out


def summarise(per_seed: dict[str, dict[int, Any]], volumes: dict[str, Any], fractions: list[float]) -> dict:
    """Mean and intervals per arm × level × fraction, and the paired slice_pairs − two_view contrast."""
    y_test = volumes["labels"][volumes["split"] == "test"]
    seeds = sorted(next(iter(per_seed.values())))
    table: dict[str, Any] = {}
    for arm, runs in per_seed.items():
        table[arm] = {}
        for level in LEVELS:
            table[arm][level] = {}
            for fraction in fractions:
                aucs = [runs[s]["probes"][level][fraction]["auc"] for s in seeds]
                mean, low, high, _, n = seed_t_interval(aucs, bounds=(0.0, 1.0))
                entry = {"per_seed": aucs, "mean": mean, "seed_t_interval": [low, high], "seeds": n,
                         "C_per_seed": [runs[s]["probes"][level][fraction]["C"] for s in seeds]}
                if level == "volume":
                    both = seeds_and_cases_interval(y_test, [runs[s]["probes"][level][fraction]["scores"]
                                                             for s in seeds], binary_auc)
                    entry["seeds_and_cases_interval"] = [both.low, both.high]
                table[arm][level][fraction] = entry
    contrast: dict[str, Any] = {}
    a, b = per_seed["slice_pairs"], per_seed["two_view"]
    for level in LEVELS:
        contrast[level] = {}
        for fraction in fractions:
            differences = [a[s]["probes"][level][fraction]["auc"] - b[s]["probes"][level][fraction]["auc"]
                           for s in seeds]
            mean, low, high, p, _ = seed_t_interval(differences, bounds=(-1.0, 1.0))
            entry = {"per_seed": differences, "mean": mean, "seed_t_interval": [low, high], "seed_t_p": p}
            if level == "volume":
                test = seeds_and_cases_paired_test(
                    y_test, [a[s]["probes"][level][fraction]["scores"] for s in seeds],
                    [b[s]["probes"][level][fraction]["scores"] for s in seeds], binary_auc)
                entry["seeds_and_cases_interval"] = [test.low, test.high]
                entry["seeds_and_cases_p"] = test.p_value
            contrast[level][fraction] = entry
    return {"arms": table, "slice_pairs_minus_two_view": contrast}


def verdict(summary: dict[str, Any], fractions: list[float]) -> str:
    """One sentence from the paired contrast: where its interval over seeds (and test volumes) excludes 0."""
    found = []
    for level in LEVELS:
        for f in fractions:
            e = summary["slice_pairs_minus_two_view"][level][str(f)]
            low, high = e.get("seeds_and_cases_interval") or e["seed_t_interval"]
            if low > 0 or high < 0:
                found.append(f"{level} level at {f:.0%} labels: {e['mean']:+.3f} [{low:.3f}, {high:.3f}]")
    if not found:
        return ("At this budget no paired interval (slice_pairs − two_view) excludes 0, at either level or any label "
                "fraction: the benchmark shows no difference between slice pairs and plain two-view.")
    return "Paired intervals excluding 0: " + "; ".join(found) + "."


def seed_interval_cell(e: dict[str, Any], difference: bool = False) -> Cell:
    """Mean [t-interval over seeds]; where measured, the interval over seeds and test volumes (with the paired p of
    a difference) on a second line."""
    after = ()
    if "seeds_and_cases_interval" in e:
        low, high = e["seeds_and_cases_interval"]
        p = f", p {num(e['seeds_and_cases_p'], 2)}" if difference and "seeds_and_cases_p" in e else ""
        after = (f"seeds+cases [{num(low)}, {num(high)}]{p}",)
    return interval_cell(e["mean"], *e["seed_t_interval"], difference=difference, after=after)


def render_html(payload: dict[str, Any]) -> str:
    """A self-contained page (radssl's benchmark template) of the summary, the contrast and the runs."""
    s, summary = payload["settings"], payload["summary"]
    fractions = s["label_fractions"]
    head = [f"{f:.0%} labels" for f in fractions]
    rows = [[level, arm] + [seed_interval_cell(summary["arms"][arm][level][str(f)]) for f in fractions]
            for level in LEVELS for arm in (*ARMS, FLOOR)]
    contrast_rows = [[level] + [seed_interval_cell(summary["slice_pairs_minus_two_view"][level][str(f)], True)
                                for f in fractions] for level in LEVELS]
    runs = [[arm, str(seed), str(record["images_seen"]), num(record["cross_image_share"]),
             num(record["final_loss"]), str(record["cpu_s"]), str(record["wall_s"])]
            for arm in ARMS for seed, record in payload["pretraining"][arm].items()]
    sections = [
        PageSection("probe", f"Linear-probe test AUC (mean over {len(s['seeds'])} seeds [t-interval over seeds])",
                    paragraphs=[Paragraph(payload["data"]["description"], "Data"),
                                Paragraph(payload["budget"]["statement"], "Budget")],
                    tables=[Table(["level", "encoder", *head], rows, numeric=range(2, 2 + len(head)))]),
        PageSection("contrast", "slice_pairs − two_view (paired by seed)",
                    tables=[Table(["level", *head], contrast_rows, numeric=range(1, 1 + len(head)))]),
        PageSection("runs", "Pretraining runs",
                    tables=[Table(["arm", "seed", "images seen", "cross-image share", "final loss", "CPU s", "wall s"],
                                  runs, numeric=range(2, 7))]),
        PageSection("reading", "Reading", bullets=payload["notes"], fine_print=[f"Settings: {json.dumps(s)}"]),
    ]
    return render_benchmark_page(title="Slice pairs vs two-view",
                                 heading="Slice-pair positives vs plain two-view SimCLR, equal budget",
                                 subtitle=payload["question"], sections=sections, machine=payload["machine"])


def renote(payload: dict[str, Any]) -> None:
    """``--rerender``: the verdict sentence again, from the record's paired contrast, first among the notes."""
    note = verdict(payload["summary"], payload["settings"]["label_fractions"])
    payload["notes"] = [n for n in payload["notes"] if not n.startswith(("At this budget", "Paired intervals"))]
    payload["notes"].insert(0, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=None, help="folder with medmnist/vesselmnist3d.npz "
                        "(default $RADSSL_DATA_DIR)")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-offset", type=int, default=2)
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/pairing_bakeoff.json"))
    parser.add_argument("--smoke", action="store_true", help="a few steps and one seed: plumbing only")
    add_render_arguments(parser, "--output", rerender="recompute the verdict note and the HTML from an existing "
                                                      "--output JSON (no training)")
    args = parser.parse_args()
    if args.render_only or args.rerender:
        render_from_result(args.output, render_html, renote if args.rerender else None)
        return
    if args.smoke:
        args.steps, args.seeds = 4, args.seeds[:2]
    torch.set_num_threads(args.threads)
    root = args.data_root or (Path(os.environ["RADSSL_DATA_DIR"]) if os.environ.get("RADSSL_DATA_DIR") else None)
    if root is None:
        raise SystemExit("set RADSSL_DATA_DIR or --data-root to a folder holding medmnist/vesselmnist3d.npz")
    if (root / "medmnist" / "vesselmnist3d.npz").is_file():
        root = root / "medmnist"
    host = machine()
    cpu_start, wall_start = cpu_seconds(), time.perf_counter()

    store = build_store(MedMNISTData(name="vesselmnist3d", root=root, download=False,
                                     slices=SlicesConfig(axis=0, keep="nonempty")))
    volume_row = store.meta["volume_row"]
    n_volumes = int(volume_row.max()) + 1
    v_labels = np.zeros(n_volumes, np.int64)
    v_split = np.empty(n_volumes, dtype="<U10")
    v_labels[volume_row] = store.labels.numpy()
    v_split[volume_row] = store.split
    volumes = {"n": n_volumes, "labels": v_labels, "split": v_split}

    per_seed: dict[str, dict[int, Any]] = {arm: {} for arm in (*ARMS, FLOOR)}
    pretraining: dict[str, dict[int, Any]] = {arm: {} for arm in ARMS}
    phase_cpu = {"pretraining": 0.0, "features": 0.0, "probes": 0.0}
    arm_config: Any = None  # the config of the seed's pretrained arms: the random-init floor uses its backbone
    with tempfile.TemporaryDirectory(prefix="pairing-bakeoff-") as temporary:
        for seed in args.seeds:
            train_volumes = np.flatnonzero(v_split == "train")
            subsets = label_fraction_subsets(v_labels, train_volumes, args.fractions, seed, source="vesselmnist3d")
            for arm in (*ARMS, FLOOR):
                begin = cpu_seconds()
                if arm == FLOOR:  # same architecture as the pretrained arms, freshly initialised by the seed
                    torch.manual_seed(seed)
                    backbone = backbone_for(arm_config, store)
                else:
                    run = pretrain_arm(store, arm, seed, args, Path(temporary))
                    backbone, arm_config = run["backbone"], run["config"]
                    pretraining[arm][seed] = run["record"]
                phase_cpu["pretraining"] += cpu_seconds() - begin
                begin = cpu_seconds()
                features = extract_features(backbone, store.images, batch_size=1024)
                phase_cpu["features"] += cpu_seconds() - begin
                begin = cpu_seconds()
                per_seed[arm][seed] = {"probes": probe_all(features, store, volumes, subsets, seed)}
                phase_cpu["probes"] += cpu_seconds() - begin
                print(f"seed {seed} {arm}: volume AUC "
                      + ", ".join(f"{f:.0%} {per_seed[arm][seed]['probes']['volume'][f]['auc']:.3f}"
                                  for f in args.fractions)
                      + " | slice AUC "
                      + ", ".join(f"{f:.0%} {per_seed[arm][seed]['probes']['slice'][f]['auc']:.3f}"
                                  for f in args.fractions), flush=True)

    summary = summarise(per_seed, volumes, args.fractions)
    total_cpu, total_wall = cpu_seconds() - cpu_start, time.perf_counter() - wall_start
    images_seen = args.steps * args.batch_size
    counts = {split: int((store.split == split).sum()) for split in ("train", "val", "test")}
    v_counts = {split: int((v_split == split).sum()) for split in ("train", "val", "test")}
    smallest = label_fraction_subsets(v_labels, np.flatnonzero(v_split == "train"), [args.fractions[0]], 0,
                                      source="vesselmnist3d")[args.fractions[0]]
    share = {arm: float(np.mean([r["cross_image_share"] for r in pretraining[arm].values()])) for arm in ARMS}
    payload = {
        "question": "Does pairing a slice with a neighbouring slice of the same volume (views.pairing slice, "
                    f"|Δ slice| ≤ {args.max_offset}) beat SimCLR's two augmentations of one slice, at equal "
                    "images seen, for a frozen linear probe?",
        "data": {
            "description": f"VesselMNIST3D (28³) as axial 2D slice stacks, non-empty slices only: {counts} slices "
                           f"from {v_counts} volumes; a slice's label is its volume's label (aneurysm vs vessel); "
                           "splits and label subsets by volume",
            "slices": counts, "volumes": v_counts,
        },
        "settings": {"method": "simclr (radssl preset)", "backbone": args.backbone, "steps": args.steps,
                     "batch_size": args.batch_size, "images_seen_per_run": images_seen,
                     "max_offset": args.max_offset, "seeds": args.seeds, "label_fractions": args.fractions,
                     "threads": args.threads, "probe": "logistic regression, C on the validation split's AUC "
                     "(all validation volumes / slices), radssl.transfer.linear_probe defaults",
                     "smoke": args.smoke},
        "budget": {
            "statement": f"equal images seen: {args.steps} steps × batch {args.batch_size} = {images_seen} images per "
                         f"pretraining run, both arms, every seed; whole benchmark {total_cpu / 60:.1f} CPU-minutes "
                         f"({total_wall / 60:.1f} wall minutes on a shared machine)",
            "kind": "images seen (steps × batch)", "cpu_s_total": round(total_cpu, 1),
            "cpu_s_by_phase": {k: round(v, 1) for k, v in phase_cpu.items()}, "wall_s_total": round(total_wall, 1),
            "target_cpu_minutes": 15,
        },
        "pretraining": {arm: {str(s): r for s, r in runs.items()} for arm, runs in pretraining.items()},
        "cross_image_share": share,
        "summary": json.loads(json.dumps(summary, default=_jsonable)),
        "machine": host,
        "notes": [
            f"cross-image share: {share['slice_pairs']:.3f} of slice_pairs' positive pairs joined two different slices "
            f"(the rest fell back to two views of one slice); two_view: {share['two_view']:.3f}.",
            "Volume level: one case per volume (mean of its slice features); the label is the volume's, so this is "
            "the clean comparison. Slice level: every slice a case with its volume's label; slices of one volume are "
            "correlated, so only the seed interval is shown there.",
            "With 3 seeds the t-interval uses t(0.975, 2) = 4.30: intervals are wide by necessity; a difference "
            "whose interval spans 0 is not shown to exist.",
            f"{args.fractions[0]:.0%} of the training volumes is {len(smallest)} volumes (at least one per class), "
            "so the smallest fraction mostly measures which few volumes were drawn.",
        ],
    }
    payload = json.loads(json.dumps(payload, default=_jsonable))
    payload["notes"].insert(0, verdict(payload["summary"], args.fractions))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, payload, indent=1, default=_jsonable)
    write_text_atomic(args.output.with_suffix(".html"),
                      render_html(json.loads(json.dumps(payload, default=_jsonable))))
    print(f"wrote {args.output} and {args.output.with_suffix('.html')} ({total_cpu / 60:.1f} CPU-min)")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return None  # test scores stay out of the JSON (they are large); AUCs and intervals are kept
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    main()
