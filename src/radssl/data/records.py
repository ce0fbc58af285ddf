"""The hand-off between file readers (DICOM, NIfTI, image folders) and preprocessing.

A reader turns files into ``Record``s: pixels in physical units (HU for CT, raw for MR/US/X-ray) plus the
metadata that splits and positive-pair policies need. Preprocessing turns a record into compact arrays; the
cache then stacks them into an ``ImageStore``. Readers never decide training behaviour.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from radssl.atomic import write_text_atomic
from radssl.errors import DataError

BadFilePolicy = Literal["error", "skip"]


@dataclass
class Record:
    """One image (H, W), multi-channel image (C, H, W) or volume (D, H, W) with its metadata.

    ``spacing`` is in mm, ordered like the pixel axes. ``index`` is the slice or frame index within its series
    (None for single images). ``label`` is a class index, a list of 0/1 for multilabel, or None (unlabelled).
    """

    pixels: np.ndarray
    path: str
    patient_id: str = ""
    study_id: str = ""
    series_id: str = ""
    modality: str = ""
    spacing: tuple[float, ...] = ()
    index: int | None = None
    label: int | list[int] | None = None
    split: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadUnit:
    """One independent piece of reading work: ``load(*args)`` decodes it into records (with pixels).

    Why: a reader that plans its work as units (a file, a NIfTI case, a DICOM series already ordered from its
    headers) lets ``radssl.data.ingest`` decode them in worker processes, one at a time, in a fixed order.
    ``load`` must be a module-level function and ``args`` picklable (they travel to a worker process); ``where``
    names the file or series in error messages. A bad unit raises ``DataError``.
    """

    where: str
    load: Callable[..., list[Record]]
    args: tuple[Any, ...] = ()
    preprocessed: bool = False
    """``load`` gives records whose ``pixels`` are already the preprocessed array (read in this process)."""

    def read(self) -> list[Record]:
        """Decode this unit into its records."""
        return self.load(*self.args)


@dataclass
class BadFileLog:
    """Collects bad files under ``on_bad_file: skip``; raises at once under ``error``.

    Never a silent drop: skipped files are counted, listed and written to a report file.
    """

    policy: BadFilePolicy = "error"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def handle(self, error: DataError) -> None:
        """Raise ``error`` (policy ``error``) or record it (policy ``skip``)."""
        if self.policy == "error":
            raise error
        self.skipped.append((error.source, str(error)))

    def write_report(self, path: Path) -> None:
        """Write the list of skipped files (JSON) atomically; written even when empty, so absence is visible."""
        payload = {"skipped": len(self.skipped), "files": [{"path": p, "error": e} for p, e in self.skipped]}
        write_text_atomic(Path(path), json.dumps(payload, indent=2))
