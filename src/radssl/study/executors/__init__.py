"""Executors run a study's tasks: ``serial`` (one process, the default, no extra dependency) or ``ray``.

An executor gets the plan, the tasks in dependency order (:func:`radssl.study.plan.plan_tasks`), the function
that computes one task (:data:`radssl.study.tasks.Work`) and the driver's :class:`TaskEvents`. It calls
``events.finished`` with each task's records as soon as the task is done, in the driver process, which commits
them to the results store at once; a task that raises or whose worker dies is reported through
``events.failed`` (after the executor's retries), and the tasks that depend on it are reported failed too.
"""

from __future__ import annotations

from radssl.errors import ConfigError
from radssl.study.executors.base import Executor, TaskEvents
from radssl.study.executors.serial import SerialExecutor

__all__ = ["EXECUTORS", "Executor", "TaskEvents", "make_executor"]

EXECUTORS = ("serial", "ray")


def make_executor(name: str = "serial", address: str | None = None, max_retries: int = 1) -> Executor:
    """The executor called ``name``; ``address`` (Ray only): ``auto``, ``ray://host:port``, or None = local."""
    if name == "serial":
        if address is not None:
            raise ConfigError(f"--address {address}: only the ray executor joins a cluster — add --executor ray")
        return SerialExecutor()
    if name == "ray":
        try:
            # Imported here, not at the top: the serial path must never import Ray (an optional dependency, slow to
            # import); this is the only module that imports the one that imports ray.
            from radssl.study.executors.ray import RayExecutor
        except ModuleNotFoundError as error:
            if error.name != "ray":
                raise
            raise ConfigError("--executor ray: Ray is not installed — pip install 'radssl[ray]' "
                              "(or run with --executor serial)") from None

        return RayExecutor(address=address, max_retries=max_retries)
    raise ConfigError(f"--executor {name}: unknown executor — choose one of {', '.join(EXECUTORS)}")
