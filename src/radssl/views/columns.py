"""Per-image metadata of the pretraining set in the form view policies use: integer codes, on the CPU.

Pairing policies ask questions such as "which other images belong to this patient?" or "which slices of this series
lie within k of this one?". Strings are turned into integer codes once here, so a policy answers with tensor ops.
``-1`` means unknown (no patient id, no slice index), and an unknown value never pairs with anything.

Where the columns come from (store columns, written by every source that has the information):

* ``store.patient_id`` → ``patient``; ``meta["study_id"]`` → ``study``; ``meta["series_id"]`` → ``series`` (a 3D
  volume, a DICOM series, a CSV ``series_column``).
* ``meta["slice_index"]`` → ``slice_index``: position along the slice normal within the series (DICOM series read
  as images, NIfTI ``layout: axial_slices``, ``data.slices`` on any 3D store, CSV ``slice_column``).
* ``meta["frame_index"]`` → ``frame_index``: time point within a cine loop (DICOM multi-frame ultrasound, 4D NIfTI,
  CSV ``frame_column``); ``meta["loop_id"]`` → ``loop``: which loop (a multi-frame file, a 4D case), falling back
  to the series where a source gives none.

Slices and frames are separate columns on purpose: a frame number is time, a slice number is space, and a 4D
NIfTI read as axial slices has both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from radssl.data.store import ImageStore
from radssl.errors import DataError

SLICE_COLUMN = "slice_index"
"""Store meta column read as the slice index within a series (spatial position, -1 unknown)."""
FRAME_COLUMN = "frame_index"
"""Store meta column read as the frame index within a cine loop (time, -1 unknown)."""
LOOP_COLUMN = "loop_id"
"""Store meta column naming the cine loop a frame belongs to ("" = the row's series)."""


def codes(values: np.ndarray) -> torch.Tensor:
    """Strings → int64 codes (equal strings, equal codes); empty strings → -1."""
    values = np.asarray(values).astype(str)
    _, inverse = np.unique(values, return_inverse=True)
    result = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
    result[torch.from_numpy(values == "")] = -1
    return result


def index_column(meta: dict[str, np.ndarray], name: str, rows: np.ndarray, where: str) -> torch.Tensor | None:
    """An integer position column (-1 unknown): ints as they are, NaN/negative floats and empty strings → -1."""
    if name not in meta:
        return None
    values = np.asarray(meta[name])[rows]
    if values.dtype.kind in "iub":
        out = values.astype(np.int64)
    elif values.dtype.kind == "f":
        out = np.where(np.isfinite(values), values, -1).astype(np.int64)
    else:
        text = np.char.strip(values.astype(str))
        try:
            out = np.asarray([int(float(v)) if v not in ("", "nan", "None") else -1 for v in text], dtype=np.int64)
        except ValueError:
            bad = next(v for v in text if v not in ("", "nan", "None") and not _is_number(v))
            raise DataError(where, f"metadata column '{name}' holds '{bad}'; expected an integer position",
                            f"fix the {name} values (empty = unknown)") from None
    out[out < 0] = -1
    return torch.from_numpy(out)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class PairingColumns:
    """Codes aligned with the rows of the pretraining image tensor (row i of the tensor = entry i here).

    ``patient``, ``study``, ``series``: int64 codes (-1 unknown). ``slice_index``, ``frame_index``: int64 positions
    within a series / cine loop (-1 unknown). ``loop``: int64 code of the cine loop a frame belongs to (defaults to
    ``series``). ``reports``: one string per row ("" = none), when the source has reports. ``store_rows``: each
    row's index in the store it came from.
    """

    patient: torch.Tensor
    study: torch.Tensor
    series: torch.Tensor
    slice_index: torch.Tensor
    frame_index: torch.Tensor
    store_rows: np.ndarray
    reports: list[str] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    loop: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.loop is None:
            self.loop = self.series.clone()

    def __len__(self) -> int:
        return int(self.patient.shape[0])

    @classmethod
    def from_store(cls, store: ImageStore, rows: np.ndarray) -> "PairingColumns":
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        unknown = torch.full((n,), -1, dtype=torch.int64)
        meta = store.meta
        where = store.origin or store.name

        def text_column(name: str) -> np.ndarray:
            return np.asarray(meta[name]).astype(str)[rows] if name in meta else np.full(n, "", dtype="<U1")

        series_text = text_column("series_id")
        loop_text = text_column(LOOP_COLUMN)
        # A frame's loop: its own loop id where the source names one, else its series (distinct code spaces).
        loop_key = np.where(loop_text != "", np.char.add("loop:", loop_text),
                            np.where(series_text != "", np.char.add("series:", series_text), ""))
        slice_index = index_column(meta, SLICE_COLUMN, rows, where)
        frame_index = index_column(meta, FRAME_COLUMN, rows, where)
        reports = None
        if "report" in meta:
            reports = [str(r) if r is not None else "" for r in np.asarray(meta["report"], dtype=object)[rows]]
        return cls(
            patient=codes(np.asarray(store.patient_id)[rows]),
            study=codes(text_column("study_id")),
            series=codes(series_text),
            slice_index=slice_index if slice_index is not None else unknown.clone(),
            frame_index=frame_index if frame_index is not None else unknown.clone(),
            store_rows=rows,
            reports=reports,
            extra={k: np.asarray(v)[rows] for k, v in meta.items() if np.asarray(v).ndim == 1},
            loop=codes(loop_key),
        )
