"""SimCLR/BYOL losses equal lightly's on the same inputs; the registry and momentum update behave."""

from __future__ import annotations

import pytest
import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss

from radssl.methods.registry import METHODS, build_method, method_class
from radssl.models.backbones import build_backbone


def _views(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 16, 16, generator=generator) for _ in range(2)]


def test_simclr_loss_equals_lightly_ntxent() -> None:
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone("small_cnn"), {"temperature": 0.2})
    method.eval()  # BatchNorm with running stats: the backbone maps each view identically in both paths
    first, second = _views()
    loss = method([first, second])
    reference = NTXentLoss(temperature=0.2)(method.project(first), method.project(second))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_byol_loss_equals_lightly_symmetric_negative_cosine() -> None:
    torch.manual_seed(0)
    method = build_method("byol", build_backbone("small_cnn"), {})
    method.eval()
    first, second = _views(1)
    loss = method([first, second])
    criterion = NegativeCosineSimilarity()
    p0 = method.prediction_head(method.projection_head(method.backbone(first)))
    p1 = method.prediction_head(method.projection_head(method.backbone(second)))
    t0 = method.target_projection_head(method.target_backbone(first))
    t1 = method.target_projection_head(method.target_backbone(second))
    reference = 0.5 * (criterion(p0, t1) + criterion(p1, t0))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


def test_byol_target_network_follows_online_by_momentum() -> None:
    torch.manual_seed(0)
    method = build_method("byol", build_backbone("small_cnn"), {"momentum_start": 0.9, "momentum_end": 0.9})
    online = next(method.backbone.parameters())
    target = next(method.target_backbone.parameters())
    assert not target.requires_grad
    with torch.no_grad():
        online.add_(1.0)
    before = target.detach().clone()
    method.on_step_end(0, 10)
    # EMA: target ← 0.9·target + 0.1·online, and the online weights are 1 larger than the target's.
    torch.testing.assert_close(target, before + 0.1, rtol=0, atol=1e-5)
    assert method.diagnostics()["momentum"] == pytest.approx(0.9)


def test_simclr_trains_and_gradients_reach_the_backbone() -> None:
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone("small_cnn"), {})
    loss = method(_views())
    loss.backward()
    grads = [p.grad for p in method.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_registry_lists_methods_and_rejects_unknown() -> None:
    assert {"simclr", "byol"} <= set(METHODS)
    assert method_class("simclr").name == "simclr"
    with pytest.raises(KeyError, match="unknown method 'moco2'"):
        method_class("moco2")
