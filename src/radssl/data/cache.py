"""Preprocessing cache: decode + preprocess once, then every later run memory-maps the result.

Why: decoding DICOM/NIfTI/PNG and resampling costs far more than an SSL epoch reading compact uint8 pixels.
The cache is one ``images.npy`` (a ``.npy`` file, memory-mapped; (N, C, H, W) or (N, C, D, H, W)), optionally
``masks.npy`` (segmentation labels on the same grid), plus a JSON sidecar ``meta.json`` (per-image metadata
columns, labels, class names, how it was built) in a folder named ``<name>-<fingerprint>``. The fingerprint
hashes every source file's path, size and mtime, the source config, the preprocessing fingerprint and the
bad-file policy, so changing any of them builds a new entry.

Atomicity: an entry is built in ``.tmp-<name>-<fingerprint>-<host>-<pid>/`` and renamed into place only when
complete (``os.rename`` of a folder is atomic on POSIX). A run killed mid-build leaves only a ``.tmp-`` folder,
which is ignored (and removed by a later build on the same host once its process is gone); an entry without
a readable, complete sidecar is discarded and rebuilt. Images are streamed into the ``.tmp-`` folder as
worker processes decode and preprocess them (``radssl.data.ingest``: peak memory does not grow with the number
of files); a failing load removes that folder, so the cache folder is left as it was.

Loading is zero-copy: ``torch.from_numpy`` over a copy-on-write memmap, so pages are read on demand and
shared between processes (DataLoader workers, DDP ranks on one host).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radssl.atomic import write_text_atomic
from radssl.data.ingest import IngestResult, ingest_units, records_as_units
from radssl.data.records import BadFileLog, BadFilePolicy, ReadUnit, Record
from radssl.data.store import ImageStore, TaskInfo
from radssl.errors import DataError

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
"""2: slice_index, frame_index and loop_id columns (pairing metadata); older entries are rebuilt."""
IMAGES_FILE = "images.npy"
MASKS_FILE = "masks.npy"
META_FILE = "meta.json"
BAD_FILES_REPORT = "bad_files.json"
SCRATCH_DIR = "scratch"
TABLE_EXTRA_KEYS = ("class_names", "class_name", "slice_index", "frame_index", "loop_id")
"""The ``Record.extra`` keys ``CacheTable`` reads (ingest keeps only these per image, not the pixels)."""


# ----------------------------------------------------------------------------------------- keys
def _config_payload(config: Any) -> Any:
    if hasattr(config, "model_dump"):
        return config.model_dump(mode="json")
    return config


def cache_fingerprint(
    files: Sequence[Path],
    source_config: Any,
    preprocess_fingerprint: str,
    on_bad_file: BadFilePolicy = "error",
) -> str:
    """SHA-256 over (path, size, mtime) of every source file, the source config and the preprocessing.

    ``stat`` only: checking the key never decodes a file. A touched or replaced file changes its mtime.
    """
    digest = hashlib.sha256()
    digest.update(f"radssl-cache-v{CACHE_FORMAT_VERSION}\n".encode())
    for path in sorted(str(Path(p).resolve()) for p in files):
        try:
            stat = os.stat(path)
            digest.update(f"{path}\x00{stat.st_size}\x00{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\x00missing\n".encode())
    digest.update(json.dumps(_config_payload(source_config), sort_keys=True, default=str).encode())
    digest.update(f"\npreprocess:{preprocess_fingerprint}\npolicy:{on_bad_file}".encode())
    return digest.hexdigest()


def entry_dir(cache_dir: Path, name: str, fingerprint: str) -> Path:
    """Folder of one cache entry."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"
    return Path(cache_dir) / f"{safe}-{fingerprint[:20]}"


# ----------------------------------------------------------------------------------------- table
def _position(value: object) -> int:
    """A record's slice/frame position as an int (-1 unknown)."""
    return -1 if value is None else int(value)  # type: ignore[call-overload]


@dataclass
class CacheTable:
    """Per-image metadata kept beside the pixels (JSON-safe columns of length N)."""

    columns: dict[str, list]
    class_names: list[str] | None
    multilabel: bool

    @staticmethod
    def from_records(records: Sequence[Record], source: str) -> "CacheTable":
        labels = [r.label for r in records]
        multilabel = any(isinstance(label, list) for label in labels)
        if multilabel and not all(isinstance(label, list) for label in labels if label is not None):
            raise DataError(source, "records mix multilabel (list) and single-class labels")
        class_names: list[str] | None = None
        for record in records:
            names = record.extra.get("class_names")
            if names is None:
                continue
            names = [str(n) for n in names]  # type: ignore[union-attr]
            if class_names is None:
                class_names = names
            elif names != class_names:
                raise DataError(record.path, f"class names {names} differ from {class_names} of earlier records")
        width = max((len(r.spacing) for r in records), default=0)
        spacing = [list(r.spacing) + [float("nan")] * (width - len(r.spacing)) for r in records]
        columns: dict[str, list] = {
            "path": [r.path for r in records],
            "patient_id": [r.patient_id for r in records],
            "study_id": [r.study_id for r in records],
            "series_id": [r.series_id for r in records],
            "modality": [r.modality for r in records],
            "index": [-1 if r.index is None else int(r.index) for r in records],
            # Pairing metadata, told apart: slice = space (within a series), frame = time (within a loop).
            "slice_index": [_position(r.extra.get("slice_index")) for r in records],
            "frame_index": [_position(r.extra.get("frame_index")) for r in records],
            "loop_id": [str(r.extra.get("loop_id") or "") for r in records],
            "spacing": spacing,
            "split": [r.split or "" for r in records],
            "label": [-1 if label is None else label for label in labels],
            "label_name": [str(r.extra.get("class_name", "")) for r in records],
        }
        return CacheTable(columns=columns, class_names=class_names, multilabel=multilabel)


# ----------------------------------------------------------------------------------------- build
def _clean_stale_temps(cache_dir: Path, prefix: str) -> None:
    """Remove half-built ``.tmp-`` folders of this key left by dead processes on this host."""
    head = f".tmp-{prefix}-{socket.gethostname()}-"
    for temp in cache_dir.glob(f".tmp-{prefix}-*"):
        if not temp.name.startswith(head):
            continue  # another host's build (shared file system): not ours to judge
        try:
            os.kill(int(temp.name[len(head) :]), 0)
            alive = True
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(temp, ignore_errors=True)


def _write_entry(
    final: Path,
    ingest: Callable[[Path], IngestResult],
    name: str,
    log: BadFileLog,
    build_info: dict[str, Any],
) -> None:
    """Build an entry in a ``.tmp-`` folder (``ingest`` streams the pixels into it), then rename it into place."""
    cache_dir = final.parent
    created = not cache_dir.exists()
    cache_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(cache_dir, final.name)
    temp = cache_dir / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        result = ingest(temp)
        table = CacheTable.from_records(result.records, name)
        build_info = dict(build_info, images=len(result.records), skipped=len(log.skipped), workers=result.workers)
        log.write_report(temp / BAD_FILES_REPORT)
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "complete": True,
            "shape": list(result.shape),
            "dtype": str(result.dtype),
            "class_names": table.class_names,
            "multilabel": table.multilabel,
            "masks": result.masks,
            "columns": table.columns,
            "build": build_info,
        }
        write_text_atomic(temp / META_FILE, json.dumps(meta))
        try:
            os.rename(temp, final)
        except OSError:
            if not _entry_complete(final):  # another process won the race with a complete entry: keep theirs
                raise
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if created:  # a failed first build leaves no empty cache folder behind
            try:
                cache_dir.rmdir()
            except OSError:
                pass  # another build has put something there meanwhile
        raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _entry_complete(entry: Path) -> dict[str, Any] | None:
    """The sidecar of a complete, readable entry, else None."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
        if not meta.get("complete") or meta.get("format_version") != CACHE_FORMAT_VERSION:
            return None
        header = np.load(entry / IMAGES_FILE, mmap_mode="r")
        if list(header.shape) != meta["shape"] or str(header.dtype) != meta["dtype"]:
            return None
        if meta.get("masks") and np.load(entry / MASKS_FILE, mmap_mode="r").shape[0] != meta["shape"][0]:
            return None
        return meta
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------- load
def _infer_task(meta: Mapping[str, Any], labels: list) -> TaskInfo:
    names = meta.get("class_names")
    if meta.get("multilabel"):
        names = names or [f"label{i}" for i in range(len(next(lab for lab in labels if lab != -1)))]
        return TaskInfo("multilabel", len(names), tuple(names))
    known = [int(lab) for lab in labels if lab != -1]
    if not known:
        return TaskInfo("none", 0, ())
    count = max(len(names or []), max(known) + 1, 2)
    names = list(names or [str(i) for i in range(count)])
    return TaskInfo("binary" if count == 2 else "multiclass", count, tuple(names))


def store_from_entry(entry: Path, name: str, task: TaskInfo | None = None) -> ImageStore:
    """Open a complete cache entry as an ImageStore (images memory-mapped, copy-on-write)."""
    meta = _entry_complete(entry)
    if meta is None:
        raise DataError(str(entry), "cache entry is incomplete or unreadable", "delete it; the next load rebuilds it")
    images = np.lib.format.open_memmap(entry / IMAGES_FILE, mode="c")
    columns = meta["columns"]
    raw_labels = columns["label"]
    task = task or _infer_task(meta, raw_labels)
    n = len(raw_labels)
    if task.kind == "multilabel":
        width = task.num_classes
        labels = torch.full((n, width), float("nan"), dtype=torch.float32)
        for i, label in enumerate(raw_labels):
            if label != -1:
                row = torch.tensor(label, dtype=torch.float32)
                labels[i] = torch.where(row < 0, torch.tensor(float("nan")), row)
    elif task.kind == "none":
        labels = torch.full((n,), -1, dtype=torch.int64)
    else:
        if meta.get("multilabel"):
            raise DataError(str(entry), f"labels are multilabel but the task is {task.kind}", "set task kind: multilabel")
        labels = torch.tensor([int(x) for x in raw_labels], dtype=torch.int64)
    split = np.asarray([s or "unlabelled" for s in columns["split"]], dtype="<U10")
    store_meta = {
        "path": np.asarray(columns["path"]),
        "study_id": np.asarray(columns["study_id"]),
        "series_id": np.asarray(columns["series_id"]),
        "modality": np.asarray(columns["modality"]),
        "index": np.asarray(columns["index"], dtype=np.int64),
        "slice_index": np.asarray(columns["slice_index"], dtype=np.int64),
        "frame_index": np.asarray(columns["frame_index"], dtype=np.int64),
        "loop_id": np.asarray(columns["loop_id"]).astype(str),
        "spacing": np.asarray(columns["spacing"], dtype=np.float32).reshape(n, -1),
        "label_name": np.asarray(columns["label_name"]),
        "source_split": np.asarray(columns["split"]),
    }
    if meta.get("masks"):
        store_meta["mask"] = np.lib.format.open_memmap(entry / MASKS_FILE, mode="c")
    return ImageStore(
        name=name,
        images=torch.from_numpy(images),
        labels=labels,
        split=split,
        patient_id=np.asarray(columns["patient_id"]),
        task=task,
        meta=store_meta,
        origin=str(entry),
    )


def load_or_build_cache(
    cache_dir: Path,
    name: str,
    files: Sequence[Path],
    source_config: Any,
    preprocess_fingerprint: str,
    read_records: Callable[[BadFileLog], list[Record]] | None,
    preprocess: Callable[[Record], np.ndarray],
    on_bad_file: BadFilePolicy = "error",
    task: TaskInfo | None = None,
    preprocess_mask: Callable[[Record], np.ndarray | None] | None = None,
    plan_units: Callable[[BadFileLog, Path], Sequence[ReadUnit]] | None = None,
    workers: int | None = None,
) -> ImageStore:
    """The cached store for this (files, source config, preprocessing), building it first if needed.

    ``files`` are every file the source reads (stat'ed, never decoded, to key the cache). On a miss the images
    come from ``plan_units`` (the reader's work as ``ReadUnit``s, decoded and preprocessed by ``workers``
    processes — default: one per CPU — and streamed to disk, see ``radssl.data.ingest``), or else from
    ``read_records`` (records already decoded in this process). ``plan_units(log, scratch)`` may keep rows it
    preprocessed while planning in the folder ``scratch`` (removed before the entry is renamed into place). ``preprocess`` turns one record into a
    (C, H, W) / (C, D, H, W) uint8 or float16 array; with ``workers`` > 1 it (and ``preprocess_mask``) must
    pickle (a ``functools.partial`` of a module-level function). Rows keep the reader's order whatever the
    worker count. Splits are the source's own (``unlabelled`` where it gives none). The bad-file report
    (``bad_files.json``) lies in the entry folder, i.e. ``store.origin``. With ``preprocess_mask`` (same
    geometry as ``preprocess``, nearest neighbour) and a mask on every record, the masks are cached too and
    appear as ``store.meta["mask"]`` ((N, H, W) or (N, D, H, W), memory-mapped).
    """
    if (read_records is None) == (plan_units is None):
        raise ValueError("give exactly one of read_records and plan_units")
    with_masks = "+masks" if preprocess_mask is not None else ""
    fingerprint = cache_fingerprint(files, source_config, preprocess_fingerprint + with_masks, on_bad_file)
    final = entry_dir(cache_dir, name, fingerprint)
    if final.exists():
        if _entry_complete(final) is not None:
            return store_from_entry(final, name, task)
        shutil.rmtree(final, ignore_errors=True)  # damaged entry (not built by us atomically): rebuild
    started = time.perf_counter()
    log = BadFileLog(on_bad_file)
    build_info: dict[str, Any] = {
        "fingerprint": fingerprint,
        "files": len(files),
        "preprocess_fingerprint": preprocess_fingerprint,
        "source_config": _config_payload(source_config),
    }

    def ingest(folder: Path) -> IngestResult:
        scratch = folder / SCRATCH_DIR  # a planner's working space, inside the entry's .tmp- folder
        scratch.mkdir()
        if plan_units is not None:
            units, count = deque(plan_units(log, scratch)), workers
            if units and all(unit.preprocessed for unit in units):
                count = 1  # only copies of rows the planner already preprocessed: no work for a pool
        else:
            units, count = deque(records_as_units(read_records(log))), 1  # type: ignore[misc]
        build_info["read_seconds"] = round(time.perf_counter() - started, 3)
        # Each unit is handed over and forgotten, so a planned record (with its reader's extras) is freed once
        # ingested rather than kept until the end.
        handed = (units.popleft() for _ in range(len(units)))
        result = ingest_units(handed, preprocess, log, folder, str(name), IMAGES_FILE, MASKS_FILE, TABLE_EXTRA_KEYS,
                              preprocess_mask, count)
        shutil.rmtree(scratch)
        build_info["total_seconds"] = round(time.perf_counter() - started, 3)
        return result

    _write_entry(final, ingest, str(name), log, build_info)
    return store_from_entry(final, name, task)
