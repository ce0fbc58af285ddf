"""Where a pretraining step's images come from, and which views step ``s`` gets.

Two ways for the pretraining images to reach the model (``train.device_cache``):
- **resident**: the whole pretraining set is copied once onto the training device as one tensor; a step indexes it.
  Fastest when it fits.
- **streamed**: nothing is copied up front; each step's rows are gathered from the store's images (a memory-mapped
  cache on disk, read on demand by the page cache) into a pinned host buffer (on CUDA) and copied to the device
  asynchronously. Memory on the device is one step's batch, whatever the size of the archive.

Both hand a view policy an object with ``index_select(0, positions)`` over *positions in the pretraining set*, so a
policy (``radssl.views``) cannot tell them apart, and the views of step ``s`` are the same bytes in either mode:
:class:`StepViews` draws them from ``(seed, s, rank)`` only (epoch permutation seeded by ``(seed, epoch)``, the
augmentation generator reseeded by ``(seed, step, rank)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from radssl.data.store import StoreRows
from radssl.views.batch import ViewBatch
from radssl.views.columns import PairingColumns
from radssl.views.policies import ViewPolicy

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates seeds derived from (seed, step, rank)

CacheMode = Literal["resident", "streamed"]


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and platforms (no Python ``hash``)."""
    value = 0
    for part in parts:
        value = (value * _MIX + int(part) + 1) % (1 << 63)
    return value


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derived_seed(seed, epoch, 17))
    return torch.randperm(n, generator=generator)


# ------------------------------------------------------------------------------------------ device cache
@dataclass(frozen=True)
class DeviceCacheChoice:
    """Resident or streamed, and why (logged, and recorded in ``run.json``)."""

    mode: CacheMode
    reason: str
    images_bytes: int
    budget_bytes: int | None = None

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "images_bytes": self.images_bytes,
                "budget_bytes": self.budget_bytes}


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the resident set would live: the CUDA device's free memory, else available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def choose_device_cache(setting: str, images_bytes: int, device: torch.device,
                        budget_gb: float | None = None) -> DeviceCacheChoice:
    """``always`` → resident, ``never`` → streamed, ``auto`` → resident when the pretraining images fit the budget
    (``budget_gb``, or half the free memory of ``device`` — half, so the model, optimiser and activations keep room)."""
    if setting == "always":
        return DeviceCacheChoice("resident", "train.device_cache is 'always'", images_bytes)
    if setting == "never":
        return DeviceCacheChoice("streamed", "train.device_cache is 'never'", images_bytes)
    if setting != "auto":
        raise ValueError(f"train.device_cache must be auto, always or never, got {setting!r}")
    if budget_gb is not None:
        budget, what = int(budget_gb * 1e9), f"train.device_cache_budget_gb = {budget_gb:g}"
    else:
        budget = free_memory_bytes(device) // 2
        what = "half the free " + ("device memory" if device.type == "cuda" else "RAM")
    fits = images_bytes <= budget
    reason = (f"auto: the pretraining images take {images_bytes / 1e9:.3g} GB, "
              f"{'within' if fits else 'over'} the budget of {budget / 1e9:.3g} GB ({what})")
    return DeviceCacheChoice("resident" if fits else "streamed", reason, images_bytes, budget)


def pretraining_images(store_images: torch.Tensor, rows: np.ndarray, device: torch.device,
                       mode: CacheMode) -> torch.Tensor | StoreRows:
    """What the view policy indexes: the resident copy on ``device``, or a :class:`StoreRows` reader that gathers
    each step's rows from the (memory-mapped) store onto ``device``."""
    if mode == "resident":
        return store_images.index_select(0, torch.from_numpy(np.asarray(rows, dtype=np.int64))).to(device)
    if store_images.device.type != "cpu":
        raise ValueError(f"streamed images must come from a CPU (memory-mapped) store, got {store_images.device}")
    return StoreRows(store_images, rows, device)


# ------------------------------------------------------------------------------------------ step → views
@dataclass
class StepViews:
    """``views(step)``: the batch of one step, a pure function of ``(seed, step, rank)`` and the data.

    The epoch permutation is cached (one per epoch), and the augmentation generator is reseeded every step, so calls
    may come from any thread in step order (the prefetcher's) or from the training loop itself with the same bytes.
    """

    policy: ViewPolicy
    images: torch.Tensor | StoreRows  # resident or streamed
    columns: PairingColumns
    seed: int
    rank: int
    local_batch: int
    global_batch: int
    steps_per_epoch: int
    n_rows: int
    device: torch.device
    _epoch: int = field(default=-1, init=False, repr=False)
    _permutation: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), init=False,
                                       repr=False)
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def rows(self, step: int) -> torch.Tensor:
        """Positions (in the pretraining set) of this rank's images at ``step``, on the CPU."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._permutation = epoch, epoch_permutation(self.seed, epoch, self.n_rows)
        begin = position * self.global_batch + self.rank * self.local_batch
        return self._permutation[begin : begin + self.local_batch]

    def __call__(self, step: int) -> ViewBatch:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        batch_rows = self.rows(step).to(self.device)
        self._generator.manual_seed(derived_seed(self.seed, step, self.rank))
        return self.policy(batch_rows, self.images, self.columns, self._generator)
