"""Any 3D store as a stack of 2D slices: one row per slice, carrying what slice pairing and honest splits need.

Why: many radiology datasets are volumes, while 2D backbones (and 2D pretext tasks) are cheaper and often
transfer as well; and neighbouring slices of one volume are the natural positive pairs of ``views.pairing.kind:
slice`` (Zeng et al., MICCAI 2021). ``data.slices: {axis: 0, keep: nonempty}`` on a MedMNIST 3D or a files data
section (NIfTI volumes, DICOM series) applies :func:`volumes_to_slices` right after loading, for every source alike.

What a slice row holds:

* pixels: the volume's slice at ``slice_index`` along ``axis`` (0 = depth D, 1 = rows H, 2 = columns W of the
  (D, H, W) layout; for NIfTI and DICOM series read by radssl, axis 0 is axial).
* ``series_id`` = its volume (the volume's series id where that is unique, else the volume's row), so slice pairs
  never cross volumes; ``slice_index`` = the position along ``axis`` (kept when empty slices are dropped, so
  ``|Δ slice|`` stays a physical distance); ``volume_row`` = the volume's row in the 3D store.
* label and split: the volume's. A slice's label is therefore a *volume* label (weak for the slice: an aneurysm
  volume's edge slice may not show the aneurysm), and no volume is split across train/val/test.
* patient id: the volume's; a volume without one gets ``volume:<row>`` so every patient-grouped step downstream
  (validation carving, grouped subsets) keeps a volume's slices together. The store's notes say so.
* other per-volume columns repeat; ``mask`` (N, D, H, W) is sliced like the images; ``spacing`` drops ``axis``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from radssl.data.store import ImageStore
from radssl.errors import DataError

AXIS_NAMES = ("depth (D)", "rows (H)", "columns (W)")


class SlicesConfig(BaseModel):
    """``data.slices``: read a 3D store as 2D slices along ``axis``; ``keep: nonempty`` drops constant slices."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    axis: int = Field(0, ge=0, le=2, description="0 = depth (axial for NIfTI/DICOM volumes), 1 = rows, 2 = columns")
    keep: Literal["nonempty", "all"] = Field(
        "nonempty", description="nonempty: drop slices whose pixels are all one value (padding, empty background)")


def volumes_to_slices(store: ImageStore, axis: int = 0, keep: Literal["nonempty", "all"] = "nonempty") -> ImageStore:
    """A 2D store with one row per (kept) slice of every volume of ``store`` (see the module docstring)."""
    where = store.origin or store.name
    if store.spatial_dims != 3:
        raise DataError(where, f"data.slices needs 3D volumes, but the store holds {store.spatial_dims}D images "
                               f"{list(store.image_shape)}", "remove data.slices for 2D data")
    if axis not in (0, 1, 2):
        raise DataError(where, f"data.slices.axis is {axis}; expected 0 (D), 1 (H) or 2 (W)")
    n, depth = len(store), store.image_shape[axis]
    # (N, C, D, H, W) → (N, S, C, a, b): the slicing axis next to the volume axis, then one row per slice.
    moved = store.images.movedim(2 + axis, 1)
    slices = moved.reshape(n * depth, *moved.shape[2:])
    volume = torch.arange(n).repeat_interleave(depth)
    position = torch.arange(depth).repeat(n)
    if keep == "nonempty":
        flat = slices.flatten(1)
        kept = torch.nonzero(flat.amax(1) != flat.amin(1)).flatten()
    else:
        kept = torch.arange(n * depth)
    if kept.numel() == 0:
        raise DataError(where, "every slice is empty (one value throughout)", "use data.slices.keep: all, or check the data")
    volume_rows = volume.index_select(0, kept).numpy()
    positions = position.index_select(0, kept).numpy()
    every = kept.numel() == n * depth
    # Every slice kept: the reshape is a view (for axis 0 of one-channel volumes), so a memory-mapped store
    # larger than RAM stays mapped; a selection copies the kept slices.
    images = slices if every else slices.index_select(0, kept).contiguous()

    patient = np.asarray(store.patient_id).astype(str)
    no_patient = patient == ""
    patient = np.where(no_patient, np.char.add("volume:", np.arange(n).astype(str)), patient)
    series = np.asarray(store.meta.get("series_id", np.full(n, ""))).astype(str)
    values, counts = np.unique(series, return_counts=True)
    unique = dict(zip(values.tolist(), counts.tolist()))
    series = np.asarray([s if s and unique[s] == 1 else f"{s or 'volume'}:{i}" for i, s in enumerate(series)])

    meta: dict[str, np.ndarray] = {}
    for name, column in store.meta.items():
        column = np.asarray(column)
        if name == "mask" and column.shape[1:] == tuple(store.image_shape):
            moved_mask = np.moveaxis(column, 1 + axis, 1)
            if every:
                meta[name] = moved_mask.reshape(n * depth, *moved_mask.shape[2:])
            else:
                meta[name] = np.ascontiguousarray(moved_mask[volume_rows, positions])
        elif name in ("spacing", "voxel_spacing") and column.ndim == 2 and column.shape[1] == 3:
            meta[name] = np.delete(column, axis, axis=1)[volume_rows]
        else:
            meta[name] = column[volume_rows]
    meta["series_id"] = series[volume_rows]
    meta["slice_index"] = positions.astype(np.int64)
    meta["volume_row"] = volume_rows.astype(np.int64)

    index = torch.from_numpy(volume_rows)
    notes = [
        f"volumes read as 2D slices along {AXIS_NAMES[axis]}: {len(kept)} of {n * depth} slices kept ({keep}); a "
        "slice's label is its volume's label and splits are the volumes' (no volume is split across train/val/test)"
    ]
    if no_patient.any():
        share = "no volume has" if no_patient.all() else f"{int(no_patient.sum())} of {n} volumes have no"
        notes.append(f"{share} a patient id: their slices carry the volume as patient id (volume:<row>), so "
                     "patient-grouped steps keep a volume's slices together, but volumes of one patient may still "
                     "fall in different splits")
    return replace(
        store,
        name=f"{store.name}-slices{axis}",
        images=images,
        labels=store.labels.index_select(0, index),
        split=np.asarray(store.split)[volume_rows],
        patient_id=patient[volume_rows],
        meta=meta,
        notes=tuple(store.notes) + tuple(notes),
        _fingerprint=None,
    )
