"""Helpers shared by tests (importable as ``support`` because tests/ is on sys.path under pytest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.data.store import ImageStore, TaskInfo


def medmnist_file(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / name, data_dir / "medmnist" / name):
        if candidate.is_file():
            return candidate
    pytest.skip(f"{name} not found under {data_dir}")


def make_tiny_store(n: int = 96, size: int = 16, seed: int = 0) -> ImageStore:
    """A small binary store with a learnable signal (bright square for class 1)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 120, (n, 1, size, size), generator=generator, dtype=torch.uint8)
    images[labels == 1, :, size // 4 : size // 2, size // 4 : size // 2] = 230
    split = np.array(["train"] * (n * 3 // 4) + ["val"] * (n // 8) + ["test"] * (n - n * 3 // 4 - n // 8))
    return ImageStore(
        name="tiny",
        images=images,
        labels=labels.long(),
        split=split,
        patient_id=np.array([f"p{i // 2}" for i in range(n)]),
        task=TaskInfo("binary", 2, ("negative", "positive")),
    )
