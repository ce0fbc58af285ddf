"""Behaviour of radssl.views.augment: per-sample randomness, determinism, and each op doing what it says."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError

from radssl.errors import ConfigError, DataError
from radssl.views.augment import AugmentationParams, BatchAugmenter


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: threading only costs here, and the machine is shared. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


IDENTITY = dict(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip_p=0.0,
    vflip_p=0.0,
    rotation_degrees=0.0,
    intensity_p=0.0,
    blur_p=0.0,
    noise_p=0.0,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int, *spatial: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, *spatial, generator=_gen(seed))


def _identity_parameters(augmenter: BatchAugmenter, batch: int) -> dict[str, torch.Tensor]:
    """Parameters that leave a batch unchanged, drawn by the module itself (full-image crop set explicitly)."""
    identity = BatchAugmenter(AugmentationParams(**IDENTITY), augmenter.output_size)
    parameters = identity.sample_parameters(batch, "cpu", _gen(0))
    parameters["crop_extent"] = torch.ones_like(parameters["crop_extent"])
    parameters["crop_center"] = torch.zeros_like(parameters["crop_center"])
    return parameters


def test_output_shape_dtype_and_range() -> None:
    images = _images(6, 40, 48)
    out = BatchAugmenter(AugmentationParams(), (32, 32))(images, _gen(1))
    assert out.shape == (6, 1, 32, 32)
    assert out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Strong brightness/noise push values outside [0, 1] before the final clamp.
    loud = AugmentationParams(brightness=1.0, noise_p=1.0, noise_std=(0.3, 0.3))
    out = BatchAugmenter(loud, (16, 16))(images, _gen(2))
    assert out.min() == 0.0 and out.max() == 1.0


def test_parameters_differ_per_sample_and_stay_in_range() -> None:
    params = AugmentationParams()
    drawn = BatchAugmenter(params, (32, 32)).sample_parameters(512, "cpu", _gen(3))
    for key in ("crop_center", "crop_extent", "rotation", "brightness", "blur_sigma", "noise_std"):
        assert drawn[key].unique(dim=0).shape[0] > 100, key
    area = drawn["crop_extent"].prod(dim=1)
    assert (area >= params.crop_scale[0] - 1e-6).all() and (area <= 1.0 + 1e-6).all()
    assert (drawn["crop_center"].abs() <= 1.0 - drawn["crop_extent"] + 1e-6).all()  # crop stays inside
    assert drawn["rotation"].abs().max() <= math.radians(params.rotation_degrees) + 1e-6
    assert ((drawn["brightness"] >= 0.6 - 1e-6) & (drawn["brightness"] <= 1.4 + 1e-6)).all()
    assert ((drawn["gamma"] >= 0.7 - 1e-6) & (drawn["gamma"] <= 1.4 + 1e-6)).all()
    assert not drawn["vflip"].any()  # radiograph default: no vertical flip
    # Probabilities are honoured (512 draws: binomial sd ~0.022).
    assert abs(drawn["hflip"].float().mean().item() - params.hflip_p) < 0.1
    assert abs((drawn["blur_sigma"] > 0).float().mean().item() - params.blur_p) < 0.1
    assert abs((drawn["gamma"] != 1).float().mean().item() - params.intensity_p) < 0.1


def test_identical_inputs_get_different_outputs() -> None:
    images = _images(1, 24, 24).expand(8, 1, 24, 24).contiguous()
    out = BatchAugmenter(AugmentationParams(), (24, 24))(images, _gen(4))
    flat = out.flatten(1)
    distances = torch.cdist(flat, flat)
    off_diagonal = distances[~torch.eye(8, dtype=torch.bool)]
    assert off_diagonal.min() > 1e-3


def test_same_seed_is_bit_identical_and_different_seed_differs() -> None:
    images = _images(5, 30, 30)
    augmenter = BatchAugmenter(AugmentationParams(noise_p=1.0, blur_p=1.0), (20, 20))
    first = augmenter(images, _gen(7))
    again = augmenter(images, _gen(7))
    other = augmenter(images, _gen(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("height,width", [(24, 24), (20, 28)])
def test_identity_parameters_reproduce_the_input(height: int, width: int) -> None:
    # crop_ratio is width/height in pixels, so a full-image crop of a non-square input has ratio W/H.
    ratio = width / height
    params = AugmentationParams(**{**IDENTITY, "crop_ratio": (ratio, ratio)})
    images = _images(3, height, width)
    out = BatchAugmenter(params, (height, width))(images, _gen(9))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_crop_parameters_select_the_requested_window() -> None:
    # Top-left quadrant at half the size: output pixel centres land exactly on input pixel centres.
    images = _images(2, 16, 20)
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY), (8, 10))
    parameters = _identity_parameters(augmenter, 2)
    parameters["crop_extent"] = torch.full((2, 2), 0.5)
    parameters["crop_center"] = torch.tensor([[-0.5, -0.5], [0.5, 0.5]])  # (x, y): top-left, bottom-right
    out = augmenter.apply(images, parameters)
    torch.testing.assert_close(out[0], images[0, :, :8, :10], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], images[1, :, 8:, 10:], atol=1e-5, rtol=0)


def test_flip_parameters_mirror_an_asymmetric_image() -> None:
    images = torch.zeros(3, 1, 12, 12)
    images[:, :, 2:5, 1:4] = 1.0  # blob in the top-left corner
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY), (12, 12))
    parameters = _identity_parameters(augmenter, 3)
    parameters["hflip"] = torch.tensor([True, False, False])
    parameters["vflip"] = torch.tensor([False, True, False])
    out = augmenter.apply(images, parameters)
    torch.testing.assert_close(out[0], images[0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], images[1].flip(-2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[2], images[2], atol=1e-5, rtol=0)
    assert not torch.allclose(out[0], images[0])


def test_rotation_by_quarter_turn_is_rigid_on_non_square_input() -> None:
    # A 12x12 window in the middle of a 12x20 image rotated by 90 degrees must equal rot90 of that window:
    # rotating in normalised instead of pixel coordinates would shear it.
    images = _images(1, 12, 20)
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY), (12, 12))
    parameters = _identity_parameters(augmenter, 1)
    parameters["crop_extent"] = torch.tensor([[12 / 20, 1.0]])
    parameters["rotation"] = torch.tensor([math.pi / 2])
    out = augmenter.apply(images, parameters)
    window = images[0, :, :, 4:16]
    rotated = [torch.rot90(window, k, dims=(-2, -1)) for k in (1, 3)]
    assert any(torch.allclose(out[0], r, atol=1e-5) for r in rotated)
    # A small rotation keeps the image centre and moves the corners into the zero padding.
    square = BatchAugmenter(AugmentationParams(**IDENTITY), (10, 10))
    parameters = _identity_parameters(square, 1)
    parameters["rotation"] = torch.tensor([math.radians(10.0)])
    small = square.apply(torch.ones(1, 1, 10, 10), parameters)
    assert small[0, 0, 5, 5] == pytest.approx(1.0) and small[0, 0, 0, 0] < 0.5


def test_chunked_cpu_warp_matches_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    import radssl.views.augment as augment

    images = _images(7, 20, 20)
    augmenter = BatchAugmenter(AugmentationParams(), (16, 16))
    parameters = augmenter.sample_parameters(7, "cpu", _gen(5), input_size=(20, 20))
    whole = augmenter.apply(images, parameters)
    monkeypatch.setattr(augment, "_CPU_GRID_POINTS", 3 * 16 * 16)  # chunks of 3, 3, 1 samples
    torch.testing.assert_close(augmenter.apply(images, parameters), whole, atol=1e-6, rtol=0)


def test_intensity_parameters_move_mean_and_std_as_expected() -> None:
    images = 0.2 + 0.4 * _images(4, 16, 16)  # in [0.2, 0.6]: no clamping below
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY), (16, 16))
    parameters = _identity_parameters(augmenter, 4)
    parameters["brightness"] = torch.tensor([1.3, 1.0, 1.0, 1.0])
    parameters["contrast"] = torch.tensor([1.0, 0.5, 1.5, 1.0])
    parameters["gamma"] = torch.tensor([1.0, 1.0, 1.0, 2.0])
    out = augmenter.apply(images, parameters)
    mean_in, mean_out = images.mean(dim=(1, 2, 3)), out.mean(dim=(1, 2, 3))
    std_in, std_out = images.std(dim=(1, 2, 3)), out.std(dim=(1, 2, 3))
    assert mean_out[0] == pytest.approx(1.3 * mean_in[0].item(), rel=1e-4)  # brightness scales
    assert mean_out[1] == pytest.approx(mean_in[1].item(), rel=1e-4)  # contrast keeps the mean...
    assert std_out[1] == pytest.approx(0.5 * std_in[1].item(), rel=1e-4)  # ...and scales the spread
    assert std_out[2] == pytest.approx(1.5 * std_in[2].item(), rel=1e-4)
    assert mean_out[3] < mean_in[3] - 0.05  # gamma > 1 darkens values in (0, 1)
    torch.testing.assert_close(out[3], images[3] ** 2, atol=1e-6, rtol=0)


def _high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


def test_blur_reduces_high_frequency_energy_per_sample() -> None:
    images = _images(3, 24, 24)
    augmenter = BatchAugmenter(AugmentationParams(**{**IDENTITY, "blur_sigma": (0.1, 2.0)}), (24, 24))
    parameters = _identity_parameters(augmenter, 3)
    parameters["blur_sigma"] = torch.tensor([0.0, 0.7, 2.0])
    out = augmenter.apply(images, parameters)
    energy_in, energy_out = _high_frequency_energy(images), _high_frequency_energy(out)
    torch.testing.assert_close(out[0], images[0])  # sigma 0: untouched
    assert energy_out[1] < 0.6 * energy_in[1]
    assert energy_out[2] < 0.5 * energy_out[1]  # larger sigma blurs more
    assert out[2].mean() == pytest.approx(images[2].mean().item(), abs=1e-3)  # kernel is normalised


def test_noise_std_is_per_sample() -> None:
    images = torch.full((3, 1, 64, 64), 0.5)
    augmenter = BatchAugmenter(AugmentationParams(**IDENTITY), (64, 64))
    parameters = _identity_parameters(augmenter, 3)
    parameters["noise_std"] = torch.tensor([0.0, 0.02, 0.08])
    out = augmenter.apply(images, parameters)
    assert torch.equal(out[0], images[0])
    assert out[1].std().item() == pytest.approx(0.02, rel=0.1)
    assert out[2].std().item() == pytest.approx(0.08, rel=0.1)


@pytest.mark.parametrize(
    "field,value",
    [
        ("crop_scale", (0.9, 0.2)),
        ("crop_scale", (0.0, 0.5)),
        ("crop_ratio", (0.0, 1.0)),
        ("gamma", (1.4, 0.7)),
        ("blur_sigma", (-1.0, 1.0)),
        ("noise_std", (0.1, 0.0)),
        ("hflip_p", 1.5),
        ("blur_p", -0.1),
        ("brightness", 2.0),
        ("rotation_degrees", -5.0),
    ],
)
def test_invalid_params_raise_validation_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        AugmentationParams(**{field: value})


def test_unknown_params_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="hue"):
        AugmentationParams(hue=0.1)  # type: ignore[call-arg]


def test_bad_inputs_raise_errors_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match="output_size"):
        BatchAugmenter(AugmentationParams(), (32,))
    augmenter = BatchAugmenter(AugmentationParams(), (8, 8))
    with pytest.raises(DataError, match="images"):
        augmenter(torch.zeros(2, 8, 8), _gen(0))  # no channel axis
    with pytest.raises(DataError, match="images"):
        augmenter(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), _gen(0))


def test_volumes_get_crop_flip_intensity_and_noise() -> None:
    volumes = _images(3, 10, 16, 14)
    out = BatchAugmenter(AugmentationParams(noise_p=1.0, blur_p=1.0), (8, 12, 12))(volumes, _gen(11))
    assert out.shape == (3, 1, 8, 12, 12) and out.min() >= 0.0 and out.max() <= 1.0
    ratio = 14 / 16
    identity = BatchAugmenter(AugmentationParams(**{**IDENTITY, "crop_ratio": (ratio, ratio)}), (10, 16, 14))
    torch.testing.assert_close(identity(volumes, _gen(12)), volumes, atol=1e-5, rtol=0)
    parameters = _identity_parameters(identity, 3)
    parameters["hflip"] = torch.tensor([True, False, False])
    parameters["blur_sigma"] = torch.tensor([0.0, 1.5, 0.0])
    flipped = identity.apply(volumes, parameters)
    torch.testing.assert_close(flipped[0], volumes[0].flip(-1), atol=1e-5, rtol=0)
    assert _high_frequency_energy(flipped[1:2, :, 5]) < 0.5 * _high_frequency_energy(volumes[1:2, :, 5])
    torch.testing.assert_close(flipped[2], volumes[2], atol=1e-5, rtol=0)
