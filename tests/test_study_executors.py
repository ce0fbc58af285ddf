"""Study executors (issue 18): serial and Ray give the same cells; failed tasks are reported, the rest committed,
and a rerun computes only what is missing. One local Ray instance (2 CPUs) is shared by the Ray tests."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radssl.study.commands import add_study_commands
from radssl.study.config import StudyConfig
from radssl.study.plan import CellTask, PretrainTask, Task, plan_tasks, prepare_study
from radssl.study.results_store import ResultsStore
from radssl.study.runner import StudyIncomplete, run_study
from radssl.study.tasks import execute

QUIET = {"log": lambda _: None}
TRAIN = {"steps": 3, "batch_size": 16, "accelerator": "cpu", "devices": 1, "progress_bar": False,
         "checkpoint_every": 2, "log_every": 1}


def _study(output_dir: Path) -> StudyConfig:
    """The smallest study of tests/test_study_grid.py, one seed: 2 encoders × 3 protocols × 2 fractions × 2 test
    sets = 24 cells in 12 cell tasks + 1 pretraining task. ``threads: 1`` so both executors sum in the same order."""
    return StudyConfig.model_validate({
        "name": "tiny",
        "output_dir": str(output_dir),
        "data": {"source": "synthetic", "n_patients": 40, "images_per_patient": 2, "image_size": 24},
        "external_test_sets": [{"name": "site1", "data": {"source": "synthetic", "n_patients": 12,
                                                          "images_per_patient": 2, "image_size": 24, "site": 1}}],
        "model": {"backbone": "small_cnn"},
        "pretraining": [{"name": "simclr", "optim": {"optimizer": "adamw", "lr": 0.002, "lr_scaling": "none"},
                         "train": TRAIN}],
        "initialisations": ["random", "ssl:simclr"],
        "label_fractions": [0.3, 1.0],
        "seeds": [0],
        "protocols": {"linear": {"Cs": [0.1, 1.0]}, "knn": {"k": 5}, "finetune": {"epochs": 1, "batch_size": 16}},
        "bootstrap_samples": 100,
        "threads": 1,
        "device": "cpu",
    })


def _cells(output_dir: Path) -> dict[str, dict[str, float]]:
    with ResultsStore(output_dir / "results.sqlite") as store:
        table: dict[str, dict[str, float]] = {}
        for row in store.cells("tiny"):
            table.setdefault(row["cell_key"], {})[row["metric"]] = row["value"]
        return table


def _scores(output_dir: Path) -> dict[str, np.ndarray]:
    with ResultsStore(output_dir / "results.sqlite") as store:
        return {key: store.predictions("tiny", key).y_score for key in _cells(output_dir)}


class Recorded:
    """A :data:`~radssl.study.tasks.Work` that logs each execution (one line per task run, in a file: Ray runs it
    in other processes) and kills its own worker process (``os._exit``, no exception, no cleanup) on
    ``die_always`` tasks, and on the first attempt of ``die_once`` tasks."""

    def __init__(self, folder: Path, die_always: tuple[str, ...] = (), die_once: tuple[str, ...] = ()) -> None:
        self.folder, self.die_always, self.die_once = folder, die_always, die_once
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, plan, task: Task, state, log):  # noqa: ANN001, ANN204
        with open(self.folder / "executions.txt", "a") as handle:
            handle.write(task.id + "\n")
        first = self.folder / f"attempted-{hashlib.sha1(task.id.encode()).hexdigest()}"  # no salted hash()
        if task.id in self.die_always or (task.id in self.die_once and not first.exists()):
            first.touch()
            os._exit(3)  # the worker dies mid-task, as under kill -9 or the OOM killer
        return execute(plan, task, state, log)

    def executions(self) -> list[str]:
        path = self.folder / "executions.txt"
        return path.read_text().splitlines() if path.is_file() else []


class Raising(Recorded):
    """Raises (instead of dying) on ``die_always`` tasks: what the serial executor sees of a broken task."""

    def __call__(self, plan, task: Task, state, log):  # noqa: ANN001, ANN204
        if task.id in self.die_always:
            with open(self.folder / "executions.txt", "a") as handle:
                handle.write(task.id + "\n")
            raise RuntimeError(f"simulated failure of {task.id}")
        return super().__call__(plan, task, state, log)


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_study(_study(tmp_path_factory.mktemp("serial") / "study"), **QUIET)


@pytest.fixture(scope="module")
def local_ray():  # noqa: ANN201
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    from radssl.study.executors.ray import start_local_ray

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module
    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _task_ids(config: StudyConfig) -> list[str]:
    plan = prepare_study(config, **QUIET)
    return [task.id for task in plan_tasks(plan, set(), set())]


# ------------------------------------------------------------------------------------------------- Ray
@pytest.mark.slow  # ~30-60 s each on 2 cores: Ray start + a 24-cell study (CI runs slow tests)
def test_ray_gives_the_serial_cells_bit_for_bit(serial_run: Path, local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    node = local_ray._private.worker.global_worker.node
    assert node.node_ip_address == "127.0.0.1"  # a Ray radssl starts itself listens on this machine only
    lines: list[str] = []
    output = run_study(_study(tmp_path / "study"), log=lines.append, executor="ray")
    serial, parallel = _cells(serial_run), _cells(output)
    assert len(serial) == 24 and parallel == serial  # every metric of every cell, exactly
    ours, theirs = _scores(serial_run), _scores(output)
    for key in ours:
        np.testing.assert_array_equal(theirs[key], ours[key], err_msg=key)
    assert (output / "report" / "report.html").is_file()
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 12 and progress[-1].startswith("[24/24]")
    assert all(" running or queued, " in line and " failed, ETA " in line for line in progress)


@pytest.mark.slow  # ~30-60 s each on 2 cores: Ray start + a 24-cell study (CI runs slow tests)
def test_a_killed_ray_worker_is_retried_or_reported_and_the_rerun_computes_only_the_rest(
        serial_run: Path, local_ray, tmp_path: Path) -> None:  # noqa: ANN001
    config = _study(tmp_path / "study")
    ids = _task_ids(config)
    retried = next(i for i in ids if i.startswith("cell:random|finetune"))
    killed = next(i for i in ids if i.startswith("cell:ssl(simclr)|knn"))
    first = Recorded(tmp_path / "first", die_always=(killed,), die_once=(retried,))
    lines: list[str] = []
    with pytest.raises(StudyIncomplete, match="1 task") as info:
        run_study(config, log=lines.append, executor="ray", max_retries=1, work=first)
    assert killed in str(info.value)
    runs = first.executions()
    assert runs.count(retried) == 2 and runs.count(killed) == 2  # each died once and was retried once
    assert sorted(set(runs)) == sorted(ids) and len(runs) == len(ids) + 2  # nothing else ran twice
    assert any(line.startswith(f"radssl study: FAILED {killed}") for line in lines)
    partial = _cells(tmp_path / "study")
    assert set(partial) == {k for k in _cells(serial_run) if not k.startswith("simclr|ssl|knn|lf=0.3|")}
    assert len(partial) == 24 - 2

    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "features").iterdir()}
    second = Recorded(tmp_path / "second")
    run_study(config, executor="ray", work=second, **QUIET)
    # Nothing committed was computed again, not even pretraining; the features task read the disk cache.
    assert sorted(second.executions()) == sorted([killed, "features:ssl(simclr)"])
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "study" / "features").iterdir()} == cached
    assert _cells(tmp_path / "study") == _cells(serial_run)


def test_a_worker_that_cannot_see_the_output_folder_fails_clearly(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from radssl.study.executors.ray import MARKER_FILE, check_shared_folder

    with pytest.raises(RuntimeError, match="filesystem every node sees") as info:
        check_shared_folder(str(tmp_path / "elsewhere"), "token")
    assert str(tmp_path / "elsewhere") in str(info.value)
    (tmp_path / MARKER_FILE).write_text("another run")
    with pytest.raises(RuntimeError, match="filesystem every node sees"):
        check_shared_folder(str(tmp_path), "token")
    (tmp_path / MARKER_FILE).write_text("token")
    check_shared_folder(str(tmp_path), "token")


# ---------------------------------------------------------------------------------------------- serial
def test_serial_reports_a_failed_task_and_its_dependents_commits_the_rest_and_resumes(
        serial_run: Path, tmp_path: Path) -> None:
    config = _study(tmp_path / "study")
    ids = _task_ids(config)
    pretraining = next(i for i in ids if i.startswith("pretrain:"))
    broken = Raising(tmp_path / "first", die_always=(pretraining,))
    lines: list[str] = []
    with pytest.raises(StudyIncomplete, match="simulated failure") as info:
        run_study(config, log=lines.append, work=broken)
    assert "8 task(s) failed (12 cells)" in str(info.value)  # pretraining + its features and 6 cell tasks
    assert sorted(broken.executions()) == sorted(i for i in ids if "ssl(simclr)" not in i)
    assert sum(line.startswith("radssl study: FAILED cell:ssl(simclr)|") for line in lines) == 6
    assert set(_cells(tmp_path / "study")) == {k for k in _cells(serial_run) if k.startswith("none|random|")}

    again = Recorded(tmp_path / "second")
    run_study(config, work=again, **QUIET)
    assert sorted(again.executions()) == sorted(i for i in ids if "random" not in i)
    assert _cells(tmp_path / "study") == _cells(serial_run)


def test_plan_lists_every_task_with_its_dependency_before_compute(tmp_path: Path) -> None:
    plan = prepare_study(_study(tmp_path / "study"), **QUIET)
    tasks = plan_tasks(plan, set(), set())
    ids = [t.id for t in tasks]
    assert ids[:2] == ["features:random", "cell:random|linear|lf=0.3|seed=0"]  # cheap encoders first
    assert [i for i in ids if not i.startswith("cell:")] == ["features:random", "pretrain:simclr",
                                                             "features:ssl(simclr)"]
    assert next(t for t in tasks if t.id == "features:ssl(simclr)").depends_on == ("pretrain:simclr",)
    cells = [t for t in tasks if isinstance(t, CellTask)]
    assert sum(t.cells for t in cells) == len(plan.cell_keys()) == 24
    for task in cells:
        frozen = task.protocol in ("linear", "knn")  # read the features task's cache; fine-tuning the checkpoint
        expected = (f"features:{task.encoder.label}",) if frozen else \
            ("pretrain:simclr",) if task.encoder.init == "ssl" else ()
        assert task.depends_on == expected, task.id
        assert all(ids.index(d) < ids.index(task.id) for d in task.depends_on)
    done = {key.key for key in plan.cell_keys() if key.protocol == "knn"}
    rest = plan_tasks(plan, done, {"simclr"})
    assert not any(isinstance(t, PretrainTask) for t in rest) and len(rest) == 2 + 8
    assert {t.depends_on for t in rest} == {(), ("features:random",), ("features:ssl(simclr)",)}


def test_the_serial_path_never_imports_ray() -> None:
    code = ("import sys; from radssl.study.runner import run_study; from radssl.study.executors import "
            "make_executor; import radssl.cli; make_executor('serial'); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert out.stdout.strip() == "False"


def test_cli_study_takes_executor_and_address() -> None:
    parser = argparse.ArgumentParser(prog="radssl")
    add_study_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["study", "s.yaml", "--executor", "ray", "--address", "auto", "--max-retries", "2"])
    assert (args.executor, args.address, args.max_retries) == ("ray", "auto", 2)
    assert parser.parse_args(["study", "s.yaml"]).executor == "serial"
    with pytest.raises(SystemExit):
        parser.parse_args(["study", "s.yaml", "--executor", "dask"])
    with pytest.raises(Exception, match="--executor ray"):
        run_study(_study(Path("unused")), address="auto", **QUIET)
