"""Foundation weights as an initialisation: ``timm:…``, ``hf:…``, ``torchvision:<arch>:…``, ``monai:<arch>:…``.

A study compares these arms beside ``random`` / ``imagenet`` / ``ssl`` (frozen features, fine-tuning, segmentation
through the U-Net decoder where the architecture gives multi-scale maps), and a pretraining run continues SSL from
them (``model.weights`` in the pretraining config: foundation → SSL on the user's images, the modern form of the
ImageNet → SSL arm). Weights are read from local files only; the backbone wrappers and the strict loader live in
:mod:`radssl.models.foundation` and :mod:`radssl.models.foundation_weights` (the engine needs them for continued
SSL, and the engine must not import ``transfer``). Input adaptation — grey replicated to the model's channels, the
model's own input size and normalisation, patch-size checks — is documented there.

Zero-shot classification with a foundation model's own text tower (CLIP-style) is not offered: the image tower is
kept and the text tower's keys are listed as dropped in the provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radssl.models.base import Backbone
from radssl.models.foundation import FOUNDATION_FAMILIES
from radssl.models.foundation_weights import (
    FoundationSource,
    foundation_spec,
    is_foundation,
    load_foundation,
    parse_foundation,
    provenance_text,
)

FOUNDATION_KINDS = FOUNDATION_FAMILIES
"""Initialisation kinds that load a foundation model from a local file or folder."""

__all__ = ["FOUNDATION_KINDS", "FoundationInit", "FoundationSource", "foundation_spec", "initialise_foundation",
           "is_foundation", "parse_foundation", "provenance_text"]


@dataclass
class FoundationInit:
    """A loaded foundation initialisation: the backbone and where its weights came from (file, SHA-256, …)."""

    backbone: Backbone
    provenance: dict[str, Any]

    @property
    def source(self) -> str:
        """One line for ``initial_backbone`` records: the init string and the weights' hash."""
        return provenance_text(self.provenance)


def initialise_foundation(text: str, in_channels: int, image_size: tuple[int, ...],
                          input_size: list[int] | None = None) -> FoundationInit:
    """The backbone of ``text`` for data of ``in_channels`` × ``image_size``, weights loaded strictly.

    The backbone also carries ``provenance`` (an attribute outside its state dict) so callers that only see the
    module can record it.
    """
    backbone, provenance = load_foundation(text, in_channels, tuple(image_size), input_size)
    backbone.provenance = provenance  # type: ignore[attr-defined]
    return FoundationInit(backbone, provenance)
