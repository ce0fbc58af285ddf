"""Label efficiency on real MedMNIST: does SSL pretraining buy labels on PneumoniaMNIST and BreastMNIST?

Runs the study grids of ``configs/pneumoniamnist.yaml`` and ``configs/breastmnist.yaml`` (random vs SSL init,
plus ImageNet / ImageNet+SSL when ``--imagenet-weights`` is given; label fractions 1–100 %; linear probe, kNN,
fine-tuning) with a CPU-budgetable number of pretraining steps and fine-tuning epochs, then writes
``benchmarks/results/label_efficiency.json`` (test AUC per init × protocol × label fraction, mean ± SD over seeds,
plus the machine) and copies each study's HTML report beside it. Studies resume: rerunning continues where a
killed run stopped.

Targets (test AUC on the internal test split, mean over seeds):
  T1  supervised from scratch (random init, fine-tune, 100 % labels) within 0.02 of MedMNIST v2's ResNet-18 (28):
      PneumoniaMNIST .944, BreastMNIST .901 (Yang et al., Scientific Data 2023, Table 3);
  T2  on PneumoniaMNIST at 1 % labels, SSL beats random by ≥ 0.05 (same protocol: fine-tune);
  T3  SSL with 10 % labels (fine-tune) reaches the reference: ≥ .944 Pneumonia, ≥ .901 Breast.

Usage:
  RADSSL_DATA_DIR=/path/to/medmnist python benchmarks/label_efficiency.py                # the full grid (GPU!)
  python benchmarks/label_efficiency.py --steps 300 --epochs 10 --seeds 0 1 2            # CPU-budgeted
  python benchmarks/label_efficiency.py --smoke --results /tmp/le.json                    # seconds: plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from radssl.atomic import write_text_atomic
from radssl.provenance import package_versions
from radssl.study.config import load_study_config
from radssl.study.grid import REPORT_DIR, RESULTS_FILE, run_study
from radssl.study.results_store import ResultsStore
from radssl.study.statistics import mean_std_over_seeds

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "label_efficiency.json"
DATASETS = ("pneumoniamnist", "breastmnist")
REFERENCE_AUC = {"pneumoniamnist": 0.944, "breastmnist": 0.901}
"""MedMNIST v2 ResNet-18 (28), trained from scratch on all labels: test AUC."""


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": package_versions(),
    }


def study_overrides(args: argparse.Namespace, dataset: str) -> list[str]:
    """Command-line budget → study overrides (validated like the YAML)."""
    overrides = [f"output_dir={args.work_dir / dataset}", f"seeds={json.dumps(args.seeds)}",
                 f"label_fractions={json.dumps(args.fractions)}", "data.download=false"]
    if args.steps is not None:
        overrides.append(f"pretraining.simclr.train.steps={args.steps}")
    if args.epochs is not None:
        overrides.append(f"protocols.finetune.epochs={args.epochs}")
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.backbone:
        overrides.append(f"model.backbone={args.backbone}")
    if args.batch_size:
        overrides.append(f"pretraining.simclr.train.batch_size={args.batch_size}")
    if args.imagenet_weights:
        overrides.append(f"imagenet_weights={args.imagenet_weights}")
    if args.threads:
        overrides += [f"threads={args.threads}", f"pretraining.simclr.train.threads={args.threads}"]
    if args.device:
        overrides.append(f"device={args.device}")
    if args.protocols:  # switch the others off; the config's options of the kept ones stay
        overrides += [f"protocols.{p}=null" for p in ("linear", "knn", "finetune") if p not in args.protocols]
    overrides += ["pretraining.simclr.train.progress_bar=false"] if args.smoke else []
    return overrides + list(args.override)


def summarise(results_file: Path, study: str) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{init: {protocol: {fraction: {mean, sd, n}}}} of internal-test AUC (full pretraining set)."""
    per_seed: dict[tuple[str, str, float], list[float]] = {}
    with ResultsStore(results_file) as store:
        for row in store.cells(study):
            if row["metric"] != "auc" or row["test_set"] != "test" or row["pretrain_fraction"] != 1.0:
                continue
            per_seed.setdefault((row["init"], row["protocol"], row["label_fraction"]), []).append(row["value"])
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (init, protocol, fraction), values in sorted(per_seed.items()):
        mean, sd, n = mean_std_over_seeds(values)
        table.setdefault(init, {}).setdefault(protocol, {})[f"{fraction:g}"] = {
            "mean": round(mean, 4), "sd": None if math.isnan(sd) else round(sd, 4), "n": n}
    return table


def _auc(table: dict, init: str, protocol: str, fraction: float) -> float | None:
    entry = table.get(init, {}).get(protocol, {}).get(f"{fraction:g}")
    return None if entry is None else entry["mean"]


def check_targets(dataset: str, table: dict) -> list[dict[str, Any]]:
    """The three targets for one dataset: value, threshold and whether it is met (None = not measured)."""
    reference = REFERENCE_AUC[dataset]
    checks = []
    supervised = _auc(table, "random", "finetune", 1.0)
    checks.append({"target": "T1 random-init fine-tune @100% within 0.02 of MedMNIST ResNet-18(28)",
                   "value": supervised, "threshold": round(reference - 0.02, 3),
                   "met": None if supervised is None else supervised >= reference - 0.02})
    if dataset == "pneumoniamnist":
        ssl, random = _auc(table, "ssl", "finetune", 0.01), _auc(table, "random", "finetune", 0.01)
        gain = None if ssl is None or random is None else round(ssl - random, 4)
        checks.append({"target": "T2 SSL − random (fine-tune) @1% labels ≥ 0.05", "value": gain, "threshold": 0.05,
                       "met": None if gain is None else gain >= 0.05})
    ssl10 = _auc(table, "ssl", "finetune", 0.1)
    checks.append({"target": f"T3 SSL fine-tune @10% labels ≥ {reference}", "value": ssl10, "threshold": reference,
                   "met": None if ssl10 is None else ssl10 >= reference})
    return checks


def print_table(dataset: str, table: dict, checks: list[dict[str, Any]]) -> None:
    fractions = sorted({float(f) for init in table.values() for proto in init.values() for f in proto})
    print(f"\n{dataset}: internal test AUC, mean over seeds (n)")
    header = f"{'init':<14}{'protocol':<10}" + "".join(f"{f'{100 * f:g}%':>13}" for f in fractions)
    print(header)
    for init, protocols in table.items():
        for protocol, values in protocols.items():
            cells = []
            for fraction in fractions:
                entry = values.get(f"{fraction:g}")
                cells.append(f"{entry['mean']:.3f} ({entry['n']})" if entry else "–")
            print(f"{init:<14}{protocol:<10}" + "".join(f"{c:>13}" for c in cells))
    print("targets:")
    for check in checks:
        status = {True: "MET", False: "not met", None: "not measured"}[check["met"]]
        value = "–" if check["value"] is None else f"{check['value']:.3f}"
        print(f"  {check['target']:<62} value {value:>6}  threshold {check['threshold']:.3f}  {status}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--data-root", help="folder with the MedMNIST .npz files (default $RADSSL_DATA_DIR)")
    parser.add_argument("--steps", type=int, default=None, help="SSL pretraining steps (default: the config's)")
    parser.add_argument("--batch-size", type=int, help="SSL pretraining batch size (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--protocols", nargs="+", choices=("linear", "knn", "finetune"),
                        help="protocols to run (default: the config's linear, knn, finetune)")
    parser.add_argument("--backbone", help="override the backbone (e.g. small_cnn for a quick plumbing check)")
    parser.add_argument("--imagenet-weights", help="torchvision resnet18 ImageNet .pth: adds imagenet inits")
    parser.add_argument("--threads", type=int, help="torch threads for pretraining and transfer")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "label_efficiency",
                        help="study outputs (checkpoints, results.sqlite, reports); resumable")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON summary to write")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings (small_cnn, 2 steps, 1 epoch, 1 seed, 2 fractions): checks plumbing only")
    parser.add_argument("override", nargs="*", help="extra study overrides, e.g. protocols.finetune.lr=0.003")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = args.steps or 2
        args.epochs = args.epochs or 1
        args.seeds = [0] if args.seeds == [0, 1, 2] else args.seeds
        args.fractions = [0.01, 1.0] if args.fractions == [0.01, 0.05, 0.1, 0.25, 1.0] else args.fractions
        args.backbone = args.backbone or "small_cnn"
        args.batch_size = args.batch_size or 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_root = args.data_root or os.environ.get("RADSSL_DATA_DIR")
    if not data_root:
        print("label_efficiency: set RADSSL_DATA_DIR (or --data-root) to the folder with the MedMNIST .npz files",
              file=sys.stderr)
        return 2
    args.data_root = data_root
    summary: dict[str, Any] = {"benchmark": "label_efficiency", "machine": machine(), "settings": {
        "steps": args.steps, "epochs": args.epochs, "seeds": args.seeds, "fractions": args.fractions,
        "backbone": args.backbone, "batch_size": args.batch_size, "protocols": args.protocols,
        "imagenet_weights": args.imagenet_weights, "smoke": args.smoke, "overrides": args.override},
        "reference_auc": REFERENCE_AUC, "datasets": {}}
    for dataset in args.datasets:
        overrides = study_overrides(args, dataset)
        config = load_study_config(ROOT / "configs" / f"{dataset}.yaml", overrides)
        started = time.perf_counter()
        output = run_study(config)
        elapsed = time.perf_counter() - started
        table = summarise(output / RESULTS_FILE, config.name)
        checks = check_targets(dataset, table)
        report = args.results.parent / f"label_efficiency_{dataset}.html"
        report.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output / REPORT_DIR / "report.html", report)
        summary["datasets"][dataset] = {"study_dir": str(output), "report": str(report),
                                        "wall_time_s": round(elapsed, 1), "test_auc": table, "targets": checks}
        print_table(dataset, table, checks)
    if args.smoke:
        print("\nsmoke settings (tiny steps/epochs, small_cnn): the numbers check plumbing, not the targets")
    write_text_atomic(args.results, json.dumps(summary, indent=2))
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
