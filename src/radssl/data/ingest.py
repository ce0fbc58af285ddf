"""Parallel, bounded-memory ingest: decode and preprocess files in worker processes, stream rows to disk.

Why: building the cache used to decode every file into one Python list before writing it, so peak memory grew
with the archive (10⁵ radiographs, 10⁴ CT volumes) and one core did all the decoding. Here a reader plans its
work as ``ReadUnit``s (a file, a NIfTI case, a DICOM series ordered from its headers); a process pool
(``concurrent.futures``; see ``_context`` for the start method) decodes and preprocesses them, and the parent
appends each preprocessed image to ``images.npy`` as it arrives. At most ``2 × workers`` units are in flight,
and results are taken in submission order, so:

* pixel memory is a few images per worker, whatever the number of files; what still grows with the files is
  per-image metadata (a few KB each: the plan's records, the cache's JSON table, the store's columns);
* rows come out in the reader's order, the same whatever the worker count, so the cache's contents and the
  store's fingerprint do not depend on ``data.ingest_workers``.

Error handling is the caller's ``BadFileLog``: a unit that fails to read, or a record that fails preprocessing,
comes back from the worker as a ``DataError`` naming its file and is raised or listed in the parent, in row
order. A worker that dies (killed, out of memory) is reported naming the unit it was reading.

The row count is only known at the end (bad files are skipped; a multi-frame file or a NIfTI case read as
slices gives several images), so ``images.npy`` is written with a fixed-size header reserved up front and filled
in last (``RowFile``); ``numpy.lib.format.open_memmap`` would need the final shape before the first row.
The caller (``radssl.data.cache``) writes into a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from radssl.data.records import BadFileLog, ReadUnit, Record
from radssl.errors import DataError

logger = logging.getLogger(__name__)

ALLOWED_DTYPES = (np.uint8, np.float16, np.float32)
NPY_HEADER_BYTES = 256
"""Room reserved for the ``.npy`` header (magic, version, length, dict): 64-byte aligned like numpy's own."""
_CHUNK_ROWS = 256

Item = TypeVar("Item")


def resolve_workers(requested: int | None) -> int:
    """Worker processes to use: ``requested``, else the CPUs this process may run on."""
    if requested is not None:
        if requested < 1:
            raise DataError("data.ingest_workers", f"is {requested}; expected at least 1", "use 1 for no worker processes")
        return int(requested)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------- parallel map
@dataclass(frozen=True)
class _Raised:
    """A ``DataError`` raised in a worker, as plain fields (``DataError`` takes 3 arguments, so it does not pickle)."""

    source: str
    problem: str
    fix: str | None

    def error(self) -> DataError:
        return DataError(self.source, self.problem, self.fix)


def _call(function: Callable[..., Any], item: Any, args: tuple[Any, ...]) -> Any:
    """Run ``function(item, *args)`` in a worker; a ``DataError`` comes back as a value."""
    try:
        return function(item, *args)
    except DataError as error:
        return _Raised(error.source, error.problem, error.fix)


def _context() -> multiprocessing.context.BaseContext:
    """``fork`` where there is one (Linux), as torch's DataLoader workers: no re-import of ``__main__`` (a user's
    unguarded script or notebook works) and no start-up cost; workers only run numpy/PIL/pydicom/nibabel code.
    ``spawn`` elsewhere (macOS, Windows), which needs the usual ``if __name__ == "__main__":`` guard."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _die_with_parent(parent: int) -> None:
    """Worker initializer: on Linux, ask the kernel to SIGKILL this worker when its parent dies (``kill -9`` of
    the build must not leave workers decoding for nobody); exit at once if the parent is already gone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: workers end when they find the call queue closed
    if os.getppid() != parent:
        os._exit(1)
    # A forked child must not enter the parent's OpenMP thread pool (GNU OpenMP is not fork-safe: a resize or
    # interpolation in torch would wait forever on the pool's barrier); one intra-op thread per worker, as torch's
    # own DataLoader workers do — the pool's parallelism is the workers.
    import torch

    torch.set_num_threads(1)


def ordered_map(
    function: Callable[..., Any],
    items: Iterable[Item],
    workers: int,
    where: Callable[[Item], str],
    args: tuple[Any, ...] = (),
) -> Iterator[tuple[Item, Any]]:
    """``(item, function(item, *args))`` in the order of ``items``; a ``DataError`` is yielded, not raised.

    ``workers == 1`` runs in this process (no pool, nothing pickled). Otherwise at most ``2 × workers`` items
    are in flight, so the results waiting in this process stay bounded. ``function`` must be a module-level
    function and items/args picklable. Closing the iterator early (an error under ``on_bad_file: error``)
    cancels what is queued.
    """
    if workers <= 1:
        for item in items:
            result = _call(function, item, args)
            yield item, result.error() if isinstance(result, _Raised) else result
        return
    pending: deque[tuple[Item, Future]] = deque()
    source = iter(items)
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=_context(), initializer=_die_with_parent,
                                   initargs=(os.getpid(),))
    try:
        for item in source:
            pending.append((item, executor.submit(_call, function, item, args)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as error:
                raise DataError(
                    where(item),
                    "a worker process died while reading it (killed, or out of memory)",
                    "lower data.ingest_workers, give the machine more memory, or remove the file",
                ) from error
            except Exception as error:  # a bug, not a bad file: say which file it happened on
                raise RuntimeError(f"{where(item)}: reading failed in a worker: {type(error).__name__}: {error}") from error
            next_item = next(source, _END)
            if next_item is not _END:
                pending.append((next_item, executor.submit(_call, function, next_item, args)))  # type: ignore[arg-type]
            yield item, result.error() if isinstance(result, _Raised) else result
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


_END = object()


# ----------------------------------------------------------------------------------------- one unit
@dataclass
class _Row:
    """One preprocessed image ready to append: its metadata-only record, pixels and optional mask."""

    record: Record
    array: np.ndarray
    mask: np.ndarray | None


def _slim(record: Record, keep_extra: Sequence[str]) -> Record:
    """The record's metadata without pixels or bulky extras (what the cache's table reads)."""
    extra = {key: record.extra[key] for key in keep_extra if key in record.extra}
    return Record(
        pixels=np.empty(0, np.uint8), path=record.path, patient_id=record.patient_id, study_id=record.study_id,
        series_id=record.series_id, modality=record.modality, spacing=tuple(record.spacing), index=record.index,
        label=record.label, split=record.split, extra=extra,
    )


def preprocess_unit(
    unit: ReadUnit,
    preprocess: Callable[[Record], np.ndarray],
    preprocess_mask: Callable[[Record], np.ndarray | None] | None,
    keep_extra: Sequence[str],
) -> list[_Row | _Raised]:
    """Read one unit and preprocess its records (runs in a worker); a record that fails comes back as ``_Raised``."""
    out: list[_Row | _Raised] = []
    for record in unit.read():
        try:
            array = np.asarray(record.pixels if unit.preprocessed else preprocess(record))
            if array.ndim not in (3, 4):
                raise DataError(record.path, f"preprocessing returned shape {array.shape}; expected (C,H,W) or (C,D,H,W)")
            if array.dtype not in ALLOWED_DTYPES:
                raise DataError(record.path, f"preprocessing returned dtype {array.dtype}; expected uint8 or float16")
            mask = preprocess_mask(record) if preprocess_mask is not None else None
            if mask is not None and tuple(mask.shape) != tuple(array.shape[1:]):
                raise DataError(record.path, f"preprocessed mask {mask.shape} does not match the image {array.shape[1:]}")
        except DataError as error:
            out.append(_Raised(error.source, error.problem, error.fix))
            continue
        out.append(_Row(_slim(record, keep_extra), array, None if mask is None else np.asarray(mask)))
    return out


# ----------------------------------------------------------------------------------------- row files
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 ``.npy`` header padded to ``NPY_HEADER_BYTES`` (the format's own layout, NEP 1)."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (np.lib.format.dtype_to_descr(dtype), tuple(shape))
    magic = np.lib.format.magic(1, 0)
    room = NPY_HEADER_BYTES - len(magic) - 2
    if len(text) + 1 > room:
        raise ValueError(f"array shape {shape} needs a longer .npy header than {NPY_HEADER_BYTES} bytes")
    return magic + struct.pack("<H", room) + (text.ljust(room - 1) + "\n").encode("latin1")


class RowFile:
    """Rows of one shape appended to a ``.npy`` file whose header (row count) is written when it is closed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.row_shape: tuple[int, ...] = ()
        self.dtype: np.dtype = np.dtype(np.uint8)
        self._stream: Any = None

    def append(self, array: np.ndarray) -> None:
        if self._stream is None:
            self.row_shape, self.dtype = tuple(array.shape), np.dtype(array.dtype)
            self._stream = open(self.path, "wb")
            self._stream.write(b"\0" * NPY_HEADER_BYTES)
        self._stream.write(memoryview(np.ascontiguousarray(array, dtype=self.dtype)).cast("B"))
        self.rows += 1

    def widen(self, dtype: np.dtype) -> None:
        """Rewrite the rows so far in a wider dtype (a later mask needs int32 where earlier ones fit uint8)."""
        self._stream.flush()
        old = np.memmap(self.path, dtype=self.dtype, mode="r", offset=NPY_HEADER_BYTES, shape=(self.rows, *self.row_shape))
        wider = self.path.with_name(self.path.name + ".widen")
        with open(wider, "wb") as out:
            out.write(b"\0" * NPY_HEADER_BYTES)
            for start in range(0, self.rows, _CHUNK_ROWS):
                out.write(memoryview(np.ascontiguousarray(old[start : start + _CHUNK_ROWS], dtype=dtype)).cast("B"))
        del old
        self._stream.close()
        os.replace(wider, self.path)
        self._stream = open(self.path, "r+b")  # not "ab": the header is written at offset 0 on close
        self._stream.seek(0, os.SEEK_END)
        self.dtype = np.dtype(dtype)

    def close(self) -> None:
        """Write the header, flush and fsync."""
        if self._stream is None:
            return
        self._stream.flush()
        self._stream.seek(0)
        self._stream.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._stream = None

    def discard(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------- ingest
@dataclass
class IngestResult:
    """What was written: the kept records (metadata only, row order), the images' shape/dtype, masks or not."""

    records: list[Record]
    shape: tuple[int, ...]
    dtype: np.dtype
    masks: bool
    workers: int


def ingest_units(
    units: Iterable[ReadUnit],
    preprocess: Callable[[Record], np.ndarray],
    log: BadFileLog,
    out_dir: Path,
    source: str,
    images_file: str,
    masks_file: str,
    keep_extra: Sequence[str],
    preprocess_mask: Callable[[Record], np.ndarray | None] | None = None,
    workers: int | None = None,
) -> IngestResult:
    """Read, preprocess and append every unit's images to ``out_dir/images_file`` (and masks), in unit order.

    Every kept image must have the first kept image's shape and dtype (set preprocess ``target_size`` for
    sources of mixed sizes); the first one that differs is an error naming both files. Masks are kept only when
    every kept image has one. ``workers`` > 1 needs picklable ``preprocess``/``preprocess_mask`` and units.
    """
    count = resolve_workers(workers)
    images = RowFile(Path(out_dir) / images_file)
    masks = RowFile(Path(out_dir) / masks_file)
    kept: list[Record] = []
    with_mask = 0
    try:
        results = ordered_map(preprocess_unit, units, count, lambda unit: unit.where, (preprocess, preprocess_mask, keep_extra))
        for _, result in results:
            if isinstance(result, DataError):
                log.handle(result)
                continue
            for row in result:
                if isinstance(row, _Raised):
                    log.handle(row.error())
                    continue
                if kept and (row.array.shape != images.row_shape or row.array.dtype != images.dtype):
                    raise DataError(
                        source,
                        f"preprocessed images differ in shape/dtype: {kept[0].path} gives {images.row_shape} "
                        f"{images.dtype} but {row.record.path} gives {row.array.shape} {row.array.dtype}",
                        "set preprocess target_size (and target spacing for volumes) so every image has one shape",
                    )
                images.append(row.array)
                if row.mask is not None:
                    with_mask += 1
                    if with_mask == len(kept) + 1:  # every image so far has one: keep writing masks
                        wider = np.result_type(masks.dtype, row.mask.dtype) if masks.rows else row.mask.dtype
                        if masks.rows and wider != masks.dtype:
                            masks.widen(wider)
                        masks.append(row.mask)
                kept.append(row.record)
        if not kept:
            raise DataError(source, "no image survived reading and preprocessing", "see bad_files.json for the reasons")
        images.close()
        has_masks = with_mask == len(kept)
        if has_masks:
            masks.close()
        else:
            masks.discard()
            if with_mask:
                logger.warning("%s: only %d of %d images have masks; masks are not cached", source, with_mask, len(kept))
    except BaseException:
        images.discard()
        masks.discard()
        raise
    return IngestResult(kept, (len(kept), *images.row_shape), images.dtype, has_masks, count)


def records_as_units(records: Sequence[Record]) -> list[ReadUnit]:
    """Records already decoded in memory (a caller's own reader) as units: read in this process only."""
    return [ReadUnit(record.path, _given, (record,)) for record in records]


def _given(record: Record) -> list[Record]:
    return [record]
