"""Label tables of the file sources: reading a CSV, checking its columns and cells, joining labels to records.

One home for what the DICOM, NIfTI and image-folder sources used to do three ways: the image folder's own CSV
(one row per image) and the label CSV beside DICOM or NIfTI data (one row per key: patient, study, series, file
or case) are read here (UTF-8, a BOM tolerated, cells stripped, line numbers counting the header as line 1, like
an editor), their columns are checked before any pixel is decoded, and a row's label becomes a record's class
index, class name and split. Errors name the file, the line and the column. The free-text reports these sources
carry are read by ``radssl.data.reports``; their config fields (:class:`SideTables`) are declared here once.
"""

from __future__ import annotations

import csv as csv_module
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from radssl.data.records import Record
from radssl.errors import DataError

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
LABEL_CSV_FIX = "check `label_csv` in the source config (a relative path is read inside `root`)"


def under_root(root: Path, path: Path) -> Path:
    """A config path: absolute as given, relative ones inside ``root`` (where the data and their CSV live)."""
    path = Path(path)
    return path if path.is_absolute() else Path(root) / path


class SideTables(BaseModel):
    """The CSV tables beside a DICOM or NIfTI source (labels, reports): config fields and their paths in ``root``."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    label_csv: Path | None = None
    """Labels (DICOM: and optionally splits) keyed by ``label_key``; a relative path is read inside ``root``."""
    label_column: str = "label"
    classes: list[str] | None = None
    report_csv: Path | None = None
    """Free-text reports (for image–text pretraining) keyed by ``report_key``; a relative path is read inside
    ``root``. Read and joined by ``radssl.data.reports``."""
    report_key_column: str | None = None
    """CSV column holding that identifier; defaults to the ``report_key`` name."""
    report_column: str = "report"
    report_encoding: str = "utf-8"
    """Text encoding of ``report_csv`` (e.g. ``latin-1``, ``cp1252``); undecodable bytes are an error naming the line."""

    @model_validator(mode="after")
    def _tables_in_root(self) -> "SideTables":
        if self.label_csv is not None:
            self.label_csv = under_root(self.root, self.label_csv)
        if self.report_csv is not None:
            self.report_csv = under_root(self.root, self.report_csv)
        return self


# ----------------------------------------------------------------------------------------- reading
def read_csv_rows(
    path: Path, problem: str = "label CSV not found", fix: str = LABEL_CSV_FIX
) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (line number, row) pairs, cells stripped; a missing file is a DataError (``problem``, ``fix``)."""
    if not path.is_file():
        raise DataError(str(path), problem, fix)
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv_module.DictReader(stream)
        header = list(reader.fieldnames or [])
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]
    return header, rows


def require_columns(where: str, header: Sequence[str], wanted: Iterable[str], fix: str) -> None:
    """A DataError naming the columns of ``wanted`` that ``header`` lacks (and the columns it has)."""
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(where, f"columns {missing} not found; the CSV has {list(header)}", fix)


@dataclass(frozen=True)
class LabelEntry:
    """One key's row of a label CSV: the label and split cells as written, and where they stand."""

    label: str
    split: str
    where: str
    """``<csv>: line <n>``, for errors about this row."""
    line: int


def read_label_table(
    path: Path,
    key_column: str,
    label_column: str,
    split_column: str | None = None,
    repeats: Literal["agree", "never"] = "agree",
    columns_fix: str = "fix the column names",
) -> dict[str, LabelEntry]:
    """{key: entry} from a label CSV; rows with an empty key label nothing and are passed over.

    ``repeats``: a key listed again is fine when its label and split agree (``agree``: a CSV of studies keyed by
    patient), or always an error (``never``: one row per case).
    """
    header, rows = read_csv_rows(Path(path))
    require_columns(str(path), header, [key_column, label_column] + ([split_column] if split_column else []),
                    columns_fix)
    table: dict[str, LabelEntry] = {}
    for line, row in rows:
        key = row.get(key_column, "")
        if not key:
            continue
        entry = LabelEntry(row.get(label_column, ""), row.get(split_column, "") if split_column else "",
                           f"{path}: line {line}", line)
        first = table.get(key)
        if first is not None and repeats == "never":
            raise DataError(str(path), f"line {line}: case '{key}' repeats line {first.line}", "list each case once")
        if first is not None and (first.label, first.split) != (entry.label, entry.split):
            raise DataError(entry.where, f"'{key}' appears again with a different label (first on line {first.line})",
                            "list each key once")
        table.setdefault(key, entry)
    return table


def table_classes(declared: Sequence[str] | None, table: dict[str, LabelEntry]) -> list[str]:
    """The declared class list, else the labels the table holds (:func:`derive_classes`)."""
    return list(declared) if declared else derive_classes([entry.label for entry in table.values()])


# ----------------------------------------------------------------------------------------- cells
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


# ----------------------------------------------------------------------------------------- joining
def entry_label(entry: LabelEntry | None, classes: Sequence[str] | None, column: str) -> tuple[int | None, str]:
    """(class index or None when unlabelled, class name) of a key's row; a DataError naming its line."""
    if entry is None or entry.label == "":
        return None, ""
    return class_index(entry.label, classes or [], entry.where, column), entry.label


def label_record(record: Record, label: int | list[int] | None, classes: Sequence[str] | None,
                 class_name: str = "") -> None:
    """Set a record's label and, with a class list, the class names the store's task is built from."""
    record.label = label
    if classes is not None:
        record.extra["class_names"] = tuple(classes)
        record.extra["class_name"] = class_name
