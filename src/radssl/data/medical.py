"""Build an ImageStore from a user's medical source (DICOM, NIfTI or an image folder).

The one place that joins reader → preprocessing → cache → splits. Splits are patient-level (an
``assign_patient_splits`` over patients, stratified by label) unless the source gives its own, and an
``external`` dataset (a second site kept for out-of-distribution testing) is all ``test``. A source that gives
train and test but no val gets a validation split carved from its training patients. Under
``on_bad_file: skip`` the bad files are listed in ``bad_files.json`` inside the cache entry
(``store.origin``), never silently dropped.

Segmentation sources: ``store.mask_classes`` comes from the source's ``mask_classes`` (NIfTI; image folders:
``background`` + ``mask_values`` names, or ``foreground``), and
``meta["voxel_spacing"]`` (mm per stored axis) is the spacing of the *stored* grid — the source spacing, or
``target_spacing`` after resampling; NaN where a ``pad``/``stretch`` resize to ``target_size`` changed it by a
per-image factor the cache does not keep — so surface distances (HD95) are in mm only where that is true.
``meta["spacing"]`` stays the source's.

What a user must know about how the data were split lands in ``store.notes`` (shown by ``radssl data
inspect``, logged, and recorded in ``run.json``): images without patient ids (split per image, so a patient's
images may leak across splits), a carved validation split, a CSV ``split`` column that is not used.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from radssl.atomic import write_bytes_atomic
from radssl.data.cache import BAD_FILES_REPORT, load_or_build_cache
from radssl.data.dicom import DicomSourceConfig, list_dicom_files, plan_dicom_units, read_dicom_source
from radssl.data.folder import FolderSourceConfig, list_folder_files, mask_notes, plan_folder_units, read_folder_source
from radssl.data.ingest import resolve_workers
from radssl.data.nifti import NiftiSourceConfig, list_nifti_files, plan_nifti_units, read_nifti_source
from radssl.data.preprocess import PreprocessConfig, modality_branch, preprocess_mask, preprocess_record
from radssl.data.records import BadFileLog, ReadUnit, Record
from radssl.data.reports import join_reports, missing_report_note, report_counts, source_reports
from radssl.data.splits import assign_patient_splits
from radssl.data.store import ALL_SPLIT_NAMES, ImageStore, TaskInfo, held_out_patient_note
from radssl.errors import DataError

logger = logging.getLogger(__name__)

SourceConfig = Annotated[DicomSourceConfig | NiftiSourceConfig | FolderSourceConfig, Field(discriminator="kind")]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/radssl/preprocessed`` (``~/.cache/...``): never inside the (read-only) data folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "radssl" / "preprocessed"


class TaskConfig(BaseModel):
    """What the labels mean. ``auto`` takes the kind and class names the source implies."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["auto", "binary", "multiclass", "multilabel", "none"] = "auto"
    class_names: list[str] | None = None


class MedicalDataConfig(BaseModel):
    """A medical dataset: where it is, how it is preprocessed and cached, how it is split."""

    model_config = ConfigDict(extra="forbid")

    source: SourceConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    on_bad_file: Literal["error", "skip"] = "error"
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
    split_seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    external: bool = False
    """An external (second-site) test set: every image becomes ``test`` and nothing of it is pretrained on."""
    ingest_workers: int | None = Field(default=None, ge=1)
    """Processes that decode and preprocess files when the cache is built (``radssl.data.ingest``); default one
    per CPU. Does not change the cache's contents, only how fast it is built."""

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions {value} must be non-negative and sum to 1")
        return value


# ----------------------------------------------------------------------------------------- source
def source_files(source: DicomSourceConfig | NiftiSourceConfig | FolderSourceConfig) -> list[Path]:
    """Every file a source reads, without decoding (keys the cache)."""
    if isinstance(source, NiftiSourceConfig):
        return list_nifti_files(source)
    if isinstance(source, FolderSourceConfig):
        return list_folder_files(source)
    return list_dicom_files(source)


def plan_source(
    source: DicomSourceConfig | NiftiSourceConfig | FolderSourceConfig,
    log: BadFileLog,
    workers: int = 1,
    preprocess: Callable[[Record], np.ndarray] | None = None,
    scratch: Path | None = None,
) -> list[ReadUnit]:
    """A source's work as ``ReadUnit``s in ``read_source``'s order (DICOM files are read by ``workers`` processes,
    and 2D DICOM frames preprocessed in that pass into ``scratch``: see ``plan_dicom_units``)."""
    if isinstance(source, NiftiSourceConfig):
        return plan_nifti_units(source, log)
    if isinstance(source, FolderSourceConfig):
        return plan_folder_units(source, log)
    return plan_dicom_units(source, log, workers, preprocess, scratch)


def read_source(source: DicomSourceConfig | NiftiSourceConfig | FolderSourceConfig, log: BadFileLog) -> list[Record]:
    """Decode a source into records (the reader matching its ``kind``)."""
    if isinstance(source, NiftiSourceConfig):
        return read_nifti_source(source, log)
    if isinstance(source, FolderSourceConfig):
        return read_folder_source(source, log)
    return read_dicom_source(source, log)


# ----------------------------------------------------------------------------------------- task
def resolve_task(inferred: TaskInfo, wanted: TaskConfig, where: str) -> TaskInfo:
    """Combine what the data imply with what the config declares; contradictions are errors."""
    if wanted.kind == "none":
        return TaskInfo("none", 0, ())
    if wanted.kind == "auto" and wanted.class_names is None:
        return inferred
    if inferred.kind == "none":
        raise DataError(
            where, f"task '{wanted.kind}' asks for labels but the source gives none", "add labels or set task kind: none"
        )
    kind = inferred.kind if wanted.kind == "auto" else wanted.kind
    if (kind == "multilabel") != (inferred.kind == "multilabel"):
        raise DataError(where, f"task kind '{kind}' does not match the source's {inferred.kind} labels", "fix task.kind")
    names = list(wanted.class_names or inferred.class_names)
    data_named = any(not name.isdigit() for name in inferred.class_names)
    if wanted.class_names is not None and data_named and list(inferred.class_names) != names[: len(inferred.class_names)]:
        raise DataError(
            where,
            f"task.class_names {names} differ from the source's classes {list(inferred.class_names)}",
            "declare the class order once, in the source's `classes`",
        )
    if len(names) < inferred.num_classes:
        raise DataError(where, f"labels reach class {inferred.num_classes - 1} but only {len(names)} class names are given")
    if kind == "binary" and len(names) != 2:
        raise DataError(where, f"a binary task needs 2 classes, the data have {names}", "use task kind: multiclass")
    return TaskInfo(kind, len(names), tuple(names))  # type: ignore[arg-type]


def _stratification_labels(labels: torch.Tensor, task: TaskInfo) -> np.ndarray:
    if task.kind == "multilabel":
        first = labels[:, 0].numpy()
        return np.where(np.isnan(first), -1, first).astype(np.int64)
    return labels.numpy().astype(np.int64)


def _carve_validation(
    split: np.ndarray, patient_id: np.ndarray, strata: np.ndarray, config: MedicalDataConfig, where: str
) -> tuple[np.ndarray, str | None]:
    """A source that gives train and test but no val: hold out training patients for validation.

    The held-out share is val / (train + val) of ``split_fractions`` (12.5 % by default), stratified and
    seeded by ``split_seed``, patient-level (``assign_patient_splits`` with no test share). Only labelled
    training images are candidates; the unlabelled images of a patient carved into val stay ``train`` but are
    left out of pretraining (``ImageStore.pretrain_indices`` drops every image of a val/test patient, and
    :func:`load_medical_store` notes how many).
    """
    train_share, val_share, _ = config.split_fractions
    if (split == "val").any() or not (split == "train").any() or val_share == 0:
        return split, None
    rows = np.flatnonzero((split == "train") & (strata >= 0))
    if len(rows) == 0:  # nothing labelled to validate on (e.g. task kind none)
        return split, None
    fraction = val_share / (train_share + val_share)
    side = assign_patient_splits(
        patient_id[rows], strata[rows], (1.0 - fraction, fraction, 0.0), config.split_seed, where
    )
    split = split.copy()
    split[rows[side == "val"]] = "val"
    note = (
        f"the source gives no 'val' split: validation was carved from train ({fraction:.1%} of the labelled "
        f"training patients, patient-level, stratified, split_seed {config.split_seed})"
    )
    return split, note


def _splits(
    store: ImageStore, labels: torch.Tensor, task: TaskInfo, config: MedicalDataConfig, where: str
) -> tuple[np.ndarray, list[str]]:
    """Split per image and the notes a user must read about it."""
    n = len(store)
    if config.external:
        return np.full(n, "test", dtype="<U10"), []
    given = store.meta["source_split"]
    has = given != ""
    strata = _stratification_labels(labels, task)
    if has.all():
        split, note = _carve_validation(given.astype("<U10"), store.patient_id, strata, config, where)
        return split, [note] if note else []
    if has.any():
        raise DataError(
            where,
            f"the source gives splits for only {int(has.sum())} of {n} images",
            "fill the split column for every row, or remove it to get patient-level splits",
        )
    split = assign_patient_splits(store.patient_id, strata, config.split_fractions, config.split_seed, where)
    if task.kind != "none":
        # Unlabelled images of training patients are pretraining-only; those of val/test patients stay there
        # (label -1, ignored by evaluation), so pretraining never sees a test patient.
        unlabelled = strata < 0 if task.kind != "multilabel" else np.isnan(labels.numpy()).all(1)
        split = np.where(unlabelled & (split == "train"), "unlabelled", split)
    return split.astype("<U10"), []


def _patient_note(patient_id: np.ndarray, source: DicomSourceConfig | NiftiSourceConfig | FolderSourceConfig) -> str | None:
    """The warning a store without (complete) patient ids must carry: splits cannot keep patients apart."""
    missing = int((patient_id == "").sum())
    if missing == 0:
        return None
    how = (
        "set source.patient_column (a CSV column) or source.patient_pattern (a regular expression on the file name)"
        if isinstance(source, FolderSourceConfig)
        else "give the files patient ids (DICOM PatientID)"
    )
    share = "no image has" if missing == len(patient_id) else f"{missing} of {len(patient_id)} images have no"
    return (
        f"{share} a patient id: those images are split per image, so images of one patient may fall in "
        f"different splits (train/test leakage) — {how}"
    )


def _unused_split_column(source: DicomSourceConfig | NiftiSourceConfig | FolderSourceConfig) -> str | None:
    """A note when the label CSV has a ``split`` column that ``split_column`` does not name (it is not used)."""
    if isinstance(source, NiftiSourceConfig) or source.split_column:
        return None
    path = source.csv if isinstance(source, FolderSourceConfig) else source.label_csv
    if path is None:
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            header = next(csv.reader(stream), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    column = next((c for c in header if c.strip().lower() == "split"), None)
    if column is None:
        return None
    return (
        f"{path} has a '{column}' column that is not used (split_column is not set): radssl made its own "
        f"patient-level splits — set source.split_column: {column} to use the file's splits"
    )


# ----------------------------------------------------------------------------------------- entry points
def load_medical_store(config: MedicalDataConfig, name: str) -> ImageStore:
    """Read, preprocess and cache a medical dataset once; later calls memory-map the cache."""
    source = config.source
    where = f"{name} ({source.kind} source {source.root})"
    preprocess_fingerprint = config.preprocess.config_fingerprint()
    workers = resolve_workers(config.ingest_workers)
    preprocess = partial(preprocess_record, config=config.preprocess)  # partials pickle: they go to workers
    reports = source_reports(source)  # read and checked before any pixel is decoded (radssl.data.reports)
    store = load_or_build_cache(
        cache_dir=config.cache_dir,
        name=name,
        files=source_files(source),
        source_config=source,
        preprocess_fingerprint=preprocess_fingerprint,
        read_records=None,
        plan_units=lambda log, scratch: plan_source(source, log, workers, preprocess, scratch),
        preprocess=preprocess,
        on_bad_file=config.on_bad_file,
        preprocess_mask=partial(preprocess_mask, config=config.preprocess),
        workers=workers,
    )
    task = resolve_task(store.task, config.task, where)
    labels = store.labels
    if task.kind == "none":
        labels = torch.full((len(store),), -1, dtype=torch.int64)
    split, notes = _splits(store, labels, task, config, where)
    notes += [n for n in (_unused_split_column(source), _patient_note(store.patient_id, source)) if n]
    if isinstance(source, FolderSourceConfig):
        notes += mask_notes(source)
    meta = dict(store.meta)
    meta["voxel_spacing"] = stored_voxel_spacing(meta["spacing"], config.preprocess, store.spatial_dims)
    mask_classes = tuple(getattr(source, "mask_classes", None) or ()) if "mask" in meta else ()
    meta["preprocessed_as"] = np.asarray([modality_branch(code, config.preprocess) for code in meta["modality"]])
    if reports is not None:
        table, key_kind = reports
        meta["report"] = join_reports(meta, store.patient_id, table, key_kind)
        notes += [n for n in (missing_report_note(meta["report"], f"empty, or no row keyed by its {key_kind}"),) if n]
    store = replace(
        store, task=task, labels=labels, split=split, meta=meta, notes=tuple(store.notes) + tuple(notes),
        mask_classes=mask_classes, _fingerprint=None
    )
    dropped = len(store.held_out_patient_rows())  # a source's own splits or a carved val split can leave some
    if dropped:
        notes.append(held_out_patient_note(dropped))
        store = replace(store, notes=store.notes + (notes[-1],))
    for note in notes:
        logger.warning("%s: %s", name, note)
    report = Path(store.origin) / BAD_FILES_REPORT
    skipped = _skipped_count(report)
    if skipped:
        logger.warning("%s: %d bad files skipped; see %s", name, skipped, report)
    return store


def stored_voxel_spacing(spacing: np.ndarray, config: PreprocessConfig, spatial_dims: int) -> np.ndarray:
    """(N, spatial_dims) mm per axis of the stored grid, from the source spacing and the preprocessing.

    Resampling to ``target_spacing`` sets it (axes without a source spacing stay NaN; a 2-value target for volumes
    keeps the depth); ``crop_or_pad`` keeps it; a ``pad`` or ``stretch`` resize to ``target_size`` scales it by a
    factor that depends on each source shape, which the cache does not keep, so those rows are NaN (unknown).
    """
    spacing = np.asarray(spacing, dtype=np.float32)
    n = len(spacing)
    out = np.full((n, spatial_dims), np.nan, dtype=np.float32)
    if spacing.ndim == 2 and spacing.shape[1] >= spatial_dims:
        out[:] = spacing[:, :spatial_dims]
    if config.target_spacing is not None:
        target = np.asarray(config.target_spacing, dtype=np.float32)[-spatial_dims:]
        resampled = np.broadcast_to(target, (n, len(target)))
        out[:, spatial_dims - len(target):] = np.where(np.isfinite(out[:, spatial_dims - len(target):]), resampled, np.nan)
    if config.target_size is not None and config.resize != "crop_or_pad":
        out[:] = np.nan
    return out


def _skipped_count(report: Path) -> int:
    import json

    try:
        return int(json.loads(report.read_text())["skipped"])
    except (OSError, ValueError, KeyError):
        return 0


def bad_files_report(store: ImageStore) -> Path:
    """Where the bad-file list of a medical store lies."""
    return Path(store.origin) / BAD_FILES_REPORT


def inspect_store(store: ImageStore, out_png: Path, per_split: int = 8) -> str:
    """Counts per split / class / patient / modality as text, and a montage PNG of sample images.

    What a user checks before spending compute: are the splits patient-disjoint and balanced, did the
    windowing produce sensible images, are there bad-file skips. 3D images show their middle slice.
    """
    lines = [f"dataset {store.name}: {len(store)} images, shape {list(store.image_shape)} x {store.channels} channel(s), "
             f"dtype {str(store.images.dtype).replace('torch.', '')}, task {store.task.kind}"]
    if store.task.class_names:
        lines.append(f"classes: {list(store.task.class_names)}")
    patients_by_split: dict[str, set[str]] = {}
    header = f"{'split':<11}{'images':>8}{'patients':>10}"
    if store.task.kind in ("binary", "multiclass"):
        header += "".join(f"{name[:12]:>14}" for name in store.task.class_names) + f"{'unlabelled':>12}"
    elif store.task.kind == "multilabel":
        header += "".join(f"{name[:12]:>14}" for name in store.task.class_names)
    lines.append(header)
    for split in ALL_SPLIT_NAMES:
        rows = store.indices(split)
        if len(rows) == 0:
            continue
        patients = set(store.patient_id[rows].tolist()) - {""}
        patients_by_split[split] = patients
        line = f"{split:<11}{len(rows):>8}{len(patients):>10}"
        labels = store.labels[torch.from_numpy(rows)]
        if store.task.kind in ("binary", "multiclass"):
            counts = torch.bincount(labels[labels >= 0], minlength=store.task.num_classes).tolist()
            line += "".join(f"{c:>14}" for c in counts) + f"{int((labels < 0).sum()):>12}"
        elif store.task.kind == "multilabel":
            line += "".join(f"{int(c):>14}" for c in torch.nan_to_num(labels, nan=0.0).sum(0).tolist())
        lines.append(line)
    # train and unlabelled may share patients (both are pretraining data); any other overlap is a leak.
    split_names = list(patients_by_split)
    shared = [
        (a, b, len(patients_by_split[a] & patients_by_split[b]))
        for i, a in enumerate(split_names)
        for b in split_names[i + 1 :]
        if {a, b} != {"train", "unlabelled"}
    ]
    leaks = [f"{a}/{b}: {n}" for a, b, n in shared if n]
    anonymous = int((store.patient_id == "").sum())
    if anonymous == len(store):
        lines.append(
            "patients shared between splits: unknown — the images carry no patient ids, so splits are per image "
            "and one patient's images may be in several splits"
        )
    else:
        unchecked = f" (not checked for the {anonymous} images without a patient id)" if anonymous else ""
        lines.append("patients shared between splits: " + (", ".join(leaks) if leaks else "none") + unchecked)
    if "modality" in store.meta:
        values, counts = np.unique(store.meta["modality"], return_counts=True)
        lines.append("modality (files): " + ", ".join(f"{v or '(unknown)'} {c}" for v, c in zip(values, counts)))
    if "report" in store.meta:
        counts = report_counts(store.meta["report"])
        lines.append(f"reports: {counts['with_report']} images with one, {counts['without_report']} without")
    if "mask" in store.meta:
        lines += mask_summary_lines(mask_statistics(store))
    if "preprocessed_as" in store.meta:
        values, counts = np.unique(store.meta["preprocessed_as"], return_counts=True)
        lines.append("preprocessed as: " + ", ".join(f"{v} {c}" for v, c in zip(values, counts)))
    if "spacing" in store.meta and store.meta["spacing"].size:
        spacing = store.meta["spacing"]
        finite = spacing[np.isfinite(spacing).all(1)] if spacing.ndim == 2 else spacing[:0]
        if len(finite):
            lines.append(f"source spacing (mm): min {np.round(finite.min(0), 3).tolist()}, max {np.round(finite.max(0), 3).tolist()}")
    report = Path(store.origin) / BAD_FILES_REPORT if store.origin else None
    if report is not None and report.is_file():
        lines.append(f"bad files skipped: {_skipped_count(report)} (see {report})")
    lines += [f"note: {note}" for note in store.notes]
    _write_montage(store, Path(out_png), per_split)
    lines.append(f"montage: {out_png}")
    return "\n".join(lines)


def mask_statistics(store: ImageStore, chunk: int = 256) -> dict[str, object]:
    """Segmentation masks at a glance: images with a mask, empty ones, images and pixels per label, foreground share.

    Read in chunks of the memory-mapped masks (a large set is never loaded whole). ``labels`` maps each label value
    present to its name (``mask_classes``, or the value itself), the images holding it and its share of all pixels.
    """
    mask = store.meta.get("mask")
    if mask is None:
        return {"images": len(store), "with_mask": 0}
    n = len(mask)
    names = list(store.mask_classes)
    images_with: dict[int, int] = {}
    pixels_of: dict[int, int] = {}
    shares = np.zeros(n, dtype=np.float64)
    for start in range(0, n, chunk):
        block = np.asarray(mask[start:start + chunk]).reshape(min(chunk, n - start), -1)
        shares[start:start + len(block)] = (block > 0).mean(axis=1)
        for value in np.unique(block).tolist():
            hit = block == value
            images_with[value] = images_with.get(value, 0) + int(hit.any(axis=1).sum())
            pixels_of[value] = pixels_of.get(value, 0) + int(hit.sum())
    total = sum(pixels_of.values()) or 1
    empty = int((shares == 0).sum())
    return {
        "images": len(store), "with_mask": n, "empty": empty,
        "labels": {int(v): {"name": names[v] if 0 <= v < len(names) else str(v), "images": images_with[v],
                            "pixel_share": pixels_of[v] / total} for v in sorted(images_with)},
        "mean_foreground_share": float(shares.mean()) if n else 0.0,
        "mean_foreground_share_non_empty": float(shares[shares > 0].mean()) if n > empty else 0.0,
    }


def mask_summary_lines(stats: dict[str, object]) -> list[str]:
    """``mask_statistics`` as the lines ``radssl data inspect`` prints."""
    labels = stats.get("labels") or {}
    assert isinstance(labels, dict)
    lines = [f"masks: {stats['with_mask']} of {stats['images']} images have one; {stats['empty']} empty "
             "(background only)"]
    lines.append("mask labels: " + ", ".join(f"{v} {d['name']} (in {d['images']} images, {d['pixel_share']:.1%} of "
                                             "pixels)" for v, d in labels.items()))
    lines.append(f"mean foreground share: {stats['mean_foreground_share']:.1%} per image "
                 f"({stats['mean_foreground_share_non_empty']:.1%} over non-empty masks)")
    return lines


def _write_montage(store: ImageStore, out_png: Path, per_split: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    picks: list[tuple[str, int]] = []
    for split in ALL_SPLIT_NAMES:
        rows = store.indices(split)
        if len(rows):
            chosen = np.sort(rng.choice(rows, size=min(per_split, len(rows)), replace=False))
            picks += [(split, int(r)) for r in chosen]
    columns = min(per_split, max(1, len(picks)))
    rows_n = int(np.ceil(len(picks) / columns))
    figure, axes = plt.subplots(rows_n, columns, figsize=(1.6 * columns, 1.8 * rows_n), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (split, row) in zip(axes.flat, picks):
        image = store.images[row, 0].float().numpy()
        if image.ndim == 3:
            image = image[image.shape[0] // 2]
        axis.imshow(image, cmap="gray", vmin=float(image.min()), vmax=float(image.max()) or 1.0)
        title = split
        if store.task.kind in ("binary", "multiclass") and int(store.labels[row]) >= 0:
            title += f"\n{store.task.class_names[int(store.labels[row])]}"
        axis.set_title(title, fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(out_png, buffer.getvalue())
