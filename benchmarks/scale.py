"""Scale-out benchmark (issue 18): ingest, streamed pretraining, the data path, and a study through Ray — one run.

Runs each part as its own script in a fresh process (so one part's memory and threads never colour another's) and
collects their results into ``benchmarks/results/scale.json``, with a scale model of a 1,000-cell study built from
the measured per-task costs:

- ``ingest``     → ``scale_ingest.py``: synthetic DICOM archives (1k / 4k / 16k files), files/s and peak RSS, 1 worker
  vs all cores (memory must stay flat as files grow);
- ``stream``     → ``scale_stream.py``: pretraining img/s resident vs streamed (target streamed ≥ 0.9 × resident);
- ``throughput`` → ``throughput.py`` for both ResNet stems: radssl end to end (prefetch on) vs model only (target
  ≥ 0.95), vs lightly as documented and with radssl's model settings;
- ``study``      → ``scale_study.py``: a ≥ 24-cell study serially and with ``--executor ray``: wall-clock, overhead
  per task, identical cell values.

Usage: python benchmarks/scale.py [--quick] [--parts ingest,stream,throughput,study] [--data-root DIR]
``--quick`` passes ``--quick`` to every part (a check that the pipeline runs; numbers mean nothing).
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

from common import machine, write_json

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = ("ingest", "stream", "throughput", "study")


def _run(script: str, args: list[str], out: Path, log: Path) -> dict[str, Any]:
    """Run one part's script, return its JSON (or the failure, so one broken part does not hide the others)."""
    command = [sys.executable, str(HERE / script), *args]
    start = time.perf_counter()
    with log.open("a") as stream:
        stream.write(f"$ {' '.join(command)}\n")
        stream.flush()
        done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=os.environ.copy())
    wall = time.perf_counter() - start
    if done.returncode != 0 or not out.is_file():
        return {"failed": True, "returncode": done.returncode, "wall_s": wall, "log": str(log)}
    result = json.loads(out.read_text())
    result["benchmark_wall_s"] = wall
    return result


def run_parts(parts: list[str], quick: bool, data_root: str | None, work: Path) -> dict[str, Any]:
    flag = ["--quick"] if quick else []
    data = ["--data-root", data_root] if data_root else ["--synthetic"]
    log = work / "scale.log"
    results: dict[str, Any] = {}
    if "ingest" in parts:
        out = work / "ingest.json"
        # 1 worker vs all cores (the pre-ingest single-list path is the memory reference of scale_ingest.py; it is
        # left out here to keep the run short — run scale_ingest.py alone for it)
        results["ingest"] = _run("scale_ingest.py", [*flag, "--no-legacy", "--out", str(out)], out, log)
    if "stream" in parts:
        out = work / "stream.json"
        # the standard stem at batch 256: the fast model of this CPU, where the data path matters most
        settings = [] if quick else ["--stem", "standard", "--batch-size", "256", "--steps", "8", "--warmup", "2",
                                     "--rounds", "3"]
        results["stream"] = _run("scale_stream.py", [*flag, *data, *settings, "--output", str(out)], out, log)
    if "throughput" in parts:
        for stem, batch in (("small", 128), ("standard", 256)):
            out = work / f"throughput_{stem}.json"
            steps = ["--steps", "3", "--warmup", "1"] if quick else ["--steps", "6", "--warmup", "2"]
            results[f"throughput_{stem}_stem"] = _run(
                "throughput.py", [*data, "--stem", stem, "--batch-size", str(batch), *steps, "--output", str(out)],
                out, log)
    if "study" in parts:
        out = work / "study.json"
        results["study"] = _run("scale_study.py", [*flag, "--out", str(out)], out, log)
    return results


def scale_model(study: dict[str, Any]) -> dict[str, Any]:
    """Wall-clock of a 1,000-cell study on 1, 8 and 64 GPUs from the measured per-task costs (a model, not a run).

    Assumptions, stated in the output: cells are independent once their pretraining run exists; a GPU runs
    ``cells_per_gpu`` probe cells at once (fractional GPUs) and one pretraining job at a time; the driver commits one
    cell at a time (single writer, measured as the per-task overhead); pretraining jobs are few (``pretrain_jobs``)
    and each takes ``pretrain_s``; shared storage is not the bottleneck for probe cells (features are cached per
    encoder).
    """
    if not study or study.get("failed"):
        return {"note": "the study part did not run; no scale model"}
    tasks = max(1, int(study.get("tasks", 1)))
    per_task = float(study.get("serial_wall_s", math.nan)) / tasks
    # Ray's per-task overhead beyond its start-up; a negative measurement is noise around zero, counted as zero
    overhead = max(0.0, float(study.get("overhead_per_task_without_startup_s", study.get("overhead_per_task_s", 0.0))))
    pretrain_s = 10 * per_task  # a pretraining job as ten cell tasks (what the measured study's one job cost, roughly)
    cells, pretrain_jobs, cells_per_gpu = 1000, 8, 4
    out = {"assumptions": scale_model.__doc__.split("Assumptions, stated in the output: ")[1].strip(),
           "measured_per_task_s": per_task, "measured_overhead_per_task_s": overhead, "cells": cells,
           "pretrain_jobs": pretrain_jobs, "cells_per_gpu": cells_per_gpu, "gpus": {}}
    for gpus in (1, 8, 64):
        pretraining = math.ceil(pretrain_jobs / gpus) * pretrain_s
        cell_waves = math.ceil(cells / (gpus * cells_per_gpu)) * per_task
        driver = cells * overhead
        wall = pretraining + max(cell_waves, driver)
        bound = "pretraining jobs" if pretraining > max(cell_waves, driver) else (
            "the single writer (driver commits)" if driver > cell_waves else "cell compute")
        out["gpus"][str(gpus)] = {"wall_s": wall, "pretraining_s": pretraining, "cells_s": cell_waves,
                                  "driver_s": driver, "bound_by": bound}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--data-root", default=os.environ.get("RADSSL_DATA_DIR"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    output = args.output or RESULTS / ("scale_quick.json" if args.quick else "scale.json")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="radssl-scale-") as tmp:
        results = run_parts(parts, args.quick, args.data_root, Path(tmp))
        log = (Path(tmp) / "scale.log").read_text() if (Path(tmp) / "scale.log").is_file() else ""
    record = {"benchmark": "scale", "quick": args.quick, "machine": machine(), "parts": results,
              "scale_model_1000_cells": scale_model(results.get("study", {})),
              "wall_s": time.perf_counter() - start}
    write_json(output, record)
    failed = [name for name, part in results.items() if part.get("failed")]
    print(f"wrote {output} ({record['wall_s'] / 60:.1f} min)" + (f"; FAILED parts: {failed}" if failed else ""))
    if failed:
        print(log[-4000:])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
