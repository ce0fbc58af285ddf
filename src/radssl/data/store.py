"""In-memory store of compact image tensors plus per-sample metadata.

Why a store: every SSL epoch touches every image many times, so images are decoded and preprocessed once
into uint8 (or float16 for >8-bit data) tensors that sit in RAM or on the training device, or stay
memory-mapped from the cache (possibly larger than RAM: whole-store passes here go a chunk of rows at a time,
see ``row_chunks``); augmentation then runs batched on that device (see ``radssl.views``). Sources (MedMNIST,
synthetic, DICOM, NIfTI, folders) produce an ``ImageStore``; nothing downstream knows which source it came from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

from radssl.errors import DataError

SPLITS = ("train", "val", "test")
"""Split names a store may use; ``unlabelled`` marks pretraining-only images with no split."""


def held_out_patient_note(count: int) -> str:
    """The sentence a store, ``run.json`` and the study report carry when pretraining rows were dropped."""
    return (f"{count} train/unlabelled image(s) of patients who also have val or test images are left out of "
            "SSL pretraining (pretraining on them would let SSL arms see test patients' anatomy)")

ALL_SPLIT_NAMES = SPLITS + ("unlabelled",)

TaskKind = Literal["binary", "multiclass", "multilabel", "none"]


@dataclass(frozen=True)
class TaskInfo:
    """What the labels mean: task kind, number of classes (or label columns) and their names."""

    kind: TaskKind
    num_classes: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind != "none" and self.num_classes < 2 and self.kind != "multilabel":
            raise ValueError(f"a {self.kind} task needs at least 2 classes, got {self.num_classes}")


@dataclass
class ImageStore:
    """Images as one compact tensor plus aligned per-sample metadata columns.

    Attributes:
        name: dataset name used in messages and provenance.
        images: uint8 or float16 tensor, (N, C, H, W) for 2D or (N, C, D, H, W) for 3D.
        labels: int64 (N,) class index for binary/multiclass (-1 = unlabelled),
            or float32 (N, K) 0/1 for multilabel (NaN = unknown).
        split: str array (N,), one of ``train``, ``val``, ``test``, ``unlabelled``.
        patient_id: str array (N,); empty string where unknown. Splits and positive pairs use it.
        task: label semantics.
        meta: further per-sample columns (site, modality, slice_index, frame_index, ...).
        origin: file(s) the data came from, for error messages and provenance.
        notes: plain sentences a user must see about how the data were read or split (e.g. "no patient ids:
            splits are per image"); ``radssl data inspect``, ``run.json`` and reports show them.
        mask_classes: names of the segmentation labels in ``meta["mask"]`` (index = label value, ``0`` the
            background), e.g. ``("background", "anterior", "posterior")``; ``()`` when the store declares none.
            Declared names are checked against the masks here (every label must lie in range), so a segmentation
            run knows its classes from the data rather than from a guess.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    split: np.ndarray
    patient_id: np.ndarray
    task: TaskInfo
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    origin: str = ""
    notes: tuple[str, ...] = ()
    mask_classes: tuple[str, ...] = ()
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Reject shapes, dtypes and values that would fail (or silently mislead) later."""
        where = self.origin or self.name
        n = int(self.images.shape[0]) if self.images.ndim > 0 else 0
        if self.images.ndim not in (4, 5):
            raise DataError(
                where,
                f"images have shape {tuple(self.images.shape)}; expected (N, C, H, W) or (N, C, D, H, W)",
            )
        if n == 0:
            raise DataError(where, "the dataset holds no images", "check the data path and split names")
        if self.images.dtype not in (torch.uint8, torch.float16, torch.float32):
            raise DataError(where, f"images have dtype {self.images.dtype}; expected uint8 or float16")
        if self.images.is_floating_point():
            first = _first_nonfinite_row(self.images)
            if first is not None:
                raise DataError(
                    where,
                    f"images contain NaN or inf pixels (first at sample index {first})",
                    "clean or drop those images before pretraining",
                )
        if self.labels.shape[0] != n:
            raise DataError(
                where,
                f"image/label count mismatch: {n} images but {self.labels.shape[0]} labels",
            )
        for column_name, column in (("split", self.split), ("patient_id", self.patient_id)):
            if len(column) != n:
                raise DataError(where, f"metadata column '{column_name}' has {len(column)} rows for {n} images")
        for column_name, column in self.meta.items():
            if len(column) != n:
                raise DataError(where, f"metadata column '{column_name}' has {len(column)} rows for {n} images")
        self._validate_masks(where, n)
        unknown = sorted(set(np.unique(self.split).tolist()) - set(ALL_SPLIT_NAMES))
        if unknown:
            raise DataError(where, f"unknown split names {unknown}; expected {list(ALL_SPLIT_NAMES)}")
        if self.task.kind in ("binary", "multiclass"):
            if self.labels.ndim != 1:
                raise DataError(where, f"labels have shape {tuple(self.labels.shape)}; a {self.task.kind} task needs (N,)")
            labelled = self.labels[self.labels >= 0]
            if labelled.numel() and int(labelled.max()) >= self.task.num_classes:
                raise DataError(
                    where,
                    f"label {int(labelled.max())} is outside the declared {self.task.num_classes} classes",
                )
            if bool((self.labels < -1).any()):
                raise DataError(where, "labels below -1 found; use -1 for 'unlabelled'")
        elif self.task.kind == "multilabel":
            if self.labels.ndim != 2 or self.labels.shape[1] != self.task.num_classes:
                raise DataError(
                    where,
                    f"labels have shape {tuple(self.labels.shape)}; a multilabel task with "
                    f"{self.task.num_classes} labels needs (N, {self.task.num_classes})",
                )

    def _validate_masks(self, where: str, n: int) -> None:
        """``meta["mask"]`` on the images' grid with integer labels; declared ``mask_classes`` cover every label."""
        self.mask_classes = tuple(str(name) for name in self.mask_classes)
        mask = self.meta.get("mask")
        if self.mask_classes and len(self.mask_classes) < 2:
            raise DataError(where, f"mask_classes {list(self.mask_classes)} name fewer than 2 labels",
                            "name the background (label 0) and at least one structure")
        if mask is None:
            if self.mask_classes:
                raise DataError(where, f"mask_classes {list(self.mask_classes)} are declared but the store has no "
                                "masks (meta['mask'])", "give the source its masks or drop mask_classes")
            return
        shape = tuple(int(s) for s in np.shape(mask))
        if shape != (n, *self.image_shape):
            raise DataError(where, f"masks have shape {shape}; expected (N, *spatial) = {(n, *self.image_shape)}, "
                            "one label map per image on its grid", "resample masks with their images")
        if not np.issubdtype(np.asarray(mask[:0]).dtype, np.integer):
            raise DataError(where, f"masks have dtype {np.asarray(mask[:0]).dtype}; expected integer labels",
                            "store label masks as integers (uint8)")
        if self.mask_classes:
            low, high = int(np.min(mask)), int(np.max(mask))
            if low < 0 or high >= len(self.mask_classes):
                bad = np.flatnonzero((np.asarray(mask).reshape(n, -1) < 0).any(1)
                                     | (np.asarray(mask).reshape(n, -1) >= len(self.mask_classes)).any(1))
                raise DataError(where, f"mask labels span {low}..{high} but mask_classes declare "
                                f"{len(self.mask_classes)} labels {list(self.mask_classes)} (first bad image: row "
                                f"{int(bad[0])})", "declare every label in mask_classes or fix the masks")

    # ------------------------------------------------------------- properties
    @property
    def spatial_dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.images.ndim - 2

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Spatial shape (H, W) or (D, H, W)."""
        return tuple(int(s) for s in self.images.shape[2:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def indices(self, split: str) -> np.ndarray:
        """Row indices of one split (``train``, ``val``, ``test`` or ``unlabelled``)."""
        if split not in ALL_SPLIT_NAMES:
            raise DataError(self.name, f"unknown split '{split}'; expected one of {list(ALL_SPLIT_NAMES)}")
        return np.flatnonzero(self.split == split)

    def pretrain_indices(self) -> np.ndarray:
        """Images SSL may see: train plus unlabelled, minus every image of a val/test patient.

        Never val/test rows, and never a train/unlabelled row whose patient also has val or test images (a source's
        own splits, or a validation split carved from labelled rows only, can leave such rows): pretraining on them
        would show SSL arms the anatomy of the patients they are tested on, which random arms never see, biasing
        the SSL gain upward (issue 19, point 6). :meth:`held_out_patient_rows` lists the dropped rows.
        """
        candidates = (self.split == "train") | (self.split == "unlabelled")
        return np.flatnonzero(candidates & ~self._of_held_out_patients())

    def held_out_patient_rows(self) -> np.ndarray:
        """Train/unlabelled rows left out of pretraining because their patient has val or test images.

        Rows without a patient id (``""``) cannot be matched and are kept (the store's notes warn about them).
        """
        candidates = (self.split == "train") | (self.split == "unlabelled")
        return np.flatnonzero(candidates & self._of_held_out_patients())

    def _of_held_out_patients(self) -> np.ndarray:
        """Boolean (N,): the row's (known) patient has at least one val or test image."""
        evaluated = (self.split == "val") | (self.split == "test")
        held_out = np.unique(self.patient_id[evaluated & (self.patient_id != "")])
        if len(held_out) == 0:
            return np.zeros(len(self.split), dtype=bool)
        return np.isin(self.patient_id, held_out) & (self.patient_id != "")

    def subset(self, rows: np.ndarray, name: str | None = None) -> "ImageStore":
        """A new store holding only ``rows`` (a view where possible, no re-decoding)."""
        rows = np.asarray(rows, dtype=np.int64)
        index = torch.from_numpy(rows)
        return replace(
            self,
            name=name or self.name,
            images=self.images.index_select(0, index),
            labels=self.labels.index_select(0, index),
            split=self.split[rows],
            patient_id=self.patient_id[rows],
            meta={k: v[rows] for k, v in self.meta.items()},
            _fingerprint=None,
        )

    def fingerprint(self) -> str:
        """SHA-256 over pixels, labels, splits and patient ids: identifies the exact data a run saw."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(str((tuple(self.images.shape), str(self.images.dtype))).encode())
            for chunk in row_chunks(self.images):  # the same bytes as the whole array's, a chunk in memory at a time
                digest.update(chunk.contiguous().cpu().numpy().data)
            digest.update(self.labels.contiguous().cpu().numpy().tobytes())
            digest.update("\x00".join(self.split.tolist()).encode())
            digest.update("\x00".join(self.patient_id.tolist()).encode())
            if "report" in self.meta:  # image–text runs: other reports are other data (absent: unchanged digest)
                reports = "\x00".join(np.asarray(self.meta["report"]).astype(str).tolist())
                digest.update(b"\x01reports\x00" + reports.encode("utf-8", "surrogatepass"))
            if self.mask_classes:  # segmentation data: masks are labels (absent: unchanged digest)
                digest.update(b"\x01masks\x00" + "\x00".join(self.mask_classes).encode())
                for chunk in row_chunks(self.meta["mask"]):
                    digest.update(np.ascontiguousarray(chunk).data)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def describe(self) -> dict[str, object]:
        """Counts per split and class, for logs and provenance."""
        summary: dict[str, object] = {
            "name": self.name,
            "images": len(self),
            "shape": list(self.image_shape),
            "channels": self.channels,
            "dtype": str(self.images.dtype).replace("torch.", ""),
            "task": self.task.kind,
            "patients": int(len(set(self.patient_id.tolist()) - {""})),
        }
        for split in ALL_SPLIT_NAMES:
            rows = self.indices(split)
            if len(rows) == 0:
                continue
            entry: dict[str, object] = {"images": int(len(rows))}
            if self.task.kind in ("binary", "multiclass"):
                counts = torch.bincount(
                    self.labels[torch.from_numpy(rows)].clamp(min=0), minlength=self.task.num_classes
                )
                entry["per_class"] = counts.tolist()
            summary[split] = entry
        if "report" in self.meta:
            present = np.char.strip(np.asarray(self.meta["report"]).astype(str)) != ""
            summary["reports"] = {"with_report": int(present.sum()), "without_report": int((~present).sum())}
        if self.mask_classes:
            summary["mask_classes"] = list(self.mask_classes)
        dropped = self.held_out_patient_rows()
        if len(dropped):  # run.json and study notes show it; absent (0) keeps older records unchanged
            summary["pretrain_rows_of_held_out_patients"] = int(len(dropped))
        if self.notes:
            summary["notes"] = list(self.notes)
        return summary


CHUNK_BYTES = 4 * 2**20
"""Bytes of rows handled at once when a whole-store pass must not copy the store (it may be a memmap larger
than RAM: a CT archive's volumes). Small: a check may hold a few float32/bool temporaries of a chunk."""


def row_chunks(array: torch.Tensor | np.ndarray, chunk_bytes: int | None = None) -> Iterator[torch.Tensor | np.ndarray]:
    """Consecutive row blocks of ``array`` (views), about ``chunk_bytes`` (default ``CHUNK_BYTES``) each."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    n = int(array.shape[0])
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * _itemsize(array))
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, n, step):
        yield array[start : start + step]


def _itemsize(array: torch.Tensor | np.ndarray) -> int:
    return array.element_size() if isinstance(array, torch.Tensor) else int(np.asarray(array[:0]).itemsize)


def _first_nonfinite_row(images: torch.Tensor) -> int | None:
    """Index of the first image holding NaN or inf, checked a chunk at a time (no full-size mask in memory)."""
    start = 0
    for chunk in row_chunks(images):
        bad = ~torch.isfinite(chunk).flatten(1).all(1)
        if bool(bad.any()):
            return start + int(bad.nonzero()[0, 0])
        start += int(chunk.shape[0])
    return None


class StoreRows:
    """Some rows of a store's images, read only when indexed: ``view[a:b]``, ``view[positions]`` or
    ``view.index_select(0, positions)`` gathers just those rows (positions count within ``rows``).

    Why: ``store.images[rows]`` copies every selected image at once, so a training split or test set of a
    memory-mapped CT archive larger than RAM could not be fine-tuned or scored, nor pretrained on; batch-wise readers
    (fine-tuning, segmentation, prediction, streamed pretraining) take this view instead and hold one batch at a time.

    ``device`` is where a gathered batch lands (default: the images' own device). From a CPU store to CUDA the
    gather goes into pinned host memory and is copied with ``non_blocking=True``, so the copy overlaps compute when
    issued from a side stream (:mod:`radssl.engine.prefetch`).
    """

    def __init__(self, images: torch.Tensor, rows: np.ndarray | torch.Tensor,
                 device: torch.device | str | None = None) -> None:
        self.images = images
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        self.device = images.device if device is None else torch.device(device)
        self.pin = self.device.type == "cuda" and images.device.type == "cpu"

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.images.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.images.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            return self._gather(self.rows.index_select(0, index.to(self.rows.device, torch.long)))
        return self._gather(self.rows[index])

    def index_select(self, dim: int, positions: torch.Tensor) -> torch.Tensor:
        """``tensor.index_select`` over the selected rows (what a view policy calls on resident images)."""
        if dim != 0:
            raise ValueError(f"StoreRows.index_select: store rows are indexed by row (dim 0) only, got dim {dim}")
        return self[positions]

    def _gather(self, store_rows: torch.Tensor) -> torch.Tensor:
        """Those rows of the store on ``device``. ``torch.index_select`` into a fresh buffer, not ``images[rows]``:
        on CPU advanced indexing measured 7-18x slower (256 uint8 rows of 64², 8 of 32×96², one thread)."""
        gathered = torch.empty((len(store_rows), *self.images.shape[1:]), dtype=self.images.dtype,
                               device=self.images.device, pin_memory=self.pin)
        torch.index_select(self.images, 0, store_rows.to(self.images.device), out=gathered)
        return gathered.to(self.device, non_blocking=self.pin)

    def nbytes(self) -> int:
        return len(self.rows) * self.images[0].numel() * self.images.element_size() if len(self.images) else 0


def images_to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float16 [0, 1] pixels to float32 [0, 1] on the batch's device."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    return batch.float()


NORMALISATION_MEAN = 0.449
"""Mean subtracted from [0, 1] pixels: the ImageNet RGB means averaged (why: see radssl.transfer.features)."""
NORMALISATION_STD = 0.226
"""Divisor of mean-centred pixels: the ImageNet RGB standard deviations averaged."""


def normalise_for_backbone(batch: torch.Tensor) -> torch.Tensor:
    """Stored pixels (uint8 [0, 255] or float [0, 1]) → float32 ``(x - 0.449) / 0.226`` on the batch's device.

    The one place the project's input convention lives (pretraining views, probes, kNN, fine-tuning).
    Out of place on purpose: for float32 input ``images_to_float`` returns the caller's tensor (maybe a view of a
    store), which an in-place ``sub_`` would corrupt.
    """
    return (images_to_float(batch) - NORMALISATION_MEAN) / NORMALISATION_STD
