"""3D backbones: pooled vectors and multi-scale maps at odd sizes, automatic stems recorded in the spec, rebuild by
spec, and the SegResNet encoder loading into the full segmentation network by key."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from radssl.models.backbones3d import load_encoder_into_segresnet, segresnet_for
from radssl.models.foundation import FOUNDATION_FAMILIES
from radssl.models.registry import BACKBONE_FAMILIES, backbone_class, build_backbone, build_from_spec, make_spec
from radssl.models.spec import BackboneSpec

SMALL_OPTIONS = {
    "resnet18_3d": {"widen_factor": 0.125},
    "small_cnn_3d": {"width": 4},
    "segresnet_encoder_3d": {"init_filters": 8, "blocks_down": (1, 1, 1, 1)},
}
FAMILIES_3D = sorted(SMALL_OPTIONS)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_every_3d_family_is_registered_for_volumes_only() -> None:
    registered = {name for name in BACKBONE_FAMILIES if 3 in backbone_class(name).spatial_dims_supported}
    assert registered - set(FOUNDATION_FAMILIES) == set(FAMILIES_3D)  # foundation wrappers: test_transfer_foundation
    for family in FAMILIES_3D:
        with pytest.raises(ValueError, match="takes 3D inputs, but the data are 2D"):
            make_spec(family, image_size=(28, 28))


@pytest.mark.parametrize("stem", ["small", "standard"])
@pytest.mark.parametrize("family", FAMILIES_3D)
def test_pooled_vector_and_maps_have_declared_shapes_at_odd_sizes(family: str, stem: str) -> None:
    torch.manual_seed(0)
    size = (13, 18, 21)
    backbone = build_backbone(family, in_channels=4, image_size=size, small_input=stem == "small",
                              options=SMALL_OPTIONS[family]).eval()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        pooled = backbone(x)
        maps = backbone.forward_features(x)
    assert pooled.shape == (2, backbone.feature_dim)
    assert len(maps) == len(backbone.feature_channels) == len(backbone.feature_strides)
    for feature_map, channels, stride in zip(maps, backbone.feature_channels, backbone.feature_strides):
        assert feature_map.shape[:2] == (2, channels), family
        assert tuple(feature_map.shape[2:]) == tuple(-(-s // stride) for s in size), (family, stride)
    assert list(backbone.feature_strides) == sorted(backbone.feature_strides), "maps run high → low resolution"
    # the pooled vector is the mean of the last map (what a restoration decoder and a projection head both see)
    torch.testing.assert_close(maps[-1].mean(dim=(2, 3, 4)), pooled, atol=1e-5, rtol=1e-4)


def test_automatic_stems_are_recorded_and_rebuild_the_same_network() -> None:
    assert make_spec("resnet18_3d", image_size=(28, 28, 28)).stem == "small"
    assert make_spec("resnet18_3d", image_size=(64, 64, 64)).stem == "small"
    assert make_spec("resnet18_3d", image_size=(48, 96, 96)).stem == "standard"
    assert make_spec("small_cnn_3d", image_size=(32, 32, 32)).stem == "small"
    assert make_spec("small_cnn_3d", image_size=(64, 64, 64)).stem == "standard"
    assert build_backbone("resnet18_3d", image_size=28, spatial_dims=3,
                          options={"widen_factor": 0.125}).feature_strides == (1, 1, 2, 4, 8)
    assert build_backbone("small_cnn_3d", image_size=64, spatial_dims=3).feature_strides == (2, 4, 8, 16)

    for family in FAMILIES_3D:
        torch.manual_seed(1)
        spec = make_spec(family, in_channels=2, image_size=(12, 16, 16), options=SMALL_OPTIONS[family])
        original = build_from_spec(spec).eval()
        again = build_from_spec(BackboneSpec.from_dict(spec.to_dict())).eval()
        again.load_state_dict(original.state_dict(), strict=True)
        x = torch.randn(2, 2, 12, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(again(x), original(x))


def test_segresnet_encoder_weights_load_into_the_full_segmentation_network() -> None:
    torch.manual_seed(2)
    spec = make_spec("segresnet_encoder_3d", in_channels=4, image_size=(16, 16, 16),
                     options={"init_filters": 8, "blocks_down": (1, 2, 2)})
    encoder = build_from_spec(spec).eval()
    network = segresnet_for(spec, out_channels=3).eval()
    left = load_encoder_into_segresnet(network, encoder)
    assert left and all(k.startswith(("up_layers.", "up_samples.", "conv_final.")) for k in left)
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        _, encoded = network.encode(x)
        for theirs, ours in zip(encoded, encoder.forward_features(x)):
            torch.testing.assert_close(theirs, ours)
        assert network(x).shape == (2, 3, 16, 16, 16)
    other = segresnet_for(make_spec("segresnet_encoder_3d", in_channels=4, spatial_dims=3,
                                options={"init_filters": 16}), 3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_encoder_into_segresnet(other, encoder)
    shallower = segresnet_for(make_spec("segresnet_encoder_3d", in_channels=4, spatial_dims=3,
                                        options={"blocks_down": (1, 2)}), 3)
    with pytest.raises(ValueError, match="encoder keys not in the SegResNet"):
        load_encoder_into_segresnet(shallower, encoder)  # a silent partial load is impossible


def test_options_are_validated_by_name() -> None:
    with pytest.raises(ValidationError, match="multiple of 8"):
        make_spec("segresnet_encoder_3d", image_size=(16, 16, 16), options={"init_filters": 12})
    with pytest.raises(ValidationError, match="widen"):
        make_spec("resnet18_3d", image_size=(16, 16, 16), options={"widen": 0.5})
    with pytest.raises(ValueError, match=r"choose a backbone for 3D data: \[.*'small_cnn_3d'"):
        make_spec("small_cnn", image_size=(16, 16, 16))
