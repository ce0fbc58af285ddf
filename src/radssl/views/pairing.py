"""Positive-pair selection: for each anchor row, which stored image its second view is made from.

``none`` pairs every image with itself (SimCLR/BYOL's two augmentations of one image). The medical pairings pair
an image with another image that shows the same anatomy differently — a view the augmentations cannot invent:

* ``patient``: another image of the same patient (Azizi et al., "Big Self-Supervised Models Advance Medical Image
  Classification", ICCV 2021, multi-instance contrastive learning; Vu et al., "MedAug", MLHC 2021). By default any
  other image of the patient; ``same_study: true`` keeps the partner in the anchor's study (one visit), and
  ``other_series: true`` takes it from another series (another view/sequence, not a neighbouring slice).
* ``slice``: a slice of the same series/volume with ``min_offset ≤ |Δ slice| ≤ max_offset`` (Zeng et al.,
  "Positional Contrastive Learning for Volumetric Medical Image Segmentation", MICCAI 2021; Chaitanya et al.,
  NeurIPS 2020 use slice position the same way).
* ``frame``: a frame of the same cine loop (same slice position, where known) with
  ``min_offset ≤ |Δ frame| ≤ max_offset`` (Jiao et al., "Self-supervised representation learning for ultrasound
  video", ISBI 2020).

Both partners are still augmented (the policy augments each view). A row without a partner (a patient with one
image, a volume of one slice) falls back to itself and is counted: ``coverage()`` is logged once, and every batch
logs its share of cross-image pairs (``ViewBatch.log_scalars``).

How it stays fast for 10⁵–10⁶ rows: every medical pairing is reduced to one table built once, vectorised. Rows are
sorted by a group key; a row's candidates are at most two contiguous windows of that order ("the patient's rows
before my series' block and after it", "slices k below me and k above me"), found by ``searchsorted``. A step then
draws ``u ~ U{0 … count-1}`` per row and maps it into the windows: O(B) tensor ops on the rows' device, no Python
loop, no O(N²) pair list.

Adding a pairing = one :class:`Pairing` subclass + one line in ``PAIRINGS``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from radssl.errors import ConfigError
from radssl.registry import Registry
from radssl.views.columns import PairingColumns

_OFFSET_KINDS = ("slice", "frame")


class PairingParams(BaseModel):
    """``views.pairing`` in the config: the pairing's name plus its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "none"
    max_offset: int = Field(1, ge=1, description="|Δ slice| or |Δ frame| allowed between partners (slice/frame)")
    min_offset: int = Field(1, ge=0, description="smallest |Δ| drawn (0 lets a slice pair with itself)")
    same_study: bool = Field(False, description="patient: the partner comes from the anchor's study (one visit)")
    other_series: bool = Field(False, description="patient: the partner comes from another series than the anchor")

    @model_validator(mode="after")
    def _keys_fit_kind(self) -> "PairingParams":
        # Compared with the defaults, not with the keys given: a dumped config (every key written) reloads.
        changed = {name for name, info in type(self).model_fields.items() if getattr(self, name) != info.default}
        if self.min_offset > self.max_offset:
            raise ValueError(f"views.pairing: min_offset {self.min_offset} exceeds max_offset {self.max_offset}")
        offsets = sorted({"max_offset", "min_offset"} & changed)
        if offsets and self.kind not in _OFFSET_KINDS:
            raise ValueError(f"views.pairing: {offsets} apply to kind slice or frame, not '{self.kind}' — remove them")
        flags = sorted({"same_study", "other_series"} & changed)
        if flags and self.kind != "patient":
            raise ValueError(f"views.pairing: {flags} apply to kind patient, not '{self.kind}' — remove them")
        return self


class Pairing:
    """Chooses partner rows; built once per run from the pretraining set's metadata columns."""

    name: ClassVar[str]
    required_columns: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: PairingParams, columns: PairingColumns) -> None:
        self.params = params
        self.columns = columns

    def partners(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B,) partner positions for anchor positions ``rows`` (on ``rows``' device), drawn from ``generator``."""
        raise NotImplementedError

    def coverage(self) -> float:
        """Share of rows that have at least one partner other than themselves (logged once at start)."""
        return 0.0


class SelfPairing(Pairing):
    """Every image is its own partner: two augmentations of one image."""

    name = "none"

    def partners(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return rows


# ----------------------------------------------------------------------------------------- partner tables
class PartnerTable:
    """Each row's candidates as at most two windows of one sorted order (see the module docstring).

    ``order[first + u]`` for ``u < first_count``, else ``order[second + u - first_count]``, over
    ``u < count``; ``count == 0`` means no candidate (the row pairs with itself). ``others`` counts candidates
    other than the row itself (a window may hold the row when ``min_offset`` is 0).
    """

    def __init__(self, order: torch.Tensor, first: torch.Tensor, first_count: torch.Tensor,
                 second: torch.Tensor, count: torch.Tensor, others: torch.Tensor) -> None:
        self.order, self.first, self.first_count, self.second, self.count = order, first, first_count, second, count
        self.others = others
        self._on: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The table on ``device`` (copied once per device)."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in (self.order, self.first, self.first_count,
                                                              self.second, self.count))
        return self._on[device]

    def draw(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniform draw among each row's candidates (itself where it has none); one ``rand`` per row."""
        order, first, first_count, second, count = self.on(rows.device)
        n = count.index_select(0, rows)
        # float32 draws are fine up to 2^24 candidates per row; clamp guards the u == n rounding edge.
        u = (torch.rand(rows.shape, generator=generator, device=rows.device) * n).long()
        u = torch.minimum(u, (n - 1).clamp(min=0))
        first_n = first_count.index_select(0, rows)
        position = torch.where(u < first_n, first.index_select(0, rows) + u,
                               second.index_select(0, rows) + u - first_n)
        position = position.clamp(0, order.numel() - 1)  # rows without candidates: any valid index, replaced below
        return torch.where(n > 0, order.index_select(0, position), rows)

    def coverage(self) -> float:
        return float((self.others > 0).float().mean()) if self.others.numel() else 0.0


def _group_codes(*keys: torch.Tensor) -> torch.Tensor:
    """One int64 code per distinct tuple of keys (-1 where any key is -1)."""
    known = torch.stack(keys).ge(0).all(dim=0)
    combined = torch.zeros_like(keys[0])
    for key in keys:  # mixed radix, re-coded after each key so the product never overflows int64
        combined = combined * (int(key.max()) + 1) + key.clamp(min=0)
        combined = torch.unique(combined, return_inverse=True)[1]
    return torch.where(known, combined, torch.full_like(combined, -1))


def window_table(group: torch.Tensor, position: torch.Tensor, min_offset: int, max_offset: int) -> PartnerTable:
    """Candidates: rows of the same ``group`` with ``min_offset ≤ |Δ position| ≤ max_offset`` (-1 = unknown).

    Sorting by ``group * stride + position + max_offset`` puts every group in its own key range (the stride leaves
    ``max_offset`` of room at both ends), so the windows ``[key - max, key - min]`` and ``[key + min, key + max]``
    never reach into a neighbouring group; ``searchsorted`` finds their ends for all rows at once.
    """
    n = group.numel()
    valid = (group >= 0) & (position >= 0)
    if not bool(valid.any()):
        return _empty_table(n)
    top = int(position[valid].max())
    stride = top + 2 * max_offset + 1
    key = torch.where(valid, group * stride + position + max_offset, torch.full_like(group, -1))
    sorted_key, order = torch.sort(key, stable=True)

    def find(offset: int, side: str) -> torch.Tensor:
        # Queries in sorted order search ~3× faster (cache locality); results go back to row order.
        return _unsort(torch.searchsorted(sorted_key, sorted_key + offset, side=side), order)

    if min_offset == 0:  # one window around the row (holding the row itself)
        lo, hi = find(-max_offset, "left"), find(max_offset, "right")
        first, first_count, second, count = lo, hi - lo, hi, hi - lo
        others = count - 1
    else:
        lo1, hi1 = find(-max_offset, "left"), find(-min_offset, "right")
        lo2, hi2 = find(min_offset, "left"), find(max_offset, "right")
        first, first_count, second, count = lo1, hi1 - lo1, lo2, (hi1 - lo1) + (hi2 - lo2)
        others = count
    zero = torch.zeros_like(count)
    count = torch.where(valid, count, zero)
    first_count = torch.where(valid, first_count, zero)
    return PartnerTable(order, first, first_count, second, count, torch.where(valid, others, zero))


def _unsort(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Values computed for the sorted positions → row order (``out[order[i]] = values[i]``)."""
    out = torch.empty_like(values)
    out[order] = values
    return out


def exclusion_table(group: torch.Tensor, block: torch.Tensor) -> PartnerTable:
    """Candidates: rows of the same ``group`` outside the row's own ``block`` (block -1 = the row alone).

    Rows sorted by (group, block, row): a row's group is one contiguous range and its block a sub-range, so the
    candidates are the two windows either side of the block.
    """
    n = group.numel()
    valid = group >= 0
    if not bool(valid.any()):
        return _empty_table(n)
    rows = torch.arange(n)
    # A row with an unknown block is a block of its own (codes after every known block).
    block = torch.where(block >= 0, block, int(block.max()) + 1 + rows)
    big = int(block.max()) + 1
    key = torch.where(valid, group * big + block, torch.full_like(group, -1))
    sorted_key, order = torch.sort(key, stable=True)
    # Run boundaries of the sorted keys, in O(N): where each group's and each block's run starts and ends.
    group_sorted = torch.where(sorted_key >= 0, torch.div(sorted_key, big, rounding_mode="floor"), -1)
    group_start, group_end = _runs(group_sorted)
    block_start, block_end = _runs(sorted_key)
    group_start, group_end = _unsort(group_start, order), _unsort(group_end, order)
    block_start, block_end = _unsort(block_start, order), _unsort(block_end, order)
    first_count = block_start - group_start
    count = first_count + (group_end - block_end)
    zero = torch.zeros_like(count)
    count = torch.where(valid, count, zero)
    return PartnerTable(order, group_start, torch.where(valid, first_count, zero), block_end, count, count)


def _runs(sorted_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of a sorted tensor: start and end (exclusive) of its run of equal values."""
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    return starts.repeat_interleave(counts), ends.repeat_interleave(counts)


def _empty_table(n: int) -> PartnerTable:
    zero = torch.zeros(n, dtype=torch.int64)
    return PartnerTable(torch.arange(max(n, 1)), zero, zero, zero, zero, zero)


class TablePairing(Pairing):
    """A medical pairing: a :class:`PartnerTable` built in ``__init__``; errors name the missing column."""

    def __init__(self, params: PairingParams, columns: PairingColumns) -> None:
        super().__init__(params, columns)
        self.check_columns()
        self.table = self.build_table()
        if self.table.coverage() == 0.0:
            raise ConfigError(
                f"views.pairing '{self.name}': no image of the pretraining set has a partner "
                f"({self.no_partner_reason()}), so every pair would be an image with itself — use "
                f"views.pairing.kind: none, or data with several images per group"
            )

    def check_columns(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def build_table(self) -> PartnerTable:  # pragma: no cover - interface
        raise NotImplementedError

    def no_partner_reason(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def partners(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.table.draw(rows, generator)

    def coverage(self) -> float:
        return self.table.coverage()

    def _require(self, values: torch.Tensor, column: str, how: str) -> None:
        if not bool((values >= 0).any()):
            raise ConfigError(
                f"views.pairing '{self.name}' needs the metadata column '{column}', which no image of the "
                f"pretraining set has — {how}"
            )


PATIENT_HOW = ("give the images patient ids: DICOM PatientID; NIfTI source.patient_from (one folder per patient); "
               "folder source.patient_column or source.patient_pattern (MedMNIST has none)")
SERIES_HOW = ("give the images series ids: DICOM SeriesInstanceUID; a 3D store read as slices (data.slices, or "
              "NIfTI source.layout: axial_slices) uses its volume; folder source.series_column")
SLICE_HOW = ("read volumes as 2D slice stacks (data.slices: {axis: 0}; NIfTI source.layout: axial_slices; DICOM "
             "series with assemble: images and ImagePositionPatient/InstanceNumber) or name the CSV column "
             "(folder source.slice_column)")
FRAME_HOW = ("read cine loops frame by frame (DICOM multi-frame files with assemble: images; 4D NIfTI with "
             "fourth_axis: frames) or name the CSV column (folder source.frame_column)")


class PatientPairing(TablePairing):
    """Another image of the same patient (optionally of the same study, or of another series)."""

    name = "patient"
    required_columns = ("patient_id",)

    def check_columns(self) -> None:
        self._require(self.columns.patient, "patient_id", PATIENT_HOW)
        if self.params.same_study:
            self._require(self.columns.study, "study_id", "give the images study ids (DICOM StudyInstanceUID; "
                                                          "folder source.study_column), or drop same_study")
        if self.params.other_series:
            self._require(self.columns.series, "series_id", SERIES_HOW + ", or drop other_series")

    def build_table(self) -> PartnerTable:
        c = self.columns
        group = _group_codes(c.patient, c.study) if self.params.same_study else c.patient
        block = c.series if self.params.other_series else torch.full_like(c.patient, -1)
        return exclusion_table(group, block)

    def no_partner_reason(self) -> str:
        scope = "study" if self.params.same_study else "patient"
        other = " in another series" if self.params.other_series else ""
        return f"every {scope} has a single image{other}"


class SlicePairing(TablePairing):
    """A slice of the same series/volume with ``min_offset ≤ |Δ slice| ≤ max_offset``."""

    name = "slice"
    required_columns = ("series_id", "slice_index")

    def check_columns(self) -> None:
        self._require(self.columns.slice_index, "slice_index", SLICE_HOW)
        self._require(self.columns.series, "series_id", SERIES_HOW)
        self._require(torch.where(self.columns.series >= 0, self.columns.slice_index, -1),
                      "series_id and slice_index (on the same images)", SERIES_HOW)

    def build_table(self) -> PartnerTable:
        return window_table(self.columns.series, self.columns.slice_index, self.params.min_offset,
                            self.params.max_offset)

    def no_partner_reason(self) -> str:
        return f"no series holds two slices {self.params.min_offset}–{self.params.max_offset} apart"


class FramePairing(TablePairing):
    """A frame of the same cine loop (and slice position, where known) with ``min_offset ≤ |Δ frame| ≤ max_offset``."""

    name = "frame"
    required_columns = ("frame_index",)

    def check_columns(self) -> None:
        self._require(self.columns.frame_index, "frame_index", FRAME_HOW)
        loop = self.columns.loop
        assert loop is not None
        self._require(torch.where(loop >= 0, self.columns.frame_index, -1),
                      "loop_id or series_id (on the images with a frame_index)",
                      "give the frames a loop: DICOM SeriesInstanceUID; folder source.series_column")

    def build_table(self) -> PartnerTable:
        c = self.columns
        assert c.loop is not None
        # Frames of one loop at one slice position (4D volumes read as slices); unknown slice = the whole loop.
        slice_key = torch.where(c.slice_index >= 0, c.slice_index, torch.zeros_like(c.slice_index))
        group = torch.where(c.loop >= 0, _group_codes(c.loop, slice_key), torch.full_like(c.loop, -1))
        return window_table(group, c.frame_index, self.params.min_offset, self.params.max_offset)

    def no_partner_reason(self) -> str:
        return f"no loop holds two frames {self.params.min_offset}–{self.params.max_offset} apart"


PAIRINGS: Registry[Pairing] = Registry("pairing", base=Pairing, entries={
    "none": "radssl.views.pairing:SelfPairing",
    "patient": "radssl.views.pairing:PatientPairing",
    "slice": "radssl.views.pairing:SlicePairing",
    "frame": "radssl.views.pairing:FramePairing",
})


pairing_class = PAIRINGS.load


def build_pairing(params: PairingParams, columns: PairingColumns) -> Pairing:
    return pairing_class(params.kind)(params, columns)
