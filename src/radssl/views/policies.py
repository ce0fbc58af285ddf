"""View policies: map one step's rows (+ the stored images and their metadata) to a :class:`ViewBatch`.

A policy is chosen in the config (``views.policy``) from ``POLICIES``; its own keys sit beside the augmentation
ranges in the ``views`` section and are validated by its ``Params`` model. The engine only calls
``prepare(columns)`` once and ``policy(rows, images, columns, generator)`` per step, so a test or a user can plug in
a policy by registering it (:func:`register_policy`) without patching any class.

Built-in: ``two_view`` (two augmentations; the second of the *partner* row chosen by ``views.pairing`` — itself,
another image of the patient, a nearby slice or frame) and ``single_view`` (one augmentation, for masked-image
modelling). Every view is normalised with the project's one input convention
(:func:`radssl.transfer.features.normalise_for_backbone` constants).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from radssl.data.store import NORMALISATION_MEAN, NORMALISATION_STD, images_to_float
from radssl.errors import ConfigError
from radssl.registry import Registry
from radssl.views.augment import AugmentationParams, BatchAugmenter
from radssl.views.batch import ViewBatch, ViewLayout
from radssl.views.columns import PairingColumns
from radssl.views.pairing import Pairing, PairingParams, build_pairing

class NoPolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class ViewSettings:
    """Everything the ``views`` config section says: policy name, its params, augmentation, pairing."""

    policy: str = "two_view"
    augment: AugmentationParams = field(default_factory=AugmentationParams)
    pairing: PairingParams = field(default_factory=PairingParams)
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyContext:
    """What a policy needs to know about the data and the device layout."""

    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    channels: int = 1
    channels_last: bool = False


def normalise_view(view: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """[0, 1] float view → backbone input convention, in place; channels-last memory (2D or 3D) when asked."""
    view = view.sub_(NORMALISATION_MEAN).div_(NORMALISATION_STD)
    if channels_last and view.ndim in (4, 5):
        view = view.contiguous(memory_format=torch.channels_last if view.ndim == 4 else torch.channels_last_3d)
    return view


class ViewPolicy:
    """Base of every policy. Subclasses set ``name``, optionally ``Params``, and implement ``layout``/``__call__``."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = NoPolicyParams
    uses_pairing: ClassVar[bool] = True

    def __init__(self, settings: ViewSettings, context: PolicyContext) -> None:
        self.settings = settings
        self.context = context
        self.params = self.Params(**settings.params)
        if not self.uses_pairing and settings.pairing.kind != "none":
            raise ConfigError(f"views.policy '{self.name}' makes no positive pairs, so views.pairing "
                              f"'{settings.pairing.kind}' has no effect — remove it or use policy two_view")
        self._pairing: Pairing | None = None

    # ---------------------------------------------------------------- pairing
    def prepare(self, columns: PairingColumns) -> dict[str, float]:
        """Build the partner tables once (errors before compute); returns scalars worth logging once."""
        self._pairing = build_pairing(self.settings.pairing, columns)
        if self.settings.pairing.kind == "none":
            return {}
        return {"pairing_coverage": self._pairing.coverage()}

    def partners(self, rows: torch.Tensor, columns: PairingColumns, generator: torch.Generator) -> torch.Tensor:
        if self._pairing is None or self._pairing.columns is not columns:
            self.prepare(columns)
        assert self._pairing is not None
        return self._pairing.partners(rows, generator)

    def pair_images(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The images of ``rows`` and of their partners as float [0, 1], and the partner rows.

        Where each row is its own partner (``views.pairing: none``) the anchor batch is reused, not gathered twice,
        and the partner rows are None (what :class:`ViewBatch` records).
        """
        partner_rows = self.partners(rows, columns, generator)
        anchor = images_to_float(images.index_select(0, rows))
        if partner_rows is rows:
            return anchor, anchor, None
        return anchor, images_to_float(images.index_select(0, partner_rows)), partner_rows

    # ---------------------------------------------------------------- interface
    def layout(self) -> ViewLayout:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                 generator: torch.Generator) -> ViewBatch:  # pragma: no cover - interface
        raise NotImplementedError


class TwoViewPolicy(ViewPolicy):
    """Two augmented views: of the anchor image, and of its partner (itself unless ``views.pairing`` says so)."""

    name = "two_view"

    def __init__(self, settings: ViewSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.augmenter = BatchAugmenter(settings.augment, context.output_size)

    def layout(self) -> ViewLayout:
        return ViewLayout(sizes=(self.context.output_size,) * 2)

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                 generator: torch.Generator) -> ViewBatch:
        first, second, partner_rows = self.pair_images(rows, images, columns, generator)
        views = [normalise_view(self.augmenter(x, generator), self.context.channels_last) for x in (first, second)]
        return ViewBatch(views=views, rows=rows, partner_rows=partner_rows)


class SingleViewPolicy(ViewPolicy):
    """One augmented view per image (masked-image modelling makes its own 'second view' by masking)."""

    name = "single_view"
    uses_pairing = False

    def __init__(self, settings: ViewSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.augmenter = BatchAugmenter(settings.augment, context.output_size)

    def layout(self) -> ViewLayout:
        return ViewLayout(sizes=(self.context.output_size,))

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                 generator: torch.Generator) -> ViewBatch:
        view = self.augmenter(images_to_float(images.index_select(0, rows)), generator)
        return ViewBatch(views=[normalise_view(view, self.context.channels_last)], rows=rows)


POLICIES: Registry[ViewPolicy] = Registry("view policy", base=ViewPolicy, entries={
    "two_view": "radssl.views.policies:TwoViewPolicy",
    "single_view": "radssl.views.policies:SingleViewPolicy",
    "neighbouring_crops": "radssl.views.volume_policies:NeighbouringCropPolicy",
    "multi_crop": "radssl.views.multicrop:MultiCropPolicy",
    "restoration": "radssl.views.restoration:RestorationPolicy",
    "image_text": "radssl.views.image_text:ImageTextPolicy",
})


register_policy = POLICIES.register
"""Register a policy class under its ``name`` (usable as a decorator); later registrations win."""
policy_class = POLICIES.load


def build_policy(settings: ViewSettings, context: PolicyContext) -> ViewPolicy:
    return policy_class(settings.policy)(settings, context)
