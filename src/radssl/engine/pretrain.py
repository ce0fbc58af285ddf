"""The SSL pretraining loop: store → batched views → method → Fabric → checkpoints.

Design choices that make it fast and exactly resumable:
- The whole pretraining set sits on the training device as one uint8 tensor; a step indexes it, augments the
  batch there (``radssl.views``) and runs the model. No DataLoader workers compete with the model for cores.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radssl.atomic import write_text_atomic
from radssl.config import PretrainConfig, dump_config
from radssl.data.store import ImageStore
from radssl.engine.checkpoint import FINAL, LAST, latest_checkpoint, load_checkpoint, save_checkpoint
from radssl.engine.optim import build_optimizer, effective_lr, lr_at, set_lr
from radssl.errors import CheckpointError, DataError, RadsslError
from radssl.methods.base import SSLMethod
from radssl.methods.registry import build_method
from radssl.models.backbones import build_backbone
from radssl.provenance import device_description, package_versions
from radssl.views.policies import TwoViewPolicy

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates seeds derived from (seed, step, rank)


class SimulatedCrash(RuntimeError):
    """Raised by ``halt_after_step`` in tests to stand in for a killed process."""


@dataclass
class PretrainResult:
    output_dir: Path
    checkpoint: Path
    steps: int
    wall_time_s: float
    images_per_s: float
    final_loss: float
    evaluation: dict[str, Any] | None
    method: SSLMethod | None = None
    """The trained method (backbone + heads) in memory, for callers that go on to transfer."""


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms (no Python ``hash``)."""
    value = 0
    for part in parts:
        value = (value * _MIX + int(part) + 1) % (1 << 63)
    return value


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, 17))
    return torch.randperm(n, generator=generator)


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


def backbone_for(config: PretrainConfig, store: ImageStore):  # noqa: ANN201 - Backbone
    """The backbone a config asks for, sized for the store's channels and images (one place for both)."""
    return build_backbone(
        config.model.backbone,
        in_channels=store.channels,
        small_input=config.model.small_input,
        image_size=max(store.image_shape),
    )


def build_pretraining_method(config: PretrainConfig, store: ImageStore) -> SSLMethod:
    return build_method(config.method.name, backbone_for(config, store), config.method.params())


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
    saved = dict(state.get("config", {}))
    current = config.to_dict()
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
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(directory / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is a declared dependency; degrade to CSV only if someone removed it
            self.writer = None

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


def pretrain(
    config: PretrainConfig,
    store: ImageStore | None = None,
    halt_after_step: int | None = None,
    fabric: Any = None,
) -> PretrainResult:
    """Run (or resume) SSL pretraining as configured; returns where the checkpoint and metrics are.

    ``halt_after_step`` raises :class:`SimulatedCrash` once that many steps are done (tests of resume).
    """
    if store is None:
        from radssl.data.build import build_store

        store = build_store(config.data)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if fabric is None:
        fabric = _make_fabric(config)
        fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    is_main = rank == 0
    output_dir = Path(config.output_dir)
    checkpoint_dir = output_dir / "checkpoints"

    rows = pretrain_rows(store, config.train.pretrain_fraction, config.seed)
    steps_per_epoch, max_steps = plan_steps(config, len(rows), world, store.origin or store.name)
    resume = _resume_state(config, store, checkpoint_dir)
    if resume is not None and resume.get("finished"):
        if is_main:
            print(f"radssl: {checkpoint_dir / FINAL} already finished; nothing to train")
        start_step = int(resume["step"])
    else:
        start_step = int(resume["step"]) if resume else 0

    torch.manual_seed(config.seed)  # identical initial weights on every rank and every resume
    method = build_pretraining_method(config, store)
    if world > 1 and config.train.sync_batchnorm and fabric.device.type == "cuda":
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    channels_last = config.train.channels_last and store.spatial_dims == 2
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    global_batch = config.train.batch_size * world
    base_lr = effective_lr(config.optim, global_batch)
    optimizer = build_optimizer(method, config.optim, base_lr)
    if resume is not None:
        method.load_state_dict(resume["method"])
        optimizer.load_state_dict(resume["optimizer"])
    core = method  # the unwrapped module: state dicts, momentum updates
    runnable: nn.Module = torch.compile(method) if config.train.compile else method
    model, optimizer = fabric.setup(runnable, optimizer)

    images = store.images.index_select(0, torch.from_numpy(rows)).to(fabric.device)
    view_size = (config.views.output_size,) * store.spatial_dims if config.views.output_size else store.image_shape
    views = TwoViewPolicy(config.views, view_size, channels_last=channels_last)
    augmentation_generator = torch.Generator(device=fabric.device)
    local_batch = config.train.batch_size

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "config.yaml", dump_config(config))
    metrics_log = _MetricsLog(output_dir, start_step, enabled=is_main)
    previous_wall = float(resume["wall_time_s"]) if resume else 0.0
    started = time.perf_counter()
    versions = package_versions()

    def checkpoint_state(step: int, finished: bool) -> dict[str, Any]:
        return {
            "method": core.state_dict(),
            "backbone": core.backbone.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "max_steps": max_steps,
            "images_seen": step * global_batch,
            "finished": finished,
            "config": config.to_dict(),
            "data_fingerprint": store.fingerprint(),
            "pretrain_rows": len(rows),
            "versions": versions,
            "device": device_description(fabric.device),
            "world_size": world,
            "wall_time_s": previous_wall + time.perf_counter() - started,
            "seed": config.seed,
        }

    progress = None
    if is_main and config.train.progress_bar and start_step < max_steps:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_steps, initial=start_step, desc=f"pretrain {config.method.name}", unit="step")

    permutation_epoch, permutation = -1, torch.empty(0, dtype=torch.long)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    last_loss, throughput = float("nan"), 0.0
    model.train()
    for step in range(start_step, max_steps):
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != permutation_epoch:
            permutation_epoch, permutation = epoch, epoch_permutation(config.seed, epoch, len(rows))
        begin = position * global_batch + rank * local_batch
        batch_rows = permutation[begin : begin + local_batch].to(fabric.device)
        augmentation_generator.manual_seed(derived_seed(config.seed, step, rank))
        inputs = views(images.index_select(0, batch_rows), augmentation_generator)

        lr = lr_at(step, max_steps, base_lr, config.optim)
        set_lr(optimizer, lr)
        loss = model(inputs)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        core.on_step_end(step, max_steps)

        window_loss += loss.detach()
        window_steps += 1
        done = step + 1
        if done % config.train.log_every == 0 or done == max_steps:
            mean_loss = float(window_loss) / window_steps
            if not math.isfinite(mean_loss):
                raise RadsslError(
                    f"pretraining loss became {mean_loss} at step {done} — lower optim.lr, "
                    "or use precision 32-true; the last good checkpoint is kept"
                )
            elapsed = time.perf_counter() - window_start
            throughput = window_steps * global_batch / max(elapsed, 1e-9)
            last_loss = mean_loss
            row = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": mean_loss, "lr": lr,
                   "images_per_s": throughput, **core.diagnostics()}
            metrics_log.log(row)
            if progress is not None:
                progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{throughput:.0f}")
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        if progress is not None:
            progress.update(1)
        if done % config.train.checkpoint_every == 0 and done < max_steps:
            if is_main:
                save_checkpoint(checkpoint_dir / LAST, checkpoint_state(done, finished=False))
            fabric.barrier()
        if halt_after_step is not None and done >= halt_after_step:
            if progress is not None:
                progress.close()
            metrics_log.close()
            raise SimulatedCrash(f"halted after step {done}")
    if progress is not None:
        progress.close()
    metrics_log.close()

    final_state = checkpoint_state(max_steps, finished=True) if resume is None or not resume.get("finished") else resume
    wall_time = float(final_state["wall_time_s"])
    if is_main:
        save_checkpoint(checkpoint_dir / FINAL, final_state)
        save_checkpoint(checkpoint_dir / LAST, final_state)
    fabric.barrier()

    evaluation = None
    if is_main:
        run_record = {
            "seed": config.seed,
            "data": store.describe(),
            "data_fingerprint": store.fingerprint(),
            "pretrain_images": len(rows),
            "steps": max_steps,
            "global_batch_size": global_batch,
            "wall_time_s": wall_time,
            "device": device_description(fabric.device),
            "world_size": world,
            "versions": versions,
            "final_loss": last_loss,
        }
        write_text_atomic(output_dir / "run.json", json.dumps(run_record, indent=2))
        if config.eval.enabled:
            from radssl.evaluation.quick import quick_evaluate, write_evaluation

            evaluation = quick_evaluate(core.backbone, store, config, device=fabric.device)
            write_evaluation(output_dir / "eval.json", evaluation)
    return PretrainResult(
        output_dir=output_dir,
        checkpoint=checkpoint_dir / FINAL,
        steps=max_steps,
        wall_time_s=wall_time,
        images_per_s=throughput,
        final_loss=last_loss,
        evaluation=evaluation,
        method=core,
    )
