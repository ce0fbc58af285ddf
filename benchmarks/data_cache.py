"""Benchmark: preprocessing-cache build rate and epoch read rate vs decoding DICOM every epoch.

Generates a synthetic CT set (``--series`` series × ``--slices`` slices of ``--size``² int16 pixels, from
pydicom's ``CT_small.dcm`` header) in a temp folder, then measures:

* ``decode_epoch``: read + preprocess every file (what a loader without a cache does each epoch);
* ``cache_build``: the same once, plus writing the memory-mapped store (files/s);
* ``cache_epoch``: one pass over the cached store in batches (images/s), after a first warm-up pass,
  so it measures the page cache, as every epoch after the first does.

Uses ``radssl.data.dicom.read_dicom_source`` and ``radssl.data.preprocess.preprocess_record`` when they are
installed; otherwise a plain pydicom read and an HU window (the JSON says which path ran).
Writes ``benchmarks/results/data_cache.json`` atomically.

Usage: python benchmarks/data_cache.py [--series 10 --slices 50 --size 256 --epochs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from radssl.atomic import write_text_atomic
from radssl.data.cache import load_or_build_cache
from radssl.data.records import BadFileLog, Record
from radssl.data.store import images_to_float

RESULT = Path(__file__).resolve().parent / "results" / "data_cache.json"


def make_dicom_series(root: Path, series: int, slices: int, size: int, seed: int = 0) -> list[Path]:
    """Write ``series`` × ``slices`` CT slices (a smooth phantom plus noise, in HU) and return their paths."""
    import pydicom
    from pydicom.data import get_testdata_file

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body = (xx**2 + yy**2 < 0.8).astype(np.float32)
    paths = []
    for s in range(series):
        series_uid = f"1.2.826.0.1.3680043.8.498.7.{s + 1}"
        for k in range(slices):
            ds = template.copy()
            hu = -1000 + body * (1040 + 200 * np.sin(6 * xx + k / 5.0)) + rng.normal(0, 20, (size, size))
            stored = np.clip(hu + 1024, 0, 4095).astype(np.uint16)  # RescaleIntercept -1024
            ds.Rows = ds.Columns = size
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = stored.tobytes()
            ds.PixelSpacing = [0.7, 0.7]
            ds.SliceThickness = 2.5
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-90.0, -90.0, 2.5 * k]
            ds.SliceLocation = 2.5 * k
            ds.PatientID = f"BENCH{s:03d}"
            ds.StudyInstanceUID = series_uid + ".0"
            ds.SeriesInstanceUID = series_uid
            ds.InstanceNumber = k + 1
            ds.SOPInstanceUID = f"{series_uid}.{k + 1}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for tag in ("LargestImagePixelValue", "SmallestImagePixelValue"):
                if tag in ds:
                    delattr(ds, tag)
            path = root / f"series{s:02d}" / f"slice{k:03d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def pipeline(root: Path, target: int) -> tuple[Callable[[BadFileLog], list[Record]], Callable[[Record], np.ndarray], str, object, str]:
    """(reader, preprocess, preprocess fingerprint, source config, which implementation)."""
    try:
        from radssl.data.dicom import DicomSourceConfig, read_dicom_source
        from radssl.data.preprocess import PreprocessConfig, preprocess_record

        source = DicomSourceConfig.model_validate({"kind": "dicom", "root": str(root)})
        config = PreprocessConfig.model_validate({"modality": "ct", "target_size": [target, target]})
        return (
            lambda log: read_dicom_source(source, log),
            lambda record: preprocess_record(record, config),
            config.config_fingerprint(),
            source,
            "radssl.data.dicom + radssl.data.preprocess",
        )
    except ImportError:
        pass
    import pydicom
    import torch.nn.functional as F

    def read(log: BadFileLog) -> list[Record]:
        records = []
        for path in sorted(root.rglob("*.dcm")):
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            records.append(Record(pixels=hu, path=str(path), patient_id=str(ds.PatientID), modality="CT"))
        return records

    def preprocess(record: Record) -> np.ndarray:
        windowed = np.clip((record.pixels + 1000.0) / 1400.0, 0.0, 1.0)  # HU window [-1000, 400]
        tensor = torch.from_numpy(windowed)[None, None]
        resized = F.interpolate(tensor, size=(target, target), mode="bilinear", align_corners=False, antialias=True)
        return (resized[0].numpy() * 255.0 + 0.5).astype(np.uint8)

    return read, preprocess, f"fallback-window-{target}", {"kind": "dicom-fallback", "root": str(root)}, "pydicom fallback"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--slices", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--target", type=int, default=128, help="preprocessed image size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="radssl-bench-") as temp:
        root = Path(temp) / "dicom"
        started = time.perf_counter()
        files = make_dicom_series(root, args.series, args.slices, args.size)
        generate_s = time.perf_counter() - started
        read, preprocess, fingerprint, source, implementation = pipeline(root, args.target)

        decode_times = []
        for _ in range(args.epochs):
            started = time.perf_counter()
            arrays = [preprocess(r) for r in read(BadFileLog())]
            decode_times.append(time.perf_counter() - started)
        n_images = len(arrays)

        started = time.perf_counter()
        store = load_or_build_cache(Path(temp) / "cache", "bench", files, source, fingerprint, read, preprocess)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        store = load_or_build_cache(Path(temp) / "cache", "bench", files, source, fingerprint, read, preprocess)
        open_s = time.perf_counter() - started

        def epoch() -> float:
            total = 0.0
            for start in range(0, len(store), args.batch):
                total += float(images_to_float(store.images[start : start + args.batch]).mean())
            return total

        epoch()  # warm the page cache, as the first training epoch does
        epoch_times = []
        for _ in range(args.epochs):
            started = time.perf_counter()
            epoch()
            epoch_times.append(time.perf_counter() - started)
        cache_bytes = sum(p.stat().st_size for p in Path(store.origin).iterdir())
        source_bytes = sum(p.stat().st_size for p in files)

    decode_s, cache_epoch_s = float(np.median(decode_times)), float(np.median(epoch_times))
    result = {
        "benchmark": "data_cache",
        "implementation": implementation,
        "files": len(files),
        "images": n_images,
        "source_shape": [args.size, args.size],
        "stored_shape": list(store.images.shape[1:]),
        "stored_dtype": str(store.images.dtype).replace("torch.", ""),
        "generate_seconds": round(generate_s, 3),
        "decode_epoch_seconds": round(decode_s, 4),
        "decode_epoch_images_per_s": round(n_images / decode_s, 1),
        "cache_build_seconds": round(build_s, 4),
        "cache_build_files_per_s": round(len(files) / build_s, 1),
        "cache_open_seconds": round(open_s, 4),
        "cache_epoch_seconds": round(cache_epoch_s, 5),
        "cache_epoch_images_per_s": round(len(store) / cache_epoch_s, 1),
        "speedup_cache_vs_decode": round(decode_s / cache_epoch_s, 1),
        "source_megabytes": round(source_bytes / 2**20, 2),
        "cache_megabytes": round(cache_bytes / 2**20, 2),
        "epochs": args.epochs,
        "batch": args.batch,
        "threads": 1,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
