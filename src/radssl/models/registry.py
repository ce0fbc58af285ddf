"""Backbone registry: a family name → its class; every backbone is built from a :class:`BackboneSpec`.

Adding an encoder = one class (``radssl.models.base.Backbone``) + one line in ``BACKBONE_FAMILIES``. Entries are
import paths so a family with a heavy or optional dependency (timm, MONAI) costs nothing until it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from radssl.models.base import Backbone
from radssl.models.spec import BackboneSpec
from radssl.registry import Registry

BACKBONE_FAMILIES: Registry[Backbone] = Registry("backbone", base=Backbone, entries={
    "resnet18": "radssl.models.backbones:ResNet18",
    "resnet50": "radssl.models.backbones:ResNet50",
    "small_cnn": "radssl.models.backbones:SmallCNN",
    "vit_tiny": "radssl.models.vit:ViTTiny",
    "vit_small": "radssl.models.vit:ViTSmall",
    # 3D (volumes): the 2D families above keep their names; their 3D variants end in _3d (radssl.models.backbones3d)
    "resnet18_3d": "radssl.models.backbones3d:ResNet18_3D",
    "small_cnn_3d": "radssl.models.backbones3d:SmallCNN3D",
    "segresnet_encoder_3d": "radssl.models.backbones3d:SegResNetEncoder3D",
    # Foundation models from other libraries, built from the architecture their weights' metadata name
    # (radssl.models.foundation; chosen with model.weights / timm:…, hf:…, torchvision:…, monai:… initialisations)
    "timm": "radssl.models.foundation:TimmBackbone",
    "hf": "radssl.models.foundation:HFBackbone",
    "torchvision": "radssl.models.foundation:TorchvisionBackbone",
    "monai": "radssl.models.foundation:MonaiBackbone",
})


backbone_class = BACKBONE_FAMILIES.load
"""The class registered under a family name; :class:`~radssl.registry.UnknownNameError` (did-you-mean) otherwise."""


def resolve_spec(spec: BackboneSpec) -> BackboneSpec:
    """Validate a spec against its family (spatial dims, options) and fill in automatic choices."""
    cls = backbone_class(spec.family)
    if spec.spatial_dims not in cls.spatial_dims_supported:
        dims = " or ".join(f"{d}D" for d in cls.spatial_dims_supported)
        fitting = sorted(BACKBONE_FAMILIES.names(where=lambda family: spec.spatial_dims in family.spatial_dims_supported))
        raise ValueError(f"backbone '{spec.family}' takes {dims} inputs, but the data are {spec.spatial_dims}D — "
                         f"choose a backbone for {spec.spatial_dims}D data: {fitting}")
    cls.options(spec)  # raises pydantic.ValidationError naming unknown or bad option keys
    return cls.resolve(spec)


def build_from_spec(spec: BackboneSpec) -> Backbone:
    """The backbone a (resolved or not) spec describes, with fresh weights from the global RNG."""
    spec = resolve_spec(spec)
    return backbone_class(spec.family)(spec)


def make_spec(family: str, in_channels: int = 1, image_size: tuple[int, ...] | int | None = None,
              small_input: bool | None = None, patch_size: int | None = None, spatial_dims: int | None = None,
              options: Mapping[str, Any] | None = None) -> BackboneSpec:
    """A resolved spec from the user-facing knobs (``small_input`` → stem); ``image_size`` may be one side."""
    if isinstance(image_size, int):
        image_size = (image_size,) * (spatial_dims or 2)
    dims = spatial_dims or (len(image_size) if image_size is not None else 2)
    stem = None if small_input is None else ("small" if small_input else "standard")
    spec = BackboneSpec(family=family, in_channels=in_channels, spatial_dims=dims, image_size=image_size,
                        stem=stem, patch_size=patch_size, options=dict(options or {}))
    return resolve_spec(spec)


def build_backbone(family: str, in_channels: int = 1, small_input: bool | None = None,
                   image_size: tuple[int, ...] | int | None = None, **knobs: Any) -> Backbone:
    """Convenience: :func:`make_spec` + :func:`build_from_spec` (tests, notebooks)."""
    return build_from_spec(make_spec(family, in_channels, image_size, small_input, **knobs))

