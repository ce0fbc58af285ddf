"""DINO, MAE and Models Genesis: losses against hand-written references, schedules, EMA, masking, the U-Net decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from radssl.errors import ConfigError
from radssl.methods.base import apply_momentum
from radssl.methods.mae import masked_patch_loss
from radssl.methods.registry import build_method, method_class
from radssl.models.base import Backbone
from radssl.models.decoders import UNetDecoder
from radssl.models.registry import build_backbone, build_from_spec
from radssl.models.spec import BackboneSpec
from radssl.views.batch import ViewBatch, ViewLayout


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ DINO
SMALL_DINO = {"hidden_dim": 32, "bottleneck_dim": 8, "output_dim": 16}


def _dino(**params: object):  # noqa: ANN202
    torch.manual_seed(0)
    return build_method("dino", build_backbone("small_cnn", image_size=16), {**SMALL_DINO, **params})


def _multicrop_batch(seed: int = 0, n: int = 6, locals_: int = 2) -> ViewBatch:
    generator = _generator(seed)
    views = [torch.randn(n, 1, 16, 16, generator=generator) for _ in range(2)]
    views += [torch.randn(n, 1, 8, 8, generator=generator) for _ in range(locals_)]
    return ViewBatch(views=views, rows=torch.arange(n), num_global=2)


def dino_loss_reference(teacher: list[torch.Tensor], student: list[torch.Tensor], center: torch.Tensor,
                        teacher_temp: float, student_temp: float) -> torch.Tensor:
    """DINO's loss written out (Caron et al. 2021, Algorithm 1 + multi-crop): for every teacher (global) view and
    every *other* student view, the cross-entropy between the centred, sharpened teacher softmax and the student
    log-softmax, averaged over the batch and then over the pairs."""
    total, pairs = torch.zeros(()), 0
    for iq, t in enumerate(teacher):
        q = F.softmax((t - center) / teacher_temp, dim=-1)
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + (-q * F.log_softmax(s / student_temp, dim=-1)).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


def test_dino_loss_equals_hand_written_reference_and_updates_the_center() -> None:
    method = _dino(center_init="zero", warmup_teacher_temp=0.04, teacher_temp=0.07, center_momentum=0.8)
    method.eval()  # BatchNorm on running statistics: a view maps the same alone or inside a batch
    center = torch.randn(1, 1, 16, generator=_generator(9))
    method.criterion.center.copy_(center)
    with torch.no_grad():  # a teacher that has drifted from the student, as after some EMA steps
        for parameter in [*method.teacher_backbone.parameters(), *method.teacher_head.parameters()]:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=_generator(parameter.numel())))
    method.set_progress(10, 100)  # teacher temperature mid-warm-up
    batch = _multicrop_batch()
    loss = method(batch)["loss"]
    with torch.no_grad():
        student = [method.projection_head(method.backbone(v)) for v in batch.views]
        teacher = [method.teacher_head(method.teacher_backbone(v)) for v in batch.global_views]
    temperature = 0.04 + 0.03 * 10 / 29
    reference = dino_loss_reference(teacher, student, center[0], temperature, 0.1)
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-5)
    # Centre: EMA (momentum 0.8) of the mean teacher output over both global views of the batch.
    expected_center = 0.8 * center + 0.2 * torch.cat(teacher).mean(dim=0)
    torch.testing.assert_close(method.criterion.center, expected_center, rtol=1e-5, atol=1e-6)


def test_dino_center_starts_at_the_first_batch_mean_and_resumes_from_the_state_dict() -> None:
    method = _dino()
    method.eval()
    batch = _multicrop_batch(1)
    method(batch)
    with torch.no_grad():
        teacher = torch.cat([method.teacher_head(method.teacher_backbone(v)) for v in batch.global_views])
    # Started at the batch mean, then updated with the same mean: still the batch mean.
    torch.testing.assert_close(method.criterion.center[0, 0], teacher.mean(dim=0), rtol=1e-5, atol=1e-6)
    state = method.state_dict()
    assert "criterion.center" in state and bool(state["center_initialised"])
    second = _multicrop_batch(2)
    resumed = _dino()
    resumed.load_state_dict(state)
    resumed.eval()
    torch.testing.assert_close(resumed(second)["loss"], method(second)["loss"])
    torch.testing.assert_close(resumed.criterion.center, method.criterion.center)


def test_dino_teacher_temperature_schedule_by_step() -> None:
    method = _dino(warmup_teacher_temp=0.04, teacher_temp=0.07, teacher_temp_warmup_fraction=0.3)
    reference = np.linspace(0.04, 0.07, 30)  # DINO's schedule: linspace over the warm-up, then constant
    for step in (0, 1, 15, 29):
        method.set_progress(step, 100)
        assert method.teacher_temperature() == pytest.approx(reference[step], abs=1e-12)
    for step in (30, 99):
        method.set_progress(step, 100)
        assert method.teacher_temperature() == pytest.approx(0.07)
    assert method.teacher_temperature(step=0) == pytest.approx(0.04)


def test_dino_teacher_moves_by_ema_only_and_is_what_transfers() -> None:
    method = _dino()
    method.train()
    method.set_progress(0, 100)
    teacher_before = [p.detach().clone() for p in method.teacher_backbone.parameters()]
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    method(_multicrop_batch())["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher_backbone.parameters())
    assert all(p.grad is None for p in method.teacher_head.parameters())
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, method.teacher_backbone.parameters()))
    momentum = apply_momentum(method, 0, 100)
    assert momentum == pytest.approx(0.996)
    for old, student, teacher in zip(teacher_before, method.backbone.parameters(),
                                     method.teacher_backbone.parameters()):
        torch.testing.assert_close(teacher, 0.996 * old + 0.004 * student)
    assert method.transfer_backbone() is method.teacher_backbone


def test_dino_last_layer_is_frozen_for_the_first_steps_only() -> None:
    method = _dino(freeze_last_layer_fraction=0.1)
    method.train()
    weight = method.projection_head.last_layer.weight_v
    method.set_progress(9, 100)
    method(_multicrop_batch())["loss"].backward()
    assert weight.grad is None, "frozen during the first 10 % of the steps"
    assert method.projection_head.layers[0].weight.grad is not None
    method.zero_grad(set_to_none=True)
    method.set_progress(10, 100)
    method(_multicrop_batch())["loss"].backward()
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0


def test_dino_takes_smaller_local_views_on_a_vit_without_changing_it() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", image_size=16, options={"depth": 1})
    method = build_method("dino", backbone, SMALL_DINO)
    batch = _multicrop_batch(n=3)
    loss = method(batch)["loss"]
    assert torch.isfinite(loss)
    assert backbone.vit.dynamic_img_size is False and backbone.vit.patch_embed.strict_img_size
    with pytest.raises(ConfigError, match="multiple of its patch size"):
        odd = ViewBatch(views=batch.views[:2] + [torch.randn(3, 1, 10, 10)], rows=batch.rows, num_global=2)
        method(odd)


def test_dino_works_without_multi_crop_on_two_views() -> None:
    method = _dino()
    layout = ViewLayout(sizes=((16, 16), (16, 16)))
    method_class("dino").requirements(method.params).check(layout, "dino", "two_view", "small_cnn")
    two = ViewBatch(views=[torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16)], rows=torch.arange(4))
    assert torch.isfinite(method(two)["loss"])


# ------------------------------------------------------------------------------------------------ MAE
def _mae(image_size: int = 8, **params: object):  # noqa: ANN202
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", image_size=image_size, patch_size=4, options={"depth": 1})
    return build_method("mae", backbone, {"decoder_depth": 1, **params})


def _patch(images: torch.Tensor, b: int, index: int, p: int, grid_w: int) -> torch.Tensor:
    """Patch ``index`` (row-major) of image ``b``, flattened as (row, column, channel) by hand."""
    row, col = divmod(index, grid_w)
    return images[b, :, row * p:(row + 1) * p, col * p:(col + 1) * p].permute(1, 2, 0).reshape(-1)


def test_mae_loss_is_the_error_on_masked_patches_only() -> None:
    images = torch.randn(2, 1, 8, 8, generator=_generator(0))
    patch_indices = torch.tensor([[0, 3, 2], [1, 0, 3]])  # 3 of 4 patches masked per image
    predictions = torch.randn(2, 3, 16, generator=_generator(1))
    for norm in (False, True):
        expected = []
        for b in range(2):
            for m, index in enumerate(patch_indices[b].tolist()):
                target = _patch(images, b, index, 4, 2)
                if norm:
                    target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                expected.append(((predictions[b, m] - target) ** 2).mean())
        loss = masked_patch_loss(predictions, images, patch_indices, 4, norm)
        torch.testing.assert_close(loss, torch.stack(expected).mean())
    kept_changed = images.clone()
    kept_changed[0, :, 4:, 0:4] += 5.0  # patch 2 of image 0 is masked, patch 1 (top right) of image 0 is kept
    kept_changed[0, :, 0:4, 4:] += 5.0
    assert not torch.equal(masked_patch_loss(predictions, kept_changed, patch_indices, 4, False),
                           masked_patch_loss(predictions, images, patch_indices, 4, False))
    only_kept = images.clone()
    only_kept[0, :, 0:4, 4:] += 5.0  # image 0 keeps patch 1 only
    only_kept[1, :, 4:, 0:4] += 5.0  # image 1 keeps patch 2 only
    torch.testing.assert_close(masked_patch_loss(predictions, only_kept, patch_indices, 4, True),
                               masked_patch_loss(predictions, images, patch_indices, 4, True))


def test_mae_forward_reconstructs_the_masked_patches_from_the_visible_ones() -> None:
    method = _mae(norm_pix_loss=False)
    method.set_progress(3, 10)
    images = torch.randn(2, 1, 8, 8, generator=_generator(2))
    out = method(ViewBatch(views=[images], rows=torch.arange(2)))
    idx_keep, idx_mask = method.mask_indices(2, images.device)  # same step: the same mask
    with torch.no_grad():
        predictions = method.predict(images, idx_keep, idx_mask)
        changed = images.clone()
        for b in range(2):  # overwrite every masked patch: the encoder must not see it
            for index in (idx_mask[b] - 1).tolist():
                row, col = divmod(index, 2)
                changed[b, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4] = 9.0
        torch.testing.assert_close(method.predict(changed, idx_keep, idx_mask), predictions)
    expected = torch.stack([((predictions[b, m] - _patch(images, b, int(i) - 1, 4, 2)) ** 2).mean()
                            for b in range(2) for m, i in enumerate(idx_mask[b])]).mean()
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert "reconstruction_loss" in out


def test_mae_mask_ratio_and_per_step_determinism() -> None:
    method = _mae(image_size=32)  # 8×8 = 64 patches
    method.set_progress(5, 100)
    idx_keep, idx_mask = method.mask_indices(4, torch.device("cpu"))
    assert idx_keep.shape == (4, 1 + 16) and idx_mask.shape == (4, 48), "75 % of 64 patches masked"
    assert bool((idx_keep[:, 0] == 0).all()), "the class token is always visible"
    everything = torch.cat([idx_keep, idx_mask], dim=1).sort(dim=1).values
    assert torch.equal(everything, torch.arange(65).expand(4, -1))
    again_keep, again_mask = method.mask_indices(4, torch.device("cpu"))
    assert torch.equal(again_keep, idx_keep) and torch.equal(again_mask, idx_mask), "same step, same mask"
    method.set_progress(6, 100)
    assert not torch.equal(method.mask_indices(4, torch.device("cpu"))[1], idx_mask)
    resumed = _mae(image_size=32, mask_ratio=0.75)
    torch.manual_seed(123)  # whatever the global RNG does, the loaded run seed decides the masks
    resumed.load_state_dict(method.state_dict())
    resumed.set_progress(5, 100)
    assert torch.equal(resumed.mask_indices(4, torch.device("cpu"))[1], idx_mask)
    half = _mae(image_size=32, mask_ratio=0.5)
    assert half.mask_indices(2, torch.device("cpu"))[1].shape == (2, 32)


def test_mae_backbone_transfers_with_the_paper_initialisation() -> None:
    method = _mae(image_size=16, encoder_init="mae")
    assert not method.backbone.vit.pos_embed.requires_grad, "fixed sine-cosine position embedding"
    rebuilt = build_from_spec(method.backbone.spec)
    rebuilt.load_state_dict(method.backbone.state_dict())
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(rebuilt.eval()(x), method.backbone.eval()(x))
    assert method.encoder.vit is method.backbone.vit, "the encoder is the backbone's own ViT"


def test_mae_needs_a_vit() -> None:
    requirements = method_class("mae").requirements(method_class("mae").Params())
    with pytest.raises(ConfigError, match="needs a backbone from"):
        requirements.check(ViewLayout(sizes=((32, 32),)), "mae", "single_view", "small_cnn")
    with pytest.raises(ConfigError, match="mae needs a ViT"):
        build_method("mae", build_backbone("small_cnn"), {})


# ------------------------------------------------------------------------------------------------ decoder + Genesis
@pytest.mark.parametrize("family", ["small_cnn", "resnet18", "vit_tiny"])
def test_unet_decoder_returns_the_input_size_for_odd_2d_sizes(family: str) -> None:
    torch.manual_seed(0)
    size = (32, 32) if family == "vit_tiny" else (29, 31)
    options = {"depth": 2} if family == "vit_tiny" else {}
    backbone = build_backbone(family, image_size=size, options=options)
    decoder = UNetDecoder(backbone.feature_channels, backbone.feature_strides, out_channels=3)
    x = torch.randn(2, 1, *size)
    assert decoder(backbone.forward_features(x), size).shape == (2, 3, *size)


def test_unet_decoder_3d_odd_sizes_and_every_skip_is_used() -> None:
    torch.manual_seed(0)
    size = (9, 29, 31)
    strides = (1, 2, 4)
    features = [torch.randn(2, c, *[-(-s // st) for s in size], requires_grad=True)
                for c, st in zip((4, 8, 16), strides)]
    decoder = UNetDecoder((4, 8, 16), strides, out_channels=2, spatial_dims=3, norm="instance")
    out = decoder(features, size)
    assert out.shape == (2, 2, *size)
    out.square().mean().backward()
    assert all(f.grad is not None and float(f.grad.abs().sum()) > 0 for f in features)
    coarse = UNetDecoder((8, 16), (4, 8), out_channels=1, spatial_dims=3)
    assert coarse(features[1:], size).shape == (2, 1, *size), "final upsampling when the finest stride > 1"


def test_models_genesis_loss_is_the_restoration_error_and_the_encoder_transfers() -> None:
    torch.manual_seed(0)
    method = build_method("models_genesis", build_backbone("small_cnn", image_size=(17, 19)), {})
    method.eval()
    view, target = torch.randn(3, 1, 17, 19), torch.randn(3, 1, 17, 19)
    batch = ViewBatch(views=[view], rows=torch.arange(3), targets=[target])
    out = method(batch)
    with torch.no_grad():
        restored = method.restore(view)
    assert restored.shape == view.shape
    torch.testing.assert_close(out["loss"], F.mse_loss(restored, target))
    l1 = build_method("models_genesis", method.backbone, {"loss": "l1"})
    l1.decoder.load_state_dict(method.decoder.state_dict())
    l1.eval()
    torch.testing.assert_close(l1(batch)["loss"], F.l1_loss(restored, target))
    assert method.transfer_backbone() is method.backbone
    with pytest.raises(ConfigError, match="needs restoration targets"):
        method_class("models_genesis").requirements(method.params).check(
            ViewLayout(sizes=((17, 19),)), "models_genesis", "single_view", "small_cnn")


class _TinyEncoder3D(Backbone):
    """A two-stage 3D conv encoder: stands in for the 3D backbones of the volumes issue."""

    family = "tiny3d"
    spatial_dims_supported = (3,)

    def __init__(self) -> None:
        super().__init__(BackboneSpec("tiny3d", spatial_dims=3))
        self.stages = nn.ModuleList([nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 8, 3, stride=2, padding=1)])
        self.feature_dim, self.feature_channels, self.feature_strides = 8, (4, 8), (1, 2)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        first = torch.relu(self.stages[0](images))
        return [first, torch.relu(self.stages[1](first))]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)[-1].mean(dim=(2, 3, 4))


def test_models_genesis_restores_volumes() -> None:
    torch.manual_seed(0)
    method = build_method("models_genesis", _TinyEncoder3D(), {"decoder_norm": "instance"})
    volumes = torch.randn(2, 1, 7, 9, 11)
    out = method(ViewBatch(views=[volumes], rows=torch.arange(2), targets=[volumes]))
    assert torch.isfinite(out["loss"]) and method.restore(volumes).shape == volumes.shape
    method_class("models_genesis").requirements(method.params).check(
        ViewLayout(sizes=((7, 9, 11),), targets=True), "models_genesis", "restoration", None)


# ------------------------------------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("name", ["dino", "mae", "models_genesis"])
def test_resumed_run_equals_the_uninterrupted_run(tmp_path, tiny_store, name: str) -> None:  # noqa: ANN001
    """Schedules, the DINO centre and the MAE masks are functions of the step and the saved state: a run killed
    between checkpoints and resumed ends bit-identical to one that never stopped."""
    from radssl.config import load_config
    from radssl.engine.checkpoint import load_checkpoint
    from radssl.engine.pretrain import SimulatedCrash, pretrain

    backbone = ["model.backbone=vit_tiny", "model.options={depth: 1}"] if name == "mae" else \
        ["model.backbone=small_cnn", "model.options={width: 8}"]
    extra = ["method.output_dim=64", "views.local_views=2", "method.freeze_last_layer_fraction=0.5",
             "method.teacher_temp=0.06"] if name == "dino" else []

    def config(folder: str):  # noqa: ANN202
        return load_config(None, [
            f"output_dir={tmp_path / folder}", f"method.name={name}", *backbone, *extra, "train.accelerator=cpu",
            "train.devices=1", "train.steps=6", "train.batch_size=16", "train.checkpoint_every=3",
            "train.log_every=1", "train.progress_bar=false", "eval.enabled=false", "train.channels_last=false"])

    uninterrupted = pretrain(config("full"), store=tiny_store)
    with pytest.raises(SimulatedCrash):
        pretrain(config("crashed"), store=tiny_store, halt_after_step=4)
    resumed = pretrain(config("crashed"), store=tiny_store)
    assert resumed.run_record["resumed_from_step"] == 3
    a, b = load_checkpoint(uninterrupted.checkpoint)["method"], load_checkpoint(resumed.checkpoint)["method"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{name}: {key} differs after resume")
