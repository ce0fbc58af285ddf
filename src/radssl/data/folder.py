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
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from radssl.data.records import BadFileLog, ReadUnit, Record
from radssl.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
    "unlabelled": "unlabelled",
    "unlabeled": "unlabelled",
}
LUMA_601 = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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
        return self


def under_root(root: Path, path: Path) -> Path:
    """A config path: absolute as given, relative ones inside ``root`` (where the data and their CSV live)."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


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
def class_index(value: str, classes: Sequence[str], where: str, column: str, fix: str | None = None) -> int:
    """Index of ``value`` among declared ``classes``; a DataError naming ``where`` (file + row) otherwise."""
    try:
        return list(classes).index(value)
    except ValueError:
        raise DataError(
            where,
            f"label '{value}' in column '{column}' is not one of the declared classes {list(classes)}",
            fix or "fix the label or add it to `classes`",
        ) from None


def derive_classes(values: Sequence[str]) -> list[str]:
    """The class list when none is declared: distinct non-empty values, numeric order if all are integers."""
    distinct = sorted({v for v in values if v != ""})
    if distinct and all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return distinct


def multilabel_value(value: str, where: str, column: str) -> int:
    """One multilabel cell: ``0``/``1`` (also ``0.0``/``1.0``, ``true``/``false``); empty = unknown (-1)."""
    text = value.strip().lower()
    if text == "":
        return -1
    if text in ("1", "1.0", "true", "yes"):
        return 1
    if text in ("0", "0.0", "false", "no"):
        return 0
    raise DataError(where, f"multilabel column '{column}' holds '{value}'; expected 0 or 1 (empty = unknown)")


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


def split_name(value: str, where: str, column: str) -> str | None:
    """Normalise a split cell (``valid`` → ``val`` ...); empty = not given."""
    text = value.strip().lower()
    if text == "":
        return None
    if text not in SPLIT_ALIASES:
        raise DataError(
            where,
            f"split column '{column}' holds '{value}'",
            f"use one of {sorted(set(SPLIT_ALIASES.values()))}",
        )
    return SPLIT_ALIASES[text]


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
    return [record]


# ----------------------------------------------------------------------------------------- layouts
def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _read_csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs; line numbers count the header as line 1, like an editor."""
    if not path.is_file():
        raise DataError(
            str(path), "CSV file not found", "check `csv` in the source config (a relative `csv` is read inside `root`)"
        )
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv_module.DictReader(stream)
        header = list(reader.fieldnames or [])
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]
    return header, rows


def _patient_id(config: FolderSourceConfig, path: Path, row: dict[str, str] | None, where: str) -> str:
    if config.patient_pattern:
        return patient_from_name(path, config.patient_pattern, where)
    if config.patient_column and row is not None:
        return row[config.patient_column]
    return ""


def _from_csv(config: FolderSourceConfig, log: BadFileLog, decode: bool = True) -> list[Record]:
    assert config.csv is not None
    csv_path = config.csv
    header, rows = _read_csv_rows(csv_path)
    wanted = [config.path_column, *config.label_columns]
    wanted += [c for c in (config.patient_column, config.split_column, config.study_column, config.series_column,
                           config.slice_column, config.frame_column) if c]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(str(csv_path), f"columns {missing} not found; the CSV has {header}", "fix the column names")
    if not rows:
        raise DataError(str(csv_path), "the CSV lists no images", "add rows or point `csv` at the right file")

    multilabel = len(config.label_columns) > 1
    classes: list[str] | None = None
    if len(config.label_columns) == 1:
        column = config.label_columns[0]
        classes = config.classes or derive_classes([row[column] for _, row in rows])
    elif multilabel and config.classes and list(config.classes) != list(config.label_columns):
        raise DataError(
            str(csv_path),
            f"`classes` {config.classes} differ from the multilabel `label_columns` {config.label_columns}",
            "leave `classes` empty for multilabel data (the label columns name the classes)",
        )

    first_line: dict[Path, int] = {}
    records: list[Record] = []
    for line, row in rows:
        where = f"{csv_path}: line {line}"
        raw = row[config.path_column]
        if raw == "":
            log.handle(DataError(where, f"empty '{config.path_column}' cell"))
            continue
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
            log.handle(
                DataError(
                    where,
                    f"duplicate path '{raw}' (first listed on line {first_line[key]})",
                    "list each image once",
                )
            )
            continue
        first_line[key] = line
        if not image_path.is_file():
            log.handle(DataError(str(image_path), f"file not found (named on {csv_path} line {line})"))
            continue
        try:
            label: int | list[int] | None = None
            class_name = ""
            if multilabel:
                label = [multilabel_value(row[c], where, c) for c in config.label_columns]
            elif classes is not None and row[config.label_columns[0]] != "":
                class_name = row[config.label_columns[0]]
                label = class_index(class_name, classes, f"{where} ({raw})", config.label_columns[0])
            split = split_name(row[config.split_column], where, config.split_column) if config.split_column else None
            patient = _patient_id(config, image_path, row, where)
            positions = {name: _position_cell(row[column], where, column)
                         for name, column in (("slice_index", config.slice_column), ("frame_index", config.frame_column))
                         if column}
        except DataError as error:
            log.handle(error)
            continue
        record = _image_record(image_path, log, config.modality, decode)
        if record is None:
            continue
        record.label = label
        record.split = split
        record.patient_id = patient
        record.study_id = row[config.study_column] if config.study_column else ""
        record.series_id = row[config.series_column] if config.series_column else ""
        record.extra.update({name: value for name, value in positions.items() if value is not None})
        record.extra["csv_line"] = line
        if multilabel:
            record.extra["class_names"] = tuple(config.label_columns)
        elif classes is not None:
            record.extra["class_names"] = tuple(classes)
            record.extra["class_name"] = class_name
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

    entries: list[tuple[Path, str | None, str]] = []  # (file, split, class name or "")
    for split, base in groups:
        entries += [(p, split, "") for p in sorted(base.iterdir()) if _is_image(p)]
        for class_dir in _subfolders(base, config):
            entries += [(p, split, class_dir.name) for p in sorted(class_dir.rglob("*")) if _is_image(p)]
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
        record = _image_record(path, log, config.modality, decode)
        if record is None:
            continue
        record.label = label
        record.split = split
        record.patient_id = patient
        if classes:
            record.extra["class_names"] = tuple(classes)
            record.extra["class_name"] = name
        records.append(record)
    return records


def list_folder_files(config: FolderSourceConfig) -> list[Path]:
    """Every file the source reads (the CSV and the images it names, or the folder's images), without decoding.

    The cache keys on these files' sizes and mtimes, so it notices an edited CSV or a replaced image.
    """
    if config.csv is None:
        if not config.root.is_dir():
            return []
        excluded = set(config.exclude_folders)
        return [
            p for p in sorted(config.root.rglob("*"))
            if _is_image(p) and not excluded & set(p.relative_to(config.root).parts[:-1][:2])  # split/class levels
        ]
    try:
        header, rows = _read_csv_rows(config.csv)
    except (DataError, OSError, UnicodeDecodeError, csv_module.Error):
        return [config.csv]  # reading reports the problem properly
    if config.path_column not in header:
        return [config.csv]
    named = {row[config.path_column] for _, row in rows if row.get(config.path_column)}
    paths = sorted(under_root(config.root, Path(raw)) for raw in named)
    return [config.csv, *paths]


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
