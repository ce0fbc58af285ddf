"""Two-process DDP on CPU (gloo): negatives are gathered across ranks and gradients are synchronised."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch

WORLD = 2
BATCH = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    shape = (WORLD * BATCH, 1, 4, 4)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


class FlattenBackbone(Backbone):
    """A weight-free encoder (flattened pixels), so the only thing a rank's loss depends on is the method."""

    family = "flatten_for_test"

    def __init__(self) -> None:
        super().__init__()
        self.feature_dim = 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


QUEUE_WARM_UP = {"moco_v2"}
"""Methods with a queue of past keys: one training-mode forward (no BatchNorm in MoCo v2's head) fills it first."""


def _method(name: str, params: dict, batch: ViewBatch | None = None) -> torch.nn.Module:
    """radssl's own method as the engine would build it (same seed on every rank), in eval mode so that the
    projection head's BatchNorm uses running statistics and each sample's embedding is independent of its batch.
    A queue method is first run once in training mode on ``batch`` (its keys enter the queue)."""
    from radssl.methods.registry import build_method

    torch.manual_seed(0)
    method = build_method(name, FlattenBackbone(), params)
    if name in QUEUE_WARM_UP and batch is not None:
        with torch.no_grad():
            method.train()(batch)
    return method.eval()


def _rank_loss(rank: int, port: int, name: str, params: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        v0, v1 = _views()
        local0 = v0[rank * BATCH : (rank + 1) * BATCH].clone().requires_grad_(True)
        local1 = v1[rank * BATCH : (rank + 1) * BATCH].clone()
        batch = ViewBatch(views=[local0, local1], rows=torch.arange(BATCH))
        method = _method(name, params, batch)
        loss = method(batch)["loss"]
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local0.grad}, Path(out) / f"rank{rank}.pt")
        # Both ranks leave the last collective before either tears gloo down: a rank that destroys the group while
        # its peer is still finishing the backward all-gather can abort the peer (seen once as SIGABRT, "terminate
        # called without an active exception", on a loaded 2-core machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path, name: str, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    tmp_path.mkdir()
    mp.spawn(_rank_loss, args=(_free_port(), name, params, str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return torch.stack([p["loss"] for p in parts]).mean(), torch.cat([p["grad"] for p in parts])


# Contrastive methods whose negatives must come from every process: name → params that switch gathering off.
GATHERING_METHODS = {
    "simclr": {"temperature": 0.5},
    "moco_v3": {},  # keys of every process are the negatives (gathered without gradient, as the reference)
    # MoCo v2's negatives are its queue; gathering decides what is enqueued (every process's keys). The queue starts
    # from random keys (MoCo's reference), so one training step first fills it (QUEUE_WARM_UP): with a queue of the
    # global batch's size, the next step's negatives are the global batch's keys with gathering and half random,
    # half local keys without — which this test sees. Own-image exclusion is off: ranks here all number their rows
    # 0..BATCH-1, so rows are not global positions as they are in the engine.
    "moco_v2": {"exclude_own_keys": False, "queue_size": WORLD * BATCH},
    # Non-contrastive, but their batch statistics must be global: Barlow Twins' cross-correlation matrix and VICReg's
    # variance/covariance terms are computed over the gathered global batch (small heads keep the test fast).
    "barlow_twins": {"projection_hidden_dim": 32, "projection_dim": 16},
    "vicreg": {"projection_hidden_dim": 32, "projection_dim": 16},
}


@pytest.mark.parametrize("name", sorted(GATHERING_METHODS))
def test_negatives_are_gathered_across_processes_by_radssls_method(tmp_path: Path, name: str) -> None:
    params = GATHERING_METHODS[name]
    v0, v1 = _views()
    v0 = v0.clone().requires_grad_(True)
    batch = ViewBatch(views=[v0, v1], rows=torch.arange(WORLD * BATCH))
    method = _method(name, params, batch)
    assert method.params.gather_distributed is True, f"{name} gathers negatives under DDP by default"
    single = method(batch)["loss"]
    single.backward()

    gathered_loss, gathered_grad = _run_ranks(tmp_path / "gather", name, params)
    # With gathering, the mean of the per-rank losses is the loss over the global batch, and (after DDP's
    # gradient averaging, i.e. the sum of the per-rank gradients / WORLD) the gradients match too.
    torch.testing.assert_close(gathered_loss, single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered_grad / WORLD, v0.grad, rtol=1e-4, atol=1e-6)

    local_loss, _ = _run_ranks(tmp_path / "local", name, {**params, "gather_distributed": False})
    assert abs(float(local_loss) - float(single.detach())) > 1e-3, "without gathering each rank sees only its own negatives"


def test_ddp_pretraining_synchronises_gradients_across_ranks(tmp_path: Path) -> None:
    worker = Path(__file__).parent / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(worker), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["world_size"] for r in reports] == [WORLD, WORLD]
    # Different ranks saw different images at every step ...
    assert all(a != b for a, b in zip(reports[0]["batch_sums"], reports[1]["batch_sums"]))
    # ... yet end with identical weights: gradients were averaged across processes.
    assert reports[0]["weights"] == reports[1]["weights"]
    assert reports[0]["checkpoint_exists"]
