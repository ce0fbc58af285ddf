"""What every benchmark script shares: the machine it ran on, seed intervals, and writing and reading results.

Kept here once so every result file describes its machine the same way (CPU model, cores, threads, GPU, load average,
package versions) and every seed interval is :func:`radssl.study.statistics.seed_t_interval`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radssl.atomic import write_text_atomic
from radssl.provenance import package_versions
from radssl.study.statistics import seed_t_interval


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds(children: bool = False) -> float:
    """User + system CPU seconds of this process (all threads), plus its finished children's with ``children`` —
    the budget of a benchmark on a shared machine, where wall time is inflated by other jobs."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    if children:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        total += usage.ru_utime + usage.ru_stime
    return total


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a result came from; ``extra`` adds the script's own keys (threads it pinned, a note)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    record = {
        "description": f"{os.cpu_count()}-core CPU ({cpu_model()}), " + (f"GPU {gpu}" if gpu else "no GPU")
                       + f"; torch threads {torch.get_num_threads()}",
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "cuda": torch.cuda.is_available(), "platform": platform.platform(), "python": platform.python_version(),
        "load_average_at_start": load, "nice": os.nice(0) if hasattr(os, "nice") else None,
        "versions": package_versions(),
    }
    record.update(extra)
    return record


def mean_sd_interval(values: list[float | None], bounds: tuple[float, float] | None = None) -> dict[str, float]:
    """Mean, SD and the 95 % t-interval over seeds of the finite values (NaN where fewer than two).

    ``bounds``: the values' range (AUC (0, 1), a difference of AUCs (-1, 1)); the interval is then computed on its
    logit scale by :func:`seed_t_interval` and stays inside the range."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(array) == 0:
        return {"mean": math.nan, "sd": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    if len(array) < 2:
        return {"mean": float(array[0]), "sd": math.nan, "low": math.nan, "high": math.nan, "n": 1}
    mean, low, high, _, _ = seed_t_interval(array, bounds=bounds)
    return {"mean": float(mean), "sd": float(array.std(ddof=1)), "low": float(low), "high": float(high),
            "n": int(len(array))}


def write_json(path: Path, record: Any, indent: int = 2, default: Callable[[Any], Any] = float) -> None:
    """Write a result file atomically (a killed benchmark never leaves half a JSON); ``default`` turns what JSON
    cannot hold into what it can (numpy scalars into floats, say)."""
    write_text_atomic(Path(path), json.dumps(record, indent=indent, default=default) + "\n")


def read_result(path: Path) -> dict[str, Any]:
    """A result file a page is re-rendered from (``--render-only``), with an error naming it where it is missing or
    not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{path}: no result file to render from (run the benchmark first, or name it)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not JSON ({error})") from error
    if not isinstance(record, dict):
        raise SystemExit(f"{path}: a result file holds a JSON object, found {type(record).__name__}")
    return record


def add_render_arguments(parser: argparse.ArgumentParser, result_flag: str, rerender: str | None = None) -> None:
    """``--render-only`` (the page from the JSON at ``result_flag``, which is only read) and, where the script can
    recompute its notes from the numbers, ``--rerender`` (help text ``rerender``)."""
    parser.add_argument("--render-only", action="store_true",
                        help=f"only rebuild the HTML from an existing {result_flag} JSON (read, never written)")
    if rerender:
        parser.add_argument("--rerender", action="store_true", help=rerender)


def render_from_result(path: Path, render: Callable[[dict[str, Any]], str],
                       renote: Callable[[dict[str, Any]], None] | None = None, indent: int = 1) -> Path:
    """``--render-only`` / ``--rerender``: the page ``<path>.html`` from the result JSON at ``path``, running nothing.
    ``renote`` (``--rerender``) first recomputes what the record says in words and writes the JSON back (``indent``
    as the script writes it); without it the JSON is only read."""
    path = Path(path)
    record = read_result(path)
    if renote is not None:
        renote(record)
        write_json(path, record, indent=indent)
    page = path.with_suffix(".html")
    write_text_atomic(page, render(record))
    return page
