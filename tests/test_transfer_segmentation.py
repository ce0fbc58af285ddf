"""Segmentation transfer (radssl.transfer.segmentation): the network's shapes, sliding-window inference, loading a
3D SSL checkpoint, the frozen and fine-tuning protocols, learning on synthetic masks, bad inputs refused before
compute, and a slow run on real MSD hippocampus volumes (RADSSL_DATA_DIR)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from radssl.config import PretrainConfig
from radssl.data.store import ImageStore
from radssl.data.synthetic import SyntheticSpec, make_synthetic_store
from radssl.data.synthetic3d import SyntheticVolumeSpec, make_synthetic_volume_store
from radssl.engine.pretrain import pretrain
from radssl.errors import DataError
from radssl.models.registry import build_backbone
from radssl.transfer.initialisation import initialise_backbone
from radssl.transfer.segmentation import (
    PatchSampler,
    SegmentationNetwork,
    finetune_segmentation,
    predict_labels,
    predict_logits,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def volumes() -> ImageStore:
    return make_synthetic_volume_store(SyntheticVolumeSpec(n_patients=10, volumes_per_patient=2, volume_size=16))


@pytest.fixture(scope="module")
def radiographs() -> ImageStore:
    """Every patient has a strong finding: an empty prediction scores Dice 0 on every case."""
    spec = SyntheticSpec(n_patients=30, images_per_patient=2, image_size=32, masks=True, finding_contrast=1.2,
                         positive_rate=1.0)
    return make_synthetic_store(spec)


def _split(store: ImageStore) -> tuple[np.ndarray, np.ndarray, dict]:
    return store.indices("train"), store.indices("val"), {"test": (store, store.indices("test"))}


# ------------------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("family, size, options", [
    ("small_cnn", (29, 31), {"width": 4}),
    ("resnet18", (27, 33), {}),
    ("resnet18", (67, 71), {}),  # > 64 px: the standard stem, whose first map is at stride 2
    ("small_cnn_3d", (13, 17, 15), {"width": 4}),
    ("small_cnn_3d", (35, 37, 33), {"width": 2}),  # > 32 voxels: first stage at stride 2
    ("resnet18_3d", (11, 13, 9), {"widen_factor": 0.125}),
    ("segresnet_encoder_3d", (9, 15, 11), {}),
])
def test_network_output_matches_odd_input_sizes(family: str, size: tuple[int, ...], options: dict) -> None:
    backbone = build_backbone(family, 1, image_size=size, spatial_dims=len(size), options=options)
    network = SegmentationNetwork(backbone, num_classes=3).eval()
    with torch.no_grad():
        logits = network(torch.randn(2, 1, *size))
    assert logits.shape == (2, 3, *size)


def test_decoder_norm_follows_the_dimensionality() -> None:
    network_2d = SegmentationNetwork(build_backbone("small_cnn", 1, image_size=16, options={"width": 4}), 2)
    network_3d = SegmentationNetwork(build_backbone("small_cnn_3d", 1, image_size=8, spatial_dims=3,
                                                    options={"width": 4}), 2)
    assert any(isinstance(m, nn.BatchNorm2d) for m in network_2d.decoder.modules())
    assert any(isinstance(m, nn.InstanceNorm3d) for m in network_3d.decoder.modules())


# ------------------------------------------------------------------------------------------------ inference
def test_sliding_window_equals_whole_volume_when_the_window_is_the_volume() -> None:
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn_3d", 1, image_size=(10, 12, 14), spatial_dims=3, options={"width": 4})
    network = SegmentationNetwork(backbone, 3).eval()
    images = torch.randn(2, 1, 10, 12, 14)
    whole = predict_logits(network, images)
    for overlap in (0.0, 0.5):
        windowed = predict_logits(network, images, patch_size=(10, 12, 14), sw_overlap=overlap)
        torch.testing.assert_close(windowed, whole)


class _VoxelWise(nn.Module):
    """A per-voxel model (1×1×1 conv): its output at a voxel never depends on the window around it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.sin(3 * x))


@pytest.mark.parametrize("patch, overlap, mode", [((4, 5, 6), 0.25, "gaussian"), ((7, 3, 9), 0.5, "constant"),
                                                  ((3, 3, 3), 0.0, "gaussian")])
def test_sliding_window_stitches_windows_back_exactly(patch: tuple[int, ...], overlap: float, mode: str) -> None:
    torch.manual_seed(1)
    model = _VoxelWise().eval()
    images = torch.randn(2, 1, 9, 11, 13)
    windowed = predict_logits(model, images, patch_size=patch, sw_overlap=overlap, sw_mode=mode)
    torch.testing.assert_close(windowed, model(images), atol=1e-5, rtol=1e-5)


def test_predicted_labels_are_the_argmax_of_whole_volume_logits(volumes: ImageStore) -> None:
    torch.manual_seed(0)
    network = SegmentationNetwork(build_backbone("small_cnn_3d", 1, image_size=16, spatial_dims=3,
                                                 options={"width": 4}), 3)
    images = volumes.images[:3]
    labels = predict_labels(network, images, patch_size=(16, 16, 16), batch_size=2)
    from radssl.data.store import normalise_for_backbone

    with torch.no_grad():
        expected = network.eval()(normalise_for_backbone(images)).argmax(1)
    assert torch.equal(labels.long(), expected)
    assert network.training is False  # was eval before the call, and stays so


# ------------------------------------------------------------------------------------------------ checkpoints
def test_3d_ssl_checkpoint_loads_by_spec_into_the_segmentation_network(tmp_path: Path, volumes: ImageStore) -> None:
    config = PretrainConfig.model_validate({
        "seed": 0, "output_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic3d", "n_patients": 10, "volumes_per_patient": 2, "volume_size": 16},
        "model": {"backbone": "small_cnn_3d", "options": {"width": 4}},
        "method": {"name": "byol"},
        "train": {"steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 3, "progress_bar": False,
                  "accelerator": "cpu", "devices": 1},
        "eval": {"enabled": False},
    })
    result = pretrain(config, store=volumes)
    backbone = initialise_backbone(f"ssl:{result.checkpoint}")
    assert backbone.spec.spatial_dims == 3 and backbone.spec.family == "small_cnn_3d"
    network = SegmentationNetwork(backbone, num_classes=3).eval()
    saved = torch.load(result.checkpoint, map_location="cpu", weights_only=False)["backbone"]
    for key, value in network.backbone.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for ours, theirs in zip(network.backbone.forward_features(x), result.backbone.eval().forward_features(x)):
            torch.testing.assert_close(ours, theirs)
        assert network(x).shape == (1, 3, 16, 16, 16)


# ------------------------------------------------------------------------------------------------ protocols
def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_encoder_stays_unchanged_and_full_finetuning_moves_it(volumes: ImageStore) -> None:
    backbone = build_backbone("small_cnn_3d", 1, image_size=16, spatial_dims=3, options={"width": 4})
    before = _state(backbone)
    train, val, tests = _split(volumes)
    common = dict(epochs=1, steps_per_epoch=2, batch_size=2, patch_size=(12, 12, 12), lr=1e-2, hd95=False)
    frozen = finetune_segmentation(backbone, volumes, train, val, tests, freeze_encoder=True, **common)
    after = frozen.model.backbone.state_dict()
    for key, value in before.items():  # weights and BatchNorm running statistics alike
        assert torch.equal(after[key], value), key
    assert not any(p.requires_grad for p in frozen.model.backbone.parameters())
    first_decoder_weight = next(frozen.model.decoder.parameters())
    fresh = SegmentationNetwork(build_backbone("small_cnn_3d", 1, image_size=16, spatial_dims=3,
                                               options={"width": 4}), 3)
    assert first_decoder_weight.shape == next(fresh.decoder.parameters()).shape
    tuned = finetune_segmentation(backbone, volumes, train, val, tests, freeze_encoder=False,
                                  encoder_lr_scale=1.0, **common)
    moved = tuned.model.backbone.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in before.items() if v.is_floating_point())
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in before.items())  # the caller's copy untouched
    assert frozen.settings["protocol"] == "segmentation_frozen" and tuned.settings["protocol"] == "segmentation_finetune"


def test_training_on_synthetic_masks_beats_empty_and_constant_predictions(radiographs: ImageStore) -> None:
    backbone = build_backbone("small_cnn", 1, image_size=32, options={"width": 8})
    train, val, tests = _split(radiographs)
    result = finetune_segmentation(backbone, radiographs, train, val, tests, epochs=2, steps_per_epoch=20,
                                   batch_size=8, lr=1e-2, encoder_lr_scale=1.0, patch_size=(16, 16),
                                   foreground_ratio=0.8, augment=False, early_stopping_patience=None, seed=0)
    truth = np.asarray(radiographs.meta["mask"])[tests["test"][1]]
    assert truth.reshape(len(truth), -1).any(1).all()  # every test case shows a finding
    # An empty prediction scores 0 on every case; predicting the finding everywhere scores 2|T| / (|T| + N).
    constant = float(np.mean([2 * t.sum() / (t.sum() + t.size) for t in truth]))
    dice = result.metrics["test"]["dice_finding"]
    assert dice > constant + 0.25, (dice, constant)
    assert result.per_case["test"]["dice_finding"].shape == (len(truth),)
    assert result.hd95_unit["test"] == "voxel"
    # Below the image diagonal, the HD95 of a missed or hallucinated finding: the model finds it, not just a number.
    diagonal = float(np.hypot(*radiographs.image_shape[-2:]))
    assert 0.0 <= result.metrics["test"]["hd95_finding"] < 0.5 * diagonal, (result.metrics["test"], diagonal)
    assert result.val_metric == max(h["val_dice_mean"] for h in result.history)
    assert result.steps == 40 and result.train_samples == 320


def test_runs_are_deterministic_in_the_seed(radiographs: ImageStore) -> None:
    backbone = build_backbone("small_cnn", 1, image_size=32, options={"width": 4})
    train, val, tests = _split(radiographs)
    run = lambda seed: finetune_segmentation(backbone, radiographs, train, val, tests, epochs=1,  # noqa: E731
                                             steps_per_epoch=3, batch_size=4, patch_size=(16, 16), seed=seed,
                                             hd95=False)
    torch.manual_seed(123)
    first = run(0)
    torch.manual_seed(456)  # the global RNG must not matter
    again, other = run(0), run(1)
    np.testing.assert_array_equal(first.per_case["test"]["dice_mean"], again.per_case["test"]["dice_mean"])
    assert first.history[0]["train_loss"] == again.history[0]["train_loss"] != other.history[0]["train_loss"]


def test_best_validation_weights_are_restored_and_early_stopping_respects_its_floor(radiographs: ImageStore) -> None:
    train, val, tests = _split(radiographs)
    common = dict(epochs=4, steps_per_epoch=5, batch_size=4, patch_size=(16, 16), seed=0, hd95=False, lr=3e-2,
                  augment=False)
    torch.manual_seed(0)  # a fixed random encoder; this lr makes later epochs worse on validation than the first
    backbone = build_backbone("small_cnn", 1, image_size=32, options={"width": 4})
    result = finetune_segmentation(backbone, radiographs, train, val, tests, early_stopping_patience=None, **common)
    scores = [h["val_dice_mean"] for h in result.history]
    assert result.best_epoch < result.epochs_run == 4 and scores[-1] < result.val_metric  # a later epoch was worse
    from radssl.transfer.segmentation_metrics import case_metrics

    predicted = predict_labels(result.model, radiographs.images[torch.from_numpy(val)], patch_size=(16, 16))
    truth = torch.from_numpy(np.asarray(radiographs.meta["mask"])[val]).long()
    restored = case_metrics(predicted, truth, radiographs.mask_classes, hd95=False)["dice_mean"].mean()
    assert restored == pytest.approx(result.val_metric)  # the returned model is the best epoch's
    stopped = finetune_segmentation(backbone, radiographs, train, val, tests, early_stopping_patience=1, min_epochs=3,
                                    **common)
    assert stopped.epochs_run == 3 and stopped.stopped_early and stopped.best_epoch == 1  # not before the floor


def test_patch_sampler_centres_the_foreground_share_on_foreground() -> None:
    masks = np.zeros((3, 20, 20), np.uint8)
    masks[0, 15:17, 2:4] = 1
    masks[1, 0, 19] = 2
    sampler = PatchSampler(masks, (6, 6), foreground_ratio=1.0)
    cases = torch.tensor([0, 1, 2] * 20)
    corners = sampler.starts(cases, torch.Generator().manual_seed(0))
    assert corners.min() >= 0 and corners.max() <= 14
    for case, corner in zip(cases.tolist(), corners.tolist()):
        patch = masks[case, corner[0]:corner[0] + 6, corner[1]:corner[1] + 6]
        assert patch.shape == (6, 6)
        if case < 2:
            assert patch.any()  # centred on foreground (clamped inside the image)
    uniform = PatchSampler(masks, (6, 6), foreground_ratio=0.0).starts(cases, torch.Generator().manual_seed(0))
    assert sum(bool(masks[c, a:a + 6, b:b + 6].any()) for c, (a, b) in zip(cases.tolist(), uniform.tolist())) < 20


# ------------------------------------------------------------------------------------------------ bad input
class _MustNotRun(nn.Module):
    """A backbone that fails the test if any compute reaches it."""

    spatial_dims, in_channels = 3, 1
    feature_channels, feature_strides = (4,), (1,)

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise AssertionError("compute started before the input was checked")


def _refused(store: ImageStore, match: str, backbone: nn.Module | None = None, tests: dict | None = None,
             **kwargs: object) -> None:
    train, val, default_tests = _split(store)
    with pytest.raises(DataError, match=match):
        finetune_segmentation(backbone or _MustNotRun(), store, train, val, default_tests if tests is None else tests,
                              epochs=1, steps_per_epoch=1, **kwargs)


def test_store_without_masks_is_refused(volumes: ImageStore) -> None:
    unmasked = replace(volumes, meta={k: v for k, v in volumes.meta.items() if k != "mask"}, mask_classes=())
    _refused(unmasked, r"no segmentation masks.*mask_suffix / mask_folder", num_classes=3)
    # a test set from another store without masks is refused too, by name
    _refused(volumes, r"test set 'external' has no segmentation masks",
             tests={"external": (unmasked, unmasked.indices("test"))})


def test_labels_outside_the_declared_classes_are_refused(volumes: ImageStore) -> None:
    undeclared = replace(volumes, mask_classes=())
    _refused(undeclared, r"mask labels span 0\.\.2 but 2 classes are declared", class_names=("background", "organ"))
    _refused(volumes, r"class_names \['background', 'organ'\] differ from the store's mask_classes",
             class_names=("background", "organ"))
    with pytest.raises(DataError, match=r"mask labels span 0\.\.2 but mask_classes declare 2 labels"):
        replace(volumes, mask_classes=("background", "organ"))
    _refused(undeclared, "declares no mask_classes and neither num_classes nor class_names")


def test_patch_larger_than_the_volume_is_refused(volumes: ImageStore) -> None:
    _refused(volumes, r"patch_size \(16, 20, 16\) is larger than the training store's images \(16, 16, 16\)",
             patch_size=(16, 20, 16))
    _refused(volumes, r"patch_size \(8, 8\) needs 3 positive sizes", patch_size=(8, 8))


def test_masks_off_the_image_grid_and_wrong_backbones_are_refused(volumes: ImageStore,
                                                                  radiographs: ImageStore) -> None:
    with pytest.raises(DataError, match=r"masks have shape \(20, 16, 16, 15\); expected \(N, \*spatial\)"):
        replace(volumes, meta={**volumes.meta, "mask": np.asarray(volumes.meta["mask"])[..., :15]})
    with pytest.raises(DataError, match="expected integer labels"):
        replace(volumes, meta={**volumes.meta, "mask": np.asarray(volumes.meta["mask"]).astype(np.float32)})
    two_d = build_backbone("small_cnn", 1, image_size=16, options={"width": 4})
    _refused(volumes, r"holds 3D images but the backbone is 2D", backbone=two_d)
    _refused(radiographs, r"holds 2D images but the backbone is 3D")
    scaled = replace(volumes, images=(volumes.images.float() / 255 * 3 - 1).half())
    _refused(scaled, r"augmentation works on \[0, 1\] images")


# ------------------------------------------------------------------------------------------------ real data
@pytest.mark.slow
def test_hippocampus_volumes_segment_well_above_chance(tmp_path: Path, data_dir: Path) -> None:
    """24 MSD hippocampus cases (1 mm MRI, labels anterior/posterior) read with their masks (mask_folder), padded to
    one size without resampling, a small 3D CNN trained on patches for a few minutes of CPU."""
    from radssl.data.medical import MedicalDataConfig, load_medical_store

    root = data_dir / "msd" / "task04_hippocampus"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    config = MedicalDataConfig.model_validate({
        "source": {"kind": "nifti", "root": str(root), "pattern": "imagesTr/hippocampus_0[0-3]*.nii.gz",
                   "mask_folder": "labelsTr", "mask_classes": ["background", "anterior", "posterior"],
                   "modality": "MR", "patient_from": "file"},
        "preprocess": {"modality": "mr", "target_size": [48, 64, 48], "resize": "crop_or_pad"},
        "cache_dir": str(tmp_path / "cache"), "task": {"kind": "none"}, "split_fractions": [0.6, 0.15, 0.25],
    })
    store = load_medical_store(config, "hippocampus")
    assert store.mask_classes == ("background", "anterior", "posterior")
    assert np.allclose(store.meta["voxel_spacing"], 1.0)  # 1 mm isotropic, crop/pad keeps it
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn_3d", 1, image_size=(32, 32, 32), spatial_dims=3, small_input=True,
                              options={"width": 8})  # full-resolution first stage: the structures are small
    train, val, tests = _split(store)
    result = finetune_segmentation(backbone, store, train, val, tests, epochs=8, steps_per_epoch=20, batch_size=4,
                                   lr=3e-3, encoder_lr_scale=1.0, patch_size=(32, 32, 32), seed=0)
    metrics = result.metrics["test"]
    # Measured (3 init seeds, 160 steps): test Dice 0.54–0.77 anterior, 0.72–0.74 posterior, HD95 mean ≈ 25 mm (a few
    # stray false-positive blobs far from the structure weigh heavily: no connected-component post-processing). An
    # empty prediction scores Dice 0 and HD95 = the 48×64×48 mm diagonal (93 mm).
    assert result.hd95_unit["test"] == "mm"
    assert metrics["dice_anterior"] > 0.4 and metrics["dice_posterior"] > 0.4, metrics
    assert metrics["hd95_mean"] < 93.0 / 2, (metrics, result.counts["test"])


@pytest.mark.slow
def test_hippocampus_as_2d_slices_segments_above_chance(tmp_path: Path, data_dir: Path) -> None:
    """2D segmentation on real data: axial slices of 24 hippocampus cases with their masks (data.slices), a 2D CNN
    trained on whole slices; splits stay by case (a case's slices never straddle train and test)."""
    from radssl.config import PretrainConfig
    from radssl.data.build import build_store

    root = data_dir / "msd" / "task04_hippocampus"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    data = {"name": "hippocampus", "source": {
        "kind": "nifti", "root": str(root), "pattern": "imagesTr/hippocampus_0[0-3]*.nii.gz", "mask_folder": "labelsTr",
        "mask_classes": ["background", "anterior", "posterior"], "modality": "MR", "patient_from": "file"},
        "preprocess": {"modality": "mr", "target_size": [40, 56, 40], "resize": "crop_or_pad"},
        "cache_dir": str(tmp_path / "cache"), "task": {"kind": "none"}, "split_fractions": [0.6, 0.15, 0.25],
        "slices": {"axis": 0, "keep": "nonempty"}}
    store = build_store(PretrainConfig.model_validate({"data": data}).data)
    assert store.spatial_dims == 2 and store.meta["mask"].shape[1:] == (56, 40)
    assert store.mask_classes == ("background", "anterior", "posterior")
    np.testing.assert_allclose(store.meta["voxel_spacing"], 1.0)  # the slice plane's two axes
    train, val, tests = _split(store)
    assert not set(store.patient_id[train]) & set(store.patient_id[tests["test"][1]])  # patient = case here
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", 1, image_size=(56, 40), options={"width": 8})
    result = finetune_segmentation(backbone, store, train, val, tests, epochs=4, steps_per_epoch=25, batch_size=16,
                                   lr=3e-3, encoder_lr_scale=1.0, seed=0)
    metrics = result.metrics["test"]
    # Slices without a structure count Dice 1 when nothing is predicted there; slices with one need it found.
    truth = np.asarray(store.meta["mask"])[tests["test"][1]]
    present = truth.reshape(len(truth), -1).max(1) > 0
    dice = result.per_case["test"]["dice_mean"]
    assert result.hd95_unit["test"] == "mm"
    assert dice[present].mean() > 0.4, metrics


@pytest.mark.slow
def test_brats_case_four_sequences_segment_end_to_end(tmp_path: Path, data_dir: Path) -> None:
    """Multi-sequence smoke test: the one BraTS case (FLAIR, T1, T1ce, T2 as channels; labels 0, 1, 2, 4 — label 3
    unused) read with its mask, a 4-channel 3D encoder and decoder trained a few patch steps, scored on itself.
    One case: a pipeline check, not an accuracy claim."""
    from radssl.data.medical import MedicalDataConfig, load_medical_store

    root = data_dir / "nifti" / "brats20_case001"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    classes = ["background", "necrotic_core", "oedema", "unused_label_3", "enhancing"]
    config = MedicalDataConfig.model_validate({
        "source": {"kind": "nifti", "root": str(root), "sequences": ["_flair", "_t1", "_t1ce", "_t2"],
                   "mask_suffix": "seg", "mask_classes": classes, "modality": "MR"},
        "preprocess": {"modality": "mr", "target_size": [40, 48, 48], "resize": "pad"},
        "cache_dir": str(tmp_path / "cache"), "task": {"kind": "none"}, "split_fractions": [1.0, 0.0, 0.0]})
    store = load_medical_store(config, "brats")
    assert store.channels == 4 and store.mask_classes == tuple(classes)
    assert set(np.unique(np.asarray(store.meta["mask"]))) <= {0, 1, 2, 4}
    assert np.isnan(store.meta["voxel_spacing"]).all()  # pad + resize: the stored voxel size is not kept
    rows = np.array([0])
    backbone = build_backbone("segresnet_encoder_3d", 4, image_size=(32, 32, 32), spatial_dims=3)
    result = finetune_segmentation(backbone, store, rows, rows, {"self": (store, rows)}, epochs=2, steps_per_epoch=3,
                                   batch_size=2, patch_size=(32, 32, 32), foreground_ratio=1.0, seed=0)
    assert set(result.per_case["self"]) >= {"dice_necrotic_core", "dice_oedema", "dice_enhancing", "hd95_mean"}
    assert result.hd95_unit["self"] == "voxel"  # no trustworthy mm spacing after the resize
    # label 3 never occurs in the truth: its Dice is 1 (nothing predicted) or 0 (a false detection), never undefined
    assert set(result.per_case["self"]["dice_unused_label_3"].tolist()) <= {0.0, 1.0}
    assert result.steps == 6 and np.isfinite(result.history[-1]["train_loss"])
