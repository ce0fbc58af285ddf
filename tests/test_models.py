"""Backbone registry and specs: every family builds from a spec, pools to feature_dim and exposes multi-scale maps."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from radssl.models.registry import BACKBONE_FAMILIES, build_backbone, build_from_spec, make_spec
from radssl.models.spec import BackboneSpec

CASES = {
    "small_cnn": {"image_size": 20},
    "resnet18": {"image_size": 28},
    "vit_tiny": {"image_size": 28, "options": {"depth": 2}},
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("family", sorted(CASES))
def test_backbone_pools_and_returns_maps_at_declared_channels_and_strides(family: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(family, in_channels=2, **CASES[family]).eval()
    size = backbone.spec.image_size
    x = torch.randn(3, 2, *size)
    with torch.no_grad():
        pooled = backbone(x)
        maps = backbone.forward_features(x)
    assert pooled.shape == (3, backbone.feature_dim)
    assert len(maps) == len(backbone.feature_channels) == len(backbone.feature_strides)
    for feature_map, channels, stride in zip(maps, backbone.feature_channels, backbone.feature_strides):
        assert feature_map.shape[:2] == (3, channels)
        assert tuple(feature_map.shape[2:]) == tuple(-(-s // stride) for s in size), (family, stride)


def test_resnet_last_map_pools_to_the_feature_vector() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", image_size=32).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x)[-1].mean(dim=(2, 3)), backbone(x))


def test_spec_records_the_automatic_choices_and_round_trips() -> None:
    small = make_spec("resnet18", image_size=28)
    large = make_spec("resnet18", image_size=128)
    assert (small.stem, large.stem) == ("small", "standard")
    assert make_spec("vit_tiny", image_size=64).patch_size == 8
    again = BackboneSpec.from_dict(small.to_dict())
    assert again == small
    a, b = build_from_spec(small), build_from_spec(again)
    assert a.state_dict().keys() == b.state_dict().keys()


def test_registry_and_options_errors_name_the_problem() -> None:
    assert {"resnet18", "resnet50", "small_cnn", "vit_tiny", "vit_small"} <= set(BACKBONE_FAMILIES)
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        make_spec("resnet19")
    with pytest.raises(ValidationError, match="widht"):
        make_spec("small_cnn", options={"widht": 8})
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        make_spec("vit_tiny", image_size=28, patch_size=8)
    with pytest.raises(ValueError, match="takes 2D inputs, but the data are 3D"):
        make_spec("resnet18", image_size=(8, 16, 16))
    assert build_backbone("small_cnn", options={"width": 8}).feature_dim == 64
