"""Image–report pretraining on CPU: retrieval and zero-shot read-outs, and what the image encoder learns.

Two data sets:
  * the embedded synthetic radiographs with their reports (``data.reports: true``; 300 patients × 4 images,
    32 px, ``finding_contrast`` 0.6 — the nodule is 1.3–2.2 px in radius at this size, so the stronger contrast
    keeps the finding learnable within a CPU budget) — split by patient (70/10/20);
  * the real chest images with clinical notes of ``$RADSSL_DATA_DIR/covid_chestxray_notes`` (343 images,
    153 patients; a folder + CSV source with ``report_column: text``, split by ``patient_id``; 48 px).

Measured, per seed:
  * ConVIRT (Zhang et al. 2020) pretraining from scratch (small CNN image encoder; the default scratch text
    encoder with a WordPiece tokenizer fitted on the training reports), then on the *held-out patients* (test
    split): image→text and text→image Recall@1/5/10 against their chance levels, and zero-shot AUC from a few
    prompts written below (synthetic: nodule vs normal; real: CT vs X-ray, and COVID-19 vs other findings);
  * on the synthetic data also linear-probe test AUC of the image encoder at 1 / 10 / 100 % of the training labels
    (C chosen on the validation split), against SimCLR at the same budget (same backbone, steps and batch; each
    method with its own preset optimiser) and a random-init encoder;
  * the text-encoder choice: the same ConVIRT run with a *tiny* text Transformer (width 64, 1 layer) and with a
    *small* one (width 128, 2 layers): retrieval, zero-shot AUC and seconds per step.

Results: ``benchmarks/results/multimodal.json`` (every number, per seed and mean ± SD, the settings, wall times and
the machine) and ``benchmarks/results/multimodal.html`` (a self-contained page).

Usage:
  RADSSL_DATA_DIR=/path/to/data nice -n 10 python benchmarks/multimodal.py        # the CPU-budgeted benchmark
  python benchmarks/multimodal.py --smoke --results /tmp/mm.json                   # plumbing only, a minute
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common import machine as shared_machine
from common import add_render_arguments, render_from_result, write_json

from radssl.atomic import write_text_atomic
from radssl.config import PretrainConfig
from radssl.data.build import build_store
from radssl.data.splits import label_fraction_subsets
from radssl.data.store import ImageStore
from radssl.engine.pretrain import backbone_for, pretrain
from radssl.provenance import package_versions
from radssl.study.formatting import num
from radssl.study.pages import Cell, PageSection, Table, render_benchmark_page
from radssl.transfer.features import extract_features
from radssl.transfer.linear_probe import linear_probe
from radssl.transfer.zero_shot import (
    ZeroShotPrompts,
    embed_images,
    retrieval_on_store,
    zero_shot_classify,
    zero_shot_scores,
)

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.01, 0.1, 1.0)
TEXT_ENCODERS = {"tiny": {"text_width": 64, "text_depth": 1, "text_heads": 4},
                 "small": {"text_width": 128, "text_depth": 2, "text_heads": 4}}

SYNTHETIC_PROMPTS = ZeroShotPrompts(prompts={
    "normal": ["The lungs are clear.", "No pulmonary nodule or mass identified.", "Clear lungs without focal lesion."],
    "finding": ["Pulmonary nodule.", "Small rounded opacity suspicious for a pulmonary nodule.",
                "Nodular opacity in the lung."],
})
MODALITY_PROMPTS = ZeroShotPrompts(prompts={
    "CT": ["CT scan of the chest.", "Axial computed tomography image.", "CT shows ground-glass opacities."],
    "X-ray": ["Chest X-ray.", "Chest radiograph.", "Frontal chest radiograph shows opacities."],
})
COVID_PROMPTS = {
    "other": ["Bacterial pneumonia.", "Pneumonia with lobar consolidation.", "Pneumocystis pneumonia."],
    "covid": ["COVID-19 pneumonia.", "Patient tested positive for COVID-19.",
              "Bilateral ground-glass opacities consistent with COVID-19."],
}


# --------------------------------------------------------------------------------------------- configs
def pretrain_config(args: argparse.Namespace, data: dict[str, Any], method: dict[str, Any], seed: int, out: Path,
                    views: dict[str, Any] | None = None, batch_size: int | None = None,
                    steps: int | None = None) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "seed": seed,
        "output_dir": str(out),
        "data": data,
        "model": {"backbone": "small_cnn"},
        "method": method,
        "views": views or {},
        "train": {"steps": steps or args.steps, "batch_size": batch_size or args.batch_size, "log_every": 25,
                  "checkpoint_every": 100000, "progress_bar": False, "accelerator": "cpu", "devices": 1,
                  "threads": args.threads},
        "eval": {"enabled": False},
    })


def synthetic_data(args: argparse.Namespace) -> dict[str, Any]:
    return {"source": "synthetic", "n_patients": args.patients, "images_per_patient": 4,
            "image_size": args.image_size, "reports": True, "finding_contrast": 0.6}


def covid_data(root: Path, cache: Path) -> dict[str, Any]:
    return {
        "name": "covid_chestxray_notes",
        "source": {"kind": "folder", "root": str(root), "csv": "reports.csv", "path_column": "image",
                   "label_columns": ["modality"], "patient_column": "patient_id", "report_column": "text"},
        "preprocess": {"modality": "xray", "target_size": [48, 48], "resize": "pad"},
        "cache_dir": str(cache),
    }


# --------------------------------------------------------------------------------------------- read-outs
def probe_aucs(backbone: torch.nn.Module, store: ImageStore, seed: int) -> dict[str, float]:
    """Linear-probe test AUC at each label fraction (nested, stratified, patient-grouped subsets of train)."""
    features = extract_features(backbone, store.images)
    train, val, test = (store.indices(s) for s in ("train", "val", "test"))
    labels = store.labels.numpy()
    subsets = label_fraction_subsets(labels, train, FRACTIONS, seed, store.patient_id, min_rows_per_class=2)
    out = {}
    for fraction, rows in subsets.items():
        probe = linear_probe(features[rows], labels[rows], features[val], labels[val],
                             {"test": (features[test], labels[test])}, store.task, seed=seed,
                             standardisation_feats=features[train])  # label-free, whole train split
        out[f"{fraction:g}"] = float(probe.metrics["test"]["auc"])
    return out


def image_text_readouts(method: Any, store: ImageStore, prompts: ZeroShotPrompts) -> dict[str, Any]:
    test = store.indices("test")
    retrieval = retrieval_on_store(method, store, test).as_dict()
    zero_shot = zero_shot_classify(method, store, test, prompts)
    return {"retrieval": retrieval, "zero_shot_auc": float(zero_shot.metrics["auc"])}


def covid_zero_shot(method: Any, store: ImageStore, root: Path) -> float | None:
    """Zero-shot AUC of COVID-19 vs other named findings (test patients; 'todo' rows left out)."""
    with open(root / "reports.csv", newline="", encoding="utf-8") as stream:
        finding = {str(root / row["image"]): row["finding"] for row in csv.DictReader(stream)}
    test = store.indices("test")
    names = [finding.get(str(p), "todo") for p in store.meta["path"][test]]
    keep = np.array([n != "todo" for n in names])
    y = np.array([int("COVID-19" in n) for n, k in zip(names, keep) if k])
    if len(set(y)) < 2:
        return None
    image = embed_images(method, store.images[torch.from_numpy(test[keep])])
    prompts = [method.embed_texts(COVID_PROMPTS[c]) for c in ("other", "covid")]
    scores = zero_shot_scores(image, prompts, float(method.logit_scale().detach()))
    return float(roc_auc_score(y, scores))


def seconds_per_step(result: Any) -> float:
    return float(result.wall_time_s) / max(1, result.steps)


# --------------------------------------------------------------------------------------------- runs
def run_synthetic(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data = synthetic_data(args)
    store = build_store(PretrainConfig.model_validate({"data": data}).data)
    per_seed: list[dict[str, Any]] = []
    for seed in args.seeds:
        record: dict[str, Any] = {"seed": seed}
        for name, params in TEXT_ENCODERS.items():
            if name != args.default_text and seed not in args.text_seeds:
                continue
            config = pretrain_config(args, data, {"name": "convirt", **params}, seed, work / f"convirt-{name}-{seed}")
            result = pretrain(config, store=store)
            readout = image_text_readouts(result.method, store, SYNTHETIC_PROMPTS)
            readout.update(seconds_per_step=seconds_per_step(result), final_loss=result.final_loss)
            if name == args.default_text:
                readout["probe_auc"] = probe_aucs(result.backbone, store, seed)
            record[f"convirt_{name}"] = readout
            print(f"synthetic seed {seed} convirt/{name}: {json.dumps(readout)[:300]}", flush=True)
        config = pretrain_config(args, data, {"name": "simclr"}, seed,
                                 work / f"simclr-{seed}")
        result = pretrain(config, store=store)
        record["simclr"] = {"probe_auc": probe_aucs(result.backbone, store, seed),
                            "seconds_per_step": seconds_per_step(result), "final_loss": result.final_loss}
        torch.manual_seed(seed)
        record["random_init"] = {"probe_auc": probe_aucs(backbone_for(config, store), store, seed)}
        print(f"synthetic seed {seed} simclr/random: {record['simclr']['probe_auc']} {record['random_init']}",
              flush=True)
        per_seed.append(record)
    return {"data": store.describe(), "per_seed": per_seed}


def run_covid(args: argparse.Namespace, work: Path, root: Path) -> dict[str, Any]:
    data = covid_data(root, work / "cache")
    store = build_store(PretrainConfig.model_validate({"data": data}).data)
    per_seed = []
    for seed in args.seeds:
        params = {"name": "convirt", **TEXT_ENCODERS[args.default_text]}
        config = pretrain_config(args, data, params, seed, work / f"covid-{seed}", batch_size=args.covid_batch_size,
                                 steps=args.covid_steps)
        result = pretrain(config, store=store)
        readout = image_text_readouts(result.method, store, MODALITY_PROMPTS)
        readout.update(covid_vs_other_zero_shot_auc=covid_zero_shot(result.method, store, root),
                       seconds_per_step=seconds_per_step(result), final_loss=result.final_loss,
                       reports_truncated=result.run_record.get("reports_truncated"),
                       tokenizer_vocab=result.run_record.get("tokenizer_vocab"))
        print(f"covid seed {seed}: {json.dumps(readout)[:300]}", flush=True)
        per_seed.append({"seed": seed, "convirt": readout})
    return {"data": store.describe(), "per_seed": per_seed}


# --------------------------------------------------------------------------------------------- summary
def _collect(records: list[dict[str, Any]], path: tuple[str, ...]) -> list[float]:
    values = []
    for record in records:
        node: Any = record
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and node is not None:
            values.append(float(node))
    return values


def mean_sd(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(section: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    records = section["per_seed"]
    summary: dict[str, Any] = {}
    for arm in arms:
        entry: dict[str, Any] = {}
        for direction in ("image_to_text", "text_to_image", "chance_image_to_text", "chance_text_to_image"):
            for k in ("R@1", "R@5", "R@10"):
                stats = mean_sd(_collect(records, (arm, "retrieval", direction, k)))
                if stats:
                    entry.setdefault(direction, {})[k] = stats
        for key in ("zero_shot_auc", "covid_vs_other_zero_shot_auc", "seconds_per_step", "final_loss"):
            stats = mean_sd(_collect(records, (arm, key)))
            if stats:
                entry[key] = stats
        for fraction in FRACTIONS:
            stats = mean_sd(_collect(records, (arm, "probe_auc", f"{fraction:g}")))
            if stats:
                entry.setdefault("probe_auc", {})[f"{fraction:g}"] = stats
        if entry:
            summary[arm] = entry
    return summary


def machine() -> dict[str, Any]:
    return shared_machine(load_average_at_end=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)


def stats_text(stats: dict[str, float] | None, digits: int = 3) -> str:
    """Mean ± SD over seeds (the mean alone for one seed; "–" where nothing was measured)."""
    if not stats:
        return "–"
    mean = num(stats["mean"], digits)
    return f"{mean} ± {num(stats['sd'], digits)}" if stats["n"] > 1 else mean


def retrieval_rows(results: dict[str, Any]) -> list[list[Cell | str]]:
    """One row per data set × ConVIRT arm: recall per direction beside its chance level, zero-shot AUCs, s/step."""
    rows: list[list[Cell | str]] = []
    for dataset, arms in results["summary"].items():
        for arm, entry in arms.items():
            if "image_to_text" not in entry:
                continue
            cells: list[Cell | str] = [dataset, arm]
            for direction in ("image_to_text", "text_to_image"):
                for k in ("R@1", "R@5", "R@10"):
                    chance = entry.get(f"chance_{direction}", {}).get(k)
                    cells.append(Cell(stats_text(entry[direction].get(k)), (f"chance {stats_text(chance)}",)))
            cells += [stats_text(entry.get("zero_shot_auc")), stats_text(entry.get("covid_vs_other_zero_shot_auc")),
                      stats_text(entry.get("seconds_per_step"), 2)]
            rows.append(cells)
    return rows


def html_page(results: dict[str, Any]) -> str:
    """A self-contained page (radssl's benchmark template): the tables, settings and machine."""
    retrieval = Table(["data", "arm", "I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5", "T→I R@10",
                       "zero-shot AUC", "COVID-19 vs other zero-shot AUC", "s / step"], retrieval_rows(results),
                      numeric=range(2, 11))
    probe = Table(["image encoder"] + [f"{f:.0%} labels" for f in FRACTIONS],
                  [[arm] + [stats_text(entry["probe_auc"].get(f"{f:g}")) for f in FRACTIONS]
                   for arm, entry in results["summary"].get("synthetic", {}).items() if "probe_auc" in entry],
                  numeric=range(1, 1 + len(FRACTIONS)))
    sections = [
        PageSection("retrieval", "Retrieval on held-out patients and zero-shot classification",
                    paragraphs=["Mean ± SD over seeds; chance levels beside each recall (reports shared by "
                                "several images count once). Zero-shot: synthetic — nodule vs normal; real — CT vs "
                                "X-ray (the store's label), and COVID-19 vs other named findings."],
                    tables=[retrieval]),
        PageSection("probe", "Linear probe of the image encoder (synthetic, test AUC)", tables=[probe]),
        PageSection("settings", "Settings and machine", preformatted=[json.dumps(results["settings"], indent=1),
                                                                      json.dumps(results["machine"], indent=1)]),
    ]
    return render_benchmark_page(title="radssl: image–report pretraining",
                                 heading="Image–report pretraining (ConVIRT) on CPU", subtitle=results["budget"],
                                 sections=sections, machine=results["machine"], versions=results.get("versions"),
                                 footer=[f"Total wall time: {results['wall_time_s']:.0f} s · data: multimodal.json"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--covid-steps", type=int, default=200)
    parser.add_argument("--covid-batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--text-seeds", type=int, nargs="*", default=[0, 1],
                        help="seeds on which the non-default text encoder is also run")
    parser.add_argument("--default-text", choices=sorted(TEXT_ENCODERS), default="tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("RADSSL_DATA_DIR"))
    parser.add_argument("--results", type=Path, default=RESULTS / "multimodal.json")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one seed: plumbing only")
    add_render_arguments(parser, "--results")
    args = parser.parse_args()
    if args.render_only:
        render_from_result(args.results, html_page)
        return
    if args.smoke:
        args.steps, args.covid_steps, args.seeds, args.patients, args.text_seeds = 6, 6, [0], 60, [0]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="radssl-multimodal-"))
    try:
        sections = {"synthetic": run_synthetic(args, work)}
        covid_root = Path(args.data_dir) / "covid_chestxray_notes" if args.data_dir else None
        if covid_root is not None and (covid_root / "reports.csv").is_file():
            sections["covid_chestxray_notes"] = run_covid(args, work, covid_root)
        else:
            print("covid_chestxray_notes not found (set RADSSL_DATA_DIR): real-data part skipped")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    arms = [f"convirt_{n}" for n in TEXT_ENCODERS] + ["convirt", "simclr", "random_init"]
    results = {
        "benchmark": "multimodal",
        "budget": (f"CPU budget: small_cnn image encoder, {args.steps} pretraining steps per run, batch "
                   f"{args.batch_size} (real data: {args.covid_steps} steps, batch {args.covid_batch_size}), "
                   f"{len(args.seeds)} seed(s), "
                   f"{args.threads} torch threads, no GPU; total {wall / 60:.1f} min on this machine."),
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "covid_steps": args.covid_steps,
                     "covid_batch_size": args.covid_batch_size,
                     "image_size": args.image_size, "patients": args.patients, "seeds": args.seeds,
                     "text_seeds": args.text_seeds, "default_text_encoder": args.default_text,
                     "text_encoders": TEXT_ENCODERS, "label_fractions": FRACTIONS, "smoke": args.smoke,
                     "synthetic_prompts": SYNTHETIC_PROMPTS.prompts, "modality_prompts": MODALITY_PROMPTS.prompts,
                     "covid_prompts": COVID_PROMPTS},
        "summary": {name: summarise(section, arms) for name, section in sections.items()},
        "sections": sections,
        "machine": machine(),
        "versions": package_versions(),
        "wall_time_s": wall,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, results)
    write_text_atomic(args.results.with_suffix(".html"), html_page(results))
    print(f"wrote {args.results} and {args.results.with_suffix('.html')} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
