"""The SSL pretraining loop: store → batched views → method → Fabric → checkpoints.

Design choices that make it fast and exactly resumable:
- The pretraining set sits on the training device as one uint8 tensor when it fits (resident), or each step's rows
  are read from the memory-mapped store into pinned memory (streamed; ``train.device_cache``, ``radssl.engine.feed``);
  a step augments its batch on the device (``radssl.views``) and runs the model. The next step's views are built
  by a background thread (a side CUDA stream on GPU) while the current step computes (``radssl.engine.prefetch``).
  No DataLoader workers compete with the model for cores, and neither mode nor prefetch changes a single view.
- Everything random in step ``s`` is a pure function of ``(seed, s, rank)``: the epoch permutation is seeded by
  ``(seed, epoch)``, augmentation by ``(seed, step, rank)``, the learning rate and BYOL momentum by ``step``. A
  resumed run therefore needs only weights, optimiser state and the step to continue bit-for-bit.
- Lightning Fabric provides devices, precision (32, bf16-mixed, 16-mixed) and strategy (DDP on one or many nodes,
  launched by ``torchrun`` or ``fabric run``); the per-device batch is ``train.batch_size``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from radssl.atomic import write_text_atomic
from radssl.config import PretrainConfig, TrainSection, dump_config
from radssl.data.build import build_store
from radssl.data.store import ImageStore
from radssl.engine.checkpoint import FINAL, LAST, latest_checkpoint, load_checkpoint, save_checkpoint
from radssl.engine.feed import DeviceCacheChoice, StepViews, choose_device_cache, derived_seed, pretraining_images
from radssl.engine.optim import build_optimizer, effective_lr, lr_at, set_lr
from radssl.engine.prefetch import Prefetcher
from radssl.errors import CheckpointError, DataError, RadsslError
from radssl.methods.base import SSLMethod, apply_momentum
from radssl.methods.registry import build_method, method_class
from radssl.models.base import Backbone
from radssl.models.foundation_weights import load_foundation, provenance_text
from radssl.models.registry import build_from_spec
from radssl.models.spec import BackboneSpec
from radssl.provenance import device_description, package_versions
from radssl.views.batch import ViewBatch
from radssl.views.columns import PairingColumns
from radssl.views.policies import PolicyContext, ViewPolicy, build_policy


class SimulatedCrash(RuntimeError):
    """Raised by ``halt_after_step`` in tests to stand in for a killed process."""


@dataclass
class PretrainResult:
    """What a finished (or already finished) pretraining run hands to its caller: files, cost and the model."""

    output_dir: Path
    checkpoint: Path
    steps: int
    wall_time_s: float
    images_per_s: float
    final_loss: float
    backbone_spec: BackboneSpec
    run_record: dict[str, Any] = field(default_factory=dict)
    """What ``run.json`` holds: seed, data fingerprint, images, steps, global batch, wall time, device, versions."""
    method: SSLMethod | None = None
    """The trained method (backbone + heads) in memory, for callers that go on to transfer."""

    @property
    def backbone(self) -> Backbone | None:
        """The encoder that transfers (the method's ``transfer_backbone()``)."""
        return None if self.method is None else self.method.transfer_backbone()

    @property
    def images_seen(self) -> int:
        return int(self.run_record.get("steps", self.steps)) * int(self.run_record.get("global_batch_size", 0))

    @property
    def device_hours(self) -> float:
        return self.wall_time_s * int(self.run_record.get("world_size", 1)) / 3600.0


def pretrain_rows(store: ImageStore, fraction: float, seed: int) -> np.ndarray:
    """Images SSL may use (train + unlabelled), optionally a seeded nested share of them.

    The share is a prefix of one permutation that depends only on ``seed``, so a 25 % set is inside the 50 % set.
    """
    rows = store.pretrain_indices()
    if len(rows) == 0:
        raise DataError(store.origin or store.name, "no train or unlabelled images to pretrain on")
    if fraction < 1.0:
        order = np.random.default_rng(derived_seed(seed, 29)).permutation(len(rows))
        rows = np.sort(rows[order[: max(1, int(round(fraction * len(rows))))]])
    return rows


def plan_steps(config: PretrainConfig, n_images: int, world_size: int, source: str) -> tuple[int, int]:
    """(steps per epoch, total steps); an error when the data cannot fill one global batch."""
    global_batch = config.train.batch_size * world_size
    steps_per_epoch = n_images // global_batch
    if steps_per_epoch == 0:
        raise DataError(
            source,
            f"{n_images} pretraining images cannot fill one global batch of {global_batch}",
            "lower train.batch_size or add images",
        )
    if config.train.steps is not None:
        return steps_per_epoch, config.train.steps
    return steps_per_epoch, max(1, math.ceil(float(config.train.epochs or 1.0) * steps_per_epoch))


def backbone_spec_for(config: PretrainConfig, store: ImageStore) -> BackboneSpec:
    """The resolved backbone spec a config asks for, sized for the store's channels and images (one place)."""
    return config.model.spec_for(store.channels, store.image_shape)


def backbone_for(config: PretrainConfig, store: ImageStore) -> Backbone:
    """A freshly initialised backbone as the engine builds it (under the caller's RNG state)."""
    return build_from_spec(backbone_spec_for(config, store))


InitialBackbone = Backbone | Mapping[str, torch.Tensor]


def build_pretraining_method(config: PretrainConfig, store: ImageStore,
                             initial_backbone: InitialBackbone | None = None) -> SSLMethod:
    """The method of a config, its backbone optionally starting from given weights.

    Weights are loaded into the backbone *before* the method is built, so momentum targets (BYOL, MoCo, DINO),
    which start as copies of the backbone, start from the same weights.
    """
    backbone = backbone_for(config, store)
    if initial_backbone is not None:
        state = initial_backbone.state_dict() if isinstance(initial_backbone, nn.Module) else initial_backbone
        try:
            backbone.load_state_dict(dict(state), strict=True)
        except RuntimeError as error:
            raise CheckpointError(f"initial_backbone does not fit {backbone.spec.describe()}: {error}") from None
    return build_method(config.method.name, backbone, config.method.params())


def view_context(config: PretrainConfig, store: ImageStore, channels_last: bool) -> PolicyContext:
    size = config.views.output_size
    output = (size,) * store.spatial_dims if size else store.image_shape
    return PolicyContext(input_size=store.image_shape, output_size=tuple(output), channels=store.channels,
                         channels_last=channels_last)


def check_method_fits(config: PretrainConfig, store: ImageStore, policy: ViewPolicy) -> BackboneSpec:
    """Backbone spec resolvable for the data, and the method's view requirements met by the policy — or a
    ConfigError naming both, before any compute or any file is written."""
    spec = backbone_spec_for(config, store)
    method_cls = method_class(config.method.name)
    requirements = method_cls.requirements(method_cls.Params(**config.method.params()))
    requirements.check(policy.layout(), config.method.name, getattr(policy, "name", type(policy).__name__),
                       spec.family)
    return spec


def check_pretraining(config: PretrainConfig, store: ImageStore) -> BackboneSpec:
    """Everything about a pretraining config that can be checked without training: backbone for the data, view
    policy and pairing for the metadata, method for the views. Raises ConfigError/DataError; writes nothing."""
    channels_last = config.train.channels_last
    policy = build_policy(config.views.settings(), view_context(config, store, channels_last))
    spec = check_method_fits(config, store, policy)
    rows = pretrain_rows(store, config.train.pretrain_fraction, config.seed)
    policy.prepare(PairingColumns.from_store(store, rows))
    return spec


EXECUTION_KEYS = ("device_cache", "device_cache_budget_gb", "prefetch", "prefetch_threads")
"""``train`` keys that change how data reach the model, never a result: a run may resume under other values."""


def _without_execution_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded config as compared on resume: ``train`` without execution keys, keys it predates at their
    defaults (a checkpoint written before ``train.clip_grad`` existed ran without clipping)."""
    plain = dict(config)
    if isinstance(plain.get("train"), Mapping):
        train = {**TrainSection().model_dump(mode="json"), **plain["train"]}
        plain["train"] = {k: v for k, v in train.items() if k not in EXECUTION_KEYS}
    return plain


def _resume_state(config: PretrainConfig, store: ImageStore, checkpoint_dir: Path) -> dict[str, Any] | None:
    """The last checkpoint if it belongs to this exact run; an error if the folder holds a different run."""
    path = latest_checkpoint(checkpoint_dir)
    if path is None:
        return None
    state = load_checkpoint(path)
    if state.get("data_fingerprint") != store.fingerprint():
        raise CheckpointError(
            f"{path}: was written for different data (fingerprint {str(state.get('data_fingerprint'))[:12]}… vs "
            f"{store.fingerprint()[:12]}…) — use a new output_dir"
        )
    saved = _without_execution_keys(state.get("config", {}))
    current = _without_execution_keys(config.to_dict())
    ignore = {"output_dir", "eval"}
    differing = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if differing:
        raise CheckpointError(
            f"{path}: belongs to a run with a different config (sections {differing}) — "
            "use a new output_dir, or delete the folder to start over"
        )
    return state


class _MetricsLog:
    """metrics.csv (appended per log step) + TensorBoard; on resume, rows after the checkpoint are dropped."""

    def __init__(self, directory: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = directory / "metrics.csv"
        self.fields: list[str] | None = None
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            with open(self.path, newline="") as stream:
                rows = [r for r in csv.DictReader(stream) if int(r["step"]) <= resume_step]
            if rows:
                self.fields = list(rows[0])
                buffer = [",".join(self.fields)] + [",".join(r[f] for f in self.fields) for r in rows]
                write_text_atomic(self.path, "\n".join(buffer) + "\n")
            else:
                self.path.unlink()
        self.writer = SummaryWriter(log_dir=str(directory / "tensorboard"), purge_step=resume_step + 1)

    def log(self, row: dict[str, float | int]) -> None:
        if not self.enabled:
            return
        if self.fields is None:
            self.fields = list(row)
        new_file = not self.path.exists()
        with open(self.path, "a", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=self.fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"pretrain/{key}", value, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _make_fabric(config: PretrainConfig):  # noqa: ANN202 - lightning type
    from lightning.fabric import Fabric

    train = config.train
    precision = "32-true" if train.precision == "32" else train.precision
    return Fabric(
        accelerator=train.accelerator,
        devices=train.devices,
        num_nodes=train.num_nodes,
        strategy=train.strategy,
        precision=precision,
    )


# ---------------------------------------------------------------------------------------------------- setup
@dataclass
class _Run:
    """A pretraining run once set up: data feed, model and optimiser on Fabric, schedule, and where it writes."""

    config: PretrainConfig
    store: ImageStore
    spec: BackboneSpec
    rows: np.ndarray
    pairing_scalars: dict[str, float]
    fabric: Any
    core: SSLMethod  # the unwrapped module: state dicts, momentum updates
    model: nn.Module  # what Fabric wraps (compiled, DDP)
    optimizer: Any
    base_lr: float
    global_batch: int
    steps_per_epoch: int
    max_steps: int
    resume: dict[str, Any] | None
    views: StepViews
    cache: DeviceCacheChoice
    initial_backbone_source: str
    versions: dict[str, str]
    started: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.fabric.global_rank == 0

    @property
    def start_step(self) -> int:
        return int(self.resume["step"]) if self.resume else 0

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"


def _build_model(config: PretrainConfig, store: ImageStore, fabric: Any, initial_backbone: InitialBackbone | None,
                 resume: dict[str, Any] | None) -> tuple[SSLMethod, nn.Module, Any, float]:
    """(method, Fabric-wrapped model, optimiser, base lr): identical initial weights on every rank and resume."""
    torch.manual_seed(config.seed)
    method = build_pretraining_method(config, store, initial_backbone if resume is None else None)
    if fabric.world_size > 1 and config.train.sync_batchnorm and fabric.device.type == "cuda":
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if config.train.channels_last:  # channels-last (NHWC / NDHWC) convolutions: +21 % in 2D, +29–64 % in 3D on CPU
        method = method.to(memory_format=torch.channels_last if store.spatial_dims == 2 else torch.channels_last_3d)
    base_lr = effective_lr(config.optim, config.train.batch_size * fabric.world_size)
    optimizer = build_optimizer(method, config.optim, base_lr)
    if resume is not None:
        method.load_state_dict(resume["method"])
        optimizer.load_state_dict(resume["optimizer"])
    runnable: nn.Module = torch.compile(method) if config.train.compile else method
    model, optimizer = fabric.setup(runnable, optimizer)
    return method, model, optimizer, base_lr


def _data_feed(config: PretrainConfig, store: ImageStore, rows: np.ndarray, policy: ViewPolicy,
               columns: PairingColumns, fabric: Any, steps_per_epoch: int) -> tuple[StepViews, DeviceCacheChoice]:
    """Resident or streamed pretraining images (``train.device_cache``) and the step → views function."""
    row_bytes = store.images.element_size() * math.prod(store.images.shape[1:])
    cache = choose_device_cache(config.train.device_cache, row_bytes * len(rows), fabric.device,
                                config.train.device_cache_budget_gb)
    if fabric.global_rank == 0:
        print(f"radssl: pretraining images {cache.mode} on {fabric.device.type} ({cache.reason})")
    images = pretraining_images(store.images, rows, fabric.device, cache.mode)
    views = StepViews(policy=policy, images=images, columns=columns, seed=config.seed, rank=fabric.global_rank,
                      local_batch=config.train.batch_size, global_batch=config.train.batch_size * fabric.world_size,
                      steps_per_epoch=steps_per_epoch, n_rows=len(rows), device=fabric.device)
    return views, cache


def _setup(config: PretrainConfig, store: ImageStore | None, fabric: Any, initial_backbone: InitialBackbone | None,
           initial_backbone_source: str, policy: ViewPolicy | None) -> _Run:
    """Check data, backbone, policy and method against each other (before anything is written), then build."""
    if store is None:
        store = build_store(config.data)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if policy is None:
        policy = build_policy(config.views.settings(), view_context(config, store, config.train.channels_last))
    spec = check_method_fits(config, store, policy)
    rows = pretrain_rows(store, config.train.pretrain_fraction, config.seed)
    columns = PairingColumns.from_store(store, rows)
    pairing_scalars = policy.prepare(columns)  # pairing tables; errors (e.g. no slice indices) before compute
    if fabric is None:
        fabric = _make_fabric(config)
        fabric.launch()
    steps_per_epoch, max_steps = plan_steps(config, len(rows), fabric.world_size, store.origin or store.name)
    resume = _resume_state(config, store, Path(config.output_dir) / "checkpoints")
    if initial_backbone is None and resume is None and config.model.weights:  # continued SSL from foundation weights
        initial_backbone, provenance = load_foundation(config.model.weights, store.channels, store.image_shape,
                                                       config.model.options.get("input_size"))
        initial_backbone_source = provenance_text(provenance)
    core, model, optimizer, base_lr = _build_model(config, store, fabric, initial_backbone, resume)
    if resume is not None:
        initial_backbone_source = str(resume.get("initial_backbone", ""))
    views, cache = _data_feed(config, store, rows, policy, columns, fabric, steps_per_epoch)
    return _Run(config=config, store=store, spec=spec, rows=rows, pairing_scalars=pairing_scalars, fabric=fabric,
                core=core, model=model, optimizer=optimizer, base_lr=base_lr,
                global_batch=config.train.batch_size * fabric.world_size, steps_per_epoch=steps_per_epoch,
                max_steps=max_steps, resume=resume, views=views, cache=cache,
                initial_backbone_source=initial_backbone_source, versions=package_versions())


# ----------------------------------------------------------------------------------------------------- step
def _train_step(run: _Run, step: int, batch: ViewBatch) -> tuple[dict[str, Any], float, float | None]:
    """One optimiser step on one batch: (method outputs, learning rate, momentum or None)."""
    lr = lr_at(step, run.max_steps, run.base_lr, run.config.optim)
    set_lr(run.optimizer, lr)
    run.core.set_progress(step, run.max_steps)
    outputs = run.model(batch)
    run.fabric.backward(outputs["loss"])
    if run.config.train.clip_grad is not None:
        # after backward, before the step, as DINO's reference (main_dino.py); Fabric unscales AMP gradients first
        norm = run.fabric.clip_gradients(run.model, run.optimizer, max_norm=run.config.train.clip_grad,
                                         error_if_nonfinite=False)
        outputs = {**outputs, "grad_norm": norm}
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.core.after_optimizer_step()  # e.g. CLIP clamps its logit scale here (OpenCLIP), not in the forward pass
    return outputs, lr, apply_momentum(run.core, step, run.max_steps)


class _Window:
    """Sums of the logged values since the last log step, and their wall time."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, outputs: Mapping[str, Any], batch: ViewBatch) -> None:
        for key, value in outputs.items():
            self.sums[key] = self.sums.get(key, 0.0) + (value.detach().float() if torch.is_tensor(value) else value)
        for key, value in batch.log_scalars().items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def flush(self, done: int, global_batch: int) -> tuple[float, float, dict[str, float]]:
        """(mean loss, images/s, other means); an error when the loss is no longer finite. Starts a new window."""
        means = {key: float(value) / self.steps for key, value in self.sums.items()}
        mean_loss = means.pop("loss")
        if not math.isfinite(mean_loss):
            raise RadsslError(f"pretraining loss became {mean_loss} at step {done} — lower optim.lr, "
                              "or use precision 32-true; the last good checkpoint is kept")
        throughput = self.steps * global_batch / max(time.perf_counter() - self.start, 1e-9)
        self.__init__()
        return mean_loss, throughput, means


# ------------------------------------------------------------------------------- checkpoint state, run record
def _checkpoint_state(run: _Run, step: int, finished: bool) -> dict[str, Any]:
    previous_wall = float(run.resume["wall_time_s"]) if run.resume else 0.0
    return {
        "method": run.core.state_dict(),
        "method_name": run.config.method.name,
        "backbone": run.core.transfer_backbone().state_dict(),
        "backbone_spec": run.spec.to_dict(),
        "optimizer": run.optimizer.state_dict(),
        "step": step,
        "max_steps": run.max_steps,
        "images_seen": step * run.global_batch,
        "finished": finished,
        "config": run.config.to_dict(),
        "data_fingerprint": run.store.fingerprint(),
        "pretrain_rows": len(run.rows),
        "versions": run.versions,
        "device": device_description(run.fabric.device),
        "world_size": run.fabric.world_size,
        "wall_time_s": previous_wall + time.perf_counter() - run.started,
        "seed": run.config.seed,
        "initial_backbone": run.initial_backbone_source,
    }


def _run_record(run: _Run, wall_time: float, final_loss: float) -> dict[str, Any]:
    """What ``run.json`` holds: seed, data, steps, batch, wall time, device, versions, how the data were fed."""
    return {
        "seed": run.config.seed,
        "method": run.config.method.name,
        "backbone_spec": run.spec.to_dict(),
        "data": run.store.describe(),
        "data_fingerprint": run.store.fingerprint(),
        "pretrain_images": len(run.rows),
        "pretrain_images_dropped_held_out_patients": len(run.store.held_out_patient_rows()),  # val/test patients
        "steps": run.max_steps,
        "resumed_from_step": run.start_step,
        "global_batch_size": run.global_batch,
        "wall_time_s": wall_time,
        "device": device_description(run.fabric.device),
        "world_size": run.fabric.world_size,
        "versions": run.versions,
        "final_loss": final_loss,
        "initial_backbone": run.initial_backbone_source,
        "device_cache": run.cache.record(),
        "prefetch": run.config.train.prefetch,
        **run.pairing_scalars,
    }


def _finish(run: _Run, last_loss: float, throughput: float) -> PretrainResult:
    """Final checkpoint (unless the run had already finished) and ``run.json``."""
    finished_before = run.resume is not None and bool(run.resume.get("finished"))
    final_state = run.resume if finished_before else _checkpoint_state(run, run.max_steps, finished=True)
    if run.is_main and not finished_before:
        save_checkpoint(run.checkpoint_dir / FINAL, final_state)
        save_checkpoint(run.checkpoint_dir / LAST, final_state)
    run.fabric.barrier()
    wall_time = float(final_state["wall_time_s"])
    run_record = _run_record(run, wall_time, last_loss)
    if run.is_main:
        write_text_atomic(run.output_dir / "run.json", json.dumps(run_record, indent=2))
    return PretrainResult(output_dir=run.output_dir, checkpoint=run.checkpoint_dir / FINAL, steps=run.max_steps,
                          wall_time_s=wall_time, images_per_s=throughput, final_loss=last_loss,
                          backbone_spec=run.spec, run_record=run_record, method=run.core)


def _announce(run: _Run) -> Any:
    """Resume message, config.yaml, and the progress bar (main process only; None elsewhere)."""
    if not run.is_main:
        return None
    if run.resume is not None:
        if run.resume.get("finished"):
            print(f"radssl: {run.checkpoint_dir / FINAL} already finished; nothing to train")
        else:
            print(f"radssl: resuming from step {run.start_step} ({latest_checkpoint(run.checkpoint_dir)})")
    run.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.output_dir / "config.yaml", dump_config(run.config))
    if not run.config.train.progress_bar or run.start_step >= run.max_steps:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.max_steps, initial=run.start_step, desc=f"pretrain {run.config.method.name}", unit="step")


# ----------------------------------------------------------------------------------------------------- loop
def pretrain(
    config: PretrainConfig,
    store: ImageStore | None = None,
    halt_after_step: int | None = None,
    fabric: Any = None,
    initial_backbone: InitialBackbone | None = None,
    initial_backbone_source: str = "",
    policy: ViewPolicy | None = None,
) -> PretrainResult:
    """Run (or resume) SSL pretraining as configured; returns the checkpoint, cost and the trained method.

    ``initial_backbone`` (a backbone or its state dict) is the starting point of a fresh run, e.g. ImageNet weights
    for ImageNet→SSL; ``initial_backbone_source`` names it in the checkpoint and ``run.json``. A resumed run
    continues from its checkpoint whatever is passed. ``policy`` replaces the configured view policy (tests,
    custom pairings). ``halt_after_step`` raises :class:`SimulatedCrash` once that many steps are done (tests).
    Nothing is written before the data, backbone, policy and method have been checked against each other.
    """
    run = _setup(config, store, fabric, initial_backbone, initial_backbone_source, policy)
    train = config.train
    progress = _announce(run)
    metrics_log = _MetricsLog(run.output_dir, run.start_step, enabled=run.is_main)
    window, last_loss, throughput = _Window(), float("nan"), 0.0
    run.model.train()
    try:
        with Prefetcher(run.views, range(run.start_step, run.max_steps), run.fabric.device,
                        enabled=train.prefetch, threads=train.prefetch_threads) as batches:
            for step, batch in batches:
                outputs, lr, momentum = _train_step(run, step, batch)
                window.add(outputs, batch)
                done = step + 1
                if done % train.log_every == 0 or done == run.max_steps:
                    last_loss, throughput, means = window.flush(done, run.global_batch)
                    metrics_log.log({"step": done, "epoch": round(done / run.steps_per_epoch, 4), "loss": last_loss,
                                     "lr": lr, "images_per_s": throughput, **means, **run.pairing_scalars,
                                     **({} if momentum is None else {"momentum": momentum})})
                    if progress is not None:
                        progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{throughput:.0f}")
                if progress is not None:
                    progress.update(1)
                if done % train.checkpoint_every == 0 and done < run.max_steps:
                    if run.is_main:
                        save_checkpoint(run.checkpoint_dir / LAST, _checkpoint_state(run, done, finished=False))
                    run.fabric.barrier()
                if halt_after_step is not None and done >= halt_after_step:
                    raise SimulatedCrash(f"halted after step {done}")
    finally:
        if progress is not None:
            progress.close()
        metrics_log.close()
    return _finish(run, last_loss, throughput)
