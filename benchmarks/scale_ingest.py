"""Benchmark: cache ingest of synthetic DICOM archives — files/s and peak memory, 1 worker vs all cores.

Makes one archive of CT slices (``--image-size``² int16, series of ``--per-series`` slices with positions, from
pydicom's ``CT_small.dcm`` header) in a temp folder, then for each size in ``--sizes`` (a folder of symlinks to
the first N files) builds the radssl cache (``radssl.data.medical.load_medical_store``, ``assemble: images``,
CT window, ``target_size`` = image size) in a fresh subprocess per run, so every run starts cold and its memory
is its own. Per run:

* ``files_per_s``: files / wall seconds of the whole build (header pass, decode + preprocess, write);
* ``peak_rss_parent_mb``: the building process's peak RSS (``ru_maxrss``);
* ``peak_rss_worker_mb``: the largest worker's peak RSS (``RUSAGE_CHILDREN``; forked workers count the
  parent's pages they map, so this is an upper bound of their own);
* ``peak_pss_tree_mb``: the largest sum of PSS (proportional set size: a page shared by k processes counts 1/k
  in each, so forked workers are not counted twice) over the process tree, sampled every 100 ms with psutil
  (RSS where PSS is unavailable; the JSON says which).

Modes: ``workers=1`` (no worker processes), ``workers=<all cores>``, and ``legacy`` (the pre-ingest path:
every record decoded into one list, then preprocessed; the memory reference). Memory must stay flat as files
grow for the ingest modes; ``growth_mb_per_1k_files`` says by how much it does grow (per-image metadata).

Writes ``benchmarks/results/scale_ingest.json`` atomically (``--quick``: ``scale_ingest_quick.json`` in the
system temp folder, so a check of the script never replaces the committed results).

Usage: python benchmarks/scale_ingest.py [--sizes 1000 4000 16000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from radssl.atomic import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def make_archive(root: Path, n_files: int, size: int = 64, per_series: int = 50, seed: int = 0) -> list[Path]:
    """Write ``n_files`` CT slices (``size``², int16 HU + noise) in series of ``per_series``; return their paths."""
    import pydicom
    from pydicom.data import get_testdata_file

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for tag in ("LargestImagePixelValue", "SmallestImagePixelValue"):
        if tag in template:
            delattr(template, tag)
    template.Rows = template.Columns = size
    template.BitsAllocated, template.BitsStored, template.HighBit, template.PixelRepresentation = 16, 16, 15, 1
    template.RescaleIntercept, template.RescaleSlope = 0, 1
    template.PixelSpacing = [0.7, 0.7]
    template.SliceThickness = 2.5
    template.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    body = (xx**2 + yy**2 < 0.8).astype(np.float32)
    paths = []
    for i in range(n_files):
        series, k = divmod(i, per_series)
        uid = f"1.2.826.0.1.3680043.8.498.9.{series + 1}"
        hu = -1000 + body * (1040 + 200 * np.sin(6 * xx + k / 5.0)) + rng.normal(0, 20, (size, size))
        template.PixelData = np.clip(hu, -1024, 3071).astype("<i2").tobytes()
        template.ImagePositionPatient = [-90.0, -90.0, 2.5 * k]
        template.SliceLocation = 2.5 * k
        template.PatientID = f"P{series:05d}"
        template.StudyInstanceUID = uid + ".0"
        template.SeriesInstanceUID = uid
        template.InstanceNumber = k + 1
        template.SOPInstanceUID = f"{uid}.{k + 1}"
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        path = root / f"s{series:05d}" / f"{k:03d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def link_subset(paths: list[Path], root: Path, folder: Path) -> Path:
    """``folder`` holding symlinks to ``paths`` (same relative layout): an archive of len(paths) files."""
    for path in paths:
        target = folder / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    return folder


# ----------------------------------------------------------------------------------------- one run (child)
def run_child(root: Path, cache: Path, mode: str, size: int) -> dict:
    """Build the cache for ``root`` in this process (``mode``: worker count, or ``legacy``); timings and peaks."""
    from functools import partial

    from radssl.data.cache import load_or_build_cache
    from radssl.data.dicom import DicomSourceConfig, list_dicom_files, read_dicom_source
    from radssl.data.medical import MedicalDataConfig, load_medical_store
    from radssl.data.preprocess import PreprocessConfig, preprocess_record

    source = DicomSourceConfig(root=root)
    preprocess = PreprocessConfig.model_validate({"modality": "ct", "target_size": [size, size]})
    started = time.perf_counter()
    if mode == "legacy":
        store = load_or_build_cache(cache, "bench", list_dicom_files(source), source, preprocess.config_fingerprint(),
                                    lambda log: read_dicom_source(source, log), partial(preprocess_record, config=preprocess))
    else:
        config = MedicalDataConfig(source=source, preprocess=preprocess, cache_dir=cache, ingest_workers=int(mode),
                                   task={"kind": "none"})
        store = load_medical_store(config, "bench")
    seconds = time.perf_counter() - started
    to_mb = 1024.0  # ru_maxrss is in KiB on Linux
    return {
        "images": len(store),
        "seconds": seconds,
        "peak_rss_parent_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / to_mb,
        "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / to_mb,
    }


def measure(root: Path, cache: Path, mode: str, size: int) -> dict:
    """Run one build in a subprocess, sampling its process tree's RSS; the child's report plus the tree peak."""
    import psutil

    command = [sys.executable, __file__, "--child", str(root), str(cache), mode, str(size)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    tree_peak, measure_kind = 0, "pss"
    handle = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            members = [handle, *handle.children(recursive=True)]
            total = 0
            for member in members:
                try:
                    total += member.memory_full_info().pss
                except (AttributeError, psutil.AccessDenied):
                    measure_kind = "rss"
                    total += member.memory_info().rss
            tree_peak = max(tree_peak, total)
        except psutil.Error:
            pass  # a worker ended while it was read
        time.sleep(0.1)
    output = process.stdout.read() if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"ingest run {mode} on {root} failed with exit code {process.returncode}")
    report = json.loads(output.strip().splitlines()[-1])
    if mode in ("1", "legacy"):
        report["peak_rss_worker_mb"] = None  # no worker processes: whatever else the child waited for is not one
    report["peak_pss_tree_mb"] = tree_peak / 2**20
    report["tree_measure"] = measure_kind
    return report


# ----------------------------------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--per-series", type=int, default=50)
    parser.add_argument("--workers", type=int, default=None, help="the 'all cores' worker count (default: CPUs)")
    parser.add_argument("--no-legacy", action="store_true", help="skip the pre-ingest single-list reference")
    parser.add_argument("--quick", action="store_true", help="100/200/400 files: checks the script runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=4, metavar=("ROOT", "CACHE", "MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        root, cache, mode, size = args.child
        print(json.dumps(run_child(Path(root), Path(cache), mode, int(size))), flush=True)
        return
    sizes = [100, 200, 400] if args.quick else sorted(args.sizes)
    out = args.out or (Path(tempfile.gettempdir()) / "scale_ingest_quick.json" if args.quick else RESULTS / "scale_ingest.json")
    cores = args.workers or len(os.sched_getaffinity(0))
    modes = ["1", str(cores)] if cores > 1 else ["1"]
    modes += [] if args.no_legacy else ["legacy"]
    runs = []
    with tempfile.TemporaryDirectory(prefix="radssl-scale-ingest-") as temp:
        temp_path = Path(temp)
        started = time.perf_counter()
        paths = make_archive(temp_path / "archive", max(sizes), args.image_size, args.per_series)
        made = time.perf_counter() - started
        print(f"archive: {len(paths)} files in {made:.1f} s", flush=True)
        for n in sizes:
            root = link_subset(paths[:n], temp_path / "archive", temp_path / f"set{n}")
            for mode in modes:
                report = measure(root, temp_path / f"cache-{n}-{mode}", mode, args.image_size)
                row = {"files": n, "mode": "legacy" if mode == "legacy" else f"{mode} worker(s)",
                       "workers": 1 if mode == "legacy" else int(mode), **report,
                       "files_per_s": n / report["seconds"]}
                runs.append(row)
                print(f"{n:>6} files  {row['mode']:<12} {row['files_per_s']:8.1f} files/s  parent peak "
                      f"{row['peak_rss_parent_mb']:7.1f} MB  tree peak {row['peak_pss_tree_mb']:7.1f} MB", flush=True)
    summary = {}
    for mode in {r["mode"] for r in runs}:
        rows = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["files"])
        small, large = rows[0], rows[-1]
        extra_files = max(large["files"] - small["files"], 1)
        summary[mode] = {
            "growth_mb_per_1k_files": (large["peak_rss_parent_mb"] - small["peak_rss_parent_mb"]) * 1000 / extra_files,
            "tree_growth_mb_per_1k_files": (large["peak_pss_tree_mb"] - small["peak_pss_tree_mb"]) * 1000 / extra_files,
            "pixel_mb_per_1k_files": 1000 * args.image_size**2 * 2 / 2**20,
            "files_per_s_at_largest": large["files_per_s"],
        }
    result = {
        "benchmark": "scale_ingest",
        "quick": args.quick,
        "sizes": sizes,
        "image_size": args.image_size,
        "per_series": args.per_series,
        "archive_seconds": made,
        "runs": runs,
        "summary": summary,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
        },
    }
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
