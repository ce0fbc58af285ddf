"""Resumable SQLite store of a study's finished cells, metrics, per-case predictions and pretraining runs.

Why SQLite: one file, ACID transactions from the standard library, and every table or plot of the
report is a query. A cell (one pretraining run x init x protocol x label fraction x pretraining fraction
x seed x test set) is written in ONE transaction together with its metrics and its test predictions, so
a study killed at any moment holds only whole cells; rerunning the grid skips them (``is_done``).

WAL journal mode lets the report (a reader) run while the grid (a writer) is still filling the store;
``synchronous=FULL`` makes a committed cell survive a power cut, which costs nothing next to a cell's
minutes of training. Per-case predictions are stored as little-endian float32/int32 blobs (4 bytes per
value) because paired DeLong tests between initialisations need the scores of the same test cases; protocols
whose metric is a mean over cases (segmentation: each case's Dice, HD95) store their per-case values instead
(``case_values``), which paired bootstraps and Wilcoxon tests need in the same way.

Each cell records its protocol's primary metric (``primary_metric``: ``auc``, ``dice``, …) so the report and the
statistics follow the task. Schema history: v1 (radssl ≤ 0.1: classification only, no ``primary_metric``, no
``case_values``, no study notes) is upgraded in place when opened — its cells read as ``auc`` cells; a store
written by a newer radssl is refused with a clear message.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from radssl.atomic import write_text_atomic
from radssl.errors import DataError

__all__ = ["CellKey", "Predictions", "ResultsStore"]

SCHEMA_VERSION = 2
LEGACY_PRIMARY_METRIC = "auc"
"""The primary metric of cells stored before ``primary_metric`` existed (schema v1: classification only)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    created TEXT NOT NULL,
    notes_json TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    study TEXT NOT NULL,
    cell_key TEXT NOT NULL,
    pretrain TEXT NOT NULL,
    init TEXT NOT NULL,
    protocol TEXT NOT NULL,
    label_fraction REAL NOT NULL,
    pretrain_fraction REAL NOT NULL,
    seed INTEGER NOT NULL,
    test_set TEXT NOT NULL,
    wall_time_s REAL,
    device TEXT,
    device_hours REAL,
    versions_json TEXT,
    finished_at TEXT NOT NULL,
    primary_metric TEXT,
    PRIMARY KEY (study, cell_key)
);
CREATE TABLE IF NOT EXISTS metrics (
    study TEXT NOT NULL,
    cell_key TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    ci_low REAL,
    ci_high REAL,
    PRIMARY KEY (study, cell_key, metric)
);
CREATE TABLE IF NOT EXISTS predictions (
    study TEXT NOT NULL,
    cell_key TEXT NOT NULL,
    y_true BLOB NOT NULL,
    y_true_dtype TEXT NOT NULL,
    y_true_shape TEXT NOT NULL,
    y_score BLOB NOT NULL,
    y_score_shape TEXT NOT NULL,
    PRIMARY KEY (study, cell_key)
);
CREATE TABLE IF NOT EXISTS case_values (
    study TEXT NOT NULL,
    cell_key TEXT NOT NULL,
    metric TEXT NOT NULL,
    vals BLOB NOT NULL,
    PRIMARY KEY (study, cell_key, metric)
);
CREATE TABLE IF NOT EXISTS pretrain_runs (
    study TEXT NOT NULL,
    run_name TEXT NOT NULL,
    checkpoint TEXT,
    wall_time_s REAL,
    device TEXT,
    device_hours REAL,
    images_seen INTEGER,
    config_json TEXT,
    finished_at TEXT NOT NULL,
    PRIMARY KEY (study, run_name)
);
"""

_CELL_COLUMNS = ("pretrain", "init", "protocol", "label_fraction", "pretrain_fraction", "seed", "test_set")
_ADDED_COLUMNS = {"cells": ("primary_metric", "TEXT"), "studies": ("notes_json", "TEXT")}
"""Columns schema v2 added to v1 tables (``ALTER TABLE`` on upgrade)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _json(value: Any) -> str:
    """Stable JSON (sorted keys); numpy scalars and Paths become plain values / strings."""

    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        return str(obj)

    return json.dumps(value, sort_keys=True, default=default)


@dataclass(frozen=True)
class CellKey:
    """Coordinates of one cell of the study grid; ``.key`` is its stable string id in the store.

    ``pretrain`` names the SSL pretraining run the encoder came from; use ``"none"`` for inits that use
    no pretraining run (random, imagenet). Floats are normalised and written with ``repr`` so the
    same cell always gets the same key (0.1 -> "0.1", 1 -> "1.0"). ``label_fraction`` 0 marks a label-free
    protocol (zero-shot), which uses no training labels at all.
    """

    pretrain: str
    init: str
    protocol: str
    label_fraction: float
    pretrain_fraction: float = 1.0
    seed: int = 0
    test_set: str = "test"

    def __post_init__(self) -> None:
        for name in ("pretrain", "init", "protocol", "test_set"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or "|" in value:
                raise DataError("CellKey", f"field {name}={value!r} must be a non-empty string without '|'",
                                f"pass a plain name for {name}, e.g. 'none', 'random', 'linear', 'test'")
        for name in ("label_fraction", "pretrain_fraction"):
            # 6 significant digits: np.float32(0.05) and 0.05 name the same cell (float32 holds ~7).
            value = float(f"{float(getattr(self, name)):.6g}")
            low_ok = value >= 0.0 if name == "label_fraction" else value > 0.0
            if not (low_ok and value <= 1.0):
                span = "[0, 1] (0: a label-free protocol)" if name == "label_fraction" else "(0, 1]"
                raise DataError("CellKey", f"field {name}={value} is outside {span}", "pass a fraction such as 0.05")
            object.__setattr__(self, name, value)
        if float(self.seed) != int(self.seed):
            raise DataError("CellKey", f"field seed={self.seed!r} is not an integer")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def key(self) -> str:
        return (f"{self.pretrain}|{self.init}|{self.protocol}|lf={self.label_fraction!r}"
                f"|pf={self.pretrain_fraction!r}|seed={self.seed}|{self.test_set}")

    @classmethod
    def from_key(cls, key: str) -> CellKey:
        """Inverse of ``.key``."""
        try:
            pretrain, init, protocol, lf, pf, seed, test_set = key.split("|")
            return cls(pretrain, init, protocol, float(lf.removeprefix("lf=")), float(pf.removeprefix("pf=")),
                       int(seed.removeprefix("seed=")), test_set)
        except ValueError as error:
            raise DataError("CellKey", f"cannot parse cell key {key!r}: {error}") from error

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CellKey:
        """The key of a row from :meth:`ResultsStore.cells`."""
        return cls(**{name: row[name] for name in _CELL_COLUMNS})


class Predictions(NamedTuple):
    """Per-case test labels and scores of one cell, in the test set's fixed case order."""

    y_true: np.ndarray
    y_score: np.ndarray


MetricValue = float | tuple[float, float | None, float | None]


def _metric_triple(name: str, value: MetricValue) -> tuple[float | None, float | None, float | None]:
    triple = tuple(value) if isinstance(value, (tuple, list)) else (value, None, None)
    if len(triple) != 3:
        raise DataError("record_cell metrics", f"metric {name!r}: expected (value, ci_low, ci_high), got {value!r}")

    def clean(x: Any) -> float | None:
        if x is None:
            return None
        x = float(x)
        return None if math.isnan(x) else x  # SQLite has no NaN; NULL means "not available"

    return clean(triple[0]), clean(triple[1]), clean(triple[2])


def _key_of(key: CellKey | str) -> str:
    return key.key if isinstance(key, CellKey) else CellKey.from_key(key).key


class ResultsStore:
    """A study results database (one SQLite file, many studies). Use as a context manager or call close()."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves so one cell is exactly one transaction.
            self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            with self._transaction():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise DataError(str(self.path), f"results store schema v{version} is newer than this radssl "
                                    f"(v{SCHEMA_VERSION})", "upgrade radssl to read this store")
                self._upgrade()
                if version < SCHEMA_VERSION:
                    self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as error:
            raise DataError(str(self.path), f"not a readable results store ({error})",
                            "point to a radssl results .sqlite file or a new path") from error

    # -- plumbing --------------------------------------------------------------------------------------

    def _upgrade(self) -> None:
        """Add the columns a v1 store lacks (its cells are classification cells: primary metric ``auc``)."""
        for table, (column, kind) in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (all or nothing)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- studies ---------------------------------------------------------------------------------------

    def save_study_config(self, study: str, config: Mapping[str, Any]) -> None:
        """Record (or replace) the study's exact configuration; ``created`` keeps the first save's time.

        Replacing lets a study grow (more seeds, another test set) and resume. A grid runner that wants
        to refuse a changed config compares :meth:`study_config` first.
        """
        with self._transaction() as db:
            db.execute("INSERT INTO studies(study, config_json, created) VALUES (?, ?, ?) "
                       "ON CONFLICT(study) DO UPDATE SET config_json = excluded.config_json",
                       (study, _json(dict(config)), _now()))

    def study_config(self, study: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT config_json FROM studies WHERE study = ?", (study,)).fetchone()
        return None if row is None else json.loads(row["config_json"])

    def save_study_notes(self, study: str, notes: list[str]) -> None:
        """Record the study's data caveats and plan notes (shown by the report); replaces earlier notes."""
        with self._transaction() as db:
            db.execute("INSERT INTO studies(study, config_json, created, notes_json) VALUES (?, '{}', ?, ?) "
                       "ON CONFLICT(study) DO UPDATE SET notes_json = excluded.notes_json",
                       (study, _now(), _json([str(n) for n in notes])))

    def study_notes(self, study: str) -> list[str]:
        row = self._conn.execute("SELECT notes_json FROM studies WHERE study = ?", (study,)).fetchone()
        return [] if row is None or row["notes_json"] is None else list(json.loads(row["notes_json"]))

    def study_created(self, study: str) -> str | None:
        row = self._conn.execute("SELECT created FROM studies WHERE study = ?", (study,)).fetchone()
        return None if row is None else row["created"]

    def studies(self) -> list[str]:
        """Names of all studies with a saved config or at least one cell."""
        rows = self._conn.execute("SELECT study FROM studies UNION SELECT DISTINCT study FROM cells ORDER BY 1")
        return [r[0] for r in rows]

    # -- cells -----------------------------------------------------------------------------------------

    def is_done(self, study: str, key: CellKey | str) -> bool:
        """True when the cell was committed (with its metrics and predictions)."""
        row = self._conn.execute("SELECT 1 FROM cells WHERE study = ? AND cell_key = ?",
                                 (study, _key_of(key))).fetchone()
        return row is not None

    def done_keys(self, study: str) -> set[str]:
        """All finished cell keys of a study (one query, for a grid runner planning a resume)."""
        return {r[0] for r in self._conn.execute("SELECT cell_key FROM cells WHERE study = ?", (study,))}

    def record_cell(self, study: str, key: CellKey, metrics: Mapping[str, MetricValue], wall_time_s: float,
                    device: str, versions: Mapping[str, Any], y_true: Any = None, y_score: Any = None,
                    device_hours: float | None = None, primary_metric: str | None = None,
                    case_values: Mapping[str, Any] | None = None) -> None:
        """Write one finished cell, its metrics and (optionally) its per-case outputs atomically.

        ``metrics`` maps name -> (value, ci_low, ci_high) (a bare float means no CI). ``device_hours``
        defaults to ``wall_time_s / 3600`` (one device); pass it for multi-device cells. ``primary_metric``
        names the cell's main metric (default ``auc``; it must be one of ``metrics``). Per-case outputs are
        ``y_true``/``y_score`` (classification scores) and/or ``case_values`` (metric name → one value per
        case, e.g. each case's Dice; NaN where undefined). Recording a cell that already exists replaces it
        (and its metrics and per-case outputs) in the same transaction.
        """
        if not isinstance(key, CellKey):
            raise DataError("record_cell", f"key must be a CellKey, got {type(key).__name__}",
                            "build it with CellKey(pretrain, init, protocol, label_fraction, ...)")
        triples = {str(name): _metric_triple(name, value) for name, value in metrics.items()}
        prediction_row = None
        if (y_true is None) != (y_score is None):
            raise DataError("record_cell", "pass both y_true and y_score, or neither")
        if y_true is not None:
            prediction_row = self._encode_predictions(key, y_true, y_score)
        primary = primary_metric or LEGACY_PRIMARY_METRIC
        if primary_metric is not None and primary not in triples:
            raise DataError(f"record_cell {key.key}", f"primary metric {primary!r} is not among the metrics "
                            f"{sorted(triples)}", "record the primary metric's value with the cell")
        values_rows = self._encode_case_values(key, case_values or {})
        hours = wall_time_s / 3600.0 if device_hours is None else device_hours
        with self._transaction() as db:
            self._delete_cell(db, study, key.key)
            db.execute(
                "INSERT INTO cells(study, cell_key, pretrain, init, protocol, label_fraction, pretrain_fraction, "
                "seed, test_set, wall_time_s, device, device_hours, versions_json, finished_at, primary_metric) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study, key.key, *(getattr(key, c) for c in _CELL_COLUMNS), float(wall_time_s), device,
                 float(hours), _json(dict(versions)), _now(), primary))
            self._insert_metrics(db, study, key.key, triples)
            if prediction_row is not None:
                self._insert_predictions(db, study, key.key, prediction_row)
            db.executemany("INSERT INTO case_values(study, cell_key, metric, vals) VALUES (?, ?, ?, ?)",
                           [(study, key.key, name, blob) for name, blob in values_rows])

    @staticmethod
    def _encode_case_values(key: CellKey, case_values: Mapping[str, Any]) -> list[tuple[str, bytes]]:
        """Per-case values as float64 blobs (NaN kept: "undefined for this case"); equal lengths required."""
        rows, lengths = [], set()
        for name, values in case_values.items():
            array = np.asarray(values, dtype=np.float64)
            if array.ndim != 1:
                raise DataError(f"record_cell {key.key}", f"case values {name!r} have shape {array.shape}",
                                "pass one value per test case")
            lengths.add(array.size)
            rows.append((str(name), array.astype("<f8").tobytes()))
        if len(lengths) > 1:
            raise DataError(f"record_cell {key.key}", f"case values have different lengths {sorted(lengths)}",
                            "pass one value per test case for every metric, in the same case order")
        return rows

    def case_values(self, study: str, key: CellKey | str) -> dict[str, np.ndarray]:
        """Per-case metric values of a cell (metric name → (cases,) float64, NaN where undefined); {} if none."""
        rows = self._conn.execute("SELECT metric, vals FROM case_values WHERE study = ? AND cell_key = ? "
                                  "ORDER BY metric", (study, _key_of(key)))
        return {r["metric"]: np.frombuffer(r["vals"], dtype="<f8").copy() for r in rows}

    @staticmethod
    def _delete_cell(db: sqlite3.Connection, study: str, cell_key: str) -> None:
        for table in ("cells", "metrics", "predictions", "case_values"):
            db.execute(f"DELETE FROM {table} WHERE study = ? AND cell_key = ?", (study, cell_key))

    @staticmethod
    def _insert_metrics(db: sqlite3.Connection, study: str, cell_key: str,
                        triples: Mapping[str, tuple[float | None, float | None, float | None]]) -> None:
        db.executemany("INSERT INTO metrics(study, cell_key, metric, value, ci_low, ci_high) VALUES (?, ?, ?, ?, ?, ?)",
                       [(study, cell_key, name, *triple) for name, triple in triples.items()])

    @staticmethod
    def _encode_predictions(key: CellKey, y_true: Any, y_score: Any) -> tuple[bytes, str, str, bytes, str]:
        t = np.asarray(y_true)
        s = np.asarray(y_score, dtype=np.float32)
        if t.shape[0] != s.shape[0]:
            raise DataError(f"record_cell {key.key}", f"y_true has {t.shape[0]} cases but y_score has {s.shape[0]}",
                            "pass the scores of the same test cases in the same order")
        integral = t.dtype.kind in "biu" or (t.dtype.kind == "f" and np.all(t == np.round(t))
                                               and np.all(np.abs(t) < 2**31))
        t = t.astype("<i4") if integral else t.astype("<f4")
        return (t.tobytes(), t.dtype.str, _json(list(t.shape)), s.astype("<f4").tobytes(), _json(list(s.shape)))

    @staticmethod
    def _insert_predictions(db: sqlite3.Connection, study: str, cell_key: str,
                            row: tuple[bytes, str, str, bytes, str]) -> None:
        db.execute("INSERT INTO predictions(study, cell_key, y_true, y_true_dtype, y_true_shape, y_score, "
                   "y_score_shape) VALUES (?, ?, ?, ?, ?, ?, ?)", (study, cell_key, *row))

    def predictions(self, study: str, key: CellKey | str) -> Predictions | None:
        """Per-case (y_true, y_score) of a cell, or None if the cell stored none."""
        row = self._conn.execute("SELECT * FROM predictions WHERE study = ? AND cell_key = ?",
                                 (study, _key_of(key))).fetchone()
        if row is None:
            return None
        y_true = np.frombuffer(row["y_true"], dtype=row["y_true_dtype"]).reshape(json.loads(row["y_true_shape"]))
        y_score = np.frombuffer(row["y_score"], dtype="<f4").reshape(json.loads(row["y_score_shape"]))
        return Predictions(y_true.copy(), y_score.copy())

    def cells(self, study: str) -> list[dict[str, Any]]:
        """Flat long-format rows: one per (cell, metric), cell columns + metric, value, ci_low, ci_high.

        A cell recorded without metrics appears once with ``metric`` None. ``primary_metric`` is the cell's main
        metric (``auc`` for cells stored before it was recorded); ``has_case_values`` says whether per-case values
        of *this row's* metric are stored.
        """
        rows = self._conn.execute(
            "SELECT c.study, c.cell_key, c.pretrain, c.init, c.protocol, c.label_fraction, c.pretrain_fraction, "
            "c.seed, c.test_set, c.wall_time_s, c.device, c.device_hours, c.versions_json, c.finished_at, "
            f"COALESCE(c.primary_metric, '{LEGACY_PRIMARY_METRIC}') AS primary_metric, "
            "m.metric, m.value, m.ci_low, m.ci_high, "
            "EXISTS(SELECT 1 FROM predictions p WHERE p.study = c.study AND p.cell_key = c.cell_key) "
            "AS has_predictions, "
            "EXISTS(SELECT 1 FROM case_values v WHERE v.study = c.study AND v.cell_key = c.cell_key "
            "AND v.metric = m.metric) AS has_case_values "
            "FROM cells c LEFT JOIN metrics m ON m.study = c.study AND m.cell_key = c.cell_key "
            "WHERE c.study = ? ORDER BY c.pretrain, c.init, c.protocol, c.test_set, c.label_fraction, "
            "c.pretrain_fraction, c.seed, m.metric", (study,))
        out = []
        for row in rows:
            record = dict(row)
            record["has_predictions"] = bool(record["has_predictions"])
            record["has_case_values"] = bool(record["has_case_values"])
            out.append(record)
        return out

    # -- pretraining runs --------------------------------------------------------------------------------

    def record_pretrain_run(self, study: str, run_name: str, checkpoint: str | Path | None, wall_time_s: float,
                            device: str, images_seen: int | None = None,
                            config: Mapping[str, Any] | None = None, device_hours: float | None = None) -> None:
        """Record (or replace) a finished SSL pretraining run; ``device_hours`` defaults to wall time x 1 device."""
        hours = wall_time_s / 3600.0 if device_hours is None else device_hours
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO pretrain_runs(study, run_name, checkpoint, wall_time_s, device, device_hours, "
                "images_seen, config_json, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study, run_name, None if checkpoint is None else str(checkpoint), float(wall_time_s), device,
                 float(hours), None if images_seen is None else int(images_seen),
                 _json(dict(config or {})), _now()))

    def is_pretrain_done(self, study: str, run_name: str) -> bool:
        row = self._conn.execute("SELECT 1 FROM pretrain_runs WHERE study = ? AND run_name = ?",
                                 (study, run_name)).fetchone()
        return row is not None

    def pretrain_runs(self, study: str) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT * FROM pretrain_runs WHERE study = ? ORDER BY run_name", (study,))
        return [dict(r) for r in rows]

    # -- export ----------------------------------------------------------------------------------------

    def export_csv(self, study: str, path: str | Path) -> Path:
        """Write :meth:`cells` as CSV (atomically) and return the path."""
        rows = self.cells(study)
        columns = list(rows[0]) if rows else ["study", "cell_key", *_CELL_COLUMNS, "wall_time_s", "device",
                                              "device_hours", "versions_json", "finished_at", "primary_metric",
                                              "metric", "value", "ci_low", "ci_high", "has_predictions",
                                              "has_case_values"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        path = Path(path)
        write_text_atomic(path, buffer.getvalue())
        return path

