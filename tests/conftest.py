"""Shared fixtures: real data found through RADSSL_DATA_DIR (skipped cleanly when absent), tiny stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from radssl.data.store import ImageStore

from support import make_tiny_store


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real-data folder from RADSSL_DATA_DIR; tests that need it skip when it is not set."""
    value = os.environ.get("RADSSL_DATA_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("RADSSL_DATA_DIR is not set to a folder with the real test data")
    return Path(value)


@pytest.fixture
def tiny_store() -> ImageStore:
    return make_tiny_store()


@pytest.fixture(autouse=True)
def _few_threads() -> None:
    torch.set_num_threads(2)
