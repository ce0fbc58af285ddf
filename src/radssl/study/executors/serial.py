"""The serial executor: every task in this process, one after another (the laptop path; no new dependency)."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence

from radssl.study.executors.base import TaskEvents
from radssl.study.plan import StudyPlan, Task
from radssl.study.tasks import WorkerState, Work, enter_task


class SerialExecutor:
    """Runs tasks in order in the driver process, sharing one encoder's backbone and features between its cells.

    A task that raises an ``Exception`` is reported failed and the tasks depending on it are skipped (reported
    failed too); the others still run, so every cell that can finish is committed. ``KeyboardInterrupt`` stops
    the study at once (committed cells stay; rerunning resumes).
    """

    name = "serial"

    def run(self, plan: StudyPlan, tasks: Sequence[Task], work: Work, events: TaskEvents,
            log: Callable[[str], None]) -> None:
        state = WorkerState()
        failed: set[str] = set()
        for task in tasks:
            broken = [d for d in task.depends_on if d in failed]
            if broken:
                failed.add(task.id)
                events.failed(task, f"depends on failed task {broken[0]}")
                continue
            events.started(task)
            enter_task(plan)
            try:
                result = work(plan, task, state, log)
            except Exception as error:  # noqa: BLE001 - reported, and the study ends with an error listing it
                failed.add(task.id)
                state = WorkerState()  # nothing half-built is reused
                events.failed(task, "".join(traceback.format_exception_only(error)).strip())
                continue
            events.finished(task, result)
