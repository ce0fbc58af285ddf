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
from lightly.loss import NTXentLoss

WORLD = 2
BATCH = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _projections() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(WORLD * BATCH, 16, generator=generator), torch.randn(WORLD * BATCH, 16, generator=generator)


def _rank_loss(rank: int, port: int, gather: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from radssl.methods.simclr import SimCLRParams

        z0, z1 = _projections()
        local0 = z0[rank * BATCH : (rank + 1) * BATCH].clone().requires_grad_(True)
        local1 = z1[rank * BATCH : (rank + 1) * BATCH].clone()
        # The criterion SimCLR builds from its params (gather_distributed defaults to True).
        params = SimCLRParams(temperature=0.5, gather_distributed=gather)
        loss = NTXentLoss(temperature=params.temperature, gather_distributed=params.gather_distributed)(local0, local1)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local0.grad}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path: Path, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    mp.spawn(_rank_loss, args=(_free_port(), gather, str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return torch.stack([p["loss"] for p in parts]).mean(), torch.cat([p["grad"] for p in parts])


def test_simclr_negatives_are_gathered_across_processes(tmp_path: Path) -> None:
    from radssl.methods.simclr import SimCLRParams

    assert SimCLRParams().gather_distributed is True, "SimCLR gathers negatives under DDP by default"
    z0, z1 = _projections()
    z0 = z0.clone().requires_grad_(True)
    single = NTXentLoss(temperature=0.5)(z0, z1)
    single.backward()

    (tmp_path / "gather").mkdir()
    gathered_loss, gathered_grad = _run_ranks(tmp_path / "gather", gather=True)
    # With gathering, the mean of the per-rank losses is the loss over the global batch, and (after DDP's
    # gradient averaging, i.e. the sum of the per-rank gradients / WORLD) the gradients match too.
    torch.testing.assert_close(gathered_loss, single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gathered_grad / WORLD, z0.grad, rtol=1e-4, atol=1e-6)

    (tmp_path / "local").mkdir()
    local_loss, _ = _run_ranks(tmp_path / "local", gather=False)
    assert abs(float(local_loss) - float(single)) > 1e-3, "without gathering each rank sees only its own negatives"


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
