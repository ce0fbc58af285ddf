"""SimCLR/BYOL: losses equal hand-written references, EMA targets follow the declared pairs, registry and view checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radssl.errors import ConfigError
from radssl.methods.base import apply_momentum
from radssl.methods.registry import METHODS, build_method, method_class
from radssl.models.registry import build_backbone
from radssl.views.batch import ViewBatch, ViewLayout, ViewRequirements


def _batch(seed: int = 0, n: int = 8) -> ViewBatch:
    generator = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 1, 16, 16, generator=generator) for _ in range(2)]
    return ViewBatch(views=views, rows=torch.arange(n))


def nt_xent_reference(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent written out (Chen et al. 2020, eq. 1): each of 2N embeddings against its partner and 2N-2 negatives."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    losses = []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        logits = torch.stack([z[i] @ z[j] / temperature for j in range(2 * n) if j != i])
        target = partner if partner < i else partner - 1  # index of the partner once i itself is left out
        losses.append(torch.logsumexp(logits, 0) - logits[target])
    return torch.stack(losses).mean()


def test_simclr_loss_equals_hand_written_nt_xent() -> None:
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone("small_cnn"), {"temperature": 0.2, "gather_distributed": False})
    method.eval()  # BatchNorm with running stats: the backbone maps each view identically in both paths
    batch = _batch()
    loss = method(batch)["loss"]
    with torch.no_grad():
        reference = nt_xent_reference(method.project(batch.views[0]), method.project(batch.views[1]), 0.2)
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-5)


def test_byol_loss_is_symmetric_negative_cosine_to_the_other_views_target() -> None:
    torch.manual_seed(0)
    method = build_method("byol", build_backbone("small_cnn"), {})
    method.eval()
    batch = _batch(1)
    loss = method(batch)["loss"]
    first, second = batch.views
    with torch.no_grad():
        p0 = method.prediction_head(method.projection_head(method.backbone(first)))
        p1 = method.prediction_head(method.projection_head(method.backbone(second)))
        t0 = method.target_projection_head(method.target_backbone(first))
        t1 = method.target_projection_head(method.target_backbone(second))
        reference = -0.5 * (F.cosine_similarity(p0, t1).mean() + F.cosine_similarity(p1, t0).mean())
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-6)


def test_byol_batch_norm_sees_each_view_as_its_own_batch() -> None:
    """As the paper and radssl's SimSiam/Barlow/VICReg/MoCo v3: one pass per view, never both views in one batch."""
    torch.manual_seed(0)
    method = build_method("byol", build_backbone("small_cnn"), {}).train()
    seen: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
             for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    batch = _batch(2, n=8)
    method(batch)
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {8}, f"BatchNorm saw batches of {sorted(set(seen))}, not one view (8)"


def test_generic_momentum_update_moves_declared_targets_by_the_schedule() -> None:
    torch.manual_seed(0)
    method = build_method("byol", build_backbone("small_cnn"), {"momentum_start": 0.9, "momentum_end": 0.9})
    online = next(method.backbone.parameters())
    target = next(method.target_backbone.parameters())
    assert not target.requires_grad
    with torch.no_grad():
        online.add_(1.0)
    before = target.detach().clone()
    assert apply_momentum(method, 0, 10) == pytest.approx(0.9)
    # EMA: target ← 0.9·target + 0.1·online, and the online weights are 1 larger than the target's.
    torch.testing.assert_close(target, before + 0.1, rtol=0, atol=1e-5)


def test_methods_without_targets_declare_none() -> None:
    method = build_method("simclr", build_backbone("small_cnn"), {})
    assert method.momentum_pairs() == []
    assert apply_momentum(method, 0, 10) is None


def test_simclr_gradients_reach_the_backbone() -> None:
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone("small_cnn"), {})
    method(_batch())["loss"].backward()
    grads = [p.grad for p in method.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_registry_lists_methods_and_rejects_unknown() -> None:
    assert {"simclr", "byol"} <= set(METHODS)
    assert method_class("simclr").name == "simclr"
    with pytest.raises(KeyError, match="unknown method 'moco2'"):
        method_class("moco2")


def test_view_requirements_name_method_policy_and_problem() -> None:
    requirements = ViewRequirements(min_views=2, max_views=2, targets=True)
    with pytest.raises(ConfigError, match=r"method 'x' does not fit view policy 'p'.*needs 2 views but the policy "
                                          r"makes 1.*needs restoration targets"):
        requirements.check(ViewLayout(sizes=((16, 16),)), "x", "p")
    with pytest.raises(ConfigError, match=r"needs a backbone from \['vit_tiny'\], got 'resnet18'"):
        ViewRequirements(backbone_families=("vit_tiny",)).check(ViewLayout(sizes=((8, 8),) * 2), "x", "p", "resnet18")
    with pytest.raises(ConfigError, match=r"runs on 2D data but the views are 3D"):
        ViewRequirements().check(ViewLayout(sizes=((4, 8, 8),) * 2), "x", "p")
    ViewRequirements().check(ViewLayout(sizes=((8, 8),) * 2), "x", "p")  # fits: no error
