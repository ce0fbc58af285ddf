"""Executors run a study's tasks: ``serial`` (one process, the default, no extra dependency) or ``ray``.

An executor gets the plan, the tasks in dependency order (:func:`radssl.study.plan.plan_tasks`), the function
that computes one task (:data:`radssl.study.tasks.Work`) and the driver's :class:`TaskEvents`. It calls
``events.finished`` with each task's records as soon as the task is done, in the driver process, which commits
them to the results store at once; a task that raises or whose worker dies is reported through
``events.failed`` (after the executor's retries), and the tasks that depend on it are reported failed too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from radssl.errors import ConfigError
from radssl.study.plan import StudyPlan, Task
from radssl.study.tasks import TaskResult, Work

EXECUTORS = ("serial", "ray")


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


def make_executor(name: str = "serial", address: str | None = None, max_retries: int = 1) -> Executor:
    """The executor called ``name``; ``address`` (Ray only): ``auto``, ``ray://host:port``, or None = local."""
    if name == "serial":
        if address is not None:
            raise ConfigError(f"--address {address}: only the ray executor joins a cluster — add --executor ray")
        from radssl.study.executors.serial import SerialExecutor

        return SerialExecutor()
    if name == "ray":
        try:
            from radssl.study.executors.ray import RayExecutor  # the only module that imports ray
        except ModuleNotFoundError as error:
            if error.name != "ray":
                raise
            raise ConfigError("--executor ray: Ray is not installed — pip install 'radssl[ray]' "
                              "(or run with --executor serial)") from None

        return RayExecutor(address=address, max_retries=max_retries)
    raise ConfigError(f"--executor {name}: unknown executor — choose one of {', '.join(EXECUTORS)}")
