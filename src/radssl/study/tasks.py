"""What one study task computes, wherever it runs: a pretraining run, or one protocol run of one encoder.

A task reads the :class:`~radssl.study.plan.StudyPlan` (data, subsets, protocols) and files under the study's
output folder (checkpoints, the feature cache), and *returns its records*: it never opens the results store. Only
the driver (:mod:`radssl.study.runner`) writes ``results.sqlite``, so there is one writer whatever the number of
workers (SQLite over a shared filesystem would not survive many writers).

Every task starts from the same state whatever executor runs it: its torch intra-op thread count and the global
seeds are set on entry, so a cell computed in a Ray worker equals the same cell computed serially (bit-identical
where the computation is deterministic on that device; see :func:`enter_task`).
"""

from __future__ import annotations

import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radssl.data.store import ImageStore
from radssl.engine.feed import derived_seed
from radssl.engine.pretrain import pretrain
from radssl.errors import ConfigError
from radssl.provenance import device_description, package_versions
from radssl.study.config import FOUNDATION_KINDS, InitSpec
from radssl.study.plan import CellTask, Encoder, FeaturesTask, PretrainTask, StudyPlan, Task
from radssl.study.results_store import CellKey
from radssl.study.statistics import bootstrap_ci
from radssl.transfer.bn_stats import frozen_encoder, reads_frozen_encoder
from radssl.transfer.features import FeatureCache
from radssl.transfer.initialisation import initialise_backbone
from radssl.transfer.metrics import accuracy, binary_auc, case_mean, macro_auc
from radssl.transfer.protocols import CaseOutputs, Protocol, ProtocolContext

__all__ = ["CellRecord", "CellResult", "FeaturesRecord", "PretrainRecord", "WorkerState", "Work", "enter_task", "execute",
           "resolve_device"]

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------- records
@dataclass
class PretrainRecord:
    """A finished pretraining run, as the driver records it in the ``pretrain_runs`` table."""

    run_name: str
    checkpoint: Path
    wall_time_s: float
    device: str
    images_seen: int
    config: dict[str, Any]
    device_hours: float


@dataclass
class FeaturesRecord:
    """An encoder's frozen features are in the on-disk cache (``extracted``: stores not found there)."""

    encoder: str
    extracted: int
    wall_time_s: float


@dataclass
class CellRecord:
    """One finished cell: the arguments of :meth:`ResultsStore.record_cell` (minus the study name)."""

    key: CellKey
    metrics: dict[str, Any]
    wall_time_s: float
    device: str
    versions: dict[str, Any]
    primary_metric: str
    arrays: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellResult:
    """What a cell task returns: one record per scored test set and a readable summary for the progress line."""

    records: list[CellRecord]
    summary: str
    wall_time_s: float


TaskResult = PretrainRecord | FeaturesRecord | CellResult


class WorkerState:
    """What consecutive tasks in one process may share: the last encoder's backbone and frozen features.

    The serial executor keeps one for the whole study, so an encoder's backbone is built and its features read
    once, as before the plan/executor split; a Ray task gets a fresh one (features then come from the on-disk
    cache under ``<output_dir>/features``). Either way the values are the same.
    """

    def __init__(self) -> None:
        self.encoder: Encoder | None = None
        self.backbone: nn.Module | None = None
        self.frozen: nn.Module | None = None
        self.features: _Features | None = None


Work = Callable[[StudyPlan, Task, WorkerState, Log], TaskResult]
"""The function an executor calls for each task (tests may inject their own, wrapping :func:`execute`)."""


# ------------------------------------------------------------------------------------------------ entry
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but no CUDA device is available — use device: auto or cpu")
    return torch.device(name)


def enter_task(plan: StudyPlan, threads: int | None = None) -> None:
    """Put this process in the same state at the start of every task, whichever executor runs it.

    ``threads``: torch intra-op threads (the study's ``threads`` wins; an executor passes its per-task CPUs).
    CPU kernels may sum in a different order with a different thread count, so bit-identical cells across
    executors need the same count: set ``threads`` in the study config. The global RNGs are seeded from the
    study seed so that nothing depends on which tasks ran before in the same process (every read-out seeds its
    own generator from the cell's seed anyway). GPU kernels that are not deterministic (atomics in some
    backward passes) can still differ in the last bits between any two runs, serial or not.
    """
    count = plan.config.threads or threads
    if count:
        torch.set_num_threads(int(count))
    seed = int(plan.config.seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def execute(plan: StudyPlan, task: Task, state: WorkerState, log: Log) -> TaskResult:
    """Run one task and return its records (the default :data:`Work`)."""
    if isinstance(task, PretrainTask):
        return run_pretrain_task(plan, task, log)
    if isinstance(task, FeaturesTask):
        return run_features_task(plan, task, state)
    return run_cell_task(plan, task, state, log)


# ------------------------------------------------------------------------------------------- pretraining
def run_pretrain_task(plan: StudyPlan, task: PretrainTask, log: Log) -> PretrainRecord:
    """Run (or resume from its last checkpoint) one pretraining job; its cost comes from what the engine returns."""
    config, job = plan.config, task.job
    pretrain_config = plan.pretrain_configs[job]
    initial, source = None, ""
    if job.from_imagenet:
        weights = config.imagenet_file(InitSpec("imagenet+ssl", job.run))
        initial = initialise_backbone(f"imagenet:{weights}", pretrain_config.model.backbone,
                                      in_channels=plan.store.channels, small_input=None)
        source = f"imagenet:{weights}"
        log(f"radssl study: pretraining '{job.run_name}' starts from the ImageNet weights {weights}")
    log(f"radssl study: pretraining '{job.run_name}' ({pretrain_config.method.name}, "
        f"{pretrain_config.model.backbone}) → {job.directory(config.output_dir)}")
    result = pretrain(pretrain_config, store=plan.store, initial_backbone=initial, initial_backbone_source=source)
    return PretrainRecord(job.run_name, Path(result.checkpoint), float(result.wall_time_s),
                          str(result.run_record["device"]), int(result.images_seen), pretrain_config.to_dict(),
                          float(result.device_hours))


# ------------------------------------------------------------------------------------------------- cells
def _backbone(plan: StudyPlan, encoder: Encoder) -> nn.Module:
    config, store = plan.config, plan.store
    if encoder.init == "random":
        # Same spec and seed as the pretraining engine: random = the SSL runs' starting point.
        spec = config.model.spec_for(store.channels, store.image_shape)
        return initialise_backbone("random", backbone_spec=spec, seed=config.seed)
    if encoder.init in FOUNDATION_KINDS:
        return initialise_backbone(encoder.spec.text, in_channels=store.channels, image_size=store.image_shape)
    if encoder.init == "imagenet":
        return initialise_backbone(f"imagenet:{config.imagenet_file(encoder.spec)}", config.model.backbone,
                                   store.channels, small_input=None)
    path = encoder.checkpoint or encoder.job.checkpoint(config.output_dir)  # type: ignore[union-attr]
    return initialise_backbone(f"ssl:{path}", None, store.channels)


class _Features:
    """Frozen features of one backbone on the internal store and each external test set, extracted lazily once.

    Shared by every frozen-feature protocol (linear probe, kNN, …) of one encoder; the extraction time lands in
    the wall time of the first cell that needs it. Kept on disk too, so other workers and resumed studies reuse it.
    """

    def __init__(self, plan: StudyPlan, backbone: nn.Module, cache_dir: Path, device: torch.device) -> None:
        self.plan, self.backbone, self.device = plan, backbone, device
        self.cache = FeatureCache(cache_dir)  # one per encoder: memory is freed when the encoder is done
        self._by_store: dict[int, torch.Tensor] = {}

    def of(self, store: ImageStore) -> torch.Tensor:
        key = id(store)
        if key not in self._by_store:
            self._by_store[key] = self.cache.features(self.backbone, store, self.plan.config.feature_batch_size,
                                                      self.device)
        return self._by_store[key]


def _case_count(test_sets: dict[str, tuple[ImageStore, np.ndarray]], name: str) -> int:
    return len(test_sets[name][1])


def _check_outcome(protocol: Protocol, outputs: dict[str, CaseOutputs], plan: StudyPlan,
                   names: tuple[str, ...]) -> None:
    """A protocol returned per-case outputs of the expected kind and length for every requested test set."""
    for name in names:
        if name not in outputs:
            raise RuntimeError(f"protocol '{protocol.name}' returned no outputs for test set '{name}'")
        out, n = outputs[name], _case_count(plan.test_sets, name)
        if protocol.case_metric == "scores":
            if out.y_score is None or len(np.asarray(out.y_score)) != n:
                raise RuntimeError(f"protocol '{protocol.name}' must return one score per case of '{name}' ({n})")
        else:
            if protocol.metric not in out.values:
                raise RuntimeError(f"protocol '{protocol.name}' returned no per-case '{protocol.metric}' for '{name}'")
            bad = {k: len(v) for k, v in out.values.items() if len(v) != n}
            if bad:
                raise RuntimeError(f"protocol '{protocol.name}' returned {bad} per-case values for '{name}' ({n} cases)")


def _cell_metrics(task_kind: str, y_true: np.ndarray, y_score: np.ndarray, n_boot: int) -> dict[str, Any]:
    """AUC and accuracy with percentile-bootstrap 95% CIs over test cases (same resamples for every cell)."""
    auc = binary_auc if task_kind == "binary" else macro_auc
    return {
        "auc": bootstrap_ci(y_true, y_score, auc, n_boot=n_boot, seed=0),
        "accuracy": bootstrap_ci(y_true, y_score, accuracy, n_boot=n_boot, seed=0),
    }


def _value_metrics(values: dict[str, np.ndarray], n_boot: int) -> dict[str, Any]:
    """Mean of each per-case metric with a percentile-bootstrap 95% CI over cases (undefined cases left out)."""
    out: dict[str, Any] = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        finite = int(np.isfinite(v).sum())
        if finite >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[name] = bootstrap_ci(np.zeros(len(v)), v, case_mean, n_boot=n_boot, seed=0, stratified=False)
        else:
            out[name] = (case_mean(None, v), None, None)
    return out


def _outputs_to_record(protocol: Protocol, test_store: ImageStore, out: CaseOutputs, n_boot: int
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, per-case arrays for the store) of one test set's outputs."""
    if protocol.case_metric == "scores":
        y_true = np.asarray(out.y_true)
        y_score = np.asarray(out.y_score, dtype=np.float64)
        metrics = _cell_metrics(test_store.task.kind, y_true, y_score, n_boot)
        arrays: dict[str, Any] = {"y_true": y_true, "y_score": y_score}
        if out.values:
            arrays["case_values"] = out.values
    else:
        metrics = _value_metrics(out.values, n_boot)
        arrays = {"case_values": out.values}
    metrics.update(out.metrics)
    return metrics, arrays


def _encoder_state(plan: StudyPlan, encoder: Encoder, state: WorkerState) -> nn.Module:
    """The encoder's backbone, reused from ``state`` when the previous task had the same encoder."""
    if state.encoder != encoder or state.backbone is None:
        state.encoder, state.backbone, state.frozen, state.features = encoder, _backbone(plan, encoder), None, None
    return state.backbone


def _frozen_state(plan: StudyPlan, encoder: Encoder, state: WorkerState, device: torch.device
                  ) -> tuple[nn.Module, _Features]:
    """The encoder's frozen read-out copy (``bn_stats``: BatchNorm statistics re-estimated on the unlabelled training
    images, the same rule for every initialisation) and its features' cache — built only for tasks that read the
    encoder frozen (a fine-tuning cell never pays the re-estimation pass), once per encoder and worker."""
    backbone = _encoder_state(plan, encoder, state)
    if state.frozen is None or state.features is None:
        config = plan.config
        state.frozen = frozen_encoder(backbone, plan.store, config.bn_stats, device, config.feature_batch_size,
                                      config.seed)
        state.features = _Features(plan, state.frozen, Path(config.output_dir) / "features", device)
    return state.frozen, state.features


def run_features_task(plan: StudyPlan, task: FeaturesTask, state: WorkerState) -> FeaturesRecord:
    """Frozen features of one encoder on the internal store and every test set, into the on-disk cache."""
    _, features = _frozen_state(plan, task.encoder, state, resolve_device(plan.config.device))
    start, misses = time.perf_counter(), features.cache.misses
    stores = {id(plan.store): plan.store} | {id(store): store for store, _ in plan.test_sets.values()}
    for store in stores.values():
        features.of(store)
    return FeaturesRecord(task.encoder.label, features.cache.misses - misses, time.perf_counter() - start)


def run_cell_task(plan: StudyPlan, task: CellTask, state: WorkerState, log: Log) -> CellResult:
    """One protocol run scoring every test set of ``task``; returns one record per test set.

    Dispatches through the protocol plugins only: the task builds the cell's context (rows, validation rows,
    test sets, shared frozen features) and records what ``Protocol.run`` returns.
    """
    config = plan.config
    device = resolve_device(config.device)
    backbone = _encoder_state(plan, task.encoder, state)
    info = plan.encoder_infos[task.encoder]
    protocol = plan.protocols[task.protocol]
    features = None
    if reads_frozen_encoder(protocol):
        backbone, features = _frozen_state(plan, task.encoder, state, device)
    seed, fraction, missing = task.seed, task.fraction, task.test_sets
    labelled = protocol.uses_labels
    rows = plan.subsets[seed][fraction] if labelled else plan.train_rows
    context = ProtocolContext(
        backbone=backbone, encoder=info, store=plan.store, train_rows=rows,
        val_rows=plan.validation_rows(seed, fraction) if labelled else plan.val_rows,
        test_sets={n: plan.test_sets[n] for n in missing}, full_train_rows=len(plan.train_rows),
        label_fraction=fraction, seed=seed, run_seed=derived_seed(config.seed, seed, 31), device=device,
        features=features.of if protocol.frozen_features and features is not None else None, log=log)
    start = time.perf_counter()
    outcome = protocol.run(context)
    wall = time.perf_counter() - start
    _check_outcome(protocol, outcome.outputs, plan, missing)
    shares = wall / len(missing)  # one protocol run scores all its test sets
    versions, device_name = package_versions(), device_description(device)
    records, summary = [], []
    for test_name, key in zip(missing, task.keys(), strict=True):
        test_store, _ = plan.test_sets[test_name]
        metrics, arrays = _outputs_to_record(protocol, test_store, outcome.outputs[test_name],
                                             config.bootstrap_samples)
        metrics["train_images"] = float(len(rows)) if labelled else 0.0
        metrics.update(outcome.records)
        records.append(CellRecord(key, metrics, shares, device_name, versions, protocol.metric, arrays))
        value = metrics[protocol.metric]
        value = value[0] if isinstance(value, tuple) else value
        summary.append(f"{test_name} {protocol.metric} {value:.3f}")
    labels_text = f"labels={fraction:g} seed={seed}" if labelled else "no labels"
    return CellResult(records, f"{task.encoder.label} {task.protocol} {labels_text}: {', '.join(summary)} "
                      f"({wall:.1f} s)", wall)
