"""3D encoders for volumes (CT, MRI; 1 channel or stacked sequences): a 3D ResNet-18, a small 3D CNN and the
encoder of MONAI's SegResNet. All take (B, C, D, H, W), pool to (B, feature_dim) and return multi-scale maps
(high → low resolution) for segmentation and restoration decoders.

Why MONAI and not torchvision's video ResNets (``r3d_18``): the video models assume RGB clips with a (3, 7, 7)
stem of stride (1, 2, 2) — time kept, space halved — so a 1-channel or 4-sequence volume needs a re-written stem
anyway, and their stride pattern treats depth as time. MONAI's ``ResNet`` (Hara et al., CVPR 2018; Chen et al.,
MedicalNet, arXiv:1904.00625) is built for volumes: ``n_input_channels`` takes 1 channel or BraTS-style sequences
natively, ``conv1_t_size`` / ``conv1_t_stride`` / ``no_max_pool`` let the stem suit 28³ volumes as well as 128³
CT, and the same class loads MedicalNet weights (``shortcut_type: A``) should a 3D ``imagenet:``-like
initialisation be added. MONAI is also where the segmentation networks come from (``SegResNet`` below), so encoder
and decoder share one well-kept library.

Families (the 2D ``resnet18`` / ``small_cnn`` keep their names; their 3D variants end in ``_3d``):

- ``resnet18_3d``: MONAI ResNet-18 (basic blocks, [2, 2, 2, 2]). ``stem: small`` (3³ stride-1 conv, no max-pool,
  like the 2D small stem and the MedMNIST 3D baselines) is chosen automatically for volumes of ≤ 64 voxels per side;
  ``standard`` is the 7³ stride-2 conv + max-pool. Option ``widen_factor`` scales every width (0.25 gives a
  2 M-parameter network that trains on a CPU; 1.0 is the 33 M-parameter ResNet-18 and wants a GPU: SimCLR with the
  small stem runs at 0.23 volumes per CPU-second at 28³ and 0.02 at 64³, 4.5 GB above baseline at 64³, batch 2).
- ``small_cnn_3d``: four Conv3d-BN-ReLU stages (the 3D twin of ``small_cnn``) for CPU runs, demos and tests.
  Its first stage runs at full resolution (``stem: small``) for volumes of ≤ 32 voxels per side and at stride 2
  above that (a full-resolution stage costs 8× more in 3D than in 2D per doubling of the side).
- ``segresnet_encoder_3d``: the encoder half of MONAI's ``SegResNet`` (Myronenko, BrainLes 2018,
  arXiv:1810.11654, the BraTS 2018 winner): an initial 3³ conv then pre-activation residual blocks with stride-2
  convs between levels, GroupNorm throughout. Chosen over BasicUNet / DynUNet / SwinUNETR because it is the
  cheapest per voxel at 32–64³ on a CPU (8 channels at full resolution by default), GroupNorm does not depend on
  the batch (3D batches are small), and MONAI splits the network into ``encode`` / ``decode`` so the encoder we
  pretrain is exactly the one the segmentation network runs. Its modules keep SegResNet's names (``convInit``,
  ``down_layers``), so the pretrained state dict loads into ``SegResNet`` by key: :func:`segresnet_for` builds the
  full network from a recorded spec and :func:`load_encoder_into_segresnet` loads the weights, checking that only
  decoder keys are left to train.

Odd sizes: every stride-2 layer maps n voxels to ceil(n / 2), so map sizes are ceil(size / stride). (SegResNet's
decoder adds skip connections and needs sizes divisible by 8: pad volumes for the full network.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from radssl.models.backbones import SmallCNN
from radssl.models.base import Backbone, resnet_feature_maps
from radssl.models.spec import BackboneSpec

SMALL_STEM_MAX_SIZE_3D = 64
"""Volumes of at most this many voxels per side get the ResNet's small (stride-1) stem when it is automatic."""
SMALL_CNN_FULL_RES_MAX_SIZE = 32
"""Volumes of at most this many voxels per side keep the small 3D CNN's first stage at full resolution."""


def _automatic_stem(spec: BackboneSpec, max_size: int) -> BackboneSpec:
    if spec.stem is not None:
        return spec
    small = spec.image_size is not None and max(spec.image_size) <= max_size
    return replace(spec, stem="small" if small else "standard")


# ---------------------------------------------------------------------------------------------- ResNet-18
class ResNet3DOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    widen_factor: float = Field(1.0, gt=0.0, le=4.0, description="multiplies every stage width (64, 128, 256, 512)")
    shortcut_type: Literal["A", "B"] = Field(
        "B", description="B: 1×1 conv downsampling shortcuts (torchvision's); A: parameter-free (MedicalNet's)")


class ResNet18_3D(Backbone):
    """MONAI's 3D ResNet-18 without its classifier; ``self.net`` keeps MONAI's parameter names."""

    family = "resnet18_3d"
    spatial_dims_supported = (3,)
    Options = ResNet3DOptions

    @classmethod
    def resolve(cls, spec: BackboneSpec) -> BackboneSpec:
        return _automatic_stem(spec, SMALL_STEM_MAX_SIZE_3D)

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        from monai.networks.nets import resnet18

        options = self.options(spec)
        small = spec.stem == "small"
        self.net = resnet18(
            spatial_dims=3, n_input_channels=spec.in_channels, conv1_t_size=3 if small else 7,
            conv1_t_stride=1 if small else 2, no_max_pool=small, shortcut_type=options.shortcut_type,
            widen_factor=options.widen_factor, feed_forward=False,
        )
        widths = tuple(int(w * options.widen_factor) for w in (64, 128, 256, 512))
        self.feature_dim = widths[-1]
        self.feature_channels = (widths[0], *widths)
        self.feature_strides = (1, 1, 2, 4, 8) if small else (2, 4, 8, 16, 32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return resnet_feature_maps(self.net, images, self.net.act, max_pool=not self.net.no_max_pool)


# ---------------------------------------------------------------------------------------------- small CNN
class SmallCNN3D(SmallCNN):
    """Four Conv3d-BN-ReLU stages (widths w, 2w, 4w, 8w; ≈0.9 M parameters at width 16) for quick CPU runs.

    The 3D twin of ``small_cnn`` (the same class, 3D stages): same stage layout, so 2D and 3D results compare like
    for like. SimCLR on the 2-core AMD EPYC CPU, 1 thread, model step only (``benchmarks/throughput_3d.py``): 7.1
    volumes per CPU-second at 28³ (small stem), 4.0 at 64³ (standard stem); SegResNet encoder 9.0 / 0.66;
    full-width ResNet-18 3D 0.23 / 0.02.
    """

    family = "small_cnn_3d"
    spatial_dims_supported = (3,)

    @classmethod
    def resolve(cls, spec: BackboneSpec) -> BackboneSpec:
        return _automatic_stem(spec, SMALL_CNN_FULL_RES_MAX_SIZE)

    def first_stride(self, spec: BackboneSpec) -> int:
        """Large volumes start at half resolution (the standard stem): the first stage dominates 3D cost."""
        return 1 if spec.stem == "small" else 2


# ---------------------------------------------------------------------------------------------- SegResNet
class SegResNetEncoderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_filters: int = Field(8, gt=0, description="channels at full resolution (doubled per level); a multiple of 8")
    blocks_down: tuple[int, ...] = Field((1, 2, 2, 4), description="residual blocks per level (SegResNet's default)")

    @field_validator("init_filters")
    @classmethod
    def _group_norm_divides(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"init_filters must be a multiple of 8 (GroupNorm with 8 groups), got {value}")
        return value

    @field_validator("blocks_down")
    @classmethod
    def _levels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1:
            raise ValueError(f"blocks_down must list at least one level of ≥ 1 block, got {value}")
        return tuple(value)


SEGRESNET_NORM = ("GROUP", {"num_groups": 8})


class SegResNetEncoder3D(Backbone):
    """The encoder half of MONAI's SegResNet; module names match SegResNet so weights load into it by key."""

    family = "segresnet_encoder_3d"
    spatial_dims_supported = (3,)
    Options = SegResNetEncoderOptions

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        options = self.options(spec)
        network = segresnet_for(spec, out_channels=1)
        # Keep only the encoder (the decoder's unused parameters would break DDP and cost memory); same attribute
        # names as SegResNet, so state-dict keys are SegResNet's own.
        self.convInit = network.convInit
        self.down_layers = network.down_layers
        levels = len(options.blocks_down)
        self.feature_channels = tuple(options.init_filters * 2**i for i in range(levels))
        self.feature_strides = tuple(2**i for i in range(levels))
        self.feature_dim = self.feature_channels[-1]

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.convInit(images)
        maps = []
        for level in self.down_layers:
            x = level(x)
            maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[-1].mean(dim=(2, 3, 4))


def segresnet_for(spec: BackboneSpec, out_channels: int, **decoder: object) -> nn.Module:
    """The full MONAI SegResNet whose encoder a ``segresnet_encoder_3d`` spec describes (decoder: ``blocks_up`` etc.).

    ``blocks_up`` defaults to one block per decoder level, matching the encoder's depth.
    """
    from monai.networks.nets import SegResNet

    if spec.family != SegResNetEncoder3D.family:
        raise ValueError(f"segresnet_for needs a '{SegResNetEncoder3D.family}' spec, got '{spec.family}'")
    options = SegResNetEncoder3D.options(spec)
    decoder.setdefault("blocks_up", (1,) * (len(options.blocks_down) - 1))
    return SegResNet(spatial_dims=3, init_filters=options.init_filters, in_channels=spec.in_channels,
                     out_channels=out_channels, norm=SEGRESNET_NORM, blocks_down=tuple(options.blocks_down),
                     **decoder)


def load_encoder_into_segresnet(network: nn.Module, encoder: SegResNetEncoder3D) -> list[str]:
    """Load a (pretrained) encoder into a SegResNet built by :func:`segresnet_for`; returns the keys left to train.

    Every encoder key must be taken (an unexpected key means the networks do not match) and every key left over
    must belong to the decoder, so a silent partial load is impossible.
    """
    result = network.load_state_dict(encoder.state_dict(), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"encoder keys not in the SegResNet: {result.unexpected_keys[:5]} — build the network "
                         "with segresnet_for(encoder.spec, ...)")
    encoder_prefixes = ("convInit.", "down_layers.")
    missing_encoder = [k for k in result.missing_keys if k.startswith(encoder_prefixes)]
    if missing_encoder:
        raise ValueError(f"SegResNet encoder keys not loaded: {missing_encoder[:5]}")
    return list(result.missing_keys)
