"""Checkpoints: atomic, loadable with ``torch.load(weights_only=True)``, self-describing.

A checkpoint is a plain dict of tensors and JSON-like values (no pickled classes), so it loads safely anywhere:
``method`` (full method state incl. heads and momentum encoders), ``backbone`` (what transfer needs),
``optimizer``, ``step``, ``images_seen``, ``config``, ``data_fingerprint``, ``versions``, ``wall_time_s``, ``seed``.
Files are written to a temporary name and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from radssl.atomic import torch_save_atomic
from radssl.errors import CheckpointError

LAST = "last.pt"
FINAL = "final.pt"
REQUIRED_KEYS = ("backbone", "step", "config", "data_fingerprint", "versions", "wall_time_s", "seed")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically after checking it has the keys that make it self-describing."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: refusing to write a checkpoint without {missing}")
    torch_save_atomic(Path(path), state)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load safely (``weights_only=True``); a clear error for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found — check the path (pretraining writes runs/<name>/checkpoints/final.pt)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"{path}: not a readable radssl checkpoint ({error.__class__.__name__}: {error})") from error
    if not isinstance(state, dict) or "backbone" not in state:
        raise CheckpointError(f"{path}: not a radssl checkpoint (no 'backbone' entry)")
    return state


def latest_checkpoint(directory: Path) -> Path | None:
    """The resumable checkpoint in ``directory`` (``last.pt``), if any."""
    candidate = Path(directory) / LAST
    return candidate if candidate.is_file() else None
