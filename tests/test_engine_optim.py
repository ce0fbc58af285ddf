"""Optimisers and the learning-rate schedule (radssl.engine.optim): values at known steps, floors, groups."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.utils.lars import LARS
from torch import nn

from radssl.config import OptimSection
from radssl.engine.optim import build_optimizer, effective_lr, lr_at, parameter_groups, set_lr


def _optim(**kwargs) -> OptimSection:
    return OptimSection(**kwargs)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


# ----------------------------------------------------------------------------------------- schedule
def test_linear_warmup_then_cosine_at_known_steps():
    config = _optim(warmup_fraction=0.1, min_lr_ratio=0.0)
    base = 0.8
    # 100 steps: 10 warm-up steps reaching base at step 9, then a half cosine over the remaining 90
    assert lr_at(0, 100, base, config) == pytest.approx(0.08)
    assert lr_at(4, 100, base, config) == pytest.approx(0.4)
    assert lr_at(9, 100, base, config) == pytest.approx(base)
    assert lr_at(10, 100, base, config) == pytest.approx(base)  # cosine starts at the top
    assert lr_at(55, 100, base, config) == pytest.approx(base / 2)  # half-way through the cosine
    assert lr_at(25, 100, base, config) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 15 / 90)))
    assert lr_at(100, 100, base, config) == pytest.approx(0.0, abs=1e-12)


def test_schedule_decreases_after_warmup_and_rises_during_it():
    config = _optim(warmup_fraction=0.2)
    values = [lr_at(s, 50, 1.0, config) for s in range(50)]
    assert all(a < b for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_no_warmup_starts_at_the_base_rate():
    config = _optim(warmup_fraction=0.0)
    assert lr_at(0, 10, 0.3, config) == pytest.approx(0.3)
    assert lr_at(5, 10, 0.3, config) == pytest.approx(0.15)


def test_min_lr_ratio_is_the_floor_of_the_cosine():
    config = _optim(warmup_fraction=0.05, min_lr_ratio=0.1)
    values = [lr_at(s, 200, 2.0, config) for s in range(201)]
    assert min(values[10:]) == pytest.approx(0.2)
    assert values[200] == pytest.approx(0.2)
    assert lr_at(105, 200, 2.0, config) == pytest.approx(0.2 + (2.0 - 0.2) * 0.5)  # middle: half-way to the floor
    assert lr_at(500, 200, 2.0, config) == pytest.approx(0.2)  # past the end: stays at the floor


def test_one_step_run_is_well_defined():
    config = _optim(warmup_fraction=0.5)
    assert lr_at(0, 1, 1.0, config) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- scaling
def test_linear_lr_scaling_with_the_global_batch():
    assert effective_lr(_optim(lr=0.3), 256) == pytest.approx(0.3)
    assert effective_lr(_optim(lr=0.3), 512) == pytest.approx(0.6)
    assert effective_lr(_optim(lr=0.3), 64) == pytest.approx(0.075)
    assert effective_lr(_optim(lr=0.3, lr_scaling="none"), 4096) == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------- groups
def test_weight_decay_only_on_weights_not_biases_or_norms():
    net = _net()
    net[0].bias.requires_grad_(False)  # frozen parameters are left out altogether
    decay, no_decay = parameter_groups(net, weight_decay=0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == {id(net[0].weight), id(net[3].weight)}
    assert ids(no_decay["params"]) == {id(net[1].weight), id(net[1].bias), id(net[3].bias)}


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lars", LARS)])
def test_build_optimizer_keeps_the_groups_and_settings(name, kind):
    config = _optim(optimizer=name, weight_decay=1e-4, momentum=0.8, betas=(0.8, 0.95))
    optimizer = build_optimizer(_net(), config, lr=0.05)
    assert isinstance(optimizer, kind)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.05 for g in optimizer.param_groups)
    if name == "adamw":
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    else:
        assert optimizer.param_groups[0]["momentum"] == 0.8


def test_weight_decay_acts_on_weights_only_in_a_step():
    net = nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(1.0)
    optimizer = build_optimizer(net, _optim(optimizer="sgd", weight_decay=0.5, momentum=0.0), lr=0.1)
    net.weight.grad = torch.zeros_like(net.weight)
    net.bias.grad = torch.zeros_like(net.bias)
    optimizer.step()  # zero gradients: only decay moves a parameter
    assert torch.allclose(net.weight, torch.full_like(net.weight, 1.0 - 0.1 * 0.5))
    assert torch.equal(net.bias, torch.ones_like(net.bias))


def test_set_lr_sets_every_group():
    optimizer = build_optimizer(_net(), _optim(optimizer="sgd"), lr=0.1)
    set_lr(optimizer, 0.0123)
    assert [g["lr"] for g in optimizer.param_groups] == [0.0123, 0.0123]


def test_vit_position_embedding_and_class_token_get_no_weight_decay() -> None:
    from radssl.engine.optim import parameter_groups
    from radssl.models.registry import build_backbone

    vit = build_backbone("vit_tiny", image_size=28, options={"depth": 1})
    decay, no_decay = parameter_groups(vit, 0.05)
    exempt = {id(p) for p in no_decay["params"]}
    assert id(vit.vit.pos_embed) in exempt and id(vit.vit.cls_token) in exempt
    assert id(vit.vit.patch_embed.proj.weight) not in exempt
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
