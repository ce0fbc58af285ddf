"""The Ray executor: each task a Ray Core remote task, on this machine's cores and GPUs or across a cluster.

``pip install radssl[ray]``. Ray is imported here only, so the serial (laptop) path never imports it.

- The plan — data included — is put in Ray's object store once (``ray.put``); every task receives the same
  reference, and the stores' images travel as numpy arrays, which Ray hands to workers on one node zero-copy from
  shared memory (:func:`_store_parts`).
- A cell task depends on its encoder's pretraining task through Ray's own dependency: the pretraining record is
  one of its arguments, so Ray starts it only when that run finished, and fails it if the run failed.
- A worker that dies (killed, out of memory, node lost) is retried ``max_retries`` times by Ray; an exception
  raised by the task is not retried (it would raise again) and is reported. Results come back to the driver,
  the only process that writes the results store.
- Checkpoints and feature caches live under the study's output folder, which every node must see at the same
  path: the driver writes a marker file with a fresh token there, and each task checks it before computing.
- A Ray instance started here (no ``--address``) listens on 127.0.0.1 only, with no dashboard and so no job
  API (which has no authentication): patient images never leave this machine.
"""

from __future__ import annotations

import os
import socket
import traceback
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import ray
import torch

from radssl.data.store import ImageStore
from radssl.errors import ConfigError
from radssl.study.executors.base import TaskEvents
from radssl.study.plan import StudyPlan, Task
from radssl.study.tasks import WorkerState, Work, enter_task

MARKER_FILE = ".radssl-shared-folder"
"""Written by the driver under the output folder; every task reads it back to prove it sees the same folder."""
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a Ray instance on this machine that listens on 127.0.0.1 only, without dashboard or job API.

    ``num_cpus``/``num_gpus``: None = what this machine has. Ray binds its gRPC servers to the node address;
    ``_node_ip_address="127.0.0.1"`` alone is turned back into the machine's routable address unless Ray's
    "no multi-node cluster" switch is on (as on macOS/Windows), so it is set for this start (checked with
    ``ss -ltn``: every Ray port on 127.0.0.1). Ray also enables token authentication by default (2.5x+).
    """
    from ray._private import ray_constants  # read at call time by ray._private.services.get_node_ip_address

    previous_env, previous_flag = os.environ.get(_LOCAL_ONLY_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOCAL_ONLY_ENV] = "0"  # the processes Ray spawns (raylet, agents) read it too
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=True, log_to_driver=True)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_flag
        if previous_env is None:
            os.environ.pop(_LOCAL_ONLY_ENV, None)
        else:
            os.environ[_LOCAL_ONLY_ENV] = previous_env


# ------------------------------------------------------------------------------------ the store, zero-copy
def _store_parts(store: ImageStore) -> dict[str, Any]:
    """An ImageStore as plain fields with numpy arrays (pickle protocol 5 out-of-band buffers: zero-copy in Ray)."""
    parts = {f.name: getattr(store, f.name) for f in fields(store)}
    for name in ("images", "labels"):
        parts[name] = parts[name].detach().cpu().contiguous().numpy()
    return parts


def _store_from_parts(parts: dict[str, Any]) -> ImageStore:
    """Rebuild a store around the object store's read-only arrays, without copying or re-validating them.

    The arrays are read-only views of shared memory; tasks only read images (gather, index_select), never write.
    """
    store = object.__new__(ImageStore)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, value in parts.items():
            if name in ("images", "labels"):
                value = torch.from_numpy(value)
            object.__setattr__(store, name, value)
    return store


# --------------------------------------------------------------------------------------------- the task
def check_shared_folder(folder: str, token: str) -> None:
    """Fail clearly when this worker cannot see the driver's output folder (not a shared filesystem)."""
    marker = Path(folder) / MARKER_FILE
    try:
        seen = marker.read_text().strip()
    except OSError:
        seen = None
    if seen != token:
        raise RuntimeError(
            f"{folder}: the study output folder is not visible from worker {socket.gethostname()} "
            f"({'no' if seen is None else 'another run’s'} {MARKER_FILE}) — the output folder must be on a "
            "filesystem every node sees (e.g. NFS or Lustre, mounted at the same path on every node): "
            "checkpoints and feature caches are written and read there by every worker"
        )


def _run_remote(plan: StudyPlan, task: Task, work: Work, folder: str, token: str, threads: int,
                *dependencies: Any) -> Any:
    """Body of every Ray task (``dependencies``: the records of the tasks it waits for, unused)."""
    check_shared_folder(folder, token)
    enter_task(plan, threads)
    return work(plan, task, WorkerState(), lambda message: print(message, flush=True))


def _short_error(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:]) if lines else "".join(traceback.format_exception_only(error)).strip()


# ------------------------------------------------------------------------------------------- the executor
class RayExecutor:
    """Runs tasks as Ray remote tasks with the per-task resources of the study's ``resources`` section."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = 1) -> None:
        self.address = address
        self.max_retries = max_retries

    def _connect(self, log: Callable[[str], None]) -> bool:
        """Join the given cluster, or start a local instance; True when this call started or joined Ray."""
        if ray.is_initialized():
            return False
        if self.address is None:
            start_local_ray()
            log("radssl study: started a local Ray instance (127.0.0.1 only, no dashboard) with "
                f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")
        else:
            try:
                ray.init(address=self.address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ConfigError(f"--address {self.address}: cannot join the Ray cluster ({error}) — start it "
                                  "with `ray start --head` (and `ray start --address HEAD:6379` on the other "
                                  "nodes), or leave --address out to run on this machine") from None
            log(f"radssl study: joined the Ray cluster at {self.address}: {ray.cluster_resources()}")
        return True

    def run(self, plan: StudyPlan, tasks: Sequence[Task], work: Work, events: TaskEvents,
            log: Callable[[str], None]) -> None:
        if not tasks:
            return
        folder = str(Path(plan.config.output_dir).resolve())
        if Path(folder) != Path(plan.config.output_dir):
            raise ConfigError(f"output_dir {plan.config.output_dir}: the ray executor needs an absolute path "
                              "(every worker resolves it from its own working directory)")
        token = uuid.uuid4().hex
        (Path(folder) / MARKER_FILE).write_text(token)
        connected = self._connect(log)
        try:
            self._run(plan, tasks, work, events, folder, token, log)
        finally:
            if connected:
                ray.shutdown()

    def _run(self, plan: StudyPlan, tasks: Sequence[Task], work: Work, events: TaskEvents, folder: str,
             token: str, log: Callable[[str], None]) -> None:
        resources = plan.config.resources
        if ray.cluster_resources().get("GPU", 0) and not (resources.pretrain.gpus or resources.cell.gpus):
            log("radssl study: note: the Ray cluster has GPUs but resources.pretrain/cell.gpus are 0: every task "
                "runs on CPU (set e.g. resources: {pretrain: {gpus: 1}, cell: {gpus: 0.25}})")
        ray.util.register_serializer(ImageStore, serializer=_store_parts, deserializer=_store_from_parts)
        for store, _ in plan.test_sets.values():
            store.fingerprint()  # hashed once here, carried to workers with the store
        plan_ref = ray.put(plan)  # the data reach the object store once, not once per task
        remote = ray.remote(_run_remote)
        refs: dict[str, Any] = {}
        pending: dict[Any, Task] = {}
        for task in tasks:
            need = resources.pretrain if task.kind == "pretrain" else resources.cell  # features: like a cell
            dependencies = [refs[d] for d in task.depends_on if d in refs]
            ref = remote.options(num_cpus=need.cpus, num_gpus=need.gpus, max_retries=self.max_retries,
                                 retry_exceptions=False, name=task.id).remote(
                plan_ref, task, work, folder, token, max(1, int(need.cpus)), *dependencies)
            refs[task.id] = ref
            pending[ref] = task
            events.started(task)
        failed: set[str] = set()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                task = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as error:
                    failed.add(task.id)
                    broken = [d for d in task.depends_on if d in failed]
                    events.failed(task, f"depends on failed task {broken[0]}" if broken else _short_error(error))
                    continue
                events.finished(task, result)
