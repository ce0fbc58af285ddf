"""Atomic file writes: a reader (or a resumed run) never sees half a file.

Write to a temporary file in the target folder, flush and fsync, then ``os.replace`` (atomic on POSIX).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _write_atomic(path: Path, mode: str, write: Callable[[IO[Any]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; results and reports are meant to be shared
    try:
        with os.fdopen(handle, mode) as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``."""
    _write_atomic(path, "w", lambda stream: stream.write(text))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    _write_atomic(path, "wb", lambda stream: stream.write(data))


def torch_save_atomic(path: Path, obj: object) -> None:
    """``torch.save`` to ``path`` atomically (checkpoints survive a crash mid-write)."""
    import torch

    _write_atomic(path, "wb", lambda stream: torch.save(obj, stream))
