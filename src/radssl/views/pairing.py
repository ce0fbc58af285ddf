"""Positive-pair selection: for each anchor row, which stored image its second view is made from.

``none`` pairs every image with itself (SimCLR/BYOL's two augmentations of one image). Medical pairings
(``patient``, ``slice``, ``frame``) pair an image with another image of the same patient, a nearby slice of the
same series or a nearby frame of the same cine loop; both partners are still augmented. A row without a partner
falls back to itself and is counted, so the run logs the share of cross-image pairs.

Adding a pairing = one :class:`Pairing` subclass + one line in ``PAIRINGS``.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from radssl.views.columns import PairingColumns


class PairingParams(BaseModel):
    """``views.pairing`` in the config: the pairing's name plus its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = "none"
    max_offset: int = Field(1, ge=1, description="|Δ slice| or |Δ frame| allowed between partners (slice/frame)")
    min_offset: int = Field(1, ge=0, description="smallest |Δ| drawn (0 lets a slice pair with itself)")


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


PAIRINGS: dict[str, str] = {
    "none": "radssl.views.pairing:SelfPairing",
}


def pairing_class(kind: str) -> type[Pairing]:
    if kind not in PAIRINGS:
        raise ValueError(f"unknown pairing '{kind}'; choose one of {sorted(PAIRINGS)}")
    module_name, class_name = PAIRINGS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_pairing(params: PairingParams, columns: PairingColumns) -> Pairing:
    return pairing_class(params.kind)(params, columns)
