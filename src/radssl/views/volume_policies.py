"""The ``neighbouring_crops`` view policy: two views cut from two nearby regions of one volume.

A volume holds many small, partly overlapping pieces of anatomy; two regions whose centres lie within a few
voxels of each other show the same tissue from shifted vantage points, a positive pair that teaches locality
without relying on augmentation alone (sub-volume positives as in Chaitanya et al., NeurIPS 2020,
arXiv:2006.10511, and Tang et al., CVPR 2022, arXiv:2111.14791). With ``max_centre_distance: 0`` both views come
from the same region (sub-volume positives: two augmentations of one crop).

For each anchor a region of ``region_size`` voxels is centred uniformly where it fits in the stored volume; the
partner region's centre is drawn uniformly in a ball of radius ``max_centre_distance`` voxels around it and then
clamped to where a region fits (clamping moves each coordinate towards the anchor's, so the distance bound holds).
Each view is then augmented as usual (``views`` augmentation keys: random resized crop *inside* its region,
flips, rotations, intensity...). Region and augmentation crop are composed into the augmenter's one affine warp,
so no sub-volume is ever copied out. The second view comes from the partner row ``views.pairing`` chooses (itself
by default), at the partner region. Distances are in voxels of the stored grid (not mm). The run logs the mean
centre distance of each step's pairs as ``crop_centre_distance``.

Works for 2D images too (neighbouring patches of a large radiograph or mammogram), hence no 3D-only code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from radssl.errors import ConfigError
from radssl.views.augment import BatchAugmenter
from radssl.views.batch import ViewBatch, ViewLayout
from radssl.views.columns import PairingColumns
from radssl.views.policies import PolicyContext, ViewPolicy, ViewSettings, normalise_view


class NeighbouringCropParams(BaseModel):
    """The policy's own ``views`` keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region_size: int | tuple[int, ...] | None = Field(
        None, description="voxels per side (or per axis, D H W) of the region each view is cut from; "
                          "null = the view size (views.output_size)")
    max_centre_distance: float = Field(
        8.0, ge=0.0, description="largest distance in voxels between the centres of the two regions")


@dataclass
class NeighbouringCropBatch(ViewBatch):
    """A :class:`ViewBatch` that also logs the mean distance between the two regions' centres.

    ``extras["region_centres"]`` (B, 2, n) holds the anchor and partner centres in voxels, (D, H, W) order.
    """

    centre_distance: torch.Tensor | None = None
    """(B,) distance in voxels between the two regions' centres."""

    def log_scalars(self) -> dict[str, float]:
        scalars = super().log_scalars()
        if self.centre_distance is not None:
            scalars["crop_centre_distance"] = float(self.centre_distance.mean())
        return scalars


class NeighbouringCropPolicy(ViewPolicy):
    """Two augmented views of two regions of one volume whose centres are at most ``max_centre_distance`` apart."""

    name = "neighbouring_crops"
    Params: ClassVar[type[BaseModel]] = NeighbouringCropParams

    def __init__(self, settings: ViewSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        params: NeighbouringCropParams = self.params  # type: ignore[assignment]
        volume = tuple(context.input_size)
        dims = len(volume)
        if params.region_size is None:
            region = tuple(min(o, v) for o, v in zip(context.output_size, volume))
        elif isinstance(params.region_size, int):
            region = (params.region_size,) * dims
        else:
            region = tuple(params.region_size)
        if len(region) != dims or min(region) < 1:
            raise ConfigError(f"views.region_size {params.region_size!r} must be one positive size or {dims} "
                              f"(one per axis of the stored {dims}D images {volume})")
        if any(r > v for r, v in zip(region, volume)):
            raise ConfigError(f"views.region_size {region} is larger than the stored images {volume} — choose a "
                              "region that fits inside them")
        if params.max_centre_distance > 0 and region == volume:
            raise ConfigError(f"views.region_size {region} equals the stored image size, so two regions cannot lie "
                              f"apart — set views.region_size below {volume} (or max_centre_distance: 0)")
        self.region = region
        self.augmenter = BatchAugmenter(settings.augment, context.output_size)

    def layout(self) -> ViewLayout:
        return ViewLayout(sizes=(tuple(self.context.output_size),) * 2)

    # ------------------------------------------------------------------ geometry
    def region_centres(self, batch: int, device: torch.device,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchor, partner) region centres, (B, n) voxel coordinates in (D, H, W) order (voxel i's centre is i)."""
        volume = torch.tensor(self.context.input_size, dtype=torch.float32, device=device)
        region = torch.tensor(self.region, dtype=torch.float32, device=device)
        low = region / 2 - 0.5  # the region [c - r/2, c + r/2] stays inside [-0.5, size - 0.5]
        high = volume - region / 2 - 0.5
        n = volume.numel()
        anchor = low + (high - low) * torch.rand(batch, n, device=device, generator=generator)
        direction = torch.randn(batch, n, device=device, generator=generator)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp(min=1e-12)
        # uniform in the ball: radius ∝ u^(1/n)
        radius = self.params.max_centre_distance * torch.rand(batch, 1, device=device, generator=generator) ** (1 / n)
        partner = torch.maximum(torch.minimum(anchor + radius * direction, high), low)
        return anchor, partner

    def _view(self, volumes: torch.Tensor, centres: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment ``volumes`` with the augmentation crop placed inside the region centred at ``centres``."""
        size = torch.tensor(self.context.input_size, dtype=torch.float32, device=volumes.device)
        region = torch.tensor(self.region, dtype=torch.float32, device=volumes.device)
        parameters = self.augmenter.sample_parameters(volumes.shape[0], volumes.device, generator, self.region)
        # Normalised coordinates (align_corners=False): voxel centre i ↦ (2i + 1) / size - 1; the augmenter's
        # coordinates are (x = W, y = H, z = D), ours (D, H, W): flip the axis order.
        region_centre = ((2 * centres + 1) / size - 1).flip(-1)
        region_extent = (region / size).flip(-1)
        parameters["crop_center"] = region_centre + region_extent * parameters["crop_center"].to(torch.float32)
        parameters["crop_extent"] = region_extent * parameters["crop_extent"].to(torch.float32)
        view = self.augmenter.apply(volumes, parameters)
        assert isinstance(view, torch.Tensor)
        return normalise_view(view, self.context.channels_last)

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                 generator: torch.Generator) -> NeighbouringCropBatch:
        first, second, partner_rows = self.pair_images(rows, images, columns, generator)
        anchor, partner = self.region_centres(rows.shape[0], first.device, generator)
        views = [self._view(first, anchor, generator), self._view(second, partner, generator)]
        return NeighbouringCropBatch(
            views=views, rows=rows, partner_rows=partner_rows,
            extras={"region_centres": torch.stack([anchor, partner], dim=1)},
            centre_distance=(anchor - partner).norm(dim=1),
        )
