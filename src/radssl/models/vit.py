"""Vision Transformers (Dosovitskiy et al., ICLR 2021, arXiv:2010.11929) from timm, sized for 1-channel 28–224 px.

timm's ``VisionTransformer`` is used as is (tested, and MAE's masked encoder in lightly wraps exactly this class), built
for the stored image size with ``in_chans`` = the store's channels. The patch size follows the image when left
automatic — 4 px up to 32 px images, 8 px up to 64 px, 16 px above — so a 28 px MedMNIST image gives a 7×7 token grid
rather than a single token. ``forward`` returns the class token after the final norm (timm's pre-logits);
``forward_features`` returns the token grids of four evenly spaced blocks as (B, D, H/p, W/p) maps (UNETR-style
skip features, Hatamizadeh et al. 2022), all at stride ``patch_size``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from pydantic import BaseModel, ConfigDict, Field
from timm.models.vision_transformer import VisionTransformer

from radssl.models.base import Backbone
from radssl.models.spec import BackboneSpec


def automatic_patch_size(image_size: tuple[int, ...]) -> int:
    side = min(image_size)
    return 4 if side <= 32 else 8 if side <= 64 else 16


class ViTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    depth: int = Field(12, gt=0, description="transformer blocks (12 in ViT-Ti/S; fewer for quick CPU runs)")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)


class _ViT(Backbone):
    embed_dim: int = 192
    num_heads: int = 3
    Options = ViTOptions

    @classmethod
    def resolve(cls, spec: BackboneSpec) -> BackboneSpec:
        if spec.image_size is None:
            raise ValueError(f"{spec.family}: a ViT needs image_size (its position embeddings depend on it)")
        if spec.patch_size is None:
            spec = replace(spec, patch_size=automatic_patch_size(spec.image_size))
        if any(side % spec.patch_size for side in spec.image_size):
            raise ValueError(f"{spec.family}: image size {spec.image_size} is not a multiple of patch_size "
                             f"{spec.patch_size} — choose a patch size that divides it (or resize the images)")
        return spec

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        options = self.options(spec)
        assert spec.image_size is not None and spec.patch_size is not None
        self.vit = VisionTransformer(
            img_size=spec.image_size, patch_size=spec.patch_size, in_chans=spec.in_channels, num_classes=0,
            embed_dim=self.embed_dim, depth=options.depth, num_heads=self.num_heads,
            drop_path_rate=options.drop_path_rate, global_pool="token",
        )
        self.feature_dim = self.embed_dim
        self.depth = options.depth
        self.feature_channels = (self.embed_dim,) * min(4, options.depth)
        self.feature_strides = (spec.patch_size,) * min(4, options.depth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        count = min(4, self.depth)
        indices = sorted({round((i + 1) * self.depth / count) - 1 for i in range(count)})
        return list(self.vit.forward_intermediates(images, indices=indices, output_fmt="NCHW",
                                                   intermediates_only=True))


class ViTTiny(_ViT):
    """ViT-Ti: 192-dim tokens, 3 heads (5.5 M parameters at depth 12)."""

    family = "vit_tiny"
    embed_dim, num_heads = 192, 3


class ViTSmall(_ViT):
    """ViT-S: 384-dim tokens, 6 heads (21.7 M parameters at depth 12)."""

    family = "vit_small"
    embed_dim, num_heads = 384, 6
