"""3D views: masks move with their images, exact quarter-turns, tilts, CT window jitter, the MR bias field,
modality defaults, and the neighbouring-crop policy's regions and distances."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from radssl.config import load_config
from radssl.data.store import NORMALISATION_MEAN, NORMALISATION_STD
from radssl.errors import ConfigError, DataError
from radssl.views.augment import PLANES, AugmentationParams, BatchAugmenter, bias_field_exponents
from radssl.views.columns import PairingColumns
from radssl.views.policies import PolicyContext, ViewSettings, build_policy
from radssl.views.volume_policies import NeighbouringCropBatch

IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, vflip_p=0.0, rotation_degrees=0.0,
                intensity_p=0.0, blur_p=0.0, noise_p=0.0)
ROT90_DIMS = {"hw": (-2, -1), "dh": (-3, -2), "dw": (-3, -1)}
"""k quarter-turns in a plane equal torch.rot90(x, k, dims) with these dims (the documented convention)."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _identity(augmenter: BatchAugmenter, batch: int) -> dict[str, torch.Tensor]:
    parameters = augmenter.sample_parameters(batch, "cpu", _gen(0))
    parameters["crop_extent"] = torch.ones_like(parameters["crop_extent"])
    parameters["crop_center"] = torch.zeros_like(parameters["crop_center"])
    return parameters


def _blob_volumes(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth Gaussian blobs off-centre (images) and their labels: 1 inside the blob, 2 in its core."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=0).astype(np.float32)
    images, masks = [], []
    for _ in range(batch):
        centre = rng.uniform(size * 0.3, size * 0.6, size=3)[:, None, None, None]
        distance = np.sqrt(((grid - centre) ** 2).sum(0))
        image = np.exp(-0.5 * (distance / (size * 0.15)) ** 2)
        images.append(image)
        masks.append((image > 0.5).astype(np.uint8) + (image > 0.85).astype(np.uint8))
    return torch.from_numpy(np.stack(images))[:, None].float(), torch.from_numpy(np.stack(masks))[:, None]


# ------------------------------------------------------------------------------------------------ masks
def test_a_known_mask_moves_with_its_image_under_flips_and_quarter_turns() -> None:
    images, masks = _blob_volumes(3, 12)
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY, rot90_p=1.0, rot90_planes=PLANES, dflip_p=1.0), (12,) * 3)
    parameters = _identity(augmenter, 3)
    parameters["dflip"] = torch.tensor([True, False, True])
    parameters["hflip"] = torch.tensor([False, True, False])
    parameters["rot90_k"] = torch.tensor([0, 1, 3])
    parameters["rot90_plane"] = torch.tensor([0, 1, 2])
    out, moved = augmenter.apply(images, parameters, masks=masks)
    assert moved.dtype == torch.uint8 and set(moved.unique().tolist()) <= {0, 1, 2}
    # on the image: the quarter-turn first, then the flips (they do not commute in sample 2)
    expected = [masks[0].flip(-3), torch.rot90(masks[1], 1, dims=ROT90_DIMS["dh"]).flip(-1),
                torch.rot90(masks[2], 3, dims=ROT90_DIMS["dw"]).flip(-3)]
    expected_images = [images[0].flip(-3), torch.rot90(images[1], 1, dims=ROT90_DIMS["dh"]).flip(-1),
                       torch.rot90(images[2], 3, dims=ROT90_DIMS["dw"]).flip(-3)]
    for i in range(3):
        assert torch.equal(moved[i], expected[i]), i
        torch.testing.assert_close(out[i], expected_images[i], atol=1e-5, rtol=0)
        assert not torch.equal(moved[i], masks[i]), "the mask really moved"


def test_masks_stay_aligned_under_random_crops_rotations_and_tilts() -> None:
    images, masks = _blob_volumes(6, 16, seed=1)
    params = AugmentationParams(modality="mr", crop_scale=(0.5, 1.0), rotation_degrees=30.0, tilt_degrees=30.0,
                                intensity_p=0.0, blur_p=0.0, noise_p=0.0, bias_field_p=0.0)
    augmenter = BatchAugmenter(params, (14, 14, 14))
    out, moved = augmenter(images, _gen(3), masks=masks.long())
    assert moved.dtype == torch.int64 and moved.shape == (6, 1, 14, 14, 14)
    _, soft = augmenter(images, _gen(3), masks=masks.float())
    assert set(soft.unique().tolist()) == {0.0, 1.0, 2.0}, "nearest neighbour: no blended labels"
    for i in range(6):
        inside = (moved[i, 0] >= 1).float()
        assert inside.sum() > 10, "the blob stays in view"
        warped_blob = (out[i, 0] > 0.5).float()
        agreement = (inside == warped_blob).float().mean()
        assert agreement > 0.97, f"sample {i}: mask and image disagree on {1 - agreement:.1%} of voxels"
        coords = torch.stack(torch.meshgrid(*[torch.arange(14.0)] * 3, indexing="ij"))
        centre_mask = (coords * inside).flatten(1).sum(1) / inside.sum()
        centre_image = (coords * warped_blob).flatten(1).sum(1) / warped_blob.sum()
        assert (centre_mask - centre_image).abs().max() < 0.5, (centre_mask, centre_image)


def test_bad_masks_are_refused_naming_the_fix() -> None:
    augmenter = BatchAugmenter(AugmentationParams(), (8, 8, 8))
    with pytest.raises(DataError, match="masks"):
        augmenter(torch.rand(2, 1, 8, 8, 8), _gen(0), masks=torch.zeros(2, 8, 8, 8))  # no channel axis
    with pytest.raises(DataError, match="masks"):
        augmenter(torch.rand(2, 1, 8, 8, 8), _gen(0), masks=torch.zeros(2, 1, 8, 8, 9))


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("plane", PLANES)
def test_quarter_turns_are_exact_in_every_plane(plane: str) -> None:
    volumes = torch.rand(3, 2, 6, 6, 6, generator=_gen(4))
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY, rot90_p=1.0, rot90_planes=(plane,)), (6, 6, 6))
    parameters = _identity(augmenter, 3)
    parameters["rot90_k"] = torch.tensor([1, 2, 3])
    out = augmenter.apply(volumes, parameters)
    for i, k in enumerate((1, 2, 3)):
        torch.testing.assert_close(out[i], torch.rot90(volumes[i], k, dims=ROT90_DIMS[plane]), atol=1e-5, rtol=0)


def test_quarter_turns_and_tilts_are_drawn_per_sample_from_the_generator() -> None:
    params = AugmentationParams(modality="ct", rot90_planes=PLANES)
    augmenter = BatchAugmenter(params, (8, 8, 8))
    drawn = augmenter.sample_parameters(400, "cpu", _gen(5))
    assert set(drawn["rot90_k"].unique().tolist()) == {0, 1, 2, 3}
    assert abs((drawn["rot90_k"] > 0).float().mean().item() - params.rot90_p) < 0.1
    assert set(drawn["rot90_plane"].unique().tolist()) == {0, 1, 2}
    assert drawn["tilt"].abs().max() <= math.radians(params.tilt_degrees) + 1e-6
    assert drawn["tilt"].unique().numel() > 700 and abs(drawn["dflip"].float().mean().item() - 0.5) < 0.1
    again = augmenter.sample_parameters(400, "cpu", _gen(5))
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)
    # 2D: depth-only ops are not drawn, and in-plane turns are the only planes
    flat = BatchAugmenter(params, (8, 8)).sample_parameters(50, "cpu", _gen(5))
    assert "dflip" not in flat and "tilt" not in flat and set(flat["rot90_plane"].tolist()) == {0}


def test_radiograph_defaults_draw_nothing_new() -> None:
    """The 2D recipe's parameters (and so its generator stream and its views) are those it always had."""
    classic = {"crop_center", "crop_extent", "hflip", "vflip", "rotation", "brightness", "contrast", "gamma",
               "blur_sigma", "noise_std", "noise_seed"}
    for size in ((16, 16), (8, 8, 8)):
        generator = _gen(0)
        assert set(BatchAugmenter(AugmentationParams(), size).sample_parameters(4, "cpu", generator)) == classic
        # the classic stream: 14 uniform draws per sample (crop centre: one per axis) and the noise seed
        reference = _gen(0)
        for _ in range(13):
            torch.rand(4, generator=reference)
        torch.rand(4, len(size), generator=reference)
        torch.randint(0, 2**62, (), generator=reference, dtype=torch.int64)
        assert torch.equal(generator.get_state(), reference.get_state()), "the generator moved differently"


@pytest.mark.parametrize("column,plane", [(0, "dh"), (1, "dw")])
def test_tilts_are_rotations_about_the_width_and_height_axes(column: int, plane: str) -> None:
    volumes = torch.rand(1, 1, 6, 6, 6, generator=_gen(6))
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY, tilt_degrees=10.0), (6, 6, 6))
    parameters = _identity(augmenter, 1)
    tilt = torch.zeros(1, 2)
    tilt[0, column] = math.pi / 2  # a quarter tilt is a quarter-turn in the plane the axis is normal to
    parameters["tilt"] = tilt
    out = augmenter.apply(volumes, parameters)
    assert any(torch.allclose(out[0], torch.rot90(volumes[0], k, dims=ROT90_DIMS[plane]), atol=1e-5) for k in (1, 3))
    parameters["tilt"] = torch.tensor([[math.radians(8.0), -math.radians(5.0)]])
    small = augmenter.apply(torch.ones(1, 1, 6, 6, 6), parameters)
    assert small[0, 0, 2:4, 2:4, 2:4].min() > 0.99 and small[0, 0].min() < 0.9, "centre kept, corners padded"


# ------------------------------------------------------------------------------------------------ intensity
def test_ct_window_jitter_moves_level_and_width() -> None:
    values = torch.linspace(0.0, 1.0, 11).view(1, 1, 1, 1, 11).expand(3, 1, 2, 2, 11).contiguous()
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY, window_level=0.1, window_width=(0.8, 1.25)),
                               (2, 2, 11))
    parameters = _identity(augmenter, 3)
    parameters["window_level"] = torch.tensor([0.0, 0.1, 0.0])
    parameters["window_width"] = torch.tensor([1.0, 1.0, 2.0])
    out = augmenter.apply(values, parameters)
    torch.testing.assert_close(out[0], values[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], (values[1] - 0.1).clamp(0, 1), atol=1e-6, rtol=0)  # level up: darker
    torch.testing.assert_close(out[2], (values[2] - 0.5) / 2 + 0.5, atol=1e-6, rtol=0)  # twice as wide: flatter
    drawn = BatchAugmenter(AugmentationParams(modality="ct", intensity_p=0.5), (2, 2, 11)).sample_parameters(
        500, "cpu", _gen(7))
    width, level = drawn["window_width"], drawn["window_level"]
    assert width.min() >= 0.8 - 1e-6 and width.max() <= 1.25 + 1e-6 and level.abs().max() <= 0.1
    assert abs((width != 1).float().mean().item() - 0.5) < 0.1, "jittered with probability intensity_p"
    assert torch.equal(width == 1, level == 0) and level.unique().numel() > 200, "per sample"


def _bias_field_by_monomials(coefficients: torch.Tensor, size: tuple[int, int, int], order: int) -> torch.Tensor:
    """Reference: the field's log summed monomial by monomial (what bias_field computes by contractions)."""
    z, y, x = torch.meshgrid(*[(torch.arange(s, dtype=torch.float64) * 2 + 1) / s - 1 for s in size], indexing="ij")
    log = torch.zeros(size, dtype=torch.float64)
    for c, (i, j, k) in zip(coefficients.double(), bias_field_exponents(3, order)):
        log += c * x**i * y**j * z**k
    return log.exp()


def test_bias_field_is_smooth_positive_and_the_polynomial_it_claims() -> None:
    size = (10, 12, 14)
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY, bias_field_p=1.0, bias_field_coefficient=0.5), size)
    parameters = augmenter.sample_parameters(4, "cpu", _gen(8))
    parameters["crop_extent"] = torch.ones(4, 3)
    parameters["crop_center"] = torch.zeros(4, 3)
    parameters["bias_field"] = torch.tensor([True, True, True, False])
    parameters["bias_coefficients"][3] = 0.0
    base = 0.002  # low enough that no field value reaches the clamp at 1
    flat = torch.full((4, 2, *size), base)
    out = augmenter.apply(flat, parameters)
    torch.testing.assert_close(out[3], flat[3])  # no field: untouched
    assert out.max() < 1.0
    for i in range(3):
        field = out[i, 0] / base
        torch.testing.assert_close(out[i, 1], out[i, 0])  # one field for every channel of a sample
        assert field.min() > 0, "multiplicative field is positive"
        assert field.std() > 0.02, "the field really varies"
        reference = _bias_field_by_monomials(parameters["bias_coefficients"][i], size, 3).float()
        torch.testing.assert_close(field, reference, rtol=1e-4, atol=1e-5)
        # smooth: the log-field is a cubic along every line, so its 4th differences vanish (noise would not)
        log = field.double().log()
        for axis in range(3):
            assert log.diff(n=1, dim=axis).abs().max() > 1e-3
            assert log.diff(n=4, dim=axis).abs().max() < 1e-3, (i, axis)
    drawn = augmenter.sample_parameters(300, "cpu", _gen(9))["bias_coefficients"]
    assert drawn.abs().max() <= 0.5 and drawn.shape[1] == len(bias_field_exponents(3, 3)) == 20


# ------------------------------------------------------------------------------------------------ config
def test_modality_fills_defaults_and_user_keys_win() -> None:
    ct = AugmentationParams(modality="ct")
    assert (ct.window_level, ct.window_width, ct.brightness, ct.gamma) == (0.1, (0.8, 1.25), 0.0, (1.0, 1.0))
    assert (ct.dflip_p, ct.rot90_p, ct.tilt_degrees) == (0.5, 0.5, 10.0)
    mr = AugmentationParams(modality="mr", bias_field_p=0.9)
    assert (mr.bias_field_p, mr.window_level, mr.gamma) == (0.9, 0.0, (0.7, 1.5))
    assert AugmentationParams().window_level == 0.0 and AugmentationParams().bias_field_p == 0.0
    with pytest.raises(ValidationError, match="modality"):
        AugmentationParams(modality="pet")
    with pytest.raises(ValidationError, match="bias_feld_p"):
        AugmentationParams(bias_feld_p=0.5)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="rot90_planes"):
        AugmentationParams(rot90_planes=("xy",))
    with pytest.raises(ValidationError, match="window_width"):
        AugmentationParams(window_width=(1.2, 0.8))
    views = load_config(None, ["views.modality=ct", "views.tilt_degrees=5"]).views
    assert (views.window_level, views.tilt_degrees) == (0.1, 5.0)
    assert views.augmentation().window_level == 0.1  # what the policy gets


# ------------------------------------------------------------------------------------------------ policy
def _coordinate_volumes(batch: int, size: tuple[int, int, int]) -> torch.Tensor:
    """3 channels holding each voxel's (d, h, w) / 32: a view's channel means are its centre's coordinates."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij")) / 32
    return grid.expand(batch, 3, *size).contiguous()


def _columns(n: int) -> PairingColumns:
    unknown = torch.full((n,), -1, dtype=torch.int64)
    return PairingColumns(patient=unknown, study=unknown, series=unknown, slice_index=unknown,
                          frame_index=unknown, store_rows=np.arange(n))


@pytest.mark.parametrize("max_distance", [0.0, 3.0])
def test_neighbouring_crops_come_from_regions_within_the_distance(max_distance: float) -> None:
    size, region = (14, 16, 20), (6, 8, 10)
    settings = ViewSettings(policy="neighbouring_crops", augment=AugmentationParams(**{**IDENTITY, "crop_ratio": (1.25, 1.25)}),
                            params={"region_size": list(region), "max_centre_distance": max_distance})
    policy = build_policy(settings, PolicyContext(input_size=size, output_size=region, channels=3))
    images = _coordinate_volumes(12, size)
    batch = policy(torch.arange(12), images, _columns(12), _gen(10))
    assert isinstance(batch, NeighbouringCropBatch) and [tuple(v.shape) for v in batch.views] == [(12, 3, *region)] * 2
    # identity augmentation: each view is its region, so its channel means are the region centre (in voxels)
    centres = [(v * NORMALISATION_STD + NORMALISATION_MEAN).mean(dim=(2, 3, 4)) * 32 for v in batch.views]
    for view_centres, claimed in zip(centres, batch.extras["region_centres"].unbind(1)):
        torch.testing.assert_close(view_centres, claimed, atol=2e-3, rtol=0)
    distance = (centres[0] - centres[1]).norm(dim=1)
    torch.testing.assert_close(distance, batch.centre_distance, atol=2e-3, rtol=0)
    assert distance.max() <= max_distance + 2e-3
    low = torch.tensor(region) / 2 - 0.5
    high = torch.tensor(size) - 1 - low
    assert all(((c >= low - 1e-3) & (c <= high + 1e-3)).all() for c in centres), "regions fit"
    assert batch.log_scalars()["crop_centre_distance"] == pytest.approx(float(distance.mean()), abs=2e-3)
    if max_distance > 0:
        assert distance.mean() > 0.5 * max_distance, "neighbours are spread over the ball, not stuck together"
    spread = centres[0].std(dim=0)
    assert (spread > 0.5).all(), "anchor regions are placed anywhere in the volume"


def test_neighbouring_crops_augment_each_view_and_are_deterministic() -> None:
    settings = ViewSettings(policy="neighbouring_crops", augment=AugmentationParams(modality="mr"),
                            params={"region_size": [6, 10, 10], "max_centre_distance": 4})
    policy = build_policy(settings, PolicyContext(input_size=(12, 16, 16), output_size=(8, 8, 8)))
    images = (torch.rand(5, 1, 12, 16, 16, generator=_gen(11)) * 255).to(torch.uint8)
    first = policy(torch.arange(5), images, _columns(5), _gen(12))
    again = policy(torch.arange(5), images, _columns(5), _gen(12))
    assert all(torch.equal(a, b) for a, b in zip(first.views, again.views))
    assert not torch.equal(first.views[0], first.views[1])
    assert policy.layout().sizes == ((8, 8, 8),) * 2


def test_neighbouring_crops_refuse_regions_that_do_not_fit() -> None:
    context = PolicyContext(input_size=(16, 16, 16), output_size=(16, 16, 16))
    with pytest.raises(ConfigError, match="region_size"):
        build_policy(ViewSettings(policy="neighbouring_crops"), context)  # region = whole volume, distance 8
    with pytest.raises(ConfigError, match="larger than the stored images"):
        build_policy(ViewSettings(policy="neighbouring_crops", params={"region_size": 20}), context)
    with pytest.raises(ConfigError, match="max_centre_distanse"):
        load_config(None, ["views.policy=neighbouring_crops", "views.max_centre_distanse=3"])
    assert build_policy(ViewSettings(policy="neighbouring_crops", params={"max_centre_distance": 0}),
                        context).region == (16, 16, 16)
