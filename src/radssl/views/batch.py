"""The batch contract between view policies, methods and the engine.

A view policy turns the rows of one training step into a :class:`ViewBatch`; a method maps that batch to a loss.
Neither the engine nor a method knows how views were made (two augmentations of one image, a patient pair,
multi-crop, a corrupted image with its restoration target, an image with its report), and a policy knows nothing of
the method. What a method needs (:class:`ViewRequirements`) is checked against what a policy provides
(:class:`ViewLayout`) before any compute, so a mismatch is a config error naming both, not a shape error mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from radssl.errors import ConfigError


@dataclass
class ViewBatch:
    """One training step's inputs.

    Attributes:
        views: normalised float tensors (B, C, *spatial), one per view; sizes may differ (multi-crop). The first
            ``num_global`` views are global views (all views when ``num_global`` is None).
        rows: (B,) positions, in the pretraining set, of the images the first view was made from.
        partner_rows: (B,) positions the second view (and later ones, for pair policies) came from; None when
            every view comes from ``rows``. ``partner_rows != rows`` marks cross-image (medical) positive pairs.
        targets: per-view restoration targets (same shape as the view), for generative/restorative methods.
        masks: per-view masks aligned with the views (e.g. segmentation masks moved with the image).
        text: tokenised reports (``input_ids``, ``attention_mask``, ...), for image–text methods.
        has_text: (B,) bool, which rows have a usable report (image-only losses may use the others).
        extras: anything else a custom policy wants to hand to a matching custom method.
    """

    views: list[torch.Tensor]
    rows: torch.Tensor
    partner_rows: torch.Tensor | None = None
    num_global: int | None = None
    targets: list[torch.Tensor] | None = None
    masks: list[torch.Tensor] | None = None
    text: dict[str, torch.Tensor] | None = None
    has_text: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.rows.shape[0])

    @property
    def global_views(self) -> list[torch.Tensor]:
        return self.views if self.num_global is None else self.views[: self.num_global]

    @property
    def local_views(self) -> list[torch.Tensor]:
        return [] if self.num_global is None else self.views[self.num_global :]

    @property
    def cross_image(self) -> torch.Tensor:
        """(B,) bool: the positive pair joins two different stored images."""
        if self.partner_rows is None:
            return torch.zeros_like(self.rows, dtype=torch.bool)
        return self.partner_rows != self.rows

    def log_scalars(self) -> dict[str, float]:
        """What the engine logs about the batch itself (share of cross-image pairs for pair policies)."""
        if self.partner_rows is None:
            return {}
        return {"cross_image_share": float(self.cross_image.float().mean())}


@dataclass(frozen=True)
class ViewLayout:
    """What a policy provides: number and sizes of views, and which optional parts are filled."""

    sizes: tuple[tuple[int, ...], ...]
    num_global: int | None = None
    targets: bool = False
    masks: bool = False
    text: bool = False

    @property
    def num_views(self) -> int:
        return len(self.sizes)

    @property
    def spatial_dims(self) -> int:
        return len(self.sizes[0])

    def describe(self) -> str:
        sizes = ", ".join("×".join(map(str, s)) for s in self.sizes)
        extras = [name for name in ("targets", "masks", "text") if getattr(self, name)]
        return f"{self.num_views} view(s) [{sizes}]" + (f" + {', '.join(extras)}" if extras else "")


@dataclass(frozen=True)
class ViewRequirements:
    """What a method needs from the views; :meth:`check` compares it with a policy's layout before compute."""

    min_views: int = 2
    max_views: int | None = 2
    equal_sizes: bool = True
    targets: bool = False
    text: bool = False
    spatial_dims: tuple[int, ...] = (2,)
    backbone_families: tuple[str, ...] | None = None
    """Backbone families the method works with (None: any), e.g. MAE needs a ViT."""

    def check(self, layout: ViewLayout, method: str, policy: str, backbone_family: str | None = None) -> None:
        """Raise ConfigError naming the method, the policy and the fix when they do not fit."""
        problems = []
        if layout.num_views < self.min_views or (self.max_views is not None and layout.num_views > self.max_views):
            wanted = str(self.min_views) if self.max_views == self.min_views else \
                f"{self.min_views}–{self.max_views if self.max_views is not None else 'any'}"
            problems.append(f"needs {wanted} views but the policy makes {layout.num_views}")
        if self.equal_sizes and len(set(layout.sizes)) > 1:
            problems.append(f"needs views of one size but the policy makes {sorted(set(layout.sizes))}")
        if self.targets and not layout.targets:
            problems.append("needs restoration targets, which the policy does not provide")
        if self.text and not layout.text:
            problems.append("needs report text, which the policy does not provide")
        if layout.spatial_dims not in self.spatial_dims:
            dims = " or ".join(f"{d}D" for d in self.spatial_dims)
            problems.append(f"runs on {dims} data but the views are {layout.spatial_dims}D")
        if self.backbone_families is not None and backbone_family is not None \
                and backbone_family not in self.backbone_families:
            problems.append(f"needs a backbone from {list(self.backbone_families)}, got '{backbone_family}'")
        if problems:
            raise ConfigError(
                f"method '{method}' does not fit view policy '{policy}' ({layout.describe()}): " + "; ".join(problems)
                + " — choose a matching views.policy / model.backbone, or another method"
            )
