"""Backbones (encoders) built from recorded specs through a registry."""

from radssl.models.base import Backbone
from radssl.models.registry import BACKBONE_FAMILIES, build_backbone, build_from_spec, make_spec, resolve_spec
from radssl.models.spec import BackboneSpec

__all__ = ["BACKBONE_FAMILIES", "Backbone", "BackboneSpec", "build_backbone", "build_from_spec", "make_spec",
           "resolve_spec"]
