"""What every executor implements and what the driver gives it (kept apart so that executors import no package code
that imports them back)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from radssl.study.plan import StudyPlan, Task
from radssl.study.tasks import TaskResult, Work


class TaskEvents(Protocol):
    """The driver's side of a run: it writes the results store and prints progress."""

    def started(self, task: Task) -> None: ...

    def finished(self, task: Task, result: TaskResult) -> None: ...

    def failed(self, task: Task, error: str) -> None: ...


class Executor(Protocol):
    name: str

    def run(self, plan: StudyPlan, tasks: Sequence[Task], work: Work, events: TaskEvents,
            log: Callable[[str], None]) -> None:
        """Run ``tasks`` (dependencies first in the sequence) and report each through ``events``."""
