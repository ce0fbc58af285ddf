"""NIfTI source: 3D/4D volumes (``.nii``/``.nii.gz``) via nibabel, with paired masks and multi-sequence cases.

Orientation: every volume is first reoriented to RAS with ``nib.as_closest_canonical`` (axis flips/permutations
only, no resampling), so files saved in LPS, LAS, ... line up. The RAS array ``data[x, y, z]`` is then laid out
as ``pixels[d, h, w] = data[X-1-w, Y-1-h, d]``: depth runs inferior → superior, rows anterior → posterior,
columns patient-right → patient-left. That is how a DICOM axial series displays (radiological convention), so
NIfTI and DICOM records of the same anatomy have the same layout, and ``pixels[d]`` is an axial slice.
``spacing`` (mm) follows that (D, H, W) order, from the canonical header's zooms (converted from m/µm if the
header says so). ``extra["affine"]`` maps (d, h, w) voxel indices to RAS mm, for writing predictions back.

4D files (x, y, z, t): ``fourth_axis: frames`` (default) gives one record per time point with ``index`` =
``frame_index`` = frame and ``loop_id`` = the case (fMRI/cine/DCE series: ``views.pairing.kind: frame`` uses
them); ``fourth_axis: channels`` stacks the 4th axis as channels (C, D, H, W) (e.g. multi-echo or pre-stacked
sequences). ``layout: axial_slices`` gives 2D records with ``slice_index`` = depth and ``series_id`` = the case
(per time point for 4D), for ``views.pairing.kind: slice``; ``data.slices`` does the same for any 3D store.

Multi-sequence cases (``sequences: [_flair, _t1, _t1ce, _t2]``, BraTS-style ``<case><sequence>.nii.gz``) are
stacked as channels (C, D, H, W) in the listed order; every sequence must be present with the same grid.
A mask (``mask_suffix: seg`` → ``<case>_seg.nii.gz`` beside the image, or ``mask_folder: labelsTr`` → a file named
after the case in that folder, the Medical Segmentation Decathlon layout ``imagesTr/`` + ``labelsTr/``) is read with
the same orientation into ``extra["mask"]`` (integer array shaped like one channel of the image). A mask must lie on
its image's grid — same shape, voxel size and affine (position and orientation, 1e-3 mm) — and, when
``mask_classes`` names the labels, hold only labels 0 … len(mask_classes) − 1: anything else is a bad file naming
the mask, before any pixel is cached (a mask on another grid would be silently misaligned after reorientation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from radssl.data.label_table import (
    LabelEntry,
    SideTables,
    entry_label,
    label_record,
    read_label_table,
    table_classes,
    under_root,
)
from radssl.data.records import BadFileLog, ReadUnit, Record
from radssl.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}


class NiftiSourceConfig(SideTables):
    """Where the NIfTI files are and how cases, masks, labels and patients are found.

    ``root``, ``label_csv``, ``label_column``, ``classes`` and the ``report_*`` fields are
    :class:`~radssl.data.label_table.SideTables`' (relative CSV paths are read inside ``root``).
    """

    kind: Literal["nifti"] = "nifti"
    pattern: str = "**/*.nii*"
    mask_suffix: str | None = None
    """Masks are ``<case>_<mask_suffix>.nii[.gz]`` beside the image; they are not read as images."""
    mask_folder: Path | None = None
    """Masks are ``<case>.nii[.gz]`` in this folder (relative paths inside ``root``), e.g. ``labelsTr`` of the
    Medical Segmentation Decathlon; files in it are never read as images."""
    mask_classes: list[str] | None = None
    """Names of the mask labels, index = label value (``[background, anterior, posterior]``); masks holding other
    labels are bad files. Becomes ``store.mask_classes``."""
    sequences: list[str] | None = None
    """File-name endings of the sequences of one case, stacked as channels in this order."""
    fourth_axis: Literal["frames", "channels"] = "frames"
    layout: Literal["volume", "axial_slices"] = "volume"
    """``axial_slices`` turns each volume into 2D records (one per depth index) for 2D pretraining."""
    label_key: str = "case_id"
    """CSV column holding the case id (file name without sequence/extension) or, failing that, the patient id."""
    patient_from: Literal["folder", "file"] = "folder"
    """Patient id from the parent folder's name (one folder per patient) or from the case id."""
    modality: str = ""
    """NIfTI stores no modality: ``MR``, ``CT``, ... here lets ``preprocess.modality: auto`` pick windows."""
    report_key: Literal["case_id", "patient_id"] = "case_id"
    """Which identifier the report rows are keyed by (every slice or frame of a case shares its report)."""

    @field_validator("sequences")
    @classmethod
    def _sequences_distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("`sequences` must be a non-empty list of distinct file-name endings")
        return value

    @field_validator("mask_classes")
    @classmethod
    def _mask_classes_named(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            raise ValueError("`mask_classes` must list at least 2 distinct names: the background (label 0) first")
        return value

    @model_validator(mode="after")
    def _masks(self) -> "NiftiSourceConfig":
        if self.mask_suffix is not None and self.mask_folder is not None:
            raise ValueError("set either `mask_suffix` (masks beside the images) or `mask_folder`, not both")
        if self.mask_classes is not None and self.mask_suffix is None and self.mask_folder is None:
            raise ValueError("`mask_classes` names mask labels but no masks are read: set `mask_suffix` or "
                             "`mask_folder`")
        if self.mask_folder is not None:
            self.mask_folder = under_root(self.root, self.mask_folder)
        return self


# ----------------------------------------------------------------------------------------- naming
def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _mask_ending(config: NiftiSourceConfig) -> str | None:
    if config.mask_suffix is None:
        return None
    return "_" + config.mask_suffix.lstrip("_")


def _sequence_of(stem: str, sequences: list[str]) -> str | None:
    """The longest listed ending that ``stem`` ends with (``_t1ce`` wins over ``_t1``)."""
    matches = [s for s in sequences if stem.endswith(s)]
    return max(matches, key=len) if matches else None


def list_nifti_files(config: NiftiSourceConfig) -> list[Path]:
    """Every file this source reads (images, masks, label CSV), without decoding: the cache's change detector."""
    files = _matching_files(config)
    if config.mask_folder is not None:
        files += _mask_folder_files(config)
    if config.label_csv is not None:
        files.append(config.label_csv)
    return files


def _matching_files(config: NiftiSourceConfig) -> list[Path]:
    if not config.root.is_dir():
        raise DataError(str(config.root), "NIfTI folder not found", "check `root` in the source config")
    masks = config.mask_folder.resolve() if config.mask_folder is not None else None
    return sorted(
        p
        for p in config.root.glob(config.pattern)
        if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) and not p.name.startswith(".")
        and (masks is None or p.parent.resolve() != masks)
    )


def _mask_folder_files(config: NiftiSourceConfig) -> list[Path]:
    """The NIfTI files of ``mask_folder`` (a missing folder is an error naming it)."""
    folder = config.mask_folder
    assert folder is not None
    if not folder.is_dir():
        raise DataError(str(folder), "mask folder not found", "check `mask_folder` (a relative path is read inside `root`)")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------- decoding
def load_canonical(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Load a NIfTI file reoriented to RAS: (array x,y,z[,t], spacing mm of x,y,z, canonical affine).

    Raises a DataError naming the file for unreadable files and for NaN/inf voxels (with their count).
    """
    import nibabel as nib

    try:
        image = nib.load(str(path))
        canonical = nib.as_closest_canonical(image)
        data = np.asanyarray(canonical.dataobj)
    except DataError:
        raise
    except Exception as error:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise DataError(str(path), f"cannot read NIfTI file ({type(error).__name__}: {error})") from error
    if data.ndim == 2:  # a single 2D slice saved as NIfTI
        data = data[:, :, None]
    while data.ndim > 4 and 1 in data.shape[3:]:  # NIfTI keeps unit dims for (x, y, z, t, component)
        data = np.squeeze(data, axis=3 + data.shape[3:].index(1))
    if data.ndim not in (3, 4):
        raise DataError(str(path), f"volume has shape {data.shape}; expected 3D (x, y, z) or 4D (x, y, z, t)")
    if np.issubdtype(data.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            raise DataError(
                str(path),
                f"{bad} of {data.size} voxels are NaN or inf",
                "fix the file (e.g. replace them with the background value) or drop it with on_bad_file: skip",
            )
    spatial_unit = canonical.header.get_xyzt_units()[0]
    scale = _UNIT_TO_MM.get(spatial_unit, 1.0)
    zooms = tuple(float(z) * scale for z in canonical.header.get_zooms()[:3])
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise DataError(str(path), f"header voxel sizes {zooms} are not positive numbers", "fix the header pixdim")
    return data, zooms, np.asarray(canonical.affine, dtype=np.float64)


def ras_to_dhw(data: np.ndarray) -> np.ndarray:
    """RAS ``data[x, y, z(, t)]`` → ``(D, H, W)`` (or ``(T, D, H, W)``): see the module docstring."""
    flipped = data[::-1, ::-1]  # x: R→L, y: A→P
    axes = (2, 1, 0) if data.ndim == 3 else (3, 2, 1, 0)
    return np.ascontiguousarray(np.transpose(flipped, axes))


def dhw_affine(ras_affine: np.ndarray, shape_xyz: tuple[int, int, int]) -> np.ndarray:
    """Affine from (d, h, w) indices to RAS mm, for arrays laid out by :func:`ras_to_dhw`."""
    nx, ny, _ = shape_xyz
    # (x, y, z) = (nx-1-w, ny-1-h, d)
    index_map = np.array(
        [[0, 0, -1, nx - 1], [0, -1, 0, ny - 1], [1, 0, 0, 0], [0, 0, 0, 1]],
        dtype=np.float64,
    )
    return ras_affine @ index_map


# ----------------------------------------------------------------------------------------- cases
def _case_groups(config: NiftiSourceConfig, files: list[Path]) -> tuple[dict, dict]:
    """Group image files into cases {(folder, case_id): {sequence: path}} and find masks {(folder, case_id): path}.

    With ``mask_folder`` the masks are keyed by case id alone (folder ``None``): see :func:`_mask_path`."""
    mask_ending = _mask_ending(config)
    cases: dict[tuple[Path, str], dict[str, Path]] = defaultdict(dict)
    masks: dict[tuple[Path, str], Path] = {}
    for path in files:
        stem = nifti_stem(path)
        if mask_ending and stem.endswith(mask_ending):
            masks[(path.parent, stem[: -len(mask_ending)])] = path
            continue
        if config.sequences:
            sequence = _sequence_of(stem, config.sequences)
            if sequence is None:
                continue  # not one of the listed sequences (e.g. a mask when no mask_suffix is set)
            cases[(path.parent, stem[: -len(sequence)])][sequence] = path
        else:
            cases[(path.parent, stem)][""] = path
    if config.mask_folder is not None:
        masks = {(None, nifti_stem(path)): path for path in _mask_folder_files(config)}
    return dict(cases), masks


def _mask_path(config: NiftiSourceConfig, masks: dict, folder: Path, case_id: str) -> Path | None:
    return masks.get((None, case_id) if config.mask_folder is not None else (folder, case_id))


def _mask_name(config: NiftiSourceConfig, case_id: str) -> str:
    if config.mask_folder is not None:
        return f"'{case_id}.nii[.gz]' in {config.mask_folder}"
    return f"'{case_id}{_mask_ending(config)}.nii[.gz]' beside the image"


def _patient_id(config: NiftiSourceConfig, folder: Path, case_id: str) -> str:
    if config.patient_from == "file" or folder.resolve() == config.root.resolve():
        return case_id
    return folder.name


def _read_labels(config: NiftiSourceConfig) -> tuple[dict[str, LabelEntry], list[str] | None]:
    """{key: entry} and the class list, from ``label_csv`` (one row per case)."""
    if config.label_csv is None:
        return {}, config.classes
    labels = read_label_table(config.label_csv, config.label_key, config.label_column, repeats="never",
                              columns_fix="fix label_key/label_column")
    return labels, table_classes(config.classes, labels)


def _load_case(config: NiftiSourceConfig, case_id: str, paths: dict[str, Path]) -> tuple[np.ndarray, tuple, np.ndarray]:
    """(pixels (D,H,W) / (C,D,H,W) / (T,D,H,W), spacing in D,H,W order, affine (d,h,w) → RAS mm)."""
    order = config.sequences or [""]
    missing = [s for s in order if s not in paths]
    if missing:
        some = next(iter(paths.values()))
        raise DataError(
            str(some.parent / case_id),
            f"case is missing sequences {missing} (found {sorted(paths)})",
            "add the files or drop the case with on_bad_file: skip",
        )
    arrays: list[np.ndarray] = []
    zooms, affine = (), np.eye(4)
    for position, sequence in enumerate(order):
        data, seq_zooms, seq_affine = load_canonical(paths[sequence])
        if config.sequences and data.ndim == 4:
            raise DataError(str(paths[sequence]), f"4D volume {data.shape} inside a multi-sequence case; expected 3D")
        if position == 0:
            zooms, affine = seq_zooms, seq_affine
        elif data.shape != arrays[0].shape or not np.allclose(seq_affine, affine, atol=1e-3):
            raise DataError(
                str(paths[sequence]),
                f"grid {data.shape} / affine differs from {paths[order[0]].name} {arrays[0].shape}",
                "resample the sequences of a case onto one grid (co-register) before loading",
            )
        arrays.append(data)
    shape_xyz = (int(arrays[0].shape[0]), int(arrays[0].shape[1]), int(arrays[0].shape[2]))
    spacing = (zooms[2], zooms[1], zooms[0])
    pixels = np.stack([ras_to_dhw(a) for a in arrays]) if config.sequences else ras_to_dhw(arrays[0])
    return pixels, spacing, dhw_affine(affine, shape_xyz)


def _load_mask(path: Path, shape_dhw: tuple[int, ...], spacing_dhw: tuple[float, ...] | None = None,
               affine_dhw: np.ndarray | None = None, mask_classes: list[str] | None = None) -> np.ndarray:
    """The mask on its image's grid (shape, voxel size, affine checked), labels within ``mask_classes``."""
    data, zooms, ras_affine = load_canonical(path)
    if data.ndim != 3:
        raise DataError(str(path), f"mask has shape {data.shape}; expected a 3D label volume")
    mask = ras_to_dhw(data)
    if mask.shape != tuple(shape_dhw):
        raise DataError(str(path), f"mask grid {mask.shape} (D, H, W) differs from its image {tuple(shape_dhw)}",
                        "resample the mask onto its image's grid (nearest neighbour) or pair the right files")
    mask_spacing = (zooms[2], zooms[1], zooms[0])
    if spacing_dhw is not None and not np.allclose(mask_spacing, spacing_dhw, rtol=1e-4, atol=1e-4):
        raise DataError(str(path), f"mask voxel size {tuple(round(z, 4) for z in mask_spacing)} mm (D, H, W) differs "
                        f"from its image's {tuple(round(float(z), 4) for z in spacing_dhw)} mm",
                        "resample the mask onto its image's grid (nearest neighbour) or pair the right files")
    if affine_dhw is not None:
        mask_affine = dhw_affine(ras_affine, (int(data.shape[0]), int(data.shape[1]), int(data.shape[2])))
        if not np.allclose(mask_affine, affine_dhw, atol=1e-3):
            shift = float(np.abs(mask_affine[:3, 3] - affine_dhw[:3, 3]).max())
            raise DataError(str(path), f"mask affine differs from its image's (origin off by up to {shift:.3g} mm, "
                            "or another orientation): same shape and voxel size, but not the same place",
                            "resample the mask onto its image's grid or fix the mask header")
    if not np.all(mask == np.round(mask)):
        raise DataError(str(path), "mask holds non-integer values", "save label masks with integer voxels")
    if mask_classes is not None and mask.size:
        low, high = float(mask.min()), float(mask.max())
        if low < 0 or high >= len(mask_classes):
            raise DataError(str(path), f"mask labels span {low:g}..{high:g} but mask_classes declare "
                            f"{len(mask_classes)} labels {mask_classes}",
                            "add the missing names to mask_classes (index = label value) or fix the mask")
    return mask.astype(np.uint8 if mask.min() >= 0 and mask.max() < 256 else np.int32)


def _case_records(
    config: NiftiSourceConfig, pixels: np.ndarray, mask: np.ndarray | None, spacing: tuple, base: Record
) -> list[Record]:
    """Split one loaded case into records: per 4D frame (``fourth_axis: frames``) and per axial slice."""
    frames = not config.sequences and pixels.ndim == 4 and config.fourth_axis == "frames"
    volumes = [(t, pixels[t]) for t in range(pixels.shape[0])] if frames else [(None, pixels)]
    records = []
    for frame, volume in volumes:
        # A 4D case is one loop in time: frame pairing groups its frames (per slice position when read as slices).
        extra = dict(base.extra) if frame is None else dict(base.extra, frame_index=frame, loop_id=base.series_id)
        if config.layout == "volume":
            extra["layout"] = "CDHW" if volume.ndim == 4 else "DHW"
            if mask is not None:
                extra["mask"] = mask
            records.append(replace(base, pixels=volume, spacing=spacing, index=frame, extra=extra))
            continue
        series = base.series_id if frame is None else f"{base.series_id}/frame{frame}"
        for d in range(volume.shape[-3]):
            pixels_2d = np.ascontiguousarray(volume[..., d, :, :])
            slice_extra = dict(extra, layout="CHW" if pixels_2d.ndim == 3 else "HW", slice_index=d)
            slice_extra["slice_thickness"] = spacing[0]
            if mask is not None:
                slice_extra["mask"] = mask[d]
            records.append(
                replace(base, pixels=pixels_2d, spacing=spacing[1:], index=d, series_id=series, extra=slice_extra)
            )
    return records


def read_nifti_source(config: NiftiSourceConfig, log: BadFileLog) -> list[Record]:
    """Read every case under ``root`` into ``Record``s (see the module docstring for layout and 4D rules)."""
    records: list[Record] = []
    for unit in plan_nifti_units(config):
        try:
            records += unit.read()
        except DataError as error:
            log.handle(error)
    if not records:
        raise DataError(str(config.root), "no NIfTI case could be read (all were skipped)", "see bad_files.json")
    return records


def plan_nifti_units(
    config: NiftiSourceConfig, log: BadFileLog | None = None, scratch: Path | None = None
) -> list[ReadUnit]:
    """One ``ReadUnit`` per case (its sequences, mask and label), sorted like ``read_nifti_source`` reads them.

    Nothing is decoded here; a case that fails (missing sequence or mask, bad grid, bad label) fails when its
    unit is read, naming the file. ``log`` and ``scratch`` are unused (the planners' common signature).
    """
    cases, masks = _case_groups(config, _matching_files(config))
    if not cases:
        wanted = f"pattern '{config.pattern}'" + (f" and sequences {config.sequences}" if config.sequences else "")
        raise DataError(str(config.root), f"no NIfTI images match {wanted}", "check `root`, `pattern` and `sequences`")
    labels, classes = _read_labels(config)
    order = config.sequences or [""]
    units = []
    for (folder, case_id), paths in sorted(cases.items()):
        first_path = paths.get(order[0]) or next(iter(paths.values()))
        mask_path = _mask_path(config, masks, folder, case_id)
        entry = labels.get(case_id) or labels.get(_patient_id(config, folder, case_id))
        units.append(ReadUnit(str(first_path), read_nifti_case, (config, folder, case_id, paths, mask_path, entry, classes)))
    return units


def read_nifti_case(
    config: NiftiSourceConfig,
    folder: Path,
    case_id: str,
    paths: dict[str, Path],
    mask_path: Path | None,
    entry: LabelEntry | None,
    classes: list[str] | None,
) -> list[Record]:
    """One case's records (``ReadUnit.load`` of this source; runs in an ingest worker). Raises ``DataError``."""
    order = config.sequences or [""]
    patient_id = _patient_id(config, folder, case_id)
    first_path = paths.get(order[0]) or next(iter(paths.values()))
    pixels, spacing, affine = _load_case(config, case_id, paths)
    mask = None
    if config.mask_suffix is not None or config.mask_folder is not None:
        if mask_path is None:
            raise DataError(
                str(first_path),
                f"no mask {_mask_name(config, case_id)}",
                "add the mask, unset mask_suffix/mask_folder, or drop the case with on_bad_file: skip",
            )
        mask = _load_mask(mask_path, pixels.shape[-3:], spacing, affine, config.mask_classes)
    label, class_name = entry_label(entry, classes, config.label_column)
    extra: dict[str, Any] = {"case_id": case_id, "affine": affine.tolist(), "files": [str(paths[s]) for s in order]}
    if config.sequences:
        extra["channel_names"] = list(config.sequences)
    base = Record(
        pixels=pixels,
        path=str(first_path),
        patient_id=patient_id,
        study_id=case_id,
        series_id=case_id,
        modality=config.modality,
        extra=extra,
    )
    label_record(base, label, classes or None, class_name)
    return _case_records(config, pixels, mask, spacing, base)
