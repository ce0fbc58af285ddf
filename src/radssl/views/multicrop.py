"""The ``multi_crop`` view policy: two global views and N small local views (Caron et al., SwAV 2020 / DINO 2021).

DINO (arXiv:2104.14294, and facebookresearch/dino ``main_dino.py``) trains on 2 global crops of 224 px covering
40–100 % of the image (``--global_crops_scale 0.4 1``) and 8 local crops of 96 px covering 5–40 %
(``--local_crops_number 8 --local_crops_scale 0.05 0.4``); the student sees all, the teacher only the global ones.
Here the global size is the run's view size and its crop range is the ``views.crop_scale`` augmentation key (so
one key, not two, sets it); the local size defaults to 3/7 of the global side (96/224), rounded to a multiple of
the ViT patch size radssl picks automatically for that image size (4 px up to 32 px, 8 up to 64, 16 above — see
``radssl.models.vit.automatic_patch_size``), so 28/32 px images get 12 px local views (3×3 patches) and 224 px
images DINO's own 96 px.

Views come out global first (``num_global = 2``). The second global view is made from the *partner* row that
``views.pairing`` chooses (itself by default), like ``two_view``'s second view; local views are crops of the
anchor image. All views of one size are augmented in one batched call (per-sample parameters, one generator).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from radssl.errors import ConfigError
from radssl.views.augment import BatchAugmenter
from radssl.views.batch import ViewBatch, ViewLayout
from radssl.views.columns import PairingColumns
from radssl.views.policies import PolicyContext, ViewPolicy, ViewSettings, normalise_view

LOCAL_TO_GLOBAL = 96 / 224
"""DINO's local / global view side (96 px / 224 px = 3/7)."""


def automatic_size_multiple(side: int) -> int:
    """The patch size radssl's ViTs use for a ``side`` px image when left automatic (models/vit.py's rule)."""
    return 4 if side <= 32 else 8 if side <= 64 else 16


def automatic_local_size(side: int, multiple: int | None = None) -> int:
    """3/7 of ``side`` rounded to the nearest multiple of ``multiple`` (default: the automatic ViT patch size)."""
    multiple = multiple or automatic_size_multiple(side)
    return max(multiple, int(round(side * LOCAL_TO_GLOBAL / multiple)) * multiple)


class MultiCropParams(BaseModel):
    """The ``multi_crop`` policy's own ``views`` keys (DINO's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_views: int = Field(8, ge=0, description="number of local views (DINO: 8)")
    local_size: int | None = Field(None, ge=4, description="local view side in px; null = 3/7 of the global side")
    local_size_multiple: int | None = Field(
        None, ge=1, description="round the automatic local size to this multiple (null: the ViT patch size rule)")
    local_crop_scale: tuple[float, float] = (0.05, 0.4)

    @field_validator("local_crop_scale")
    @classmethod
    def _fraction_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (0.0 < low <= high <= 1.0):
            raise ValueError(f"local_crop_scale must be an area-fraction range 0 < low <= high <= 1, got {value}")
        return value


class MultiCropPolicy(ViewPolicy):
    """2 global views (config size, ``views.crop_scale``) + ``local_views`` local views (``local_size``)."""

    name = "multi_crop"
    Params: ClassVar[type[BaseModel]] = MultiCropParams
    num_global: ClassVar[int] = 2

    def __init__(self, settings: ViewSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        params: MultiCropParams = self.params  # type: ignore[assignment]
        global_size = tuple(context.output_size)
        if params.local_size is not None:
            local_side = params.local_size
        else:
            local_side = automatic_local_size(min(global_size), params.local_size_multiple)
        if local_side > min(global_size):
            raise ConfigError(f"views.local_size {local_side} is larger than the global view size {global_size} — "
                              "choose a local_size below the global one (DINO: 3/7 of it)")
        self.global_size = global_size
        self.local_size = (local_side,) * len(global_size)
        self.global_augmenter = BatchAugmenter(settings.augment, global_size)
        local_augment = settings.augment.model_copy(update={"crop_scale": params.local_crop_scale})
        self.local_augmenter = BatchAugmenter(local_augment, self.local_size)

    def layout(self) -> ViewLayout:
        count = self.params.local_views  # type: ignore[attr-defined]
        return ViewLayout(sizes=(self.global_size,) * self.num_global + (self.local_size,) * count,
                          num_global=self.num_global)

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                 generator: torch.Generator) -> ViewBatch:
        anchor, partner, partner_rows = self.pair_images(rows, images, columns, generator)
        channels_last = self.context.channels_last
        # One batched call per view size: [anchor; partner] for the globals, the anchor repeated for the locals.
        global_views = self.global_augmenter(torch.cat([anchor, partner]), generator).chunk(2)
        views = [normalise_view(v, channels_last) for v in global_views]
        count = self.params.local_views  # type: ignore[attr-defined]
        if count:
            local = self.local_augmenter(anchor.repeat((count,) + (1,) * (anchor.ndim - 1)), generator)
            views += [normalise_view(v, channels_last) for v in local.chunk(count)]
        return ViewBatch(views=views, rows=rows, partner_rows=partner_rows, num_global=self.num_global)
