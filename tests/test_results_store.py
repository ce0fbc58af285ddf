"""Tests of the resumable SQLite results store."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from radssl.errors import DataError
from radssl.study.results_store import CellKey, ResultsStore

STUDY = "demo"


def _key(**overrides: object) -> CellKey:
    fields = dict(pretrain="simclr", init="ssl", protocol="linear", label_fraction=0.05, pretrain_fraction=1.0,
                  seed=1, test_set="test")
    fields.update(overrides)
    return CellKey(**fields)  # type: ignore[arg-type]


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_cell_key_is_stable_and_validated() -> None:
    key = _key()
    assert key.key == "simclr|ssl|linear|lf=0.05|pf=1.0|seed=1|test"
    assert CellKey.from_key(key.key) == key
    assert _key(label_fraction=np.float32(0.05), seed=np.int64(1)).key == key.key
    assert _key(label_fraction=1).key != key.key
    assert _key(label_fraction=0.0).key.endswith("|lf=0.0|pf=1.0|seed=1|test"), "0: a label-free protocol"
    for bad in (-0.1, 1.5):
        with pytest.raises(DataError, match="label_fraction"):
            _key(label_fraction=bad)
    with pytest.raises(DataError, match="pretrain_fraction"):
        _key(pretrain_fraction=0.0)
    with pytest.raises(DataError, match="without '|'"):
        _key(init="a|b")


def test_recorded_cell_is_done_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 50)
    y_score = rng.random(50)
    with ResultsStore(path) as store:
        assert not store.is_done(STUDY, _key())
        store.record_cell(STUDY, _key(), {"auc": (0.8, 0.7, 0.9), "accuracy": 0.75}, wall_time_s=7200.0,
                          device="cpu", versions={"torch": "2.14.1"}, y_true=y_true, y_score=y_score)
        journal = store._conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"

    with ResultsStore(path) as store:  # a resumed study sees the finished cell and nothing else
        assert store.is_done(STUDY, _key())
        assert store.is_done(STUDY, _key().key)
        assert not store.is_done(STUDY, _key(seed=2))
        assert not store.is_done("other-study", _key())
        assert store.done_keys(STUDY) == {_key().key}
        rows = store.cells(STUDY)
        predictions = store.predictions(STUDY, _key())
    by_metric = {r["metric"]: r for r in rows}
    assert set(by_metric) == {"auc", "accuracy"}
    assert (by_metric["auc"]["value"], by_metric["auc"]["ci_low"], by_metric["auc"]["ci_high"]) == (0.8, 0.7, 0.9)
    assert by_metric["accuracy"]["ci_low"] is None
    assert by_metric["auc"]["device_hours"] == pytest.approx(2.0)
    assert by_metric["auc"]["label_fraction"] == 0.05 and by_metric["auc"]["seed"] == 1
    assert json.loads(by_metric["auc"]["versions_json"]) == {"torch": "2.14.1"}
    assert by_metric["auc"]["has_predictions"] is True
    np.testing.assert_array_equal(predictions.y_true, y_true)
    np.testing.assert_array_equal(predictions.y_score, y_score.astype(np.float32))


def test_exception_inside_record_cell_leaves_no_half_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.sqlite"
    store = ResultsStore(path)
    store.record_cell(STUDY, _key(seed=0), {"auc": 0.7}, 1.0, "cpu", {})

    def crash(*args: object, **kwargs: object) -> None:  # the cell row and metrics are already written
        raise RuntimeError("simulated crash while writing predictions")

    monkeypatch.setattr(store, "_insert_predictions", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        store.record_cell(STUDY, _key(), {"auc": 0.8}, 1.0, "cpu", {}, y_true=[0, 1], y_score=[0.2, 0.9])
    assert not store.is_done(STUDY, _key())
    # Replacing an existing cell that then crashes keeps the old cell intact.
    with pytest.raises(RuntimeError):
        store.record_cell(STUDY, _key(seed=0), {"auc": 0.9}, 1.0, "cpu", {}, y_true=[0, 1], y_score=[0.2, 0.9])
    monkeypatch.undo()
    assert [r["value"] for r in store.cells(STUDY)] == [0.7]
    store.record_cell(STUDY, _key(), {"auc": 0.8}, 1.0, "cpu", {})  # the connection is usable again
    store.close()
    assert _count(path, "cells") == 2 and _count(path, "metrics") == 2 and _count(path, "predictions") == 0


def test_killed_process_mid_transaction_leaves_no_half_cell(tmp_path: Path) -> None:
    """A real crash: the writer process dies (os._exit, no cleanup) after writing half a cell."""
    path = tmp_path / "results.sqlite"
    script = textwrap.dedent(f"""
        import os
        from radssl.study.results_store import CellKey, ResultsStore
        store = ResultsStore({str(path)!r})
        store.record_cell("demo", CellKey("none", "random", "linear", 0.1), {{"auc": 0.6}}, 1.0, "cpu", {{}})
        store._insert_predictions = lambda *a: os._exit(3)
        store.record_cell("demo", CellKey("none", "random", "linear", 0.5), {{"auc": 0.7}}, 1.0, "cpu", {{}},
                          y_true=[0, 1], y_score=[0.1, 0.8])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    with ResultsStore(path) as store:
        assert store.is_done(STUDY, CellKey("none", "random", "linear", 0.1))
        assert not store.is_done(STUDY, CellKey("none", "random", "linear", 0.5))
        assert [r["label_fraction"] for r in store.cells(STUDY)] == [0.1]
    assert _count(path, "metrics") == 1


def test_rerecording_a_cell_replaces_its_metrics(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.record_cell(STUDY, _key(), {"auc": 0.7, "accuracy": 0.6}, 1.0, "cpu", {}, y_true=[0, 1],
                          y_score=[0.3, 0.6])
        store.record_cell(STUDY, _key(), {"auc": 0.75}, 2.0, "cuda:0", {})
        rows = store.cells(STUDY)
        assert [(r["metric"], r["value"], r["device"]) for r in rows] == [("auc", 0.75, "cuda:0")]
        assert store.predictions(STUDY, _key()) is None


def test_multiclass_predictions_round_trip_compactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 300)
    y_score = rng.random((300, 4))
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.record_cell(STUDY, _key(), {"auc": 0.5}, 1.0, "cpu", {}, y_true=y_true, y_score=y_score)
        got = store.predictions(STUDY, _key())
        size = store._conn.execute("SELECT length(y_true) + length(y_score) FROM predictions").fetchone()[0]
    assert got.y_score.shape == (300, 4) and got.y_score.dtype == np.float32
    np.testing.assert_array_equal(got.y_true, y_true)
    np.testing.assert_allclose(got.y_score, y_score, rtol=1e-7)
    assert size == 4 * 300 + 4 * 300 * 4
    with pytest.raises(DataError, match="cases"):
        ResultsStore(tmp_path / "r.sqlite").record_cell(STUDY, _key(), {}, 1.0, "cpu", {}, y_true=[0, 1],
                                                         y_score=[0.5])


def test_study_config_pretrain_runs_and_csv_export(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.save_study_config(STUDY, {"seeds": [0, 1], "label_fractions": [0.01, 1.0]})
        created = store.study_created(STUDY)
        store.save_study_config(STUDY, {"seeds": [0, 1, 2], "label_fractions": [0.01, 1.0]})
        assert store.study_config(STUDY) == {"seeds": [0, 1, 2], "label_fractions": [0.01, 1.0]}
        assert store.study_created(STUDY) == created
        assert store.study_config("missing") is None

        store.record_pretrain_run(STUDY, "simclr", tmp_path / "simclr.ckpt", wall_time_s=1800.0, device="cuda:0",
                                  images_seen=1_000_000, config={"method": "simclr"}, device_hours=2.0)
        assert store.is_pretrain_done(STUDY, "simclr") and not store.is_pretrain_done(STUDY, "byol")
        (run,) = store.pretrain_runs(STUDY)
        assert run["device_hours"] == 2.0 and run["images_seen"] == 1_000_000
        assert json.loads(run["config_json"]) == {"method": "simclr"}

        for seed in (0, 1):
            store.record_cell(STUDY, _key(seed=seed), {"auc": (0.7 + seed / 10, 0.6, 0.9), "accuracy": 0.6},
                              10.0, "cpu", {"radssl": "0.1.0"})
        assert store.studies() == [STUDY]
        out = store.export_csv(STUDY, tmp_path / "out" / "results.csv")
        expected = store.cells(STUDY)
    with out.open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == len(expected) == 4
    assert [(r["seed"], r["metric"], float(r["value"])) for r in rows] == [
        (str(e["seed"]), e["metric"], e["value"]) for e in expected]
    assert not list(out.parent.glob(".*.tmp"))


def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(DataError, match="not-a-db.sqlite"):
        ResultsStore(bad)


def test_per_case_values_primary_metric_and_notes_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    dice = np.array([0.9, 0.5, np.nan, 0.7])
    hd95 = np.array([1.0, 3.5, np.nan, np.inf])
    key = _key(protocol="segmentation_finetune")
    with ResultsStore(path) as store:
        store.save_study_config(STUDY, {"seeds": [1]})
        store.save_study_notes(STUDY, ["data: no patient ids: splits per image, patients may leak"])
        store.record_cell(STUDY, key, {"dice": (0.7, 0.5, 0.9), "hd95": 2.25}, wall_time_s=1.0, device="cpu",
                          versions={}, primary_metric="dice", case_values={"dice": dice, "hd95": hd95})
        with pytest.raises(DataError, match="primary metric 'auc' is not among the metrics"):
            store.record_cell(STUDY, _key(), {"dice": 0.5}, wall_time_s=1.0, device="cpu", versions={},
                              primary_metric="auc")
        with pytest.raises(DataError, match="different lengths"):
            store.record_cell(STUDY, _key(), {"dice": 0.5}, wall_time_s=1.0, device="cpu", versions={},
                              primary_metric="dice", case_values={"dice": dice, "hd95": hd95[:2]})
    with ResultsStore(path) as store:
        values = store.case_values(STUDY, key)
        assert set(values) == {"dice", "hd95"}
        np.testing.assert_array_equal(values["dice"], dice)  # NaN and inf kept bit for bit (float64)
        np.testing.assert_array_equal(values["hd95"], hd95)
        rows = {r["metric"]: r for r in store.cells(STUDY)}
        assert {r["primary_metric"] for r in rows.values()} == {"dice"}
        assert rows["dice"]["has_case_values"] and not rows["dice"]["has_predictions"]
        assert store.study_notes(STUDY) == ["data: no patient ids: splits per image, patients may leak"]
        assert store.study_config(STUDY) == {"seeds": [1]}
        store.record_cell(STUDY, key, {"dice": 0.1}, wall_time_s=1.0, device="cpu", versions={},
                          primary_metric="dice")
        assert store.case_values(STUDY, key) == {}, "re-recording a cell replaces its per-case values too"


_V1_SCHEMA = """
CREATE TABLE studies (study TEXT PRIMARY KEY, config_json TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE cells (study TEXT NOT NULL, cell_key TEXT NOT NULL, pretrain TEXT NOT NULL, init TEXT NOT NULL,
    protocol TEXT NOT NULL, label_fraction REAL NOT NULL, pretrain_fraction REAL NOT NULL, seed INTEGER NOT NULL,
    test_set TEXT NOT NULL, wall_time_s REAL, device TEXT, device_hours REAL, versions_json TEXT,
    finished_at TEXT NOT NULL, PRIMARY KEY (study, cell_key));
CREATE TABLE metrics (study TEXT NOT NULL, cell_key TEXT NOT NULL, metric TEXT NOT NULL, value REAL, ci_low REAL,
    ci_high REAL, PRIMARY KEY (study, cell_key, metric));
CREATE TABLE predictions (study TEXT NOT NULL, cell_key TEXT NOT NULL, y_true BLOB NOT NULL,
    y_true_dtype TEXT NOT NULL, y_true_shape TEXT NOT NULL, y_score BLOB NOT NULL, y_score_shape TEXT NOT NULL,
    PRIMARY KEY (study, cell_key));
CREATE TABLE pretrain_runs (study TEXT NOT NULL, run_name TEXT NOT NULL, checkpoint TEXT, wall_time_s REAL,
    device TEXT, device_hours REAL, images_seen INTEGER, config_json TEXT, finished_at TEXT NOT NULL,
    PRIMARY KEY (study, run_name));
PRAGMA user_version=1;
"""


def test_a_v1_store_is_upgraded_in_place_and_its_cells_read_as_auc(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    key = _key()
    with sqlite3.connect(path) as db:  # a store as radssl 0.1 wrote it (schema v1)
        db.executescript(_V1_SCHEMA)
        db.execute("INSERT INTO studies VALUES (?, '{}', 'then')", (STUDY,))
        db.execute("INSERT INTO cells VALUES (?, ?, 'simclr', 'ssl', 'linear', 0.05, 1.0, 1, 'test', 2.0, 'cpu', "
                   "0.001, '{}', 'then')", (STUDY, key.key))
        db.execute("INSERT INTO metrics VALUES (?, ?, 'auc', 0.8, 0.7, 0.9)", (STUDY, key.key))
    with ResultsStore(path) as store:
        (row,) = store.cells(STUDY)
        assert row["primary_metric"] == "auc" and row["value"] == 0.8 and not row["has_case_values"]
        assert store.study_notes(STUDY) == [] and store.case_values(STUDY, key) == {}
        store.record_cell(STUDY, _key(seed=2), {"auc": 0.7}, wall_time_s=1.0, device="cpu", versions={})
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        db.execute("PRAGMA user_version=99")
    with pytest.raises(DataError, match="schema v99 is newer than this radssl"):
        ResultsStore(path)
