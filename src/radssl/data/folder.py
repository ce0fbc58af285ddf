"""Image-folder source: PNG/JPEG/TIFF files listed by a CSV, or sorted into class-named sub-folders.

Two layouts:

* ``csv`` given (a relative ``csv`` lies in ``root``): one row per image. ``path_column`` (default ``path``;
  relative to ``root`` unless absolute; a path that leaves ``root``, e.g. ``../x.png``, is refused), optional
  ``label_columns`` (one column = a class label mapped through ``classes``; several columns = multilabel 0/1),
  ``patient_column`` and ``split_column`` (``train``/``val``/``test``; ``valid``, ``validation``, ``training``,
  ``testing`` and ``unlabelled`` are understood too). Positive-pair metadata (``views.pairing``): ``study_column``,
  ``series_column`` (the volume or cine loop), ``slice_column`` and ``frame_column`` (integer positions within
  the series; each needs ``series_column``).
* ``csv`` absent: ``root/<class>/**/image`` (class = sub-folder name; sorted, or numeric order when every name
  is an integer), optionally one level of split folders above the classes (``root/train/<class>/...``, as in
  Kermany et al. 2018's chest X-ray release). Images lying directly in ``root`` are unlabelled. A class folder
  listed in ``exclude_folders`` is not read; with ``classes`` declared, a folder outside them is a bad file.

Patients: ``patient_column``, or ``patient_pattern``, a regular expression searched in each image's *file
name* whose first group (or whole match) is the patient id (``"^(P\\d+)_"`` for ``P0012_view2.png``). Without
either, every image is its own patient: splits are then per image and images of one patient may end up on
both sides (``radssl data inspect`` and the store's notes say so).

Segmentation masks (image files, see ``radssl.data.image_masks`` for the value rules): ``mask_column`` (CSV; one
cell may list several files, ``a.png;b.png``), or ``mask_suffix`` (``_mask`` → ``<stem>_mask.png`` and numbered
copies ``<stem>_mask_1.png`` beside the image, or in ``mask_folder`` at the image's relative path), merged by union
for one class or through ``mask_values`` (``{benign: 128, malignant: 255}``) for several. Each mask must lie on its
image's pixel grid; wrong sizes and undeclared values are bad files naming the mask, before anything is cached.
Mask files are never read as images: files following the configured rule are masks; without any mask
configuration, ``<stem>_mask[_n].<ext>`` files whose image ``<stem>.<ext>`` lies beside them are left out too
(``radssl data inspect`` notes how many). Every image needs a mask once masks are configured
(``missing_mask: empty`` reads an image without one as all background, e.g. normal cases).

Pixels keep their range: 8-bit files give uint8, 16-bit PNG/TIFF give uint16 (``extra["bit_depth"]`` says
which), so preprocessing can window or take percentiles on the full range. Colour images become one channel
explicitly with ITU-R BT.601 luma (Y = 0.299 R + 0.587 G + 0.114 B — the weights Pillow's ``convert("L")``
uses, kept in float32 to avoid a second rounding); radiographs and ultrasound saved as RGB are grey anyway, and
a silent "first channel" would be wrong for the colour overlays some exports carry. Alpha is dropped.
"""

from __future__ import annotations

import csv as csv_module
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from radssl.data.image_masks import index_masks, mask_name_match, merge_mask_files
from radssl.data.label_table import (
    SPLIT_ALIASES,
    class_index,
    derive_classes,
    label_record,
    multilabel_value,
    read_csv_rows,
    require_columns,
    split_name,
    under_root,
)
from radssl.data.records import BadFileLog, ReadUnit, Record
from radssl.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)
UNCONFIGURED_MASK_SUFFIX = "_mask"
"""Without mask settings, ``<stem>_mask[_n].<ext>`` beside an image ``<stem>.<ext>`` is a mask, never an image."""
MASK_SEPARATOR = ";"
"""Separates several mask files in one ``mask_column`` cell."""


class FolderSourceConfig(BaseModel):
    """Where the images are and how labels, patients and splits are read."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["folder"] = "folder"
    root: Path
    csv: Path | None = None
    path_column: str = "path"
    label_columns: list[str] = []
    classes: list[str] | None = None
    patient_column: str | None = None
    patient_pattern: str | None = None
    """Regular expression searched in each file name; its first group (or the whole match) is the patient id."""
    split_column: str | None = None
    study_column: str | None = None
    """CSV column of each image's study (one visit): ``views.pairing`` patient with ``same_study``."""
    series_column: str | None = None
    """CSV column of each image's series (the volume a slice, or the cine loop a frame, belongs to)."""
    slice_column: str | None = None
    """CSV column of the slice position within its series (integer; empty = unknown): ``views.pairing`` slice."""
    frame_column: str | None = None
    """CSV column of the frame number within its cine loop (integer; empty = unknown): ``views.pairing`` frame."""
    exclude_folders: list[str] = []
    """Class (or split) sub-folder names that are not read, e.g. a class left out of the study."""
    report_column: str | None = None
    """CSV column of each image's free-text report (empty cell = no report; UTF-8), for image–text pretraining; read
    and joined by ``radssl.data.reports``."""
    modality: str = ""
    """DICOM-style modality code for all images (``DX``, ``CR``, ``US``, ...); empty = unknown."""
    mask_column: str | None = None
    """CSV column of each image's segmentation mask file(s), relative to ``root``; several joined by ``;``."""
    mask_suffix: str | None = None
    """Mask files are ``<image stem><mask_suffix>.<ext>`` (and numbered copies ``..._1``, ``..._2``) beside the
    image, or in ``mask_folder``; they are never read as images."""
    mask_folder: Path | None = None
    """Folder of the masks (relative to ``root`` unless absolute), mirroring the images' sub-folders; a mask there is
    named like its image (plus ``mask_suffix`` when set)."""
    mask_values: dict[str, int] | None = None
    """Label map: class name → its pixel value in the mask files (``{lesion: 255}``; ``{benign: 1, malignant: 2}``);
    labels are 1, 2, ... in this order (0 = background). Unset: one class ``foreground`` (union, thresholded)."""
    mask_threshold: int | None = None
    """One-class masks: foreground where value >= this; unset = 1 for 0/1 files, half the bit range otherwise."""
    missing_mask: Literal["error", "empty"] = "error"
    """An image without a mask: a bad file (``error``) or all background (``empty``, e.g. normal cases)."""

    @field_validator("patient_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as error:
                raise ValueError(f"patient_pattern '{value}' is not a valid regular expression ({error})") from None
        return value

    @model_validator(mode="after")
    def _resolve(self) -> "FolderSourceConfig":
        if self.patient_column and self.patient_pattern:
            raise ValueError("set either patient_column or patient_pattern, not both")
        pairing = {k: v for k, v in (("study_column", self.study_column), ("series_column", self.series_column),
                                      ("slice_column", self.slice_column), ("frame_column", self.frame_column)) if v}
        if pairing and self.csv is None:
            raise ValueError(f"{sorted(pairing)} name CSV columns: set `csv` too")
        for position in ("slice_column", "frame_column"):
            if position in pairing and not self.series_column:
                raise ValueError(f"{position} needs series_column: a {position.split('_')[0]} number means something "
                                 "only within its series (the volume or cine loop it belongs to)")
        if self.csv is not None:
            self.csv = under_root(self.root, self.csv)
        self._check_masks()
        return self

    def _check_masks(self) -> None:
        if self.mask_column and self.csv is None:
            raise ValueError("mask_column names a CSV column: set `csv` too (or use mask_suffix for files beside "
                             "the images)")
        if self.mask_column and (self.mask_suffix is not None or self.mask_folder is not None):
            raise ValueError("set either mask_column (masks listed in the CSV) or mask_suffix/mask_folder, not both")
        if self.mask_suffix is not None and not self.mask_suffix.strip():
            raise ValueError("mask_suffix must not be empty (e.g. _mask); for masks named exactly like their images "
                             "use mask_folder without mask_suffix")
        if not self.has_masks:
            given = [k for k in ("mask_values", "mask_threshold") if getattr(self, k) is not None]
            given += ["missing_mask"] if self.missing_mask != "error" else []
            if given:
                raise ValueError(f"{given} describe masks but none are read: set mask_column, mask_suffix or "
                                 "mask_folder")
        if self.mask_values is not None:
            names, values = list(self.mask_values), list(self.mask_values.values())
            if not names:
                raise ValueError("mask_values is empty: name at least one class (e.g. {lesion: 255})")
            if "background" in names:
                raise ValueError("mask_values must not name 'background': it is label 0, pixel value 0")
            if any(v < 1 or v > 65535 for v in values) or len(set(values)) != len(values):
                raise ValueError(f"mask_values {self.mask_values} must be distinct pixel values 1..65535 (0 is "
                                 "the background)")
            if self.mask_threshold is not None:
                raise ValueError("mask_threshold is for one-class masks; with mask_values each value is a label")
        if self.mask_threshold is not None and self.mask_threshold < 1:
            raise ValueError("mask_threshold must be >= 1 (foreground where the mask value >= it)")
        if self.mask_folder is not None:
            self.mask_folder = under_root(self.root, self.mask_folder)

    @property
    def has_masks(self) -> bool:
        """Whether this source reads segmentation masks."""
        return bool(self.mask_column) or self.mask_suffix is not None or self.mask_folder is not None

    @property
    def mask_classes(self) -> list[str] | None:
        """Names of the mask labels, index = label (``store.mask_classes``); None without masks."""
        if not self.has_masks:
            return None
        return ["background", *(self.mask_values or {"foreground": 1})]


def outside_root(root: Path, path: Path) -> bool:
    """Whether ``path`` leaves ``root`` once ``..`` are resolved.

    Lexical on purpose (``os.path.normpath`` of absolute paths, no symlink resolution): a data folder whose
    images are symlinks into an archive is fine; a CSV row that climbs out with ``..`` is not.
    """
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([base, target]) != base


def patient_from_name(path: Path, pattern: str, where: str) -> str:
    """The patient id ``pattern`` finds in the file name (first group, else the whole match)."""
    match = re.search(pattern, Path(path).name)
    if match is None or not (match.group(1) if match.re.groups else match.group(0)):
        raise DataError(
            where,
            f"patient_pattern '{pattern}' finds no patient id in the file name '{Path(path).name}'",
            "fix the pattern (it is searched in the file name, its first group is the id) or rename the file",
        )
    return match.group(1) if match.re.groups else match.group(0)


# ----------------------------------------------------------------------------------------- labels
def _position_cell(value: str, where: str, column: str) -> int | None:
    """A slice/frame number cell: a non-negative integer (``3``, ``3.0``); empty = unknown."""
    text = value.strip()
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or number < 0:
        raise DataError(where, f"column '{column}' holds '{value}'; expected a slice/frame number (0, 1, 2, ...)",
                        "fix the cell, or leave it empty where the position is unknown")
    return int(number)


# ----------------------------------------------------------------------------------------- pixels
def read_image(path: Path) -> tuple[np.ndarray, int]:
    """Decode one image file to a 2D array and its bit depth (8 or 16).

    Multi-page TIFFs are rejected rather than silently cut to their first page.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise DataError(
                    str(path),
                    f"multi-page image ({image.n_frames} pages); this reader takes one image per file",
                    "save each page as its own file",
                )
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return np.asarray(image, dtype=np.uint16).copy(), 16
            if mode in ("I", "F"):
                array = np.asarray(image)
                if array.min() >= 0 and array.max() <= 65535 and np.all(array == np.round(array)):
                    return array.astype(np.uint16), 16
                raise DataError(
                    str(path), f"{mode}-mode pixels range {array.min()}..{array.max()}; expected 8- or 16-bit data"
                )
            if mode == "1":
                return np.asarray(image.convert("L")), 8
            if mode in ("L", "LA"):
                return np.asarray(image.getchannel(0)), 8
            if mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            elif mode not in ("RGB", "RGBA"):
                image = image.convert("RGB")
            rgb = np.asarray(image, dtype=np.float32)[..., :3]
            return rgb @ LUMA_601, 8
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(str(path), f"cannot decode image ({error})", "re-export or remove the file") from error


def _image_record(path: Path, log: BadFileLog, modality: str, decode: bool = True) -> Record | None:
    """The file's record; ``decode=False`` leaves the pixels to ``decode_image_record`` (in a worker)."""
    if not decode:
        return Record(pixels=np.empty(0, np.uint8), path=str(path), modality=modality)
    try:
        pixels, bit_depth = read_image(path)
    except DataError as error:
        log.handle(error)
        return None
    return Record(pixels=pixels, path=str(path), modality=modality, extra={"bit_depth": bit_depth})


def decode_image_record(record: Record) -> list[Record]:
    """Decode a planned record's image file (``ReadUnit.load`` of this source; runs in an ingest worker)."""
    pixels, bit_depth = read_image(Path(record.path))
    record.pixels = pixels
    record.extra["bit_depth"] = bit_depth
    if "mask_rule" in record.extra:  # masks are read beside their image, in the same worker
        _merge_mask(record)
    return [record]


# ----------------------------------------------------------------------------------------- layouts
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


class MaskFinder:
    """Which files are masks, and each image's mask files, under a source's mask rule (each folder indexed once).

    Rules: ``mask_folder`` (masks mirror the images' sub-folders, named like the image plus ``mask_suffix``),
    ``mask_suffix`` beside the images, or — with no mask settings — ``<stem>_mask[_n]`` files whose image
    ``<stem>.<ext>`` lies beside them (left out of the images only).
    """

    def __init__(self, config: FolderSourceConfig) -> None:
        self.config = config
        self.suffix = config.mask_suffix if config.has_masks else UNCONFIGURED_MASK_SUFFIX
        self._indexes: dict[Path, dict[tuple[Path, str], list[Path]]] = {}
        self._stems: dict[Path, set[str]] = {}

    def _folder_files(self, folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if _is_image(p)) if folder.is_dir() else []

    def _index(self, folder: Path) -> dict[tuple[Path, str], list[Path]]:
        if folder not in self._indexes:
            self._indexes[folder] = index_masks(self._folder_files(folder), self.suffix or "")
        return self._indexes[folder]

    def _mask_dir(self, image: Path) -> Path:
        folder = self.config.mask_folder
        if folder is None:
            return image.parent
        try:
            relative = image.parent.relative_to(self.config.root)
        except ValueError:
            relative = Path()
        return folder / relative

    def is_mask(self, path: Path) -> bool:
        """Whether ``path`` is a mask file under the rule (so never an image)."""
        folder = self.config.mask_folder
        if folder is not None:
            return not outside_root(folder, path)
        image_stem = mask_name_match(path.stem, self.suffix or "")
        if image_stem is None:
            return False
        if self.config.has_masks:
            return True
        if path.parent not in self._stems:  # unconfigured: a mask only where its image lies beside it
            self._stems[path.parent] = {p.stem for p in self._folder_files(path.parent)}
        return image_stem in self._stems[path.parent]

    def masks_for(self, image: Path) -> list[Path]:
        """The mask files of ``image`` (plain first, then numbered copies); [] when it has none."""
        folder = self._mask_dir(image)
        return list(self._index(folder).get((folder, image.stem), []))


def _mask_paths_from_cell(config: FolderSourceConfig, cell: str, where: str) -> list[Path]:
    """The mask files one ``mask_column`` cell names (``a.png;b.png``), inside ``root``."""
    paths = []
    for raw in (part.strip() for part in cell.split(MASK_SEPARATOR)):
        if not raw:
            continue
        path = under_root(config.root, Path(raw))
        if outside_root(config.root, path):
            raise DataError(where, f"mask path '{raw}' lies outside the data root {config.root}",
                            "list masks inside `root` (paths relative to it)")
        paths.append(path)
    return paths


def _attach_mask(record: Record, config: FolderSourceConfig, paths: list[Path], where: str) -> None:
    """Check the image's mask files and merge them into ``record.extra["mask"]`` (DataError naming the file).

    A planned record (pixels not decoded yet: the parallel ingest) keeps the checked paths and the mask rule; the
    ingest worker merges them once the image's size is known (:func:`decode_image_record`).
    """
    if not paths and config.missing_mask != "empty":
        how = (f"an empty '{config.mask_column}' cell ({where})" if config.mask_column
               else f"no {config.mask_suffix or ''}[_n] mask file in {MaskFinder(config)._mask_dir(Path(record.path))}")
        raise DataError(record.path, f"image has no segmentation mask: {how}",
                        "add its mask, set missing_mask: empty if it shows no finding, or skip it with "
                        "on_bad_file: skip")
    for path in paths:
        if not path.is_file():
            raise DataError(str(path), f"mask file not found (mask of {record.path}, {where})",
                            "fix the mask path or add the file")
    record.extra["mask_files"] = len(paths)
    record.extra["mask_rule"] = ([str(p) for p in paths], config.mask_values, config.mask_threshold)
    if np.size(record.pixels):
        _merge_mask(record)


def _merge_mask(record: Record) -> None:
    """The mask of a decoded record from its checked files (``extra["mask_rule"]``): zeros when it has none."""
    paths, values, threshold = record.extra.pop("mask_rule")
    shape = tuple(int(s) for s in np.shape(record.pixels))
    record.extra["mask"] = (merge_mask_files([Path(p) for p in paths], shape, values, threshold, record.path)
                            if paths else np.zeros(shape, dtype=np.uint8))


def _patient_id(config: FolderSourceConfig, path: Path, row: dict[str, str] | None, where: str) -> str:
    if config.patient_pattern:
        return patient_from_name(path, config.patient_pattern, where)
    if config.patient_column and row is not None:
        return row[config.patient_column]
    return ""


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The folder CSV's header and (line, row) pairs (:func:`radssl.data.label_table.read_csv_rows`)."""
    return read_csv_rows(path, "CSV file not found",
                         "check `csv` in the source config (a relative `csv` is read inside `root`)")


def _csv_table(config: FolderSourceConfig) -> tuple[list[tuple[int, dict[str, str]]], list[str] | None]:
    """The CSV's rows and the class list of a one-column label (None otherwise), columns checked before any row."""
    csv_path = config.csv
    assert csv_path is not None
    header, rows = _csv_rows(csv_path)
    wanted = [config.path_column, *config.label_columns]
    wanted += [c for c in (config.patient_column, config.split_column, config.study_column, config.series_column,
                           config.slice_column, config.frame_column, config.mask_column) if c]
    require_columns(str(csv_path), header, wanted, "fix the column names")
    if not rows:
        raise DataError(str(csv_path), "the CSV lists no images", "add rows or point `csv` at the right file")
    if len(config.label_columns) == 1:
        column = config.label_columns[0]
        return rows, config.classes or derive_classes([row[column] for _, row in rows])
    if len(config.label_columns) > 1 and config.classes and list(config.classes) != list(config.label_columns):
        raise DataError(
            str(csv_path),
            f"`classes` {config.classes} differ from the multilabel `label_columns` {config.label_columns}",
            "leave `classes` empty for multilabel data (the label columns name the classes)",
        )
    return rows, None


def _csv_image(config: FolderSourceConfig, raw: str, line: int, first_line: dict[Path, int],
               masks: MaskFinder | None, log: BadFileLog) -> Path | None:
    """The image file a CSV row names; None (after ``log``) for an empty, repeated or missing one."""
    where = f"{config.csv}: line {line}"
    if raw == "":
        log.handle(DataError(where, f"empty '{config.path_column}' cell"))
        return None
    image_path = under_root(config.root, Path(raw))
    if outside_root(config.root, image_path):
        # Refused under every on_bad_file policy: a row reaching outside the data folder is a wrong CSV
        # (or a hostile one), not a damaged image.
        raise DataError(
            where,
            f"path '{raw}' lies outside the data root {config.root}",
            "list images inside `root` (paths relative to it), or set `root` to a folder holding them all",
        )
    key = image_path.resolve()
    if key in first_line:
        log.handle(DataError(where, f"duplicate path '{raw}' (first listed on line {first_line[key]})",
                             "list each image once"))
        return None
    first_line[key] = line
    if masks is not None and not config.mask_column and masks.is_mask(image_path):
        raise DataError(where, f"'{raw}' is a mask file under the mask rule (mask_suffix/mask_folder), listed "
                        f"as an image", "list only images in the CSV; their masks are found by the rule")
    if not image_path.is_file():
        log.handle(DataError(str(image_path), f"file not found (named on {config.csv} line {line})"))
        return None
    return image_path


@dataclass(frozen=True)
class _RowCells:
    """What one CSV row says about its image besides the path (checked before the image is decoded)."""

    label: int | list[int] | None
    class_name: str
    split: str | None
    patient: str
    positions: dict[str, int | None]


def _csv_cells(config: FolderSourceConfig, row: dict[str, str], line: int, image_path: Path,
               classes: list[str] | None) -> _RowCells:
    """The row's label, split, patient and slice/frame positions; a DataError naming the line and column."""
    where = f"{config.csv}: line {line}"
    label: int | list[int] | None = None
    class_name = ""
    if len(config.label_columns) > 1:
        label = [multilabel_value(row[c], where, c) for c in config.label_columns]
    elif classes is not None and row[config.label_columns[0]] != "":
        class_name = row[config.label_columns[0]]
        label = class_index(class_name, classes, f"{where} ({row[config.path_column]})", config.label_columns[0])
    split = split_name(row[config.split_column], where, config.split_column) if config.split_column else None
    patient = _patient_id(config, image_path, row, where)
    positions = {name: _position_cell(row[column], where, column)
                 for name, column in (("slice_index", config.slice_column), ("frame_index", config.frame_column))
                 if column}
    return _RowCells(label, class_name, split, patient, positions)


def _fill_csv_record(record: Record, config: FolderSourceConfig, row: dict[str, str], line: int, cells: _RowCells,
                     classes: list[str] | None) -> None:
    record.split = cells.split
    record.patient_id = cells.patient
    record.study_id = row[config.study_column] if config.study_column else ""
    record.series_id = row[config.series_column] if config.series_column else ""
    record.extra.update({name: value for name, value in cells.positions.items() if value is not None})
    record.extra["csv_line"] = line
    if len(config.label_columns) > 1:  # multilabel: the label columns name the classes
        record.label = cells.label
        record.extra["class_names"] = tuple(config.label_columns)
    else:
        label_record(record, cells.label, classes, cells.class_name)


def _masked_record(config: FolderSourceConfig, path: Path, log: BadFileLog, decode: bool,
                   mask_paths: Callable[[], list[Path]] | None, where: str) -> Record | None:
    """The image's record with its mask files checked and attached; None (after ``log``) when either is bad."""
    record = _image_record(path, log, config.modality, decode)
    if record is None or mask_paths is None:
        return record
    try:
        _attach_mask(record, config, mask_paths(), where)
    except DataError as error:
        log.handle(error)
        return None
    return record


def _from_csv(config: FolderSourceConfig, log: BadFileLog, decode: bool = True) -> list[Record]:
    rows, classes = _csv_table(config)
    first_line: dict[Path, int] = {}
    records: list[Record] = []
    masks = MaskFinder(config) if config.has_masks else None
    for line, row in rows:
        image_path = _csv_image(config, row[config.path_column], line, first_line, masks, log)
        if image_path is None:
            continue
        try:
            cells = _csv_cells(config, row, line, image_path, classes)
        except DataError as error:
            log.handle(error)
            continue
        where = f"{config.csv}: line {line}"
        mask_paths = None if masks is None else (
            partial(_mask_paths_from_cell, config, row[config.mask_column], where) if config.mask_column
            else partial(masks.masks_for, image_path))
        record = _masked_record(config, image_path, log, decode, mask_paths, where)
        if record is None:
            continue
        _fill_csv_record(record, config, row, line, cells, classes)
        records.append(record)
    return records


def _subfolders(base: Path, config: FolderSourceConfig) -> list[Path]:
    """Visible sub-folders of ``base`` that are not excluded, sorted by name."""
    excluded = set(config.exclude_folders)
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in excluded)


def _from_subfolders(config: FolderSourceConfig, log: BadFileLog, decode: bool = True) -> list[Record]:
    root = config.root
    if not root.is_dir():
        raise DataError(str(root), "image folder not found", "check `root` in the source config")
    subfolders = _subfolders(root, config)
    # Optional split level: root/{train,val,test}/<class>/...
    split_folders = [p for p in subfolders if p.name.lower() in SPLIT_ALIASES]
    if subfolders and len(split_folders) == len(subfolders):
        groups = [(SPLIT_ALIASES[p.name.lower()], p) for p in split_folders]
    else:
        groups = [(None, root)]

    finder = MaskFinder(config)
    entries: list[tuple[Path, str | None, str]] = []  # (file, split, class name or "")
    mask_files: list[Path] = []
    for split, base in groups:
        found = [(p, split, "") for p in sorted(base.iterdir()) if _is_image(p)]
        for class_dir in _subfolders(base, config):
            if config.mask_folder is not None and not outside_root(config.mask_folder, class_dir):
                continue  # the mask folder inside root is no class
            found += [(p, split, class_dir.name) for p in sorted(class_dir.rglob("*")) if _is_image(p)]
        for entry in found:
            if finder.is_mask(entry[0]):
                mask_files.append(entry[0])
            else:
                entries.append(entry)
    if config.has_masks and config.mask_folder is None:
        images = {(p.parent, p.stem) for p, _, _ in entries}
        for path in mask_files:
            if (path.parent, mask_name_match(path.stem, config.mask_suffix or "")) not in images:
                log.handle(DataError(str(path), f"mask file (mask_suffix '{config.mask_suffix}') with no image "
                                     "beside it", "rename it after its image, or remove it"))
    if not entries:
        raise DataError(
            str(root),
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in the folder or its class sub-folders",
            "point `root` at the image folder, or give a `csv`",
        )
    names = [name for _, _, name in entries]
    classes = config.classes or derive_classes(names)
    records: list[Record] = []
    for path, split, name in entries:
        label = None
        try:
            if name:
                label = class_index(
                    name, classes, str(path), "sub-folder name",
                    fix="fix the folder name, add it to `classes`, or list it in `exclude_folders`",
                )
            patient = _patient_id(config, path, None, str(path))
        except DataError as error:
            log.handle(error)
            continue
        record = _masked_record(config, path, log, decode,
                                partial(finder.masks_for, path) if config.has_masks else None, str(path))
        if record is None:
            continue
        record.split = split
        record.patient_id = patient
        label_record(record, label, classes or None, name)
        records.append(record)
    return records


def list_folder_files(config: FolderSourceConfig) -> list[Path]:
    """Every file the source reads (the CSV and the images it names, or the folder's images), without decoding.

    The cache keys on these files' sizes and mtimes, so it notices an edited CSV or a replaced image.
    """
    mask_dir = [] if config.mask_folder is None or not config.mask_folder.is_dir() else \
        [p for p in sorted(config.mask_folder.rglob("*")) if _is_image(p)]
    if config.csv is None:
        if not config.root.is_dir():
            return []
        excluded = set(config.exclude_folders)
        files = [
            p for p in sorted(config.root.rglob("*"))
            if _is_image(p) and not excluded & set(p.relative_to(config.root).parts[:-1][:2])  # split/class levels
        ]
        return sorted(set(files) | set(mask_dir))
    try:
        header, rows = _csv_rows(config.csv)
    except (DataError, OSError, UnicodeDecodeError, csv_module.Error):
        return [config.csv]  # reading reports the problem properly
    if config.path_column not in header:
        return [config.csv]
    named = {row[config.path_column] for _, row in rows if row.get(config.path_column)}
    paths = sorted(under_root(config.root, Path(raw)) for raw in named)
    masks: set[Path] = set(mask_dir)
    if config.mask_column and config.mask_column in header:
        masks |= {under_root(config.root, Path(part.strip())) for _, row in rows
                  for part in row.get(config.mask_column, "").split(MASK_SEPARATOR) if part.strip()}
    elif config.mask_suffix is not None and config.mask_folder is None:
        finder = MaskFinder(config)
        masks |= {m for path in paths for m in finder.masks_for(path)}
    return [config.csv, *paths, *sorted(masks - set(paths))]


def unread_mask_files(config: FolderSourceConfig) -> int:
    """How many ``<stem>_mask[_n]`` files beside their images a folder without mask settings left out as images."""
    if config.has_masks or config.csv is not None or not config.root.is_dir():
        return 0
    finder = MaskFinder(config)
    return sum(1 for p in list_folder_files(config) if finder.is_mask(p))


def read_folder_source(config: FolderSourceConfig, log: BadFileLog) -> list[Record]:
    """Decode every image the config names into a 2D ``Record`` (H, W), with labels, patients and splits.

    Bad rows/files (missing, duplicate, undecodable, label outside ``classes``) go through ``log``: an error at
    once under ``on_bad_file: error``, a listed skip under ``skip``.
    """
    return _read(config, log, decode=True)


def plan_folder_units(config: FolderSourceConfig, log: BadFileLog, scratch: Path | None = None) -> list[ReadUnit]:
    """The source as one ``ReadUnit`` per image, in ``read_folder_source``'s order; pixels are decoded by the unit.

    CSV and label problems go through ``log`` here; an undecodable image fails when its unit is read
    (``radssl.data.ingest``), naming the file, so the same files are kept or skipped as by ``read_folder_source``.
    ``scratch`` (the cache's working folder) is not needed here.
    """
    return [ReadUnit(record.path, decode_image_record, (record,)) for record in _read(config, log, decode=False)]


def _read(config: FolderSourceConfig, log: BadFileLog, decode: bool) -> list[Record]:
    if config.label_columns and config.csv is None:
        raise DataError(str(config.root), "`label_columns` need a `csv`", "add `csv`, or use class sub-folders")
    if config.csv is not None:
        records = _from_csv(config, log, decode)
    else:
        records = _from_subfolders(config, log, decode)
    if not records:
        raise DataError(
            str(config.csv or config.root),
            "no image could be read (all were skipped as bad files)",
            "see bad_files.json for the reasons",
        )
    for record in records:
        record.spacing = ()  # plain image files carry no trustworthy pixel spacing
        record.extra["layout"] = "HW"
    return records


def mask_notes(config: FolderSourceConfig) -> list[str]:
    """What a user must know about how this folder's masks were read (or which files were left out as masks)."""
    if not config.has_masks:
        left_out = unread_mask_files(config)
        if not left_out:
            return []
        return [f"{left_out} files named <image>{UNCONFIGURED_MASK_SUFFIX}[_n] beside their images were not read as "
                f"images (they look like masks) — set source.mask_suffix: {UNCONFIGURED_MASK_SUFFIX} to use them as "
                "segmentation masks"]
    if config.mask_values:
        rule = ("label map " + ", ".join(f"{name} = value {value}" for name, value in config.mask_values.items())
                + " (JPEG masks: nearest declared value)")
    elif config.mask_threshold is not None:
        rule = f"one class 'foreground' where the mask value >= {config.mask_threshold}"
    else:
        rule = ("one class 'foreground': value 1 in 0/1 masks, else value >= half the bit range (128 of 255), so "
                "anti-aliased JPEG edges are thresholded")
    where = (f"CSV column '{config.mask_column}'" if config.mask_column
             else f"files <image>{config.mask_suffix or ''}[_n]" + (f" in {config.mask_folder}" if config.mask_folder
                                                                    else " beside the images"))
    empty = "; images without a mask are all background (missing_mask: empty)" if config.missing_mask == "empty" else ""
    return [f"masks from {where}: {rule}; several files of one image are merged by union{empty}"]

