"""MAE: masked autoencoders (He et al., CVPR 2022, arXiv:2111.06377).

75 % of the patches of each image are removed at random; the ViT encoder sees only the visible ones (plus the class
token), a light transformer decoder sees the encoded tokens with mask tokens in the removed places, and a linear
layer predicts the pixels of every patch. The loss is the mean squared error on the *removed* patches only, against
pixels normalised per patch (``norm_pix_loss``, the better target in the paper's Table 1).

lightly's: ``MaskedVisionTransformerTIMM`` (the encoder: wraps the backbone's own timm ``VisionTransformer``, so
the trained weights are the backbone's and transfer unchanged) and ``MaskedVisionTransformerDecoderTIMM`` (decoder
blocks, mask token, fixed sine-cosine decoder position embedding; lightly's replacement for the deprecated
``MAEDecoderTIMM``), plus its token gather/scatter helpers. Ours: the mask is drawn from a generator seeded by
(a per-run seed, the global step, the process rank), because lightly's ``random_token_mask`` uses the global RNG,
whose state the engine does not checkpoint — a resumed run would draw different masks. The per-run seed is drawn
once from the global RNG when the method is built (the engine seeds it with ``config.seed``) and kept as a buffer,
so it is saved with the checkpoint. Patchify is ours too (lightly's asserts square images).

Encoder initialisation: ``encoder_init: keep`` (default) leaves the backbone as built or loaded — timm's ViT init
with a learned position embedding — so ``initial_backbone`` weights (ImageNet→SSL) survive; ``mae`` applies the
paper's initialisation (xavier-uniform linear layers, fixed 2D sine-cosine position embedding), which would
overwrite weights loaded into the backbone. Either way the backbone stays self-consistent for transfer.

Decoder size: the paper's decoder (8 blocks × 512 for ViT-L, 24 × 1024) costs < 10 % of the encoder per token;
the same proportions for radssl's 12-block ViT-Ti/S give 4 blocks at half the encoder width (≈ 8 % per token),
the default here (``decoder_dim: null`` = half the encoder width, 32-dim heads as the paper's decoder).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from lightly.models import utils as lightly_utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from pydantic import Field
from torch import nn

from radssl.errors import ConfigError
from radssl.methods.base import MethodOutput, MethodParams, SSLMethod
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements

_MIX = 0x9E3779B97F4A7C15


class MAEParams(MethodParams):
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of patches removed (paper: 0.75)")
    norm_pix_loss: bool = Field(True, description="per-patch normalised pixel targets (better in the paper, Table 1)")
    decoder_depth: int = Field(4, gt=0, description="decoder blocks (paper ViT-L: 8 of 24 encoder blocks)")
    decoder_dim: int | None = Field(None, gt=0, description="decoder width; null = half the encoder width")
    decoder_head_dim: int = Field(32, gt=0, description="width per decoder attention head (paper: 512/16)")
    encoder_init: Literal["keep", "mae"] = Field(
        "keep", description="keep the backbone's weights, or MAE's xavier + fixed sin-cos position embedding")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) → (B, H/p · W/p, p·p·C), patches row-major, pixels within a patch (row, column, channel)."""
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch_size * patch_size * channels)


def masked_patch_loss(predictions: torch.Tensor, images: torch.Tensor, patch_indices: torch.Tensor,
                      patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """MSE between predicted and true pixels of the patches at ``patch_indices`` (B, M), as in MAE's
    ``forward_loss``: optional per-patch normalisation (unbiased variance + 1e-6), mean per patch, mean over patches.
    """
    target = lightly_utils.get_at_index(patchify(images, patch_size), patch_indices)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    return ((predictions - target) ** 2).mean()


class MAE(SSLMethod):
    """Masked-patch pixel reconstruction with a ViT encoder that sees only the visible patches."""

    name = "mae"
    Params = MAEParams
    family = "generative"
    paper = "He et al., CVPR 2022 (arXiv:2111.06377)"

    def __init__(self, backbone: Backbone, params: MAEParams) -> None:
        super().__init__(backbone, params)
        vit = getattr(backbone, "vit", None)
        if vit is None:
            raise ConfigError(f"mae needs a ViT backbone (vit_tiny, vit_small); got '{backbone.spec.family}'")
        self.encoder = MaskedVisionTransformerTIMM(
            vit=vit,
            weight_initialization="" if params.encoder_init == "mae" else "skip",
            pos_embed_initialization="sincos" if params.encoder_init == "mae" else "skip",
        )
        # MAE drops the masked tokens instead of replacing them, so the encoder's mask token is never used: keep it
        # out of the optimiser (and out of DDP's unused-parameter check).
        self.encoder.mask_token.requires_grad_(False)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.grid_size = tuple(int(g) for g in vit.patch_embed.grid_size)
        self.num_patches = math.prod(self.grid_size)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        if self.grid_size[0] != self.grid_size[1]:
            raise ConfigError(f"mae: the decoder's sine-cosine position embedding needs a square patch grid, got "
                              f"{self.grid_size} — use square images")
        embed_dim = int(vit.embed_dim)
        decoder_dim = params.decoder_dim or max(params.decoder_head_dim, embed_dim // 2)
        if decoder_dim % params.decoder_head_dim:
            raise ConfigError(f"mae: decoder_dim {decoder_dim} must be a multiple of decoder_head_dim "
                              f"{params.decoder_head_dim}")
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=self.num_patches, embed_dim=decoder_dim, depth=params.decoder_depth,
            num_heads=decoder_dim // params.decoder_head_dim, num_prefix_tokens=self.num_prefix_tokens,
        )
        self.prediction_head = nn.Linear(decoder_dim, self.patch_size**2 * backbone.in_channels)
        self.register_buffer("mask_seed", torch.randint(0, 2**62, (), dtype=torch.int64))
        self._mask_generators: dict[torch.device, torch.Generator] = {}

    @classmethod
    def requirements(cls, params: MAEParams) -> ViewRequirements:
        return ViewRequirements(min_views=1, max_views=1, backbone_families=("vit_tiny", "vit_small"))

    # ------------------------------------------------------------------ masking
    def mask_generator(self, device: torch.device) -> torch.Generator:
        """The step's masking generator: seeded by (run seed, global step, rank), so a resumed run re-draws it."""
        generator = self._mask_generators.get(device)
        if generator is None:
            generator = self._mask_generators[device] = torch.Generator(device=device)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = 0
        for part in (int(self.mask_seed), self.progress[0], rank):
            seed = (seed * _MIX + part + 1) % (1 << 63)
        return generator.manual_seed(seed)

    def mask_indices(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx_keep, idx_mask) token indices (prefix tokens count as kept), as MAE's ``random_masking``: a random
        permutation per image from argsort of uniform noise, the first ⌊N·(1 − ratio)⌋ patches kept."""
        noise = torch.rand(batch_size, self.num_patches, device=device, generator=self.mask_generator(device))
        order = torch.argsort(noise, dim=1) + self.num_prefix_tokens
        keep = int(self.num_patches * (1.0 - self.params.mask_ratio))
        prefix = torch.arange(self.num_prefix_tokens, device=device).expand(batch_size, -1)
        return torch.cat([prefix, order[:, :keep]], dim=1), order[:, keep:]

    # ------------------------------------------------------------------ forward
    def predict(self, images: torch.Tensor, idx_keep: torch.Tensor, idx_mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, M, p·p·C) of the masked tokens ``idx_mask``, from the tokens ``idx_keep``."""
        encoded = self.encoder.encode(images=images, idx_keep=idx_keep)
        embedded = self.decoder_embed(encoded)
        # Scatter the visible tokens into a full-length sequence; the decoder puts its mask token in the gaps.
        full = embedded.new_zeros(images.shape[0], self.num_patches + self.num_prefix_tokens, embedded.shape[-1])
        full = lightly_utils.set_at_index(full, idx_keep, embedded)
        decoded = self.decoder(full, idx_mask=idx_mask)
        return self.prediction_head(lightly_utils.get_at_index(decoded, idx_mask))

    def forward(self, batch: ViewBatch) -> MethodOutput:
        images = batch.views[0]
        idx_keep, idx_mask = self.mask_indices(images.shape[0], images.device)
        predictions = self.predict(images, idx_keep, idx_mask).float()
        patches = idx_mask - self.num_prefix_tokens
        loss = masked_patch_loss(predictions, images.float(), patches, self.patch_size, self.params.norm_pix_loss)
        # Logged under a name shared with the other reconstruction methods (Models Genesis), for reports.
        return {"loss": loss, "reconstruction_loss": loss.detach()}
