"""Image–text loss under two-process DDP (gloo, CPU): embeddings are gathered with gradients across processes.

A module of its own with few imports: every spawned rank imports it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from radssl.methods.image_text import image_text_loss

WORLD, PER_RANK = 2, 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    image = torch.randn(WORLD * PER_RANK, 6, generator=generator)
    text = torch.randn(WORLD * PER_RANK, 6, generator=generator)
    has_text = torch.tensor([True, True, False, True, True, True, True, True, False, True])
    ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 1, 8, 9])  # shared reports across the two ranks' halves
    return image, text, has_text, ids


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        image, text, has_text, ids = _inputs()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for gather in (True, False):  # one spawn for both: starting processes is the slow part
            local_image = image[part].clone().requires_grad_(True)
            local_text = text[part].clone().requires_grad_(True)
            loss, _, _ = image_text_loss(local_image, local_text, 5.0, 0.75, has_text[part], ids[part], gather)
            loss.backward()
            results[gather] = {"loss": loss.detach(), "image_grad": local_image.grad, "text_grad": local_text.grad}
        torch.save({"gather": results[True], "local": results[False]}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return {mode: (torch.stack([p[mode]["loss"] for p in parts]).mean(),
                   torch.cat([p[mode]["image_grad"] for p in parts]), torch.cat([p[mode]["text_grad"] for p in parts]))
            for mode in ("gather", "local")}


def test_embeddings_are_gathered_across_two_processes(tmp_path: Path) -> None:
    image, text, has_text, ids = _inputs()
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    single, _, _ = image_text_loss(image, text, 5.0, 0.75, has_text, ids)
    single.backward()
    runs = _two_ranks(tmp_path)
    loss, image_grad, text_grad = runs["gather"]
    # The mean of the per-rank losses is the global-batch loss; DDP's averaged gradient (sum over ranks / WORLD) too.
    torch.testing.assert_close(loss, single.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(image_grad / WORLD, image.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(text_grad / WORLD, text.grad, rtol=1e-4, atol=1e-6)
    local = runs["local"][0]
    assert abs(float(local) - float(single.detach())) > 1e-3, "without gathering each rank sees only its own negatives"
    for name in ("convirt", "clip"):
        from radssl.methods.registry import method_class

        assert method_class(name).Params().gather_distributed is True
