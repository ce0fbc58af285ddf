"""Shared fixtures: real data found through RADSSL_DATA_DIR (skipped cleanly when absent), tiny stores."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from radssl.data.store import ImageStore

from support import make_tiny_store, on_one_fixed_batch


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder from RADSSL_DATA_DIR; tests that need it skip when it is not set."""
    value = os.environ.get("RADSSL_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("RADSSL_DATA_DIR is not set to a folder with the real test data")
    return Path(value)


@pytest.fixture(scope="session")
def medmnist_file(data_dir: Path) -> Callable[[str], Path]:
    """``medmnist_file("pneumoniamnist.npz")``: the path of a MedMNIST file under RADSSL_DATA_DIR, else a skip.

    The one lookup every real-data test uses, in the order radssl's MedMNIST loader searches a root: the folder
    itself, then its ``medmnist/`` sub-folder. Pass ``path.parent`` where a test needs the root (``data.root``).
    """

    def find(name: str) -> Path:
        for candidate in (data_dir / name, data_dir / "medmnist" / name):
            if candidate.is_file():
                return candidate
        pytest.skip(f"{name} not found in {data_dir} or {data_dir / 'medmnist'} (RADSSL_DATA_DIR)")

    return find


@pytest.fixture
def one_fixed_batch():  # noqa: ANN201 - a function PretrainConfig → PretrainConfig
    """``one_fixed_batch(config)``: the config on one fixed batch (``support.on_one_fixed_batch``); the policies it
    registers are removed from the global registry when the test ends."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield lambda config: stack.enter_context(on_one_fixed_batch(config))


@pytest.fixture
def tiny_store() -> ImageStore:
    return make_tiny_store()


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)
