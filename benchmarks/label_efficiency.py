"""Label efficiency on real MedMNIST: does SSL pretraining buy labels on PneumoniaMNIST and BreastMNIST?

Runs the study grids of ``configs/pneumoniamnist.yaml`` and ``configs/breastmnist.yaml`` (random vs SSL init,
plus ImageNet / ImageNet+SSL when ``--imagenet-weights`` is given; label fractions 1–100 %; linear probe, kNN,
fine-tuning) with a CPU-budgetable number of pretraining steps and fine-tuning epochs, then writes
``benchmarks/results/label_efficiency.json`` (test AUC per init × protocol × label fraction, mean ± SD over seeds,
plus the machine) and copies each study's HTML report beside it. Studies resume: rerunning continues where a
killed run stopped.

Every row is one arm — an initialisation *and* the pretraining run it came from (``ssl:simclr``; two SSL runs are
two rows) — read out by one protocol, with the backbone that was actually built (e.g. ``resnet18 (1 ch, 2D, small
stem, 28×28 px)``), mean ± SD over seeds, the t-interval over seeds and the 95% interval over seeds and test
cases (see ``radssl.study.statistics.seeds_and_cases_interval``). ``settings.protocol_rules`` records the
fine-tuning budget, backbone-LR and validation rules the cells were computed with.

Targets (test AUC on the internal test split, mean over seeds; each records the backbone it was measured with, and
the MedMNIST reference is ResNet-18 (28) — a target met with another backbone says so):
  T1  supervised from scratch (random init, fine-tune, 100 % labels) within ±0.02 of MedMNIST v2's ResNet-18 (28),
      two-sided |AUC − ref| ≤ 0.02: PneumoniaMNIST .944, BreastMNIST .901 (Yang et al., Scientific Data 2023);
  T2  on PneumoniaMNIST at 1 % labels, each SSL run beats random by ≥ 0.05 (fine-tune; the paired interval over
      seeds and test cases is recorded beside the point estimate);
  T3  each SSL run with 10 % labels (fine-tune) reaches the reference, i.e. is at or above it (one-sided by intent).

Usage:
  RADSSL_DATA_DIR=/path/to/medmnist python benchmarks/label_efficiency.py                # the full grid (GPU!)
  python benchmarks/label_efficiency.py --steps 300 --epochs 10 --seeds 0 1 2            # CPU-budgeted
  python benchmarks/label_efficiency.py --stem standard --steps 87 --batch-size 256      # ResNet-18, 7×7 stem
  python benchmarks/label_efficiency.py ... protocols.finetune.backbone_lr_scale=1.0 validation=full  # rules
  python benchmarks/label_efficiency.py --smoke --results /tmp/le.json                    # seconds: plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


from common import machine as shared_machine

from radssl.atomic import write_text_atomic
from radssl.study.config import load_study_config
from radssl.study.runner import REPORT_DIR, RESULTS_FILE, run_study
from radssl.study.results_store import CellKey, ResultsStore
from radssl.study.statistics import (
    binary_auc,
    macro_auc,
    mean_std_over_seeds,
    seed_t_interval,
    seeds_and_cases_interval,
    seeds_and_cases_paired_test,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "label_efficiency.json"
DATASETS = ("pneumoniamnist", "breastmnist")
REFERENCE_AUC = {"pneumoniamnist": 0.944, "breastmnist": 0.901}
"""MedMNIST v2 ResNet-18 (28), trained from scratch on all labels: test AUC."""
REFERENCE_MODEL = "MedMNIST v2 ResNet-18 (28)"
REFERENCE_TOLERANCE = 0.02
"""T1: two-sided, |AUC − reference| ≤ this."""
STEMS = {"small": "true", "standard": "false", "auto": "null"}
"""--stem → model.small_input (small: 3×3 stride-1 stem, no max-pool; standard: torchvision's 7×7 stride-2)."""


def machine() -> dict[str, Any]:
    return shared_machine()


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
    if args.stem:
        overrides.append(f"model.small_input={STEMS[args.stem]}")
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


def arm_name(init: str, pretrain: str) -> str:
    """One row per initialisation *and* pretraining run: ``random``, ``ssl:simclr``, ``imagenet+ssl:byol``."""
    return init if pretrain in ("", "none") else f"{init}:{pretrain}"


def _backbones(store: ResultsStore, study: str) -> dict[str, str]:
    """Arm → the backbone it was built with (from the stored study and pretraining-run configs)."""
    from radssl.config import ModelSection

    config = store.study_config(study) or {}
    data = config.get("data") or {}
    size = int(data.get("size") or data.get("image_size") or 28)

    def describe(model: dict[str, Any] | None) -> str:
        if not model:
            return "unknown"
        section = ModelSection.model_validate(model)
        try:
            return section.spec_for(1, (size, size)).describe()
        except Exception:  # noqa: BLE001 - a description must not break the benchmark
            return section.backbone
    out = {"random": describe(config.get("model")), "imagenet": describe({**(config.get("model") or {}),
                                                                          "small_input": False})}
    for run in store.pretrain_runs(study):
        model = json.loads(run["config_json"] or "{}").get("model")
        out[f"run:{run['run_name']}"] = describe(model)
    return out


def summarise(results_file: Path, study: str) -> dict[str, dict[str, Any]]:
    """{arm: {backbone, pretraining_run, protocols: {protocol: {fraction: row}}}} of internal-test AUC.

    Arms are grouped by initialisation *and* pretraining run (full pretraining set only). A row holds mean, SD
    and n over seeds, the t-interval over seeds (test set fixed) and the 95% interval over seeds and test cases.
    """
    cells: dict[tuple[str, str, str, float], list[CellKey]] = {}
    values: dict[tuple[str, str, str, float], list[float]] = {}
    with ResultsStore(results_file) as store:
        for row in store.cells(study):
            if row["metric"] != "auc" or row["test_set"] != "test" or row["pretrain_fraction"] != 1.0:
                continue
            group = (row["init"], row["pretrain"], row["protocol"], float(row["label_fraction"]))
            cells.setdefault(group, []).append(CellKey.from_row(row))
            values.setdefault(group, []).append(row["value"])
        backbones = _backbones(store, study)
        table: dict[str, dict[str, Any]] = {}
        for group in sorted(values):
            init, pretrain, protocol, fraction = group
            mean, sd, n = mean_std_over_seeds(values[group])
            _, t_low, t_high, _, _ = seed_t_interval(values[group], bounds=(0.0, 1.0))  # AUC rows only
            entry: dict[str, Any] = {"mean": round(mean, 4), "sd": None if math.isnan(sd) else round(sd, 4), "n": n,
                                     "t95_seeds": _pair(t_low, t_high)}
            both = _seeds_and_cases(store, study, cells[group])
            entry["ci95_seeds_and_cases"] = None if both is None else _pair(both.low, both.high)
            run = pretrain if init == "ssl" else f"imagenet+{pretrain}" if init == "imagenet+ssl" else None
            arm = table.setdefault(arm_name(init, pretrain), {
                "init": init, "pretraining_run": run,
                "backbone": backbones.get(f"run:{run}", backbones.get(init, "unknown")) if run else
                backbones.get(init, "unknown"), "protocols": {}})
            arm["protocols"].setdefault(protocol, {})[f"{fraction:g}"] = entry
    return table


def _pair(low: float, high: float) -> list[float] | None:
    return None if not (math.isfinite(low) and math.isfinite(high)) else [round(low, 4), round(high, 4)]


def _scores(store: ResultsStore, study: str, keys: list[CellKey]) -> tuple[Any, list[Any]] | None:
    loaded = [store.predictions(study, key) for key in sorted(keys, key=lambda k: k.seed)]
    if not loaded or any(p is None for p in loaded):
        return None
    return loaded[0].y_true, [p.y_score for p in loaded]


def _seeds_and_cases(store: ResultsStore, study: str, keys: list[CellKey]):  # noqa: ANN202
    scores = _scores(store, study, keys)
    if scores is None:
        return None
    y_true, per_seed = scores
    return seeds_and_cases_interval(y_true, per_seed, binary_auc if per_seed[0].ndim == 1 else macro_auc)


def _entry(table: dict, arm: str, protocol: str, fraction: float) -> dict[str, Any] | None:
    return table.get(arm, {}).get("protocols", {}).get(protocol, {}).get(f"{fraction:g}")


def _auc(table: dict, arm: str, protocol: str, fraction: float) -> float | None:
    entry = _entry(table, arm, protocol, fraction)
    return None if entry is None else entry["mean"]


def _paired_gain(results_file: Path | None, study: str | None, ssl_arm: str, fraction: float) -> dict | None:
    """SSL − random at one fraction (fine-tune), paired by seed, over seeds and test cases."""
    if results_file is None or study is None:
        return None
    with ResultsStore(results_file) as store:
        by_arm: dict[str, dict[int, CellKey]] = {}
        for row in store.cells(study):
            if (row["metric"] == "auc" and row["test_set"] == "test" and row["protocol"] == "finetune"
                    and row["pretrain_fraction"] == 1.0 and abs(row["label_fraction"] - fraction) < 1e-9):
                by_arm.setdefault(arm_name(row["init"], row["pretrain"]), {})[row["seed"]] = CellKey.from_row(row)
        a, b = by_arm.get(ssl_arm, {}), by_arm.get("random", {})
        seeds = sorted(set(a) & set(b))
        scores_a, scores_b = _scores(store, study, [a[s] for s in seeds]), _scores(store, study, [b[s] for s in seeds])
    if not seeds or scores_a is None or scores_b is None:
        return None
    function = binary_auc if scores_a[1][0].ndim == 1 else macro_auc
    result = seeds_and_cases_paired_test(scores_a[0], scores_a[1], scores_b[1], function)
    return {"ci95_seeds_and_cases": _pair(result.low, result.high), "p_seeds_and_cases": round(result.p_value, 4),
            "paired_seeds": len(seeds)}


def check_targets(dataset: str, table: dict, results_file: Path | None = None,
                  study: str | None = None) -> list[dict[str, Any]]:
    """The targets for one dataset: value, threshold, rule, backbone and whether met (None = not measured)."""
    reference = REFERENCE_AUC[dataset]
    checks = []
    supervised = _auc(table, "random", "finetune", 1.0)
    backbone = table.get("random", {}).get("backbone", "unknown")
    checks.append({
        "target": f"T1 random-init fine-tune @100% ({backbone}) within ±{REFERENCE_TOLERANCE} of {REFERENCE_MODEL}",
        "rule": f"two-sided: |AUC − {reference}| ≤ {REFERENCE_TOLERANCE}", "value": supervised,
        "threshold": [round(reference - REFERENCE_TOLERANCE, 3), round(reference + REFERENCE_TOLERANCE, 3)],
        "backbone": backbone, "reference_model": REFERENCE_MODEL,
        "same_architecture_as_reference": backbone.startswith("resnet18 ") and "small stem" in backbone,
        "met": None if supervised is None else abs(supervised - reference) <= REFERENCE_TOLERANCE + 1e-12})
    ssl_arms = sorted(arm for arm, row in table.items() if row.get("init") == "ssl")
    for arm in ssl_arms:
        arm_backbone = table[arm]["backbone"]
        if dataset == "pneumoniamnist":
            ssl, random = _auc(table, arm, "finetune", 0.01), _auc(table, "random", "finetune", 0.01)
            gain = None if ssl is None or random is None else round(ssl - random, 4)
            check = {"target": f"T2 {arm} − random (fine-tune) @1% labels ≥ 0.05 ({arm_backbone})",
                     "rule": "one-sided on the mean over seeds: gain ≥ 0.05", "value": gain, "threshold": 0.05,
                     "backbone": arm_backbone, "met": None if gain is None else gain >= 0.05}
            paired = _paired_gain(results_file, study, arm, 0.01)
            if paired:
                check.update(paired)
            checks.append(check)
        ssl10 = _auc(table, arm, "finetune", 0.1)
        checks.append({"target": f"T3 {arm} fine-tune @10% labels at or above {REFERENCE_MODEL} {reference} "
                                 f"({arm_backbone})",
                       "rule": f"one-sided by intent ('reaches'): AUC ≥ {reference}", "value": ssl10,
                       "threshold": reference, "backbone": arm_backbone,
                       "met": None if ssl10 is None else ssl10 >= reference})
    return checks


def protocol_rules(config: Any) -> dict[str, Any]:
    """The fine-tuning budget, backbone-LR and validation rules a study's cells were computed with."""
    finetune = config.protocols.finetune
    return {
        "validation": config.validation, "validation_min_per_class": config.validation_min_per_class,
        "finetune": None if finetune is None else {
            "epochs": finetune.epochs, "steps_per_epoch": finetune.steps_per_epoch, "min_epochs": finetune.min_epochs,
            "early_stopping_patience": finetune.early_stopping_patience,
            "backbone_lr_scale": finetune.backbone_lr_scale, "batch_size": finetune.batch_size},
    }


def print_table(dataset: str, table: dict, checks: list[dict[str, Any]]) -> None:
    fractions = sorted({float(f) for arm in table.values() for proto in arm["protocols"].values() for f in proto})
    print(f"\n{dataset}: internal test AUC, mean over seeds (n)")
    header = f"{'arm':<22}{'protocol':<10}" + "".join(f"{f'{100 * f:g}%':>13}" for f in fractions) + "  backbone"
    print(header)
    for arm, row in table.items():
        for protocol, values in row["protocols"].items():
            cells = []
            for fraction in fractions:
                entry = values.get(f"{fraction:g}")
                cells.append(f"{entry['mean']:.3f} ({entry['n']})" if entry else "–")
            print(f"{arm:<22}{protocol:<10}" + "".join(f"{c:>13}" for c in cells) + f"  {row['backbone']}")
    print("targets:")
    for check in checks:
        status = {True: "MET", False: "not met", None: "not measured"}[check["met"]]
        value = "–" if check["value"] is None else f"{check['value']:.3f}"
        print(f"  {check['target']}\n      value {value:>6}  rule {check['rule']}  {status}")


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
    parser.add_argument("--stem", choices=tuple(STEMS),
                        help="ResNet stem: small (3×3 stride 1, MedMNIST's ResNet-18 (28)), standard (7×7 stride 2, "
                             "several times faster on a CPU at 28 px), auto (by image size); default: the config's")
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
        "backbone": args.backbone, "stem": args.stem, "batch_size": args.batch_size, "protocols": args.protocols,
        "threads": args.threads, "device": args.device,
        "imagenet_weights": args.imagenet_weights, "smoke": args.smoke, "overrides": args.override},
        "reference_auc": REFERENCE_AUC, "datasets": {}}
    for dataset in args.datasets:
        overrides = study_overrides(args, dataset)
        config = load_study_config(ROOT / "configs" / f"{dataset}.yaml", overrides)
        started = time.perf_counter()
        output = run_study(config)
        elapsed = time.perf_counter() - started
        table = summarise(output / RESULTS_FILE, config.name)
        checks = check_targets(dataset, table, output / RESULTS_FILE, config.name)
        report = args.results.parent / f"label_efficiency_{dataset}.html"
        report.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output / REPORT_DIR / "report.html", report)
        summary["datasets"][dataset] = {"study_dir": str(output), "report": str(report),
                                        "wall_time_s": round(elapsed, 1), "protocol_rules": protocol_rules(config),
                                        "test_auc": table, "targets": checks}
        print_table(dataset, table, checks)
    if args.smoke:
        print("\nsmoke settings (tiny steps/epochs, small_cnn): the numbers check plumbing, not the targets")
    write_text_atomic(args.results, json.dumps(summary, indent=2))
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
