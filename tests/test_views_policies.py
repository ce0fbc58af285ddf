"""View policies: registry, layout, determinism, normalisation and the config section that chooses them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radssl.config import load_config
from radssl.data.store import NORMALISATION_MEAN, NORMALISATION_STD
from radssl.errors import ConfigError
from radssl.views.columns import PairingColumns
from radssl.views.policies import PolicyContext, ViewSettings, build_policy


def _store_columns(store) -> PairingColumns:  # noqa: ANN001
    return PairingColumns.from_store(store, np.arange(len(store)))


def test_two_view_policy_makes_two_independent_normalised_views(tiny_store) -> None:  # noqa: ANN001
    policy = build_policy(ViewSettings(), PolicyContext(input_size=(16, 16), output_size=(12, 12)))
    rows = torch.tensor([0, 5, 9])
    columns = _store_columns(tiny_store)
    batch = policy(rows, tiny_store.images, columns, torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in batch.views] == [(3, 1, 12, 12)] * 2
    assert torch.equal(batch.rows, rows) and batch.partner_rows is None and batch.log_scalars() == {}
    assert not torch.equal(batch.views[0], batch.views[1]), "each view gets its own augmentation"
    low, high = (0 - NORMALISATION_MEAN) / NORMALISATION_STD, (1 - NORMALISATION_MEAN) / NORMALISATION_STD
    assert all(float(v.min()) >= low - 1e-5 and float(v.max()) <= high + 1e-5 for v in batch.views)
    again = policy(rows, tiny_store.images, columns, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batch.views, again.views)), "same seed, same views"
    assert policy.layout().sizes == ((12, 12), (12, 12))


def test_single_view_policy_refuses_a_pairing() -> None:
    context = PolicyContext(input_size=(16, 16), output_size=(16, 16))
    assert build_policy(ViewSettings(policy="single_view"), context).layout().num_views == 1
    from radssl.views.pairing import PairingParams

    with pytest.raises(ConfigError, match="makes no positive pairs"):
        build_policy(ViewSettings(policy="single_view", pairing=PairingParams(kind="patient")), context)


def test_views_config_validates_policy_name_and_keys() -> None:
    with pytest.raises(ConfigError, match="unknown view policy 'three_view'"):
        load_config(None, ["views.policy=three_view"])
    with pytest.raises(ConfigError, match="local_views"):
        load_config(None, ["views.local_views=6"])  # two_view has no such key
    with pytest.raises(ConfigError, match="unknown pairing 'sibling'"):
        load_config(None, ["views.pairing.kind=sibling"])
    settings = load_config(None, ["views.crop_scale=[0.5, 1.0]"]).views.settings()
    assert settings.policy == "two_view" and settings.augment.crop_scale == (0.5, 1.0)


def test_method_preset_fills_only_what_the_user_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    from radssl.methods.simclr import SimCLR

    monkeypatch.setattr(SimCLR, "preset", {"optim": {"optimizer": "sgd", "lr": 0.06}, "views": {"blur_p": 0.0}})
    config = load_config(None, ["method.name=simclr", "optim.lr=0.5"])
    assert (config.optim.optimizer, config.optim.lr, config.views.blur_p) == ("sgd", 0.5, 0.0)
    off = load_config(None, ["method.name=simclr", "method.preset=false"])
    assert off.optim.optimizer == "lars" and off.views.blur_p == 0.5


def test_preset_keys_of_another_policy_are_dropped_when_the_user_picks_a_policy(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from radssl.methods.simclr import SimCLR

    preset = {"views": {"policy": "multi_crop", "local_views": 4, "blur_p": 0.0}}
    monkeypatch.setattr(SimCLR, "preset", preset)
    config = load_config(None, ["method.name=simclr", "views.policy=two_view"])
    assert config.views.policy == "two_view" and config.views.blur_p == 0.0  # shared augmentation keys still apply
    assert "local_views" not in config.views.policy_params()


def test_preset_optimiser_recipe_is_dropped_when_the_user_picks_another_optimiser(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from radssl.methods.simclr import SimCLR

    preset = {"optim": {"optimizer": "sgd", "lr": 0.06, "momentum": 0.0, "min_lr_ratio": 1.0},
              "method": {"temperature": 0.3}}
    monkeypatch.setattr(SimCLR, "preset", preset)
    lars = load_config(None, ["method.name=simclr", "optim.optimizer=lars"])
    assert (lars.optim.lr, lars.optim.momentum, lars.optim.min_lr_ratio) == (0.3, 0.9, 0.0)  # engine defaults
    assert lars.method.params()["temperature"] == 0.3  # method keys still come from the preset
    same = load_config(None, ["method.name=simclr", "optim.optimizer=sgd", "optim.lr=0.1"])
    assert (same.optim.lr, same.optim.momentum, same.optim.min_lr_ratio) == (0.1, 0.0, 1.0)
