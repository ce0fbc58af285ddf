"""Per-image metadata of the pretraining set in the form view policies use: integer codes, on the CPU.

Pairing policies ask questions such as "which other images belong to this patient?" or "which slices of this series
lie within k of this one?". Strings are turned into integer codes once here, so a policy answers with tensor ops.
``-1`` means unknown (no patient id, no slice index), and an unknown value never pairs with anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from radssl.data.store import ImageStore

SLICE_COLUMNS = ("slice_index", "index")
"""Store meta columns read as the slice index within a series (``index`` is what file readers write)."""
FRAME_COLUMNS = ("frame_index", "index")
"""Store meta columns read as the frame index within a cine loop."""


def codes(values: np.ndarray) -> torch.Tensor:
    """Strings → int64 codes (equal strings, equal codes); empty strings → -1."""
    values = np.asarray(values).astype(str)
    _, inverse = np.unique(values, return_inverse=True)
    result = torch.from_numpy(inverse.astype(np.int64))
    result[torch.from_numpy(values == "")] = -1
    return result


def _first_column(meta: dict[str, np.ndarray], names: tuple[str, ...], rows: np.ndarray) -> torch.Tensor | None:
    for name in names:
        if name in meta:
            values = np.asarray(meta[name])[rows]
            if values.dtype.kind in "iu":
                return torch.from_numpy(values.astype(np.int64))
            if values.dtype.kind == "f":
                return torch.from_numpy(np.where(np.isfinite(values), values, -1).astype(np.int64))
    return None


@dataclass
class PairingColumns:
    """Codes aligned with the rows of the pretraining image tensor (row i of the tensor = entry i here).

    ``patient``, ``study``, ``series``: int64 codes (-1 unknown). ``slice_index``, ``frame_index``: int64 positions
    within a series / cine loop (-1 unknown). ``reports``: one string per row ("" = none), when the source has
    reports. ``store_rows``: each row's index in the store it came from.
    """

    patient: torch.Tensor
    study: torch.Tensor
    series: torch.Tensor
    slice_index: torch.Tensor
    frame_index: torch.Tensor
    store_rows: np.ndarray
    reports: list[str] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.patient.shape[0])

    @classmethod
    def from_store(cls, store: ImageStore, rows: np.ndarray) -> "PairingColumns":
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        unknown = torch.full((n,), -1, dtype=torch.int64)
        meta = store.meta

        def code_column(name: str) -> torch.Tensor:
            return codes(np.asarray(meta[name])[rows]) if name in meta else unknown.clone()

        series = code_column("series_id")
        slice_index = _first_column(meta, SLICE_COLUMNS, rows)
        frame_index = _first_column(meta, FRAME_COLUMNS, rows)
        reports = None
        if "report" in meta:
            reports = [str(r) if r is not None else "" for r in np.asarray(meta["report"], dtype=object)[rows]]
        return cls(
            patient=codes(store.patient_id[rows]),
            study=code_column("study_id"),
            series=series,
            slice_index=slice_index if slice_index is not None else unknown.clone(),
            frame_index=frame_index if frame_index is not None else unknown.clone(),
            store_rows=rows,
            reports=reports,
            extra={k: np.asarray(v)[rows] for k, v in meta.items() if np.asarray(v).ndim == 1},
        )
