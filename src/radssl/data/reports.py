"""Free-text reports of file sources: read from CSV, joined to the images, counted.

Reports become ``store.meta["report"]`` (str per image; ``""`` = none). They are joined *after* the pixel cache (the
cache keys on pixels and their metadata; editing a report does not re-decode a single image), but read and checked
*before* it, so a bad report file fails in milliseconds:

* image folder + CSV: ``report_column`` of the same CSV, per image (joined by the image path);
* DICOM / NIfTI: ``report_csv`` keyed by ``report_key`` — patient id or study id (NIfTI: the case id) — so a
  study's report is shared by every image of the study. One key on several rows is an error unless the rows carry
  the same text.

Encoding: the folder CSV is read as UTF-8 (like the rest of that CSV); a ``report_csv`` in ``report_encoding``
(default ``utf-8``; e.g. ``latin-1`` or ``cp1252`` for older hospital exports). Bytes that are not valid in that
encoding are a :class:`DataError` naming the file, the line and the fix — never a crash or silently replaced
characters. Images without a report are counted (``store.notes``, ``describe()``, ``radssl data inspect``); how
pretraining treats them is the view policy's ``missing_report`` option.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from radssl.data.folder import FolderSourceConfig
from radssl.data.label_table import require_columns, under_root
from radssl.errors import DataError

REPORT_COLUMN = "report"


def _decode(path: Path, encoding: str) -> str:
    """The file's text; a DataError naming the line of the first undecodable byte."""
    if not path.is_file():
        raise DataError(str(path), "report CSV not found", "check the path (a relative path is read inside `root`)")
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(str(path), f"unknown report_encoding '{encoding}'",
                        "use e.g. utf-8, latin-1 or cp1252") from None
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(
            str(path),
            f"line {line}: byte {raw[error.start:error.start + 1]!r} is not valid {encoding} text",
            "re-save the file as UTF-8, or set the source's report_encoding to the file's real encoding "
            "(e.g. latin-1 or cp1252)",
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def read_report_table(path: Path, key_column: str, report_column: str, encoding: str = "utf-8",
                      where: str | None = None) -> dict[str, tuple[str, int]]:
    """{key: (report text, CSV line)} from a CSV; keys and texts stripped; empty keys skipped."""
    path = Path(path)
    reader = csv.DictReader(io.StringIO(_decode(path, encoding), newline=""))
    header = list(reader.fieldnames or [])
    require_columns(where or str(path), header, (key_column, report_column),
                    "fix report_column / the key column name, or the CSV header")
    table: dict[str, tuple[str, int]] = {}
    for row in reader:
        key = (row.get(key_column) or "").strip()
        text = (row.get(report_column) or "").strip()
        if not key:
            continue
        previous = table.get(key)
        if previous is None or (text and not previous[0]):
            table[key] = (text, reader.line_num)
        elif text and text != previous[0]:
            raise DataError(
                str(path),
                f"line {reader.line_num}: '{key}' has a different report on line {previous[1]}",
                "give each key one report (join a study's reports into one text), or key the CSV by study id",
            )
    return table


def report_column_for(paths: np.ndarray, table: Mapping[str, tuple[str, int]]) -> np.ndarray:
    """Reports aligned with ``paths`` (``""`` where the table has none)."""
    return np.asarray([table.get(str(p), ("", 0))[0] for p in paths], dtype=object).astype(str)


def report_counts(reports: np.ndarray) -> dict[str, int]:
    """Images with and without a (non-blank) report."""
    present = np.char.strip(np.asarray(reports).astype(str)) != ""
    return {"with_report": int(present.sum()), "without_report": int((~present).sum())}


def missing_report_note(reports: np.ndarray, how: str) -> str | None:
    """The store note when some images have no report (None when all have one)."""
    counts = report_counts(reports)
    if counts["without_report"] == 0:
        return None
    total = counts["with_report"] + counts["without_report"]
    return (f"{counts['without_report']} of {total} images have no report ({how}); image–text pretraining drops "
            "them or uses them for image-only terms (views.missing_report)")


# ----------------------------------------------------------------------------------------- per source
def source_reports(source: object) -> tuple[dict[str, tuple[str, int]], str] | None:
    """Read a source's reports before any pixel is decoded: (table keyed as :func:`join_reports` expects, key kind).

    ``None`` when the source declares no reports. Key kinds: ``path`` (folder), ``patient_id``, ``study_id``.
    """
    if isinstance(source, FolderSourceConfig):
        if source.report_column is None:
            return None
        if source.csv is None:
            raise DataError(str(source.root), "`report_column` needs a `csv`", "add `csv`, or remove report_column")
        # Keyed by the image path exactly as the folder reader records it (root / relative path).
        raw = read_report_table(source.csv, source.path_column, source.report_column, "utf-8")
        return {str(under_root(source.root, Path(k))): v for k, v in raw.items()}, "path"
    report_csv = getattr(source, "report_csv", None)
    if report_csv is None:
        return None
    key = str(getattr(source, "report_key"))
    column = getattr(source, "report_key_column", None) or key
    table = read_report_table(Path(report_csv), column, str(getattr(source, "report_column")),
                              str(getattr(source, "report_encoding", "utf-8")))
    return table, "study_id" if key == "case_id" else key


def join_reports(meta: Mapping[str, np.ndarray], patient_id: np.ndarray, table: Mapping[str, tuple[str, int]],
                 key_kind: str) -> np.ndarray:
    """``store.meta["report"]``: each image's report through its path, patient id or study id."""
    keys = np.asarray(patient_id) if key_kind == "patient_id" else np.asarray(meta[key_kind])
    return report_column_for(keys, table)
