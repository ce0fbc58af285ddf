"""The multi_crop and restoration view policies and the Models Genesis corruptions (2D and 3D)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from radssl.config import load_config
from radssl.data.store import images_to_float
from radssl.errors import ConfigError
from radssl.models.vit import automatic_patch_size
from radssl.views.augment import AugmentationParams, BatchAugmenter
from radssl.views.columns import PairingColumns
from radssl.views.multicrop import automatic_local_size, automatic_size_multiple
from radssl.views.pairing import PAIRINGS, Pairing, PairingParams
from radssl.views.policies import PolicyContext, ViewSettings, build_policy, normalise_view
from radssl.views.restoration import (
    GenesisCorruption,
    RestorationParams,
    bezier_mapping,
    box_mask,
    inpaint_sizes,
    local_pixel_shuffle,
    outpaint_sizes,
    paint,
    sample_bezier,
    sample_local_shuffle,
    sample_painting,
    window_ids,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _columns(store) -> PairingColumns:  # noqa: ANN001
    return PairingColumns.from_store(store, np.arange(len(store)))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ multi_crop
def test_multi_crop_sizes_global_first_and_determinism(tiny_store) -> None:  # noqa: ANN001
    context = PolicyContext(input_size=(16, 16), output_size=(16, 16))
    policy = build_policy(ViewSettings(policy="multi_crop", params={"local_views": 3}), context)
    layout = policy.layout()
    assert layout.num_global == 2 and layout.sizes == ((16, 16),) * 2 + ((8, 8),) * 3
    rows, columns = torch.tensor([0, 3, 7, 11]), _columns(tiny_store)
    batch = policy(rows, tiny_store.images, columns, _generator(0))
    assert [tuple(v.shape) for v in batch.views] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 3
    assert batch.num_global == 2 and len(batch.global_views) == 2 and len(batch.local_views) == 3
    assert batch.partner_rows is None
    again = policy(rows, tiny_store.images, columns, _generator(0))
    assert all(torch.equal(a, b) for a, b in zip(batch.views, again.views)), "same generator, same views"
    other = policy(rows, tiny_store.images, columns, _generator(1))
    assert not any(torch.equal(a, b) for a, b in zip(batch.views, other.views))
    assert len({v.sum().item() for v in batch.local_views}) == 3, "each local view is its own crop"


def test_multi_crop_local_size_follows_dino_and_the_vit_patch_rule() -> None:
    # DINO: 96 px local views for 224 px global views (3/7), rounded to the automatic ViT patch size.
    assert [automatic_local_size(s) for s in (28, 32, 64, 224)] == [12, 12, 24, 96]
    assert all(automatic_size_multiple(s) == automatic_patch_size((s, s)) for s in range(8, 300))
    assert automatic_local_size(64, multiple=4) == 28
    context = PolicyContext(input_size=(16, 16), output_size=(16, 16))
    with pytest.raises(ConfigError, match="local_size 20 is larger"):
        build_policy(ViewSettings(policy="multi_crop", params={"local_size": 20}), context)
    explicit = build_policy(ViewSettings(policy="multi_crop", params={"local_size": 12, "local_views": 2}), context)
    assert explicit.layout().sizes[2:] == ((12, 12),) * 2


class ShiftPairing(Pairing):
    """Test pairing: every row's partner is the next row (a stand-in for a patient / slice partner)."""

    name = "shift"

    def partners(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (rows + 1) % len(self.columns)


def test_multi_crop_second_global_view_comes_from_the_pairing_partner(tiny_store, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setitem(PAIRINGS, "shift", f"{__name__}:ShiftPairing")
    context = PolicyContext(input_size=(16, 16), output_size=(16, 16))
    augment = AugmentationParams()
    settings = ViewSettings(policy="multi_crop", augment=augment, pairing=PairingParams(kind="shift"),
                            params={"local_views": 2})
    policy = build_policy(settings, context)
    rows = torch.tensor([0, 4, 9])
    batch = policy(rows, tiny_store.images, _columns(tiny_store), _generator(5))
    assert torch.equal(batch.partner_rows, rows + 1) and batch.log_scalars() == {"cross_image_share": 1.0}
    # The same draws made by hand: one batched global call on [anchor; partner] images, then the local call.
    generator = _generator(5)
    anchor = images_to_float(tiny_store.images[rows])
    partner = images_to_float(tiny_store.images[rows + 1])
    expected = BatchAugmenter(augment, (16, 16))(torch.cat([anchor, partner]), generator).chunk(2)
    for view, want in zip(batch.global_views, expected):
        torch.testing.assert_close(view, normalise_view(want.clone(), False))
    wrong = BatchAugmenter(augment, (16, 16))(torch.cat([anchor, anchor]), _generator(5)).chunk(2)[1]
    assert not torch.allclose(batch.global_views[1], normalise_view(wrong, False)), "partner, not the anchor"


def test_dino_preset_selects_multi_crop_and_its_keys_validate() -> None:
    config = load_config(None, ["method.name=dino", "views.local_views=4"])
    assert config.views.policy == "multi_crop" and config.views.crop_scale == (0.4, 1.0)
    assert config.views.settings().params == {"local_views": 4}
    with pytest.raises(ConfigError, match="local_crop_scale"):
        load_config(None, ["method.name=dino", "views.local_crop_scale=[0.5, 0.1]"])


# ------------------------------------------------------------------------------------------------ Bézier mapping
def _reference_bezier(controls: np.ndarray, inverted: bool, x: np.ndarray) -> np.ndarray:
    """Models Genesis ``nonlinear_transformation`` with given random draws (pytorch/utils.py, 100,000 points)."""
    points = [[0, 0], controls[0], controls[1], [1, 1]]
    t = np.linspace(0.0, 1.0, 100000)
    n = len(points) - 1
    bernstein = np.array([math.comb(n, i) * t ** (n - i) * (1 - t) ** i for i in range(n + 1)])
    xvals = np.dot(np.array([p[0] for p in points]), bernstein)
    yvals = np.dot(np.array([p[1] for p in points]), bernstein)
    if inverted:
        xvals = np.sort(xvals)
    else:
        xvals, yvals = np.sort(xvals), np.sort(yvals)
    return np.interp(x, xvals, yvals)


def test_bezier_mapping_is_monotone_with_the_reference_endpoints_and_values() -> None:
    params = sample_bezier(8, torch.device("cpu"), _generator(0), p=1.0)
    params["inverted"] = torch.arange(8) % 2 == 1
    x = torch.linspace(0, 1, 257).expand(8, 1, 1, 257).contiguous()
    y = bezier_mapping(x, params)[:, 0, 0]
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    for b in range(8):
        steps = y[b, 1:] - y[b, :-1]
        if params["inverted"][b]:
            assert (y[b, 0], y[b, -1]) == (1.0, 0.0) and bool((steps <= 1e-7).all()), "inverted: 1 → 0, decreasing"
        else:
            assert (y[b, 0], y[b, -1]) == (0.0, 1.0) and bool((steps >= -1e-7).all()), "0 → 1, increasing"
        reference = _reference_bezier(params["controls"][b].double().numpy(), bool(params["inverted"][b]),
                                      x[b, 0, 0].double().numpy())
        np.testing.assert_allclose(y[b].numpy(), reference, atol=2e-4)
    off = dict(params, apply=torch.zeros(8, dtype=torch.bool))
    assert torch.equal(bezier_mapping(x, off), x), "samples the probability skipped are unchanged"


# ------------------------------------------------------------------------------------------------ local shuffling
@pytest.mark.parametrize("spatial", [(20, 17), (6, 8, 10)])
def test_local_shuffle_permutes_pixels_within_each_window(spatial: tuple[int, ...]) -> None:
    batch = 3
    pixels = math.prod(spatial)
    x = torch.rand(batch, 1, *spatial, generator=_generator(1))
    x = torch.cat([x, x + 10.0], dim=1)  # channel 1 = channel 0 + 10: both channels move alike
    params = sample_local_shuffle(batch, spatial, torch.device("cpu"), _generator(2), p=1.0,
                                  max_window_fraction=0.3, coverage=1.0)
    out = local_pixel_shuffle(x, params)
    assert not torch.equal(out, x)
    torch.testing.assert_close(out[:, 1], out[:, 0] + 10.0)
    ids = window_ids(spatial, params["window"], params["offset"])
    for b in range(batch):
        before, after = x[b, 0].reshape(pixels), out[b, 0].reshape(pixels)
        for window in ids[b].unique():
            inside = ids[b] == window
            assert torch.equal(before[inside].sort().values, after[inside].sort().values), "same values per window"
        assert int(params["window"][b].max()) <= max(1, int(0.3 * max(spatial)))
    unchosen = dict(params, chosen=torch.zeros_like(params["chosen"]))
    assert torch.equal(local_pixel_shuffle(x, unchosen), x), "windows not chosen stay in place"


@pytest.mark.parametrize("spatial", [(28, 28), (28, 28, 28), (16, 16)])
def test_every_image_drawn_for_shuffling_is_shuffled(spatial: tuple[int, ...]) -> None:
    """Windows are never 1 on every axis, so the shuffle rate is ``p`` (1×1 windows at 28 px made it 0.75 p)."""
    batch = 64
    x = torch.rand(batch, 1, *spatial, generator=_generator(3))
    params = sample_local_shuffle(batch, spatial, torch.device("cpu"), _generator(4), p=0.5,
                                  max_window_fraction=0.1, coverage=0.85)
    window = params["window"]
    assert (window.prod(dim=1) >= 2).all(), "a 1-pixel window cannot be shuffled"
    largest = max(2, int(0.1 * spatial[0]))
    assert int(window.max()) <= largest and int(window.min()) >= 1
    # Every shape but all-ones is drawn (28 px, 2D: 1×2, 2×1, 2×2).
    if spatial == (28, 28):
        assert {tuple(w) for w in window.tolist()} == {(1, 2), (2, 1), (2, 2)}
    changed = (local_pixel_shuffle(x, params) != x).flatten(1).any(dim=1)
    assert torch.equal(changed, params["apply"]), "shuffled exactly the images the probability drew"


# ------------------------------------------------------------------------------------------------ painting
def _painting(spatial: tuple[int, ...], share: float, seed: int = 3, batch: int = 6) -> dict[str, torch.Tensor]:
    return sample_painting((batch, 1, *spatial), torch.device("cpu"), _generator(seed), p=1.0, inpaint_share=share)


@pytest.mark.parametrize("spatial", [(28, 31), (12, 14, 16)])
def test_in_painting_changes_only_inside_its_boxes(spatial: tuple[int, ...]) -> None:
    params = _painting(spatial, share=1.0)
    assert bool(params["inpaint"].all()) and not bool(params["outpaint"].any())
    x = torch.rand(6, 1, *spatial, generator=_generator(4))
    out = paint(x, params)
    inside = box_mask(spatial, {k: params[f"inpaint_{k}"] for k in ("start", "size", "active")}).unsqueeze(1)
    assert torch.equal(out[~inside], x[~inside])
    assert torch.equal(out[inside], params["noise"][inside]) and bool(inside.any())
    low, high = inpaint_sizes(spatial, torch.device("cpu"))
    size, start, active = params["inpaint_size"], params["inpaint_start"], params["inpaint_active"]
    assert bool(((size >= low) & (size <= high)).all()), "box sides in [side // 6, side // 3]"
    sides = torch.tensor(spatial)
    assert bool(((start >= 3) & (start + size <= sides - 3)).all()), "boxes keep 3 px from the border"
    assert bool((active.long().diff(dim=1) <= 0).all()), "box k only while every earlier coin came up"


@pytest.mark.parametrize("spatial", [(28, 31), (12, 14, 16)])
def test_out_painting_keeps_only_inside_its_boxes(spatial: tuple[int, ...]) -> None:
    params = _painting(spatial, share=0.0)
    assert bool(params["outpaint"].all()) and bool(params["outpaint_active"][:, 0].all()), "first box always"
    x = torch.rand(6, 1, *spatial, generator=_generator(4))
    out = paint(x, params)
    inside = box_mask(spatial, {k: params[f"outpaint_{k}"] for k in ("start", "size", "active")}).unsqueeze(1)
    assert torch.equal(out[inside], x[inside])
    assert torch.equal(out[~inside], params["noise"][~inside]) and bool((~inside).any())
    low, high = outpaint_sizes(spatial, torch.device("cpu"))
    size = params["outpaint_size"]
    assert bool(((size >= low) & (size <= high)).all()), "box sides in side − [3/7, 4/7]·side"


def test_in_and_out_painting_are_mutually_exclusive_with_the_reference_rates() -> None:
    params = sample_painting((4000, 1, 8, 8), torch.device("cpu"), _generator(0), p=0.9, inpaint_share=0.2)
    assert not bool((params["inpaint"] & params["outpaint"]).any())
    painted = (params["inpaint"] | params["outpaint"]).float().mean()
    inpainted = params["inpaint"].float().sum() / (params["inpaint"] | params["outpaint"]).float().sum()
    assert abs(float(painted) - 0.9) < 0.03 and abs(float(inpainted) - 0.2) < 0.03
    assert bool(params["outpaint_active"][:, 0].all()), "out-painting always keeps at least one box"
    first_inpaint = params["inpaint_active"][:, 0].float().mean()
    assert abs(float(first_inpaint) - 0.95) < 0.02, "in-painting's first box also needs its coin (p = 0.95)"


# ------------------------------------------------------------------------------------------------ whole corruption
@pytest.mark.parametrize("shape", [(4, 1, 29, 31), (2, 1, 10, 12, 14)])
def test_corruption_is_deterministic_by_generator_in_2d_and_3d(shape: tuple[int, ...]) -> None:
    corruption = GenesisCorruption(RestorationParams(local_shuffle_p=1.0, nonlinear_p=1.0, paint_p=1.0))
    x = torch.rand(shape, generator=_generator(0))
    first = corruption(x, _generator(7))
    assert first.shape == x.shape and not torch.equal(first, x)
    assert torch.equal(first, corruption(x, _generator(7)))
    assert not torch.equal(first, corruption(x, _generator(8)))
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_corruption_applies_the_reference_steps_in_order() -> None:
    x = torch.rand(5, 1, 20, 20, generator=_generator(0))
    shuffle_only = GenesisCorruption(RestorationParams(local_shuffle_p=1.0, nonlinear_p=0.0, paint_p=0.0))
    shuffled = shuffle_only(x, _generator(1))
    assert not torch.equal(shuffled, x)
    assert torch.equal(shuffled.flatten(1).sort().values, x.flatten(1).sort().values), "same pixels, moved"
    corruption = GenesisCorruption(RestorationParams(local_shuffle_p=1.0, nonlinear_p=1.0, paint_p=1.0))
    params = corruption.sample(tuple(x.shape), "cpu", _generator(2))
    steps = {prefix: {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
             for prefix in ("shuffle_", "bezier_")}
    # Shuffle, then intensity mapping, then painting: the painted noise is not remapped (reference order).
    by_hand = paint(bezier_mapping(local_pixel_shuffle(x, steps["shuffle_"]), steps["bezier_"]), params)
    assert torch.equal(corruption.apply(x, params), by_hand)


def test_restoration_policy_target_is_the_uncorrupted_augmented_view(tiny_store) -> None:  # noqa: ANN001
    augment = AugmentationParams(intensity_p=0.0, blur_p=0.0, noise_p=0.0)
    context = PolicyContext(input_size=(16, 16), output_size=(16, 16))
    policy = build_policy(ViewSettings(policy="restoration", augment=augment), context)
    layout = policy.layout()
    assert layout.sizes == ((16, 16),) and layout.targets
    rows, columns = torch.tensor([1, 2, 8, 30]), _columns(tiny_store)
    batch = policy(rows, tiny_store.images, columns, _generator(3))
    expected = BatchAugmenter(augment, (16, 16))(images_to_float(tiny_store.images[rows]), _generator(3))
    torch.testing.assert_close(batch.targets[0], normalise_view(expected, False))
    assert batch.views[0].shape == batch.targets[0].shape and not torch.equal(batch.views[0], batch.targets[0])
    again = policy(rows, tiny_store.images, columns, _generator(3))
    assert torch.equal(again.views[0], batch.views[0]) and torch.equal(again.targets[0], batch.targets[0])
    identity = build_policy(ViewSettings(policy="restoration", augment=augment, params={
        "nonlinear_p": 0.0, "local_shuffle_p": 0.0, "paint_p": 0.0}), context)
    plain = identity(rows, tiny_store.images, columns, _generator(3))
    assert torch.equal(plain.views[0], plain.targets[0]), "no corruption drawn: the view is its target"
    with pytest.raises(ConfigError, match="makes no positive pairs"):
        build_policy(ViewSettings(policy="restoration", pairing=PairingParams(kind="patient")), context)


def test_restoration_policy_makes_3d_views() -> None:
    volumes = torch.randint(0, 255, (5, 1, 10, 12, 14), dtype=torch.uint8, generator=_generator(0))
    context = PolicyContext(input_size=(10, 12, 14), output_size=(8, 12, 12))
    policy = build_policy(ViewSettings(policy="restoration"), context)
    assert policy.layout().spatial_dims == 3
    batch = policy(torch.tensor([0, 2, 4]), volumes, None, _generator(1))  # type: ignore[arg-type]
    assert batch.views[0].shape == batch.targets[0].shape == (3, 1, 8, 12, 12)
