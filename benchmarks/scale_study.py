"""Benchmark: one study run serially and with ``--executor ray`` on this machine — wall-clock, overhead per task,
and whether every cell value is identical (issue 18, part 3: "a study of ≥ 24 cells").

The study: synthetic radiograph-like data, the small CNN, random vs SimCLR-pretrained encoders × linear probe, kNN
and fine-tuning × label fractions × seeds × internal and shifted-site test sets (48 cells in 24 cell tasks + 1
pretraining task; ``--quick``: 24 cells, tiny data and budgets, only to check the script runs). Both executors use
``threads`` torch threads per task (the same count, so cells can be bit-identical); Ray runs ``cpus`` tasks at a
time on a local instance started by radssl (127.0.0.1 only). The Ray wall-clock includes starting and stopping Ray;
``ray_startup_s`` is measured apart so the per-task overhead can be read with and without it.

Usage: python benchmarks/scale_study.py [--quick] [--cpus N] [--out PATH]
Writes benchmarks/results/scale_study.json (``--quick``: scale_study_quick.json) atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from radssl.atomic import write_text_atomic
from radssl.study.config import StudyConfig
from radssl.study.plan import plan_tasks, prepare_study
from radssl.study.results_store import ResultsStore
from radssl.study.runner import run_study

RESULTS = Path(__file__).resolve().parent / "results"


def study_config(output_dir: Path, quick: bool, cpus: int) -> StudyConfig:
    """≥ 24 cells; ``quick`` shrinks data and budgets (not the grid)."""
    patients, size, steps, epochs = (40, 24, 3, 1) if quick else (200, 28, 40, 3)
    data = {"source": "synthetic", "n_patients": patients, "images_per_patient": 2, "image_size": size}
    train = {"steps": steps, "batch_size": 16 if quick else 64, "accelerator": "cpu", "devices": 1,
             "progress_bar": False, "checkpoint_every": max(2, steps // 2), "log_every": 10}
    return StudyConfig.model_validate({
        "name": "scale",
        "output_dir": str(output_dir),
        "data": data,
        "external_test_sets": [{"name": "site1", "data": {**data, "n_patients": patients // 3, "site": 1}}],
        "model": {"backbone": "small_cnn"},
        "pretraining": [{"name": "simclr", "optim": {"optimizer": "adamw", "lr": 0.002, "lr_scaling": "none"},
                         "train": train}],
        "initialisations": ["random", "ssl:simclr"],
        "label_fractions": [0.3, 1.0],
        "seeds": [0] if quick else [0, 1],
        "protocols": {"linear": {"Cs": [0.1, 1.0]}, "knn": {"k": 5},
                      "finetune": {"epochs": epochs, "batch_size": 16}},
        "bootstrap_samples": 100,
        "threads": 1,
        "device": "cpu",
        "resources": {"pretrain": {"cpus": 1}, "cell": {"cpus": 1}},
    })


def cell_values(output_dir: Path) -> dict[str, dict[str, Any]]:
    with ResultsStore(output_dir / "results.sqlite") as store:
        table: dict[str, dict[str, Any]] = {}
        for row in store.cells("scale"):
            table.setdefault(row["cell_key"], {})[row["metric"]] = [row["value"], row["ci_low"], row["ci_high"]]
        for key in table:
            table[key]["y_score"] = store.predictions("scale", key).y_score.tolist()
        return table


def ray_startup_seconds(cpus: int) -> float:
    import ray

    from radssl.study.executors.ray import start_local_ray

    start = time.perf_counter()
    start_local_ray(num_cpus=cpus)
    ray.shutdown()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny data and budgets: check the script runs")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray instance")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or RESULTS / ("scale_study_quick.json" if args.quick else "scale_study.json")
    with tempfile.TemporaryDirectory(prefix="radssl-scale-") as scratch:
        walls: dict[str, float] = {}
        values: dict[str, dict[str, dict[str, Any]]] = {}
        for executor in ("serial", "ray"):
            config = study_config(Path(scratch) / executor, args.quick, args.cpus)
            start = time.perf_counter()
            run_study(config, executor=executor, log=lambda line: print(f"[{executor}] {line}", flush=True))
            walls[executor] = time.perf_counter() - start
            values[executor] = cell_values(Path(scratch) / executor)
        plan = prepare_study(study_config(Path(scratch) / "plan", args.quick, args.cpus), log=lambda _: None)
        tasks = len(plan_tasks(plan, set(), set()))
        cells = len(plan.cell_keys())
        startup = ray_startup_seconds(args.cpus)
    serial, ray_cells = values["serial"], values["ray"]
    different = sorted(key for key in serial if serial[key] != ray_cells.get(key))
    payload = {
        "quick": args.quick,
        "cells": cells,
        "tasks": tasks,
        "ray_cpus": args.cpus,
        "torch_threads_per_task": 1,
        "serial_wall_s": round(walls["serial"], 2),
        "ray_wall_s": round(walls["ray"], 2),
        "ray_startup_s": round(startup, 2),
        "overhead_per_task_s": round((walls["ray"] - walls["serial"]) / tasks, 3),
        "overhead_per_task_without_startup_s": round((walls["ray"] - walls["serial"] - startup) / tasks, 3),
        "identical_cell_values": not different and set(serial) == set(ray_cells),
        "cells_that_differ": different,
        "machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "note": "ray wall includes starting and stopping the local Ray instance; identical = every metric value, "
                "CI bound and per-case score equal bit for bit",
    }
    write_text_atomic(out, json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
