"""MoCo v2, MoCo v3, SimSiam, Barlow Twins, VICReg: each loss equals its paper's formula written out by hand, MoCo v2's
queue is a checkpointed FIFO that never contrasts a query with its own image, momentum targets follow the declared
pairs, stop-gradients hold, and presets validate. (Training through the engine: test_methods_train.py; gathering
across processes: test_distributed.py.)"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import BarlowTwinsLoss, NTXentLoss
from lightly.loss.vicreg_loss import covariance_loss

from radssl.config import PretrainConfig, load_config
from radssl.data.store import ImageStore
from radssl.engine.checkpoint import load_checkpoint
from radssl.engine.pretrain import SimulatedCrash, pretrain
from radssl.methods.base import apply_momentum
from radssl.methods.registry import build_method, method_class
from radssl.methods.vicreg import covariance_term
from radssl.models.base import Backbone
from radssl.models.registry import build_backbone
from radssl.views.batch import ViewBatch

FAMILY_A = ("moco_v2", "moco_v3", "simsiam", "barlow_twins", "vicreg")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class FlattenBackbone(Backbone):
    """A weight-free encoder (flattened pixels, any spatial dims): embeddings depend on nothing but the method."""

    family = "flatten_for_test"

    def __init__(self, feature_dim: int = 16) -> None:
        super().__init__()
        self.feature_dim = feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def _views(seed: int, n: int = 8, size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, size, size, generator=generator) for _ in range(2)]


def _batch(seed: int = 0, n: int = 8, size: int = 16, first_row: int = 0) -> ViewBatch:
    return ViewBatch(views=_views(seed, n, size), rows=torch.arange(first_row, first_row + n))


def _small_cnn_method(name: str, **params: object):  # noqa: ANN202
    torch.manual_seed(0)
    return build_method(name, build_backbone("small_cnn"), params)


def _flat_method(name: str, **params: object):  # noqa: ANN202
    """The method on flattened 8×8 pixels, in eval mode (BatchNorm = identity at init): every embedding differs,
    so each formula is checked on non-degenerate numbers (a fresh CNN in eval mode maps noise to near-constants)."""
    torch.manual_seed(0)
    return build_method(name, FlattenBackbone(64), params).eval()


def _pair_batch(seed: int, n: int = 8) -> ViewBatch:
    """Two correlated 8×8 views (second = first + noise), so positives are more alike than negatives."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(n, 1, 8, 8, generator=generator)
    return ViewBatch(views=[first, first + 0.7 * torch.randn(n, 1, 8, 8, generator=generator)], rows=torch.arange(n))


# ------------------------------------------------------------------------------------------------ MoCo v2
def moco_info_nce_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
                            excluded: set[tuple[int, int]] = frozenset()) -> torch.Tensor:
    """MoCo eq. 1 written out: −log e^{q·k⁺/τ} / (e^{q·k⁺/τ} + Σ_{j not excluded} e^{q·n_j/τ}), mean over queries."""
    q, k, queue = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    losses = []
    for i in range(q.shape[0]):
        positive = torch.exp(q[i] @ k[i] / temperature)
        negatives = sum(torch.exp(q[i] @ queue[j] / temperature)
                        for j in range(queue.shape[0]) if (i, j) not in excluded)
        losses.append(-torch.log(positive / (positive + negatives)))
    return torch.stack(losses).mean()


def _with_queue(method, size: int, rows: torch.Tensor, seed: int = 5) -> torch.Tensor:  # noqa: ANN001
    keys = F.normalize(torch.randn(size, method.params.projection_dim, generator=torch.Generator().manual_seed(seed)),
                       dim=1)
    method.queue.fill(keys, rows)
    return keys


def test_moco_v2_loss_is_info_nce_of_query_against_momentum_key_and_queue() -> None:
    method = _flat_method("moco_v2", queue_size=24, temperature=0.2)
    with torch.no_grad():  # a target that differs from the online head: keys must come from the momentum encoder
        for parameter in method.target_projection_head.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    queue = _with_queue(method, 24, torch.arange(100, 124))  # rows no batch image has: nothing excluded
    batch = _pair_batch(1)
    loss = method(batch)["loss"]
    with torch.no_grad():
        q = method.projection_head(batch.views[0].flatten(1))
        k = method.target_projection_head(batch.views[1].flatten(1))  # the momentum encoder's key
        reference = moco_info_nce_reference(q, k, queue, 0.2)
        # ... which is also lightly's NTXentLoss with the same memory bank (MoCo mode).
        lightly_loss = NTXentLoss(temperature=0.2, memory_bank_size=(24, 128))
        lightly_loss.memory_bank.bank.copy_(queue)
        lightly_value = lightly_loss(q, k)
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), lightly_value, rtol=1e-5, atol=1e-5)


def test_moco_v2_never_contrasts_a_query_with_keys_of_its_own_image_or_partner() -> None:
    method = _flat_method("moco_v2", queue_size=6, temperature=0.5)
    # Queue rows: 0 and 3 are images of this batch (rows 0–3); 9 is this batch's partner of anchor 2.
    queue = _with_queue(method, 6, torch.tensor([0, 50, 3, 51, 9, 0]))
    views = _pair_batch(2, n=4).views
    batch = ViewBatch(views=views, rows=torch.arange(4), partner_rows=torch.tensor([1, 0, 9, 3]))
    loss = method(batch)["loss"]
    with torch.no_grad():
        q = method.projection_head(views[0].flatten(1))
        k = method.target_projection_head(views[1].flatten(1))
    # query 0 (row 0, partner 1): entries 0 and 5; query 1 (row 1, partner 0): 0 and 5; query 2 (row 2, partner 9):
    # entry 4; query 3 (row 3, partner 3): entry 2.
    excluded = {(0, 0), (0, 5), (1, 0), (1, 5), (2, 4), (3, 2)}
    torch.testing.assert_close(loss.detach(), moco_info_nce_reference(q, k, queue, 0.5, excluded), rtol=1e-5,
                               atol=1e-5)
    kept = _flat_method("moco_v2", queue_size=6, temperature=0.5, exclude_own_keys=False)
    kept.queue.fill(queue, torch.tensor([0, 50, 3, 51, 9, 0]))
    with torch.no_grad():
        torch.testing.assert_close(kept(batch)["loss"], moco_info_nce_reference(q, k, queue, 0.5), rtol=1e-5,
                                   atol=1e-5)


def _flatten_moco_v2(**params: object):  # noqa: ANN202
    torch.manual_seed(0)
    return build_method("moco_v2", FlattenBackbone(16), {"projection_dim": 8, **params})


def test_moco_v2_queue_is_a_fifo_started_from_random_keys_and_lives_in_the_state_dict() -> None:
    method = _flatten_moco_v2(queue_size=10).train()
    start = method.queue.keys.clone()
    # MoCo's reference start: random unit vectors made from no image (row −1), not copies of the first keys.
    torch.testing.assert_close(start.norm(dim=1), torch.ones(10))
    assert method.queue.rows.tolist() == [-1] * 10
    expected_keys = []
    for step in range(3):
        batch = _batch(step, n=4, size=4, first_row=4 * step)
        with torch.no_grad():
            expected_keys.append(F.normalize(method.target_projection_head(batch.views[1].flatten(1)), dim=1))
        method(batch)
        if step == 0:  # the first keys were pushed at 0–3; the random start stays in the rest
            assert method.queue.rows.tolist() == [0, 1, 2, 3] + [-1] * 6
            assert int(method.queue.pointer) == 4
            torch.testing.assert_close(method.queue.keys[4:], start[4:], rtol=0, atol=0)
    # Oldest first out: step 1 wrote 4–7 at 4–7; step 2 wrote 8, 9 at 8, 9 and wrapped 10, 11 to 0, 1.
    assert method.queue.rows.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert int(method.queue.pointer) == 2
    torch.testing.assert_close(method.queue.keys[4:8], expected_keys[1])
    torch.testing.assert_close(method.queue.keys[[8, 9, 0, 1]], expected_keys[2])
    torch.testing.assert_close(method.queue.keys[2:4], expected_keys[0][2:4])

    state = method.state_dict()
    assert {"queue.keys", "queue.rows", "queue.pointer"} <= set(state)
    restored = _flatten_moco_v2(queue_size=10).train()
    restored.load_state_dict(state)
    nxt = _batch(7, n=4, size=4, first_row=40)
    torch.testing.assert_close(restored(nxt)["loss"], method(nxt)["loss"], rtol=0, atol=0)
    assert restored.queue.rows.tolist() == method.queue.rows.tolist()


def test_moco_v2_eval_forward_leaves_the_queue_alone() -> None:
    method = _flatten_moco_v2(queue_size=10).eval()
    start = method.queue.keys.clone()
    method(_batch(0, n=4, size=4))
    assert torch.equal(method.queue.keys, start) and int(method.queue.pointer) == 0
    assert method.queue.rows.tolist() == [-1] * 10


def test_moco_v2_first_step_without_exclusion_never_meets_its_own_keys_among_the_negatives() -> None:
    # A queue started from the first keys tiled put each query's own key ~K/B times among its negatives when
    # exclude_own_keys is off; the first step's negatives must be the random start alone.
    method = _flatten_moco_v2(queue_size=12, exclude_own_keys=False).train()
    start = method.queue.keys.clone()
    batch = _batch(0, n=4, size=4)
    loss = method(batch)["loss"]
    with torch.no_grad():
        q = method.projection_head(batch.views[0].flatten(1))
        k = method.target_projection_head(batch.views[1].flatten(1))
        torch.testing.assert_close(loss, moco_info_nce_reference(q, k, start, method.params.temperature),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [33, 65, 5])
def test_moco_v2_shuffle_bn_groups_never_hold_a_single_sample(batch_size: int) -> None:
    method = _small_cnn_method("moco_v2", shuffle_bn_group=32 if batch_size > 5 else 4).train()
    sizes: list[int] = []
    hook = method.target_backbone.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    # 8 px: the CNN's last BatchNorm sees 1×1 maps, so a 1-sample group has one value per channel and BatchNorm
    # raises ("Expected more than 1 value per channel") — what B % group == 1 did with ``split(group)``.
    images = torch.randn(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    keys = method.encode_keys(images)
    hook.remove()
    assert keys.shape[0] == batch_size and sum(sizes) == batch_size
    assert len(sizes) >= 2 and min(sizes) >= 2 and max(sizes) - min(sizes) <= 1, sizes
    with pytest.raises(ValueError, match="shuffle_bn_group must be 0"):
        method_class("moco_v2").Params(shuffle_bn_group=1)


def test_moco_v2_emulates_shuffling_bn_by_encoding_keys_in_groups() -> None:
    method = _small_cnn_method("moco_v2", shuffle_bn_group=4).train()
    first, _ = _views(3, n=8)
    changed = first.clone()
    changed[4:] = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 3 + 1
    # A key's BatchNorm statistics come from its own group of 4: the other group does not move it.
    torch.testing.assert_close(method.encode_keys(first)[:4], method.encode_keys(changed)[:4])
    whole = _small_cnn_method("moco_v2", shuffle_bn_group=0).train()
    assert not torch.allclose(whole.encode_keys(first)[:4], whole.encode_keys(changed)[:4], atol=1e-4)


def _engine_config(tmp_path: Path, name: str, *extra: str) -> PretrainConfig:
    return load_config(None, [
        f"output_dir={tmp_path / name}", "model.backbone=small_cnn", "train.accelerator=cpu", "train.devices=1",
        "train.steps=6", "train.batch_size=16", "train.checkpoint_every=3", "train.log_every=1",
        "train.progress_bar=false", "eval.enabled=false", "method.name=moco_v2", "method.queue_size=40", *extra,
    ])


def test_moco_v2_resumes_bit_for_bit_because_the_queue_is_checkpointed(tmp_path: Path,
                                                                        tiny_store: ImageStore) -> None:
    uninterrupted = pretrain(_engine_config(tmp_path, "full"), store=tiny_store)
    crashed = _engine_config(tmp_path, "crashed")
    with pytest.raises(SimulatedCrash):
        pretrain(crashed, store=tiny_store, halt_after_step=4)  # the queue of 40 has wrapped by step 3
    resumed = pretrain(crashed, store=tiny_store)
    a, b = load_checkpoint(uninterrupted.checkpoint)["method"], load_checkpoint(resumed.checkpoint)["method"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} differs after resume")


# ------------------------------------------------------------------------------------------------ MoCo v3
def moco_v3_reference(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Chen, Xie & He Alg. 1: ctr(q1, k2) + ctr(q2, k1), ctr = 2τ · mean_i −log softmax_j(q_i·k_j/τ)[i]."""
    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        terms = []
        for i in range(q.shape[0]):
            logits = torch.stack([q[i] @ k[j] for j in range(k.shape[0])]) / temperature
            terms.append(torch.log(torch.exp(logits).sum()) - logits[i])
        return torch.stack(terms).mean() * 2 * temperature
    return ctr(q1, k2) + ctr(q2, k1)


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_moco_v3_loss_is_symmetric_contrast_of_predictions_with_momentum_keys_scaled_by_2tau(
        temperature: float) -> None:
    method = _flat_method("moco_v3", temperature=temperature)
    with torch.no_grad():  # a target that differs from the online projector: keys must come from the target
        for parameter in method.target_projection_head.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    batch = _pair_batch(4)
    first, second = (v.flatten(1) for v in batch.views)
    loss = method(batch)["loss"]
    with torch.no_grad():
        q1 = method.prediction_head(method.projection_head(first))
        q2 = method.prediction_head(method.projection_head(second))
        k1 = method.target_projection_head(first)
        k2 = method.target_projection_head(second)
        reference = moco_v3_reference(q1, q2, k1, k2, temperature)
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-5)


def _layers(head: torch.nn.Module) -> list[str]:
    return [type(m).__name__ + ("" if not isinstance(m, torch.nn.BatchNorm1d) else f"(affine={m.affine})")
            for m in head.layers]


def test_moco_v3_heads_follow_the_reference_layout_for_cnns_and_vits() -> None:
    cnn = _small_cnn_method("moco_v3")
    assert _layers(cnn.projection_head) == ["Linear", "BatchNorm1d(affine=True)", "ReLU", "Linear",
                                            "BatchNorm1d(affine=False)"]
    assert _layers(cnn.prediction_head) == ["Linear", "BatchNorm1d(affine=True)", "ReLU", "Linear"]
    assert all(m.bias is None for m in cnn.modules() if isinstance(m, torch.nn.Linear) and m in
               list(cnn.projection_head.modules()) + list(cnn.prediction_head.modules()))

    torch.manual_seed(0)
    vit = build_method("moco_v3", build_backbone("vit_tiny", image_size=16, options={"depth": 1}), {})
    assert _layers(vit.projection_head) == ["Linear", "BatchNorm1d(affine=True)", "ReLU"] * 2 + [
        "Linear", "BatchNorm1d(affine=False)"]
    assert _layers(vit.prediction_head)[-1] == "BatchNorm1d(affine=False)"
    # Random patch projection: the ViT's patch embedding gets no gradient; the rest of the encoder does.
    vit(_batch(5, n=4))["loss"].backward()
    patch = vit.backbone.vit.patch_embed.proj.weight
    assert not patch.requires_grad and patch.grad is None
    assert vit.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_moco_v3_keys_carry_no_gradient_and_queries_do() -> None:
    method = _small_cnn_method("moco_v3")
    method(_batch(6))["loss"].backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(p.grad is None for p in method.target_projection_head.parameters())
    for module in (method.backbone, method.projection_head, method.prediction_head):
        assert sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None) > 0


# ------------------------------------------------------------------------------------------------ momentum pairs
@pytest.mark.parametrize("name", ["moco_v2", "moco_v3"])
def test_moco_targets_are_declared_momentum_pairs_moved_by_the_ema(name: str) -> None:
    method = _small_cnn_method(name, momentum_start=0.9, momentum_end=0.9)
    pairs = method.momentum_pairs()
    assert [(id(a), id(b)) for a, b in pairs] == [
        (id(method.backbone), id(method.target_backbone)),
        (id(method.projection_head), id(method.target_projection_head)),
    ]
    targets = [p for _, target in pairs for p in target.parameters()]
    assert targets and not any(p.requires_grad for p in targets)
    with torch.no_grad():
        for online, _ in pairs:
            for parameter in online.parameters():
                parameter.add_(1.0)
    before = [p.detach().clone() for p in targets]
    assert apply_momentum(method, 0, 10) == pytest.approx(0.9)
    for after, old in zip(targets, before):  # target ← 0.9·target + 0.1·online, online = target + 1
        torch.testing.assert_close(after, old + 0.1, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ SimSiam
def test_simsiam_loss_is_symmetric_negative_cosine_to_the_other_views_projection() -> None:
    method = _flat_method("simsiam")
    batch = _pair_batch(7)
    out = method(batch)
    with torch.no_grad():
        z1, z2 = (method.projection_head(v.flatten(1)) for v in batch.views)
        p1, p2 = method.prediction_head(z1), method.prediction_head(z2)

        def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

        reference = -0.5 * (cosine(p1, z2).mean() + cosine(p2, z1).mean())
        std = (z1 / z1.norm(dim=1, keepdim=True)).std(dim=0).mean()
    torch.testing.assert_close(out["loss"].detach(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["output_std"], std, rtol=1e-5, atol=1e-6)


def test_simsiam_stops_the_gradient_on_the_projection_side() -> None:
    """With a predictor whose output ignores its input (first layer zeroed), gradient can reach the encoder only
    through the projections z — which the stop-gradient cuts: the encoder and projector must get none."""
    method = _small_cnn_method("simsiam").eval()
    with torch.no_grad():
        method.prediction_head.layers[0].weight.zero_()
        method.prediction_head.layers[-1].bias.normal_()
    method(_batch(8))["loss"].backward()
    for module in (method.backbone, method.projection_head):
        assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in module.parameters())
    assert float(method.prediction_head.layers[-1].bias.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------ Barlow Twins
def barlow_twins_reference(z_a: torch.Tensor, z_b: torch.Tensor, lam: float) -> tuple[torch.Tensor, ...]:
    """Zbontar et al. eq. 1: C from batch-standardised embeddings; Σ(1 − C_ii)² + λ Σ_{i≠j} C_ij²."""
    n, dim = z_a.shape

    def standardise(z: torch.Tensor) -> torch.Tensor:  # batch statistics, biased variance, BatchNorm's ε
        return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + 1e-5)

    a, b = standardise(z_a), standardise(z_b)
    c = torch.stack([torch.stack([(a[:, i] * b[:, j]).sum() / n for j in range(dim)]) for i in range(dim)])
    on = sum((1 - c[i, i]) ** 2 for i in range(dim))
    off = sum(c[i, j] ** 2 for i in range(dim) for j in range(dim) if i != j)
    return on + lam * off, on, off


def test_barlow_twins_loss_and_its_two_terms_equal_the_cross_correlation_formula() -> None:
    method = _flat_method("barlow_twins", projection_hidden_dim=24, projection_dim=12, lambda_param=0.02)
    batch = _pair_batch(9)
    out = method(batch)
    with torch.no_grad():
        z_a, z_b = (method.projection_head(v.flatten(1)) for v in batch.views)
        loss, on, off = barlow_twins_reference(z_a, z_b, 0.02)
        lightly_value = BarlowTwinsLoss(lambda_param=0.02)(z_a, z_b)
    torch.testing.assert_close(out["loss"].detach(), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), lightly_value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["invariance"], on, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["redundancy"], off, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ VICReg
def vicreg_reference(z_a: torch.Tensor, z_b: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, ...]:
    """Bardes et al. eqs. 1–6: s = mean ‖z − z′‖²/D, v = mean_j max(0, 1 − √(Var z_j + ε)), c = Σ_{i≠j} C_ij² / D."""
    n, dim = z_a.shape
    invariance = ((z_a - z_b) ** 2).sum() / (n * dim)

    def variance(z: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.clamp(1 - torch.sqrt(z[:, j].var(unbiased=True) + eps), min=0)
                            for j in range(dim)]).mean()

    def covariance(z: torch.Tensor) -> torch.Tensor:
        centred = z - z.mean(dim=0)
        c = centred.T @ centred / (n - 1)
        return sum(c[i, j] ** 2 for i in range(dim) for j in range(dim) if i != j) / dim

    return invariance, (variance(z_a) + variance(z_b)) / 2, covariance(z_a) + covariance(z_b)


def test_vicreg_loss_is_the_weighted_sum_of_its_three_logged_terms() -> None:
    method = _flat_method("vicreg", projection_hidden_dim=24, projection_dim=12, invariance_weight=20.0,
                          variance_weight=15.0, covariance_weight=2.0)
    batch = _pair_batch(10)
    batch.views = [10 * v for v in batch.views]  # embeddings of order 1, so every term is far from zero
    out = method(batch)
    with torch.no_grad():
        z_a, z_b = (method.projection_head(v.flatten(1)) for v in batch.views)
        invariance, variance, covariance = vicreg_reference(z_a, z_b)
    torch.testing.assert_close(out["invariance"], invariance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["variance"], variance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["covariance"], covariance, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), 20 * invariance + 15 * variance + 2 * covariance,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "dim"), [(6, 40), (40, 6)])
def test_vicreg_fast_covariance_term_equals_lightlys_in_value_and_gradient(n: int, dim: int) -> None:
    z = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) * 2 + 0.5
    ours, theirs = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    covariance_term(ours).backward()
    covariance_loss(theirs).backward()
    torch.testing.assert_close(covariance_term(z), covariance_loss(z))
    torch.testing.assert_close(ours.grad, theirs.grad)


# ------------------------------------------------------------------------------------------------ all five
@pytest.mark.parametrize("name", FAMILY_A)
def test_method_metadata_requirements_and_preset(name: str) -> None:
    cls = method_class(name)
    assert cls.name == name
    assert cls.family == ("contrastive" if name.startswith("moco") else "non-contrastive")
    assert "arXiv:" in cls.paper
    docstring = sys.modules[cls.__module__].__doc__ or ""
    assert "arXiv:" in docstring and "lightly's" in docstring and "ours" in docstring
    assert cls.requirements(cls.Params()).spatial_dims == (2, 3)
    with pytest.raises(Exception, match="not_a_key"):
        cls.Params(not_a_key=1)
    config = PretrainConfig.model_validate({"method": {"name": name}, "views": {"rotation_degrees": 5.0}})
    assert set(cls.preset) == {"views", "optim"}
    for key, value in cls.preset["optim"].items():
        assert getattr(config.optim, key) == value
    for key, value in cls.preset["views"].items():
        assert getattr(config.views, key) == (5.0 if key == "rotation_degrees" else value)  # user keys win
    assert 0.2 <= config.views.crop_scale[0] <= 0.35 and config.views.vflip_p == 0.0


@pytest.mark.parametrize("name", FAMILY_A)
def test_method_runs_on_volumes(name: str) -> None:
    torch.manual_seed(0)
    params = {"queue_size": 16} if name == "moco_v2" else {}
    method = build_method(name, FlattenBackbone(64), params)
    generator = torch.Generator().manual_seed(11)
    views = [torch.randn(6, 1, 4, 4, 4, generator=generator) for _ in range(2)]
    out = method(ViewBatch(views=views, rows=torch.arange(6)))
    assert math.isfinite(float(out["loss"].detach()))
    out["loss"].backward()
