"""Run a study plan: hand its tasks to an executor and commit each result as it comes back; the driver side.

How a study runs (:func:`run_study`):
1. :func:`~radssl.study.plan.prepare_study` checks everything before any compute (see :mod:`radssl.study.plan`).
2. Label-fraction subsets (nested, stratified, per seed) are written to ``subsets/seed{n}.json``.
3. :func:`~radssl.study.plan.plan_tasks` lists what is left: pretraining runs not yet finished, and the cell
   tasks (one protocol run of one encoder at one seed and label fraction) whose cells the store lacks.
4. An executor runs them — ``serial`` (this process, the default) or ``ray`` (Ray tasks on this machine or a
   cluster). A task returns its records; this process alone writes ``results.sqlite``: each finished cell is
   committed at once (metrics with bootstrap CIs, per-case predictions, wall time, device, versions), so a killed
   study loses at most the cells in flight, and rerunning skips every committed cell and finished pretraining run.
   Frozen features are extracted once per (backbone weights, data) by a features task, into the on-disk
   :class:`~radssl.transfer.features.FeatureCache` under ``features/``, which the cells then read.
5. A task that fails (after the executor's retries) is reported, with the tasks that depend on it; the others
   still run and are committed, and the study then stops with :class:`StudyIncomplete` — rerun to resume.
6. The HTML report is rendered into ``<output_dir>/report/``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError

from radssl.atomic import write_text_atomic
from radssl.config import apply_overrides, dump_config, format_validation_error
from radssl.data.splits import save_subsets
from radssl.errors import ConfigError, DataError, RadsslError
from radssl.study.config import StudyConfig, apply_named_override, load_study_config
from radssl.study.executors import make_executor
from radssl.study.plan import Log, StudyPlan, Task, _check_compatible, plan_tasks, prepare_study, print_log
from radssl.study.report import render_report
from radssl.study.results_store import ResultsStore
from radssl.study.tasks import CellResult, FeaturesRecord, PretrainRecord, TaskResult, Work, execute

__all__ = ["REPORT_DIR", "RESULTS_FILE", "StudyIncomplete", "run_study"]

RESULTS_FILE = "results.sqlite"
REPORT_DIR = "report"


class StudyIncomplete(RadsslError):
    """Some tasks failed; every other cell is committed and rerunning the same command resumes the study."""


def _load(config: StudyConfig | str | Path, overrides: list[str] | None) -> StudyConfig:
    if not isinstance(config, StudyConfig):
        return load_study_config(Path(config), overrides)
    if not overrides:
        return config
    raw = config.to_dict()
    plain = [text for text in overrides if not apply_named_override(raw, text)]
    apply_overrides(raw, plain)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, f"study '{config.name}'", StudyConfig, raw)) from None


def _save_subsets(plan: StudyPlan, directory: Path) -> None:
    fingerprint = plan.store.fingerprint()
    for seed, subsets in plan.subsets.items():
        path = directory / f"seed{seed}.json"
        if path.is_file():
            previous = json.loads(path.read_text()).get("meta", {}).get("data_fingerprint")
            if previous != fingerprint:
                raise DataError(str(path), f"was drawn from different data (fingerprint {str(previous)[:12]}… vs "
                                f"{fingerprint[:12]}…)", "the study data changed: use a new output_dir")
        save_subsets(path, subsets, {"seed": seed, "data": plan.store.name, "data_fingerprint": fingerprint,
                                     "train_images": int(len(plan.train_rows))})
        if seed in plan.val_subsets:  # proportional validation rows of each label fraction
            save_subsets(directory / f"val_seed{seed}.json", plan.val_subsets[seed],
                         {"seed": seed, "data": plan.store.name, "data_fingerprint": fingerprint,
                          "val_images": int(len(plan.val_rows)), "validation": plan.config.validation,
                          "validation_min_per_class": plan.config.validation_min_per_class})


def _rules_line(plan: StudyPlan) -> str:
    """The comparison rules in one line (also stated in the report's "How the numbers were made")."""
    config = plan.config
    if config.validation == "proportional":
        rule = f"validation: proportional (same fraction of {len(plan.val_rows)} images, ≥ " \
               f"{config.validation_min_per_class} per class)"
    else:
        rule = f"validation: full ({len(plan.val_rows)} images for every fraction)"
    for protocol in plan.protocols.values():
        text = protocol.rules(len(plan.train_rows))
        if text:
            rule += f"; {text}"
    return rule


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class _Driver:
    """The executor's :class:`~radssl.study.executors.TaskEvents`: commits records and prints progress lines."""

    def __init__(self, plan: StudyPlan, results: ResultsStore, log: Log, total: int, done: int) -> None:
        self.plan, self.results, self.log = plan, results, log
        self.total, self.done, self.done_at_start = total, done, done
        self.running = 0
        self.failures: list[tuple[Task, str]] = []
        self.failed_cells = 0
        self.started_at = time.perf_counter()

    def started(self, task: Task) -> None:
        """Handed to a worker (Ray: submitted; it may wait in Ray's queue for free resources)."""
        self.running += 1

    def _status(self) -> str:
        computed = self.done - self.done_at_start
        left = self.total - self.done - self.failed_cells
        elapsed = time.perf_counter() - self.started_at
        eta = _duration(elapsed / computed * left) if computed and left else ("0m00s" if not left else "?")
        return f"{self.running} running or queued, {len(self.failures)} failed, ETA {eta}"

    def finished(self, task: Task, result: TaskResult) -> None:
        self.running -= 1
        name = self.plan.config.name
        if isinstance(result, PretrainRecord):
            self.results.record_pretrain_run(name, result.run_name, result.checkpoint, wall_time_s=result.wall_time_s,
                                             device=result.device, images_seen=result.images_seen,
                                             config=result.config, device_hours=result.device_hours)
            self.log(f"radssl study: pretraining '{result.run_name}' done in {result.wall_time_s:.0f} s "
                     f"({self._status()})")
            return
        if isinstance(result, FeaturesRecord):
            self.log(f"radssl study: features of {result.encoder} ready ({result.extracted} stores extracted, "
                     f"{result.wall_time_s:.1f} s; {self._status()})")
            return
        assert isinstance(result, CellResult)
        for record in result.records:
            self.results.record_cell(name, record.key, record.metrics, wall_time_s=record.wall_time_s,
                                     device=record.device, versions=record.versions,
                                     primary_metric=record.primary_metric, **record.arrays)
        self.done += len(result.records)  # only the test sets the store lacked were scored
        self.log(f"[{self.done}/{self.total}] {result.summary} | {self._status()}")

    def failed(self, task: Task, error: str) -> None:
        self.running = max(0, self.running - 1)
        self.failures.append((task, error))
        self.failed_cells += task.cells
        self.log(f"radssl study: FAILED {task.id}: {error} | {self._status()}")


def run_study(config: StudyConfig | str | Path, overrides: list[str] | None = None, log: Log = print_log,
              executor: str = "serial", address: str | None = None, max_retries: int = 1,
              work: Work | None = None) -> Path:
    """Run (or resume) a whole study and render its report; returns the study's output folder.

    ``executor``: ``serial`` (default; this process) or ``ray`` (``address``: None = a local Ray instance on this
    machine, ``auto`` or ``ray://host:port`` = a running cluster; ``max_retries``: reruns of a task whose worker
    died). ``work``: the function computing one task (default :func:`radssl.study.tasks.execute`; tests wrap it).
    Outputs: ``config.yaml``, ``results.sqlite`` (cells, metrics, predictions, pretraining runs),
    ``subsets/seed{n}.json``, ``pretraining/<run>/`` (checkpoints, metrics), ``features/`` (cache) and
    ``report/report.html`` + ``report/results.csv``. Raises :class:`StudyIncomplete` when a task failed.
    """
    runner = make_executor(executor, address, max_retries)  # a bad executor name fails before any work
    config = _load(config, overrides)
    if runner.name != "serial":  # workers resolve paths from their own working directory
        config = config.model_copy(update={"output_dir": Path(config.output_dir).resolve()})
    if config.threads:
        torch.set_num_threads(config.threads)
    plan = prepare_study(config, log)  # every check, before any compute
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / RESULTS_FILE
    with ResultsStore(results_path) as results:
        _check_compatible(results.study_config(config.name), config.to_dict(), results_path)
        results.save_study_config(config.name, config.to_dict())
        write_text_atomic(output_dir / "config.yaml", dump_config(config))
        results.save_study_notes(config.name, plan.notes)
        _save_subsets(plan, output_dir / "subsets")
        done = results.done_keys(config.name)
        finished_runs = {job.run_name for job in plan.jobs
                         if job.checkpoint(config.output_dir).is_file()
                         and results.is_pretrain_done(config.name, job.run_name)}
        tasks = plan_tasks(plan, done, finished_runs)
        keys = plan.cell_keys()
        total = len(keys)
        log(f"radssl study '{config.name}': {total} cells ({len(plan.encoders)} encoders × "
            f"{len(plan.protocols)} protocols × {len(config.seeds)} seeds × "
            f"{len(config.label_fractions)} label fractions × {len(plan.test_sets)} test sets"
            f"{'; label-free protocols once per encoder' if any(not p.uses_labels for p in plan.protocols.values()) else ''}"
            f"{f'; {len(plan.skipped)} encoder × protocol pairs skipped' if plan.skipped else ''}), "
            f"{len(plan.jobs)} pretraining runs; {len(done)} cells already done; "
            f"{len(tasks)} tasks to run ({runner.name} executor)")
        log(f"radssl study: {_rules_line(plan)}")
        started = time.perf_counter()
        driver = _Driver(plan, results, log, total, sum(key.key in done for key in keys))
        runner.run(plan, tasks, work or execute, driver, log)
        if driver.failures:
            first = driver.failures[0]
            raise StudyIncomplete(
                f"study '{config.name}': {len(driver.failures)} task(s) failed ({driver.failed_cells} cells), "
                f"e.g. {first[0].id}: {first[1]} — {driver.done} of {total} cells are committed in {results_path}; "
                "fix the cause and rerun the same command to resume")
        report = render_report(results, config.name, output_dir / REPORT_DIR, primary_metric=None)
    log(f"radssl study '{config.name}' finished in {time.perf_counter() - started:.0f} s; report: {report}")
    return output_dir


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin wrapper for `python -m`
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m radssl.study.runner study.yaml [key=value ...]", file=sys.stderr)
        return 2
    try:
        run_study(Path(args[0]), args[1:])
    except RadsslError as error:
        print(f"radssl: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
