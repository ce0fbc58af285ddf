"""DICOM source: single images, multi-frame files (cine, enhanced CT/MR) and series assembled into volumes.

Files are found under ``root`` by ``pattern`` and recognised by the Part-10 ``DICM`` preamble, not by suffix
(PACS exports often have no ``.dcm``). A file that has a DICOM suffix but no preamble is a bad file; any other
non-DICOM file (``DICOMDIR``, notes, spreadsheets) is ignored.

What a record holds (see ``radssl.data.records``):

* pixels in *modality units*: the Modality LUT (rescale slope/intercept, or a Modality LUT sequence; per frame
  for enhanced multi-frame files) is applied, so CT is in Hounsfield units. Values stay exact: uint8 / int16
  where they are integers that fit, float32 otherwise, so 12/16-bit precision survives until normalisation.
* no display transforms: the file's VOI window (``extra["windows"]``, ``extra["voi_lut"]``) and MONOCHROME1's
  inversion (``extra["invert"]``) are left to preprocessing, which applies them in DICOM's order (VOI first,
  then the presentation inversion; PS3.4 N.2), so a window taken from the file stays correct.
* colour images (RGB, YBR, PALETTE COLOR — ultrasound exports) become one grey channel by ITU-R BT.601 luma,
  as the image-folder reader does (rounded back to uint8 for 8-bit sources); ``extra["photometric"]`` keeps
  the original interpretation.
* ids from the tags (PatientID, StudyInstanceUID, SeriesInstanceUID, Modality) and spacing in mm ordered like
  the pixel axes: (row, column) from PixelSpacing (else ImagerPixelSpacing, at the detector plane, or an
  ultrasound region's physical deltas); volumes add the slice spacing in front.

Two assembly modes:

* ``images`` (default): every 2D image or frame is a record. Multi-frame files give one record per frame with
  ``index`` = frame number, plus ``frame_index`` and ``loop_id`` (the file) for a cine loop, or ``slice_index``
  for frames at distinct positions (enhanced CT/MR): frame and slice pairing tell time from space.
  Single-frame slices that share a series are ordered as in ``series`` mode and get
  ``index`` = ``slice_index`` = their rank along the slice normal, because slice pairing reads it as physical
  adjacency; so a series with a gap or mixed modalities is reported here too (set
  ``slice_spacing_tolerance: null`` to skip the gap check). Series holding several orientations or stacks
  (localisers, echoes) get ``index = None`` instead of an error: as 2D images they are fine.
* ``series``: the single-frame slices of one SeriesInstanceUID become one volume (D, H, W), sorted by
  ImagePositionPatient projected on the slice normal (cross product of the ImageOrientationPatient row and
  column directions), falling back to InstanceNumber; a multi-frame file is a volume of its own (its frames
  sorted the same way when they carry positions, as enhanced CT/MR do; kept in acquisition order with a
  NaN depth spacing when they do not, as ultrasound cine does: that axis is time, not space).

Every failure is a ``DataError`` naming the file (or the series) and the problem, routed through ``BadFileLog``
so ``on_bad_file: skip`` skips and lists it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from radssl.data.ingest import RowFile, ordered_map
from radssl.data.label_table import (
    SideTables,
    entry_label,
    label_record,
    read_label_table,
    split_name,
    table_classes,
)
from radssl.data.records import BadFileLog, ReadUnit, Record
from radssl.errors import DataError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
PLUGIN_FIX = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg or python-gdcm"
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DicomSourceConfig(SideTables):
    """Where the DICOM files are, how they become records, and where labels come from.

    ``root``, ``label_csv``, ``label_column``, ``classes`` and the ``report_*`` fields are
    :class:`~radssl.data.label_table.SideTables`' (relative CSV paths are read inside ``root``).
    """

    kind: Literal["dicom"] = "dicom"
    pattern: str = "**/*"
    """Glob below ``root``; files are recognised by their ``DICM`` preamble, so no suffix is needed."""
    assemble: Literal["images", "series"] = "images"
    """``images``: every 2D image or frame is a record; ``series``: the slices of a series become one volume."""
    label_key: Literal["patient_id", "study_id", "series_id", "path"] = "patient_id"
    """Which identifier the CSV rows are keyed by; ``path`` is the file (or series folder) relative to root."""
    key_column: str | None = None
    """CSV column holding that identifier; defaults to the ``label_key`` name."""
    split_column: str | None = None
    """Column of ``label_csv`` holding each key's split (``train``/``val``/``test``; ``valid``, ``validation``,
    ``training``, ``testing``, ``unlabelled`` understood). Unset, radssl makes its own patient-level splits (and
    says so when the CSV has a ``split`` column it does not use). A source giving only train and test gets a
    validation split carved from train, patient-level."""
    modality: str | None = None
    """Expected DICOM Modality (``CT``, ``MR``, ``US``, ``DX`` ...); a file of another modality is an error."""
    slice_spacing_tolerance: float | None = Field(default=0.1, ge=0.0)
    """Largest relative deviation of one slice gap from the series' median gap; ``None`` turns the check off."""
    report_key: Literal["patient_id", "study_id"] = "study_id"
    """Which identifier the report rows are keyed by (a study's report is shared by all its images)."""


# ----------------------------------------------------------------------------------------- files
def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def list_dicom_files(config: DicomSourceConfig) -> list[Path]:
    """Every file the source may read (pattern matches plus the label CSV), without decoding: keys the cache."""
    root = Path(config.root)
    files: list[Path] = []
    if root.is_dir():
        files = sorted(p for p in root.glob(config.pattern) if p.is_file() and not p.name.startswith("."))
    if config.label_csv is not None:
        csv_path = Path(config.label_csv).resolve()
        files = [p for p in files if p.resolve() != csv_path] + [Path(config.label_csv)]
    return files


def _dicom_candidates(config: DicomSourceConfig, log: BadFileLog) -> list[Path]:
    root = Path(config.root)
    if not root.is_dir():
        raise DataError(str(root), "DICOM folder not found", "check `root` in the source config")
    files = [p for p in list_dicom_files(config) if config.label_csv is None or p != Path(config.label_csv)]
    found: list[Path] = []
    ignored = 0
    for path in files:
        if path.name.upper() == "DICOMDIR":
            ignored += 1  # a media index, not an image
        elif _has_preamble(path):
            found.append(path)
        elif path.suffix.lower() in DICOM_SUFFIXES:
            log.handle(
                DataError(
                    str(path),
                    "not a readable DICOM file (no 'DICM' preamble at byte 128: corrupt, or a headerless export)",
                    "re-export it as a DICOM Part-10 file, remove it, or use on_bad_file: skip",
                )
            )
        else:
            ignored += 1
    if ignored:
        logger.info("%s: ignored %d non-DICOM files", root, ignored)
    if not found and not (log.policy == "skip" and log.skipped):
        raise DataError(
            str(root),
            f"no DICOM files (with the 'DICM' preamble) among {len(files)} files matching '{config.pattern}'",
            "check `root` and `pattern`",
        )
    return found


# ----------------------------------------------------------------------------------------- tags
def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    try:
        items = list(value) if not isinstance(value, (str, bytes, int, float)) else [value]
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        return None
    return out if out and all(np.isfinite(out)) else None


def _functional(ds: Any, frame: int | None, sequence: str, keyword: str) -> Any:
    """A tag from the frame's per-frame functional group, else the shared group, else the top level.

    Enhanced CT/MR (and other multi-frame IODs) keep geometry, rescale and windows in functional groups.
    """
    groups = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frame is not None and per_frame is not None and frame < len(per_frame):
        groups.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


@dataclass
class _Frame:
    """One decoded 2D image (a single-frame file or one frame of a multi-frame file) and its tags."""

    pixels: np.ndarray
    path: Path
    frame: int | None
    n_frames: int
    patient_id: str
    study_id: str
    series_id: str
    sop_uid: str
    modality: str
    instance_number: int | None
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    spacing_between_slices: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def _pixel_spacing(ds: Any, frame: int | None) -> tuple[tuple[float, float] | None, str]:
    spacing = _floats(_functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing"))
    if spacing and len(spacing) == 2 and min(spacing) > 0:
        return (spacing[0], spacing[1]), "PixelSpacing"
    spacing = _floats(ds.get("ImagerPixelSpacing"))
    if spacing and len(spacing) == 2 and min(spacing) > 0:
        return (spacing[0], spacing[1]), "ImagerPixelSpacing (detector plane)"
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        # Units 3 = cm (PS3.3 C.8.5.5.1.15); spatial regions only.
        if region.get("PhysicalUnitsXDirection") == 3 and region.get("PhysicalUnitsYDirection") == 3:
            dx, dy = _floats(region.get("PhysicalDeltaX")), _floats(region.get("PhysicalDeltaY"))
            if dx and dy and dx[0] > 0 and dy[0] > 0:
                return (10.0 * abs(dy[0]), 10.0 * abs(dx[0])), "SequenceOfUltrasoundRegions"
    return None, ""


def _windows(ds: Any, frame: int | None) -> list[tuple[float, float]]:
    centres = _floats(_functional(ds, frame, "FrameVOILUTSequence", "WindowCenter"))
    widths = _floats(_functional(ds, frame, "FrameVOILUTSequence", "WindowWidth"))
    if not centres or not widths:
        return []
    return [(c, w) for c, w in zip(centres, widths) if w > 0]


def _voi_lut(ds: Any) -> dict[str, Any] | None:
    """The first VOI LUT table (PS3.3 C.11.2): entries, first mapped value, bits; None when absent."""
    items = ds.get("VOILUTSequence")
    if not items:
        return None
    item = items[0]
    descriptor = _floats(item.get("LUTDescriptor"))
    data = item.get("LUTData")
    if not descriptor or len(descriptor) != 3 or data is None:
        return None
    table = np.asarray(data, dtype=np.float64).ravel()
    first = int(descriptor[1])
    if first >= 2**15 and int(ds.get("PixelRepresentation", 0)) == 1:
        first -= 2**16  # US-encoded negative first value for signed data
    return {"first": first, "bits": int(descriptor[2]), "table": table}


def _exact_dtype(values: np.ndarray) -> np.ndarray:
    """The smallest of uint8 / int16 / float32 holding ``values`` exactly (float32 when not integral)."""
    if values.dtype == np.uint8 or values.dtype == np.int16:
        return values
    if values.dtype.kind in "iub" or (values.dtype.kind == "f" and np.all(np.mod(values, 1) == 0)):
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo >= 0 and hi <= 255:
            return values.astype(np.uint8)
        if lo >= -(2**15) and hi < 2**15:
            return values.astype(np.int16)
    return values.astype(np.float32)


# ----------------------------------------------------------------------------------------- decoding
def _decode(ds: Any, path: Path) -> np.ndarray:
    """The stored pixel values, (F, H, W[, 3]) or (H, W[, 3]); clear errors for what cannot be decoded."""
    from pydicom.pixels.decoders.base import get_decoder

    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        what = f" (SOP class {sop.name})" if sop is not None else ""
        raise DataError(
            str(path),
            f"no PixelData element{what}: not an image",
            "remove non-image objects (reports, RT plans, presentation states) or use on_bad_file: skip",
        )
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise DataError(
                str(path),
                f"transfer syntax {syntax.name} ({syntax}) cannot be decoded by pydicom",
                "convert it to an uncompressed transfer syntax (e.g. dcmtk `dcmdjpeg` / `gdcmconv --raw`)",
            ) from None
        if not decoder.is_available:
            raise DataError(str(path), f"transfer syntax {syntax.name} needs a decoder plugin", PLUGIN_FIX)
    try:
        return np.asarray(ds.pixel_array)
    except Exception as error:  # pydicom raises ValueError/RuntimeError/AttributeError... per plugin
        name = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
        fix = "the file is truncated or corrupt: re-export it, or use on_bad_file: skip"
        if syntax is not None and syntax.is_compressed:
            # Either damaged data or a variant the installed plugin lacks (Pillow has no 12-bit JPEG).
            fix = f"the file is corrupt, or needs another decoder ({PLUGIN_FIX}); or use on_bad_file: skip"
        raise DataError(
            str(path), f"cannot decode pixel data, transfer syntax {name}: {type(error).__name__}: {error}", fix
        ) from error


def _to_grey(pixels: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    """Colour (…, 3) or palette images as BT.601 luma (uint8 for 8-bit colour, else float32); grey unchanged."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = np.asarray(apply_color_lut(pixels, ds), dtype=np.float32)
        descriptor = _floats(ds.get("RedPaletteColorLookupTableDescriptor"))
        if descriptor and len(descriptor) == 3 and int(descriptor[2]) == 16:
            pixels /= 257.0  # 16-bit palette entries → the 0..255 scale of other colour images
    samples = int(ds.get("SamplesPerPixel", 1))
    if samples == 3 or photometric == "PALETTE COLOR":
        # pydicom converts YBR to RGB when decoding (pixel_array's default), so (…, 3) is RGB here.
        luma = pixels.astype(np.float32) @ LUMA_601
        if pixels.dtype == np.uint8:
            # 8-bit colour (ultrasound cine): back to uint8, 4× less memory for long clips; the rounding
            # (≤ 0.5 grey level) is below the 8-bit source's own quantisation.
            return np.round(luma).astype(np.uint8)
        return luma
    if samples != 1:
        raise DataError("", f"{samples} samples per pixel; expected 1 (grey) or 3 (colour)")
    return pixels


def _modality_values(ds: Any, pixels: np.ndarray, frames: int) -> list[np.ndarray]:
    """Per frame: stored values → modality units (HU for CT) with the exact narrowest dtype."""
    from pydicom.pixels import apply_modality_lut

    stack = pixels if frames > 1 else pixels[None]
    groups = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")
    enhanced = any(ds.get(k) is not None for k in groups)
    out = []
    for f, frame in enumerate(stack):
        if enhanced and "ModalityLUTSequence" not in ds:
            slope = _floats(_functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope"))
            intercept = _floats(_functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept"))
            values = frame
            if slope or intercept:
                values = frame.astype(np.float64) * (slope[0] if slope else 1.0) + (intercept[0] if intercept else 0.0)
        else:
            values = apply_modality_lut(frame, ds)
        out.append(_exact_dtype(np.asarray(values)))
    return out


def _read_dataset(path: Path) -> Any:
    """The parsed file (pixels not decoded yet); a DataError naming it when its header cannot be read."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, force=False)
    except InvalidDicomError as error:
        raise DataError(str(path), f"not a readable DICOM file ({error})", "re-export or remove it") from error
    except Exception as error:  # EOFError, struct.error, OSError, ValueError on damaged headers
        raise DataError(
            str(path),
            f"cannot read the DICOM header ({type(error).__name__}: {error}); the file is truncated or corrupt",
            "re-export or remove it, or use on_bad_file: skip",
        ) from error


def _file_modality(ds: Any, path: Path, expected_modality: str | None) -> str:
    """The file's Modality (upper case), else the expected one; a file of another modality is an error."""
    modality = _text(ds, "Modality").upper()
    if expected_modality and modality and modality != expected_modality.upper():
        raise DataError(
            str(path),
            f"Modality is '{modality}' but the source config expects '{expected_modality}'",
            "fix `modality`, narrow `pattern`, or move the file out of this dataset",
        )
    return modality or (expected_modality or "").upper()


def _frame_values(ds: Any, path: Path) -> tuple[list[np.ndarray], int, str]:
    """Each frame's grey values (modality units for MONOCHROME), the frame count and the photometric interpretation."""
    pixels = _decode(ds, path)
    declared = _floats(ds.get("NumberOfFrames"))
    frames = max(int(declared[0]), 1) if declared else 1
    photometric = _text(ds, "PhotometricInterpretation").upper()
    try:
        grey = _to_grey(pixels, ds, photometric)
    except DataError as error:
        raise DataError(str(path), error.problem) from error
    expected_ndim = 3 if frames > 1 else 2
    if grey.ndim != expected_ndim:
        raise DataError(str(path), f"decoded pixels have shape {grey.shape}; expected {frames} frame(s) of 2D images")
    if photometric.startswith("MONOCHROME"):
        return _modality_values(ds, grey, frames), frames, photometric
    return (list(grey) if frames > 1 else [grey]), frames, photometric


def _frame(ds: Any, path: Path, index: int | None, pixels: np.ndarray, frames: int, modality: str,
           spacing: tuple[float, float] | None, extra: dict[str, Any]) -> _Frame:
    """One frame with the geometry tags of its functional group (or of the file)."""
    position = _floats(_functional(ds, index, "PlanePositionSequence", "ImagePositionPatient"))
    orientation = _floats(_functional(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient"))
    thickness = _floats(_functional(ds, index, "PixelMeasuresSequence", "SliceThickness"))
    between = _floats(_functional(ds, index, "PixelMeasuresSequence", "SpacingBetweenSlices"))
    instance = _floats(ds.get("InstanceNumber"))
    return _Frame(
        pixels=np.ascontiguousarray(pixels),
        path=path,
        frame=index,
        n_frames=frames,
        patient_id=_text(ds, "PatientID"),
        study_id=_text(ds, "StudyInstanceUID"),
        series_id=_text(ds, "SeriesInstanceUID"),
        sop_uid=extra["sop_instance_uid"],
        modality=modality,
        instance_number=int(instance[0]) if instance else None,
        position=np.array(position) if position and len(position) == 3 else None,
        orientation=np.array(orientation) if orientation and len(orientation) == 6 else None,
        pixel_spacing=spacing,
        slice_thickness=thickness[0] if thickness and thickness[0] > 0 else None,
        spacing_between_slices=between[0] if between and between[0] > 0 else None,
        extra=extra,
    )


def read_dicom_frames(path: Path, expected_modality: str | None = None) -> list[_Frame]:
    """Decode one DICOM file into its frames (one for a single-frame file) with their tags."""
    ds = _read_dataset(path)
    modality = _file_modality(ds, path, expected_modality)
    values, frames, photometric = _frame_values(ds, path)
    base = {
        "photometric": photometric,
        "invert": photometric == "MONOCHROME1",
        "voi_function": _text(ds, "VOILUTFunction").upper() or "LINEAR",
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "frames_in_file": frames,
    }
    voi = _voi_lut(ds) if photometric.startswith("MONOCHROME") else None
    frame_time = _floats(ds.get("FrameTime"))
    out = []
    for f, frame_pixels in enumerate(values):
        index = f if frames > 1 else None
        spacing, spacing_source = _pixel_spacing(ds, index)
        extra: dict[str, Any] = dict(base, spacing_source=spacing_source)
        extra["windows"] = _windows(ds, index) if photometric.startswith("MONOCHROME") else []
        if voi is not None:
            extra["voi_lut"] = voi
        if frame_time:
            extra["frame_time_ms"] = frame_time[0]
        out.append(_frame(ds, path, index, frame_pixels, frames, modality, spacing, extra))
    return out


# ----------------------------------------------------------------------------------------- series
@dataclass
class _Stack:
    """Frames of one series (or one multi-frame file) in slice order, with the depth spacing."""

    frames: list[_Frame]
    depth_spacing: float
    order: str  # "position", "instance_number" or "acquisition"
    positions: list[float] | None


def _series_source(frames: Sequence[_Frame]) -> str:
    folders = sorted({str(f.path.parent) for f in frames})
    where = folders[0] if len(folders) == 1 else f"{folders[0]} (+{len(folders) - 1} folders)"
    uid = frames[0].series_id or "(no SeriesInstanceUID)"
    files = len({f.path for f in frames})
    return f"{where}: series {uid} ({files} file{'s' if files != 1 else ''})"


def _check_same(frames: Sequence[_Frame], source: str, strict: bool) -> bool:
    """Mixed modalities always raise; different image sizes raise when ``strict``, else return False."""
    by_modality: dict[str, list[str]] = defaultdict(list)
    for f in frames:
        by_modality[f.modality or "(none)"].append(f.path.name)
    if len(by_modality) > 1:
        listing = "; ".join(f"{m}: {', '.join(sorted(set(n))[:3])}" for m, n in sorted(by_modality.items()))
        raise DataError(
            source,
            f"mixed modalities in one series ({listing})",
            "remove the stray files or give them their own SeriesInstanceUID",
        )
    shapes = {f.pixels.shape for f in frames}
    if len(shapes) > 1:
        if not strict:
            return False
        raise DataError(source, f"slices have different sizes {sorted(shapes)}", "remove the odd slices")
    return True


def _fmt(values: Iterable[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def order_stack(frames: Sequence[_Frame], source: str, tolerance: float | None, strict: bool) -> _Stack | None:
    """Sort slices along the slice normal and check their spacing.

    ``strict`` (series mode) raises for every ordering problem; otherwise (images mode) a series that is not
    one stack (several orientations or duplicate positions) gives ``None`` and is kept as 2D images.
    Inconsistent gaps and mixed modalities raise in both modes.
    """
    if not _check_same(frames, source, strict):
        return None
    frames = list(frames)
    if len(frames) == 1:
        f = frames[0]
        return _Stack(frames, float(f.spacing_between_slices or f.slice_thickness or np.nan), "single", None)
    geometric = all(f.position is not None and f.orientation is not None for f in frames)
    if geometric:
        orientations = np.stack([f.orientation for f in frames])  # type: ignore[misc]
        if np.abs(orientations - orientations[0]).max() > 1e-3:
            if not strict:
                return None
            distinct = len({tuple(np.round(o, 3)) for o in orientations})
            raise DataError(
                source,
                f"slices have {distinct} different orientations (ImageOrientationPatient): not one stack",
                "split the series (e.g. drop localiser images) or use assemble: images",
            )
        row, col = orientations[0][:3], orientations[0][3:]
        normal = np.cross(row, col)
        positions = np.array([float(np.dot(f.position, normal)) for f in frames])  # type: ignore[arg-type]
        rank = np.lexsort((np.array([f.instance_number or 0 for f in frames]), positions))
        frames = [frames[i] for i in rank]
        positions = positions[rank]
        gaps = np.diff(positions)
        if np.any(gaps < 1e-3):
            if not strict:
                return None
            dup = int(np.sum(gaps < 1e-3))
            at = positions[1:][gaps < 1e-3][:3]
            raise DataError(
                source,
                f"{dup} slices repeat a position (at {_fmt(np.round(at, 3))} mm along the normal): the series holds "
                "several stacks (echoes, phases or repeats)",
                "split the stacks into separate series or use assemble: images",
            )
        median = float(np.median(gaps))
        if tolerance is not None:
            off = np.abs(gaps - median) > tolerance * median + 1e-4
            if off.any():
                first = int(np.argmax(off))
                counts = {float(g): int(n) for g, n in zip(*np.unique(np.round(gaps, 3), return_counts=True))}
                listing = ", ".join(f"{g:g} mm ×{n}" for g, n in counts.items())
                raise DataError(
                    source,
                    f"inconsistent slice spacing: gaps {listing} (median {median:g} mm); e.g. {gaps[first]:g} mm "
                    f"between {frames[first].path.name} and {frames[first + 1].path.name} at "
                    f"{positions[first]:g} → {positions[first + 1]:g} mm",
                    "a slice is missing or the series mixes stacks: re-export the full series, raise "
                    "slice_spacing_tolerance, or use on_bad_file: skip",
                )
        return _Stack(frames, median, "position", positions.tolist())
    if all(f.frame is not None for f in frames) and len({f.path for f in frames}) == 1:
        # Cine / multi-frame without plane positions: frames stay in acquisition order; depth is time.
        frames.sort(key=lambda f: f.frame or 0)
        return _Stack(frames, float("nan"), "acquisition", None)
    numbers = [f.instance_number for f in frames]
    if all(n is not None for n in numbers) and len(set(numbers)) == len(numbers):
        frames.sort(key=lambda f: f.instance_number or 0)
        f = frames[0]
        return _Stack(frames, float(f.spacing_between_slices or f.slice_thickness or np.nan), "instance_number", None)
    if not strict:
        return None
    raise DataError(
        source,
        "cannot order the slices: no ImagePositionPatient/ImageOrientationPatient and no distinct InstanceNumber",
        "use assemble: images, or fix the headers",
    )


def _in_plane(frames: Sequence[_Frame], source: str) -> tuple[float, float] | None:
    spacings = {f.pixel_spacing for f in frames}
    if len(spacings) > 1:
        listing = ", ".join(str(s) for s in sorted(spacings, key=str))
        raise DataError(source, f"slices have different PixelSpacing ({listing})", "remove the odd slices")
    return next(iter(spacings))


def _volume_record(stack: _Stack, source: str) -> Record:
    frames = stack.frames
    first = frames[0]
    in_plane = _in_plane(frames, source)
    dtype = np.result_type(*[f.pixels.dtype for f in frames])
    if isinstance(first.pixels, DeferredPixels):  # planning: the volume is stacked when its unit is read
        volume: np.ndarray | DeferredPixels = DeferredPixels((len(frames), *first.pixels.shape), dtype)
    else:
        volume = np.stack([f.pixels.astype(dtype, copy=False) for f in frames])
    spacing = (stack.depth_spacing, *in_plane) if in_plane else ()
    extra = dict(first.extra)
    extra.update(
        layout="DHW",
        files=sorted({str(f.path) for f in frames}),
        slice_order=stack.order,
        depth_axis="time" if stack.order == "acquisition" else "space",
        source_frames=[(str(f.path), f.frame) for f in frames],
    )
    if stack.positions is not None:
        extra["slice_positions_mm"] = stack.positions
    return Record(
        pixels=volume,  # type: ignore[arg-type]
        path=str(first.path),
        patient_id=first.patient_id,
        study_id=first.study_id,
        series_id=first.series_id,
        modality=first.modality,
        spacing=spacing,
        index=None,
        extra=extra,
    )


def _image_record(frame: _Frame, index: int | None, extra: dict[str, Any] | None = None) -> Record:
    merged = dict(frame.extra, layout="HW", source_frames=[(str(frame.path), frame.frame)])
    if frame.slice_thickness is not None:
        merged["slice_thickness"] = frame.slice_thickness
    if extra:
        merged.update(extra)
    return Record(
        pixels=frame.pixels,
        path=str(frame.path),
        patient_id=frame.patient_id,
        study_id=frame.study_id,
        series_id=frame.series_id,
        modality=frame.modality,
        spacing=frame.pixel_spacing or (),
        index=index,
        extra=merged,
    )


def _group_single_frames(frames: Sequence[_Frame]) -> dict[tuple[str, str], list[_Frame]]:
    groups: dict[tuple[str, str], list[_Frame]] = defaultdict(list)
    for f in frames:
        key = (f.study_id, f.series_id) if f.series_id else ("", str(f.path))
        groups[key].append(f)
    return groups


def _assemble_images(files: list[list[_Frame]], config: DicomSourceConfig, log: BadFileLog) -> list[Record]:
    records: list[Record] = []
    singles = [frames[0] for frames in files if frames[0].frame is None]
    for frames in files:
        if frames[0].frame is not None:
            records += _multiframe_records(frames)
    for (_, _), group in sorted(_group_single_frames(singles).items()):
        source = _series_source(group)
        try:
            stack = order_stack(group, source, config.slice_spacing_tolerance, strict=False) if len(group) > 1 else None
        except DataError as error:
            log.handle(error)
            continue
        if stack is None:
            records += [_image_record(f, None) for f in group]
            continue
        for rank, f in enumerate(stack.frames):
            extra: dict[str, Any] = {"slice_index": rank, "slice_order": stack.order}
            if stack.positions is not None:
                extra["slice_position_mm"] = stack.positions[rank]
            records.append(_image_record(f, rank, extra))
    return records


def _multiframe_records(frames: list[_Frame]) -> list[Record]:
    """One 2D record per frame of a multi-frame file (``index`` = frame number), told apart for pairing.

    Frames at distinct plane positions (enhanced CT/MR) are slices: ``slice_index`` = rank along the slice normal.
    Frames without positions or all at one position (ultrasound cine, cardiac cine MR) are a loop in time:
    ``frame_index`` = frame number and ``loop_id`` = the file's SOPInstanceUID (several loops may share a series).
    """
    source = str(frames[0].path)
    stack = order_stack(frames, source, None, strict=False) if len(frames) > 1 else None
    if stack is not None and stack.order == "position":
        rank = {id(f): r for r, f in enumerate(stack.frames)}
        return [_image_record(f, f.frame, {"slice_index": rank[id(f)], "slice_order": "position"}) for f in frames]
    positions = [f.position for f in frames]
    one_plane = all(p is None for p in positions) or (
        all(p is not None for p in positions) and float(np.ptp(np.stack(positions), axis=0).max()) < 1e-3)  # type: ignore[arg-type]
    if not one_plane:  # several planes that do not form one stack: no adjacency to claim
        return [_image_record(f, f.frame) for f in frames]
    loop = frames[0].sop_uid or source
    return [_image_record(f, f.frame, {"frame_index": f.frame, "loop_id": loop}) for f in frames]


def _assemble_series(files: list[list[_Frame]], config: DicomSourceConfig, log: BadFileLog) -> list[Record]:
    stacks: list[tuple[list[_Frame], str]] = []
    singles = [frames[0] for frames in files if frames[0].frame is None]
    for frames in files:
        if frames[0].frame is not None:
            stacks.append((frames, f"{frames[0].path}"))
    for _, group in sorted(_group_single_frames(singles).items()):
        stacks.append((group, _series_source(group)))
    records = []
    for frames, source in stacks:
        try:
            stack = order_stack(frames, source, config.slice_spacing_tolerance, strict=True)
            assert stack is not None
            records.append(_volume_record(stack, source))
        except DataError as error:
            log.handle(error)
    return records


# ----------------------------------------------------------------------------------------- labels
def _record_keys(record: Record, config: DicomSourceConfig) -> list[str]:
    if config.label_key != "path":
        return [str(getattr(record, config.label_key))]
    root = Path(config.root)
    path = Path(record.path)
    keys = []
    for candidate in (path, path.parent):
        try:
            keys.append(candidate.relative_to(root).as_posix())
        except ValueError:
            pass
    return keys


def _attach_labels(records: list[Record], config: DicomSourceConfig, log: BadFileLog) -> list[Record]:
    if config.label_csv is None:
        return records
    table = read_label_table(config.label_csv, config.key_column or config.label_key, config.label_column,
                             config.split_column, columns_fix="fix key_column/label_column/split_column")
    classes = table_classes(config.classes, table)
    kept = []
    for record in records:
        entry = next((table[k] for k in _record_keys(record, config) if k in table), None)
        try:
            label, class_name = entry_label(entry, classes, config.label_column)
            split = split_name(entry.split, entry.where, config.split_column) if entry and config.split_column else None
        except DataError as error:
            log.handle(DataError(record.path, f"{error.source}: {error.problem}", error.fix))
            continue
        if entry is not None and config.split_column:
            record.split = split
        record.extra["class_name"] = class_name  # every record of a labelled source names its class ("" = none)
        label_record(record, label, classes or None, class_name)
        kept.append(record)
    return kept


# ----------------------------------------------------------------------------------------- entry point
def read_dicom_source(config: DicomSourceConfig, log: BadFileLog) -> list[Record]:
    """Read every DICOM image under ``config.root`` into ``Record``s, sorted by (path, index).

    Bad files and bad series go through ``log`` (raise under ``on_bad_file: error``, listed skip under ``skip``).
    """
    files: list[list[_Frame]] = []
    for path in _dicom_candidates(config, log):
        try:
            files.append(read_dicom_frames(path, config.modality))
        except DataError as error:
            log.handle(error)
    return _records(files, config, log)


def _records(files: list[list[_Frame]], config: DicomSourceConfig, log: BadFileLog) -> list[Record]:
    assemble = _assemble_series if config.assemble == "series" else _assemble_images
    records = assemble(files, config, log)
    records = _attach_labels(records, config, log)
    if not records:
        raise DataError(
            str(config.root), "no DICOM image could be read (all were skipped as bad files)", "see bad_files.json"
        )
    records.sort(key=lambda r: (r.path, -1 if r.index is None else r.index))
    return records


# ----------------------------------------------------------------------------------------- planned ingest
@dataclass(frozen=True)
class DeferredPixels:
    """Shape and dtype of pixels a header pass decoded and let go; ``decode_dicom_record`` decodes them again."""

    shape: tuple[int, ...]
    dtype: np.dtype


def _frame_headers(
    path: Path, expected_modality: str | None, preprocess: Callable[[Record], np.ndarray] | None
) -> tuple[list[_Frame], list[np.ndarray | DataError] | None]:
    """``read_dicom_frames`` keeping only each frame's pixel shape and dtype (runs in an ingest worker).

    The pixels are decoded here, so a file whose pixel data cannot be decoded is found (and skipped or raised)
    before series are assembled, exactly as ``read_dicom_source`` finds it. With ``preprocess`` (``assemble:
    images``, where a frame's preprocessing needs nothing that assembly adds) each frame is also preprocessed
    now, so it is decoded once; a preprocessing error is returned, to be reported only if the frame's record
    survives assembly, in record order, as ``read_dicom_source`` + the cache would.
    """
    frames = read_dicom_frames(path, expected_modality)
    outputs: list[np.ndarray | DataError] | None = None
    if preprocess is not None:
        outputs = []
        for frame in frames:
            try:
                outputs.append(np.asarray(preprocess(_image_record(frame, None))))
            except DataError as error:
                outputs.append(error)
    for frame in frames:
        frame.pixels = DeferredPixels(tuple(frame.pixels.shape), frame.pixels.dtype)  # type: ignore[assignment]
    return frames, outputs


class _PreprocessedRows:
    """Frames preprocessed while planning: rows of a scratch ``.npy`` in file order (odd shapes kept aside)."""

    def __init__(self, path: Path) -> None:
        self.file = RowFile(path)
        self.where: dict[tuple[str, int | None], int | np.ndarray | DataError] = {}
        self.rows: np.ndarray | None = None

    def add(self, frame: _Frame, output: np.ndarray | DataError) -> None:
        key = (str(frame.path), frame.frame)
        same = self.file.rows == 0 or (isinstance(output, np.ndarray) and output.shape == self.file.row_shape
                                        and output.dtype == self.file.dtype)
        if isinstance(output, np.ndarray) and same and output.dtype in (np.uint8, np.float16, np.float32):
            self.where[key] = self.file.rows
            self.file.append(output)
        else:
            self.where[key] = output  # an error, or a shape the cache will refuse if the record survives

    def finish(self) -> None:
        self.file.close()
        if self.file.rows:
            self.rows = np.load(self.file.path, mmap_mode="r")


def _preprocessed_row(record: Record, rows: _PreprocessedRows, frame: tuple[str, int | None]) -> list[Record]:
    """The row ``plan_dicom_units`` preprocessed for this record (``ReadUnit.load``, in the building process)."""
    found = rows.where[frame]
    if isinstance(found, DataError):
        raise found
    record.pixels = np.array(rows.rows[found]) if isinstance(found, int) else found  # type: ignore[index]
    return [record]


def plan_dicom_units(
    config: DicomSourceConfig,
    log: BadFileLog,
    workers: int = 1,
    preprocess: Callable[[Record], np.ndarray] | None = None,
    scratch: Path | None = None,
) -> list[ReadUnit]:
    """The source as one ``ReadUnit`` per record (an image, a frame or a series volume), in ``read_dicom_source``'s order.

    Every file is read by ``workers`` processes (headers, and pixels decoded to find bad files exactly as
    ``read_dicom_source`` does) and series are ordered and checked from the headers alone, so memory does not
    grow with the archive. ``assemble: images`` with ``preprocess`` and a ``scratch`` folder: each frame is
    preprocessed in that same pass and kept as a row in ``scratch``, and the units copy those rows in record
    order (one decode per file). Otherwise (``series``) each unit decodes its files again and stacks the volume.
    """
    early = preprocess if config.assemble == "images" and scratch is not None else None
    rows = _PreprocessedRows(Path(scratch) / "frames.npy") if early is not None else None
    files: list[list[_Frame]] = []
    candidates = _dicom_candidates(config, log)
    for _, result in ordered_map(_frame_headers, candidates, workers, str, (config.modality, early)):
        if isinstance(result, DataError):
            log.handle(result)
            continue
        frames, outputs = result
        files.append(frames)
        if rows is not None and outputs is not None:
            for frame, output in zip(frames, outputs):
                rows.add(frame, output)
    records = _records(files, config, log)
    if rows is None:
        return [ReadUnit(record.path, decode_dicom_record, (record, config.modality)) for record in records]
    rows.finish()
    units = []
    for record in records:
        frame = record.extra["source_frames"][0]  # type: ignore[index]
        units.append(ReadUnit(record.path, _preprocessed_row, (record, rows, tuple(frame)), preprocessed=True))
    return units


def decode_dicom_record(record: Record, expected_modality: str | None) -> list[Record]:
    """Decode a planned record's pixels (``ReadUnit.load`` of this source; runs in an ingest worker).

    A volume is filled slice by slice into one array, so a worker holds one volume (plus one file's frames).
    """
    deferred = record.pixels
    assert isinstance(deferred, DeferredPixels)
    sources: list[tuple[str, int | None]] = list(record.extra["source_frames"])  # type: ignore[arg-type]
    volume = record.extra.get("layout") == "DHW"
    out = np.empty(deferred.shape, deferred.dtype) if volume else None
    last_path, frames = "", []
    for position, (path, frame) in enumerate(sources):
        if path != last_path:
            frames, last_path = read_dicom_frames(Path(path), expected_modality), path
        pixels = frames[frame or 0].pixels
        wanted = deferred.shape[1:] if volume else deferred.shape
        if pixels.shape != wanted or (not volume and pixels.dtype != deferred.dtype):
            raise DataError(path, f"pixels changed while the archive was read ({pixels.shape} {pixels.dtype}, "
                            f"planned {wanted} {deferred.dtype})", "do not modify the files during ingest; rerun")
        if out is None:
            record.pixels = pixels
        else:
            out[position] = pixels
    if out is not None:
        record.pixels = out
    return [record]
