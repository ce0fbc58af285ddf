"""Real interruptions: ``kill -9`` a running ``radssl pretrain`` / ``radssl study``, rerun the same command, and
compare with an uninterrupted run.

The in-process resume tests stop a run with an exception; these kill the process with SIGKILL, so nothing of
it gets to clean up — what is on disk (atomic checkpoints, committed SQLite cells) is all a rerun has. Tiny
offline settings: the synthetic source at 32 px, ``small_cnn``, one thread.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # three subprocess runs each (Python + torch start-up dominates): ~20-60 s per test

KILL_TIMEOUT_S = 300.0
"""Give up waiting for the kill point after this long (a guard against hanging, not a speed assert)."""

PRETRAIN_STEPS = 30
PRETRAIN = [
    "data.source=synthetic", "data.n_patients=16", "data.images_per_patient=4", "data.image_size=32",
    "model.backbone=small_cnn", "optim.optimizer=adamw", "optim.lr=0.001", "optim.lr_scaling=none",
    f"train.steps={PRETRAIN_STEPS}", "train.batch_size=16", "train.checkpoint_every=3", "train.log_every=3",
    "train.accelerator=cpu", "train.threads=1", "train.progress_bar=false", "eval.enabled=false",
]

STUDY_YAML = """\
name: killed
seed: 0
data: {source: synthetic, n_patients: 24, images_per_patient: 2, image_size: 32}
model: {backbone: small_cnn}
pretraining:
  - name: simclr
    optim: {optimizer: adamw, lr: 0.001, lr_scaling: none}
    train: {steps: 20, batch_size: 16, accelerator: cpu, threads: 1, progress_bar: false, checkpoint_every: 10}
initialisations: [random, ssl:simclr]
label_fractions: [0.5, 1.0]
seeds: [0, 1]
protocols: {linear: {}, finetune: {epochs: 2, batch_size: 16}}
bootstrap_samples: 100
device: cpu
threads: 1
"""
STUDY_CELLS = 2 * 2 * 2 * 2  # initialisations × fractions × seeds × protocols (internal test set only)


def _radssl(*args: str) -> list[str]:
    return [sys.executable, "-m", "radssl.cli", *args]


def _environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _run(command: list[str], log: Path) -> str:
    """Run to completion; its combined output (the test fails, showing it, on a non-zero exit)."""
    with open(log, "w") as stream:
        code = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=_environment()).returncode
    output = log.read_text()
    assert code == 0, f"{' '.join(command)} exited {code}:\n{output[-3000:]}"
    return output


def _run_and_kill(command: list[str], log: Path, ready: Callable[[], bool]) -> None:
    """Start ``command``, wait until ``ready()``, then SIGKILL it (no handler, no clean-up runs)."""
    with open(log, "w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=_environment())
        deadline = time.monotonic() + KILL_TIMEOUT_S
        try:
            while not ready():
                if process.poll() is not None:
                    pytest.fail(f"the run ended (exit {process.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"no kill point within {KILL_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL


# ----------------------------------------------------------------------------------------- pretraining
def _loss_by_step(run: Path) -> dict[str, str]:
    """metrics.csv as {step: loss text}; a step logged twice would be a re-computed (or duplicated) step."""
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    step, loss = header.index("step"), header.index("loss")
    rows = [line.split(",") for line in lines[1:]]
    steps = [row[step] for row in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice in {run / 'metrics.csv'}: {steps}"
    return {row[step]: row[loss] for row in rows}


def test_pretrain_killed_after_a_checkpoint_resumes_to_identical_weights(tmp_path: Path) -> None:
    reference = tmp_path / "uninterrupted"
    _run(_radssl("pretrain", "--output-dir", str(reference), *PRETRAIN), tmp_path / "reference.log")

    run = tmp_path / "killed"
    command = _radssl("pretrain", "--output-dir", str(run), *PRETRAIN)
    last = run / "checkpoints" / "last.pt"
    _run_and_kill(command, tmp_path / "killed.log", ready=last.is_file)  # checkpoints are written atomically
    killed_at = int(torch.load(last, weights_only=True)["step"])
    assert 0 < killed_at < PRETRAIN_STEPS and not (run / "checkpoints" / "final.pt").exists(), (
        f"killed at step {killed_at}: the kill must land between the first checkpoint and the end"
    )

    output = _run(command, tmp_path / "rerun.log")
    resumed = re.findall(r"radssl: resuming from step (\d+) \((.+)\)", output)
    assert resumed, f"the rerun printed no 'radssl: resuming from step N (path)' line:\n{output[-3000:]}"
    step, path = int(resumed[0][0]), Path(resumed[0][1])
    # it resumed where the killed run's last checkpoint was, not from 0 (a restart would be deterministic too)
    assert step == killed_at and path.resolve() == last.resolve()

    final = torch.load(run / "checkpoints" / "final.pt", weights_only=True)
    expected = torch.load(reference / "checkpoints" / "final.pt", weights_only=True)
    assert final["step"] == expected["step"] == PRETRAIN_STEPS
    assert final["backbone"].keys() == expected["backbone"].keys()
    for name, tensor in expected["backbone"].items():
        assert torch.equal(final["backbone"][name], tensor), f"backbone tensor {name} differs after resume"
    assert _loss_by_step(run) == _loss_by_step(reference)  # every logged loss, before and after the kill


# ----------------------------------------------------------------------------------------- study
def _cells(results: Path) -> int:
    """Finished cells in a study's results store (0 while it does not exist yet); read-only, never blocks it."""
    if not results.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{results}?mode=ro", uri=True, timeout=0.1) as db:
            return int(db.execute("SELECT COUNT(*) FROM cells").fetchone()[0])
    except sqlite3.Error:
        return 0  # schema not written yet, or the writer holds the lock for a moment


def _table(results: Path) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(cell, metric) → (value, CI low, CI high), NaN as a string so that equal NaNs compare equal."""
    def norm(x: float | None) -> float | str | None:
        return "nan" if x is not None and math.isnan(x) else x

    with sqlite3.connect(results) as db:
        rows = db.execute("SELECT cell_key, metric, value, ci_low, ci_high FROM metrics").fetchall()
    return {(key, metric): (norm(v), norm(lo), norm(hi)) for key, metric, v, lo, hi in rows}


def _cell_stamps(results: Path) -> dict[str, tuple[float, str]]:
    """cell → (measured wall time, finished at): a cell computed again would not keep both."""
    with sqlite3.connect(results) as db:
        rows = db.execute("SELECT cell_key, wall_time_s, finished_at FROM cells").fetchall()
    return {key: (wall, finished) for key, wall, finished in rows}


def test_study_killed_between_cells_resumes_to_the_same_results(tmp_path: Path) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(STUDY_YAML)
    reference = tmp_path / "uninterrupted"
    _run(_radssl("study", str(config), "--output-dir", str(reference)), tmp_path / "reference.log")
    expected = _table(reference / "results.sqlite")
    assert len({key for key, _ in expected}) == STUDY_CELLS

    study = tmp_path / "killed"
    command = _radssl("study", str(config), "--output-dir", str(study))
    results = study / "results.sqlite"
    _run_and_kill(command, tmp_path / "killed.log", ready=lambda: _cells(results) >= 1)
    before = _cell_stamps(results)
    assert 1 <= len(before) < STUDY_CELLS, f"{len(before)} cells were done at the kill; it must land mid-study"

    _run(command, tmp_path / "rerun.log")
    after = _cell_stamps(results)
    assert len(after) == STUDY_CELLS
    assert {key: after[key] for key in before} == before, "cells finished before the kill were computed again"
    assert _table(results) == expected
    assert (study / "report" / "report.html").is_file()
