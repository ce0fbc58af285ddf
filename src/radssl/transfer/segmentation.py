"""Segmentation transfer, 2D and 3D: a U-Net decoder on a (pretrained) encoder's multi-scale features, fine-tuned on
an :class:`~radssl.data.store.ImageStore` with masks (``store.meta["mask"]``), scored per case by Dice and HD95.

The network (:class:`SegmentationNetwork`) is the backbone's ``forward_features`` (high → low resolution maps)
followed by :class:`radssl.models.decoders.UNetDecoder` (Ronneberger et al., MICCAI 2015; Çiçek et al. 2016 for 3D),
so any registered encoder — 2D ResNet/CNN/ViT, 3D ResNet-18 / small CNN / SegResNet encoder — becomes a segmenter,
and the encoder an SSL method pretrained is exactly the one that is transferred (``initialise_backbone("ssl:…")``).

Two protocols through one function, :func:`finetune_segmentation` (the study's ``segmentation`` protocol):

- ``freeze_encoder=True`` — the encoder is frozen (eval mode: BatchNorm statistics fixed, no gradients) and only the
  decoder trains: a read-out of what the pretrained features already hold, the segmentation twin of a linear probe.
- ``freeze_encoder=False`` — full fine-tuning, the encoder at ``lr × encoder_lr_scale`` (discriminative learning
  rates; use 1.0 from a random initialisation).

Recipe (follows :mod:`radssl.transfer.finetune`'s conventions): the caller's backbone is deep-copied; the decoder is
initialised and every batch sampled/augmented from generators seeded by ``seed`` (the global RNG is untouched);
AdamW with weight decay on conv/linear weights only, cosine decay per step, exactly ``steps_per_epoch`` optimiser
steps per epoch drawn from a continuing stream of shuffled passes; model selection on the validation split's mean
foreground Dice with early stopping (``early_stopping_patience`` epochs without gain, never before ``min_epochs``);
the best-validation weights are restored before the test sets are scored; the first NaN/inf loss raises
:class:`~radssl.transfer.finetune.NonFiniteLossError`.

- **Loss**: MONAI's ``DiceCELoss`` (soft Dice over all classes + cross-entropy, equal weights, Dice computed over the
  whole batch — nnU-Net's "batch Dice", Isensee et al., Nat Methods 2021 — which stays stable when a patch holds
  no foreground).
- **Patches** (``patch_size``; None trains and predicts on whole images/volumes): random patches, a share
  ``foreground_ratio`` of them centred on a random foreground voxel of the case (nnU-Net oversamples foreground the
  same way, so small structures are seen), the rest placed uniformly. Inference then runs MONAI's
  ``sliding_window_inference`` with the same window, ``sw_overlap`` and Gaussian blending (``sw_mode``).
- **Augmentation** (``augment``): :class:`radssl.views.augment.BatchAugmenter` on each training batch — one
  per-sample affine (mild zoom, left–right flip, small rotation) applied to image and mask alike (the mask with
  nearest-neighbour sampling), plus mild intensity/blur/noise on the image only (:data:`SEGMENTATION_AUGMENTATION`;
  pass a mapping of :class:`~radssl.views.augment.AugmentationParams` keys to change it, ``False`` for none).
- **Metrics** (:mod:`radssl.transfer.segmentation_metrics`, MONAI's): Dice per foreground class and its mean over
  classes, HD95 per class and its mean, **per case**, in mm where the store knows the stored grid's voxel size
  (``meta["voxel_spacing"]``, see :mod:`radssl.data.medical`) else in voxels. Empty-structure rules (both empty →
  Dice 1 and HD95 NaN, left out of means and counted; one empty → Dice 0 and HD95 = the image diagonal) are in that
  module's docstring.

Bad input is refused before any compute (nothing is written — the function writes no file at all): a store without
masks, masks off the images' grid, labels outside the declared classes, a patch larger than the images, a backbone of
the wrong dimensionality or channel count, empty splits.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from radssl.data.store import ImageStore, StoreRows, images_to_float, normalise_for_backbone
from radssl.engine.supervised import RecipeFields, SupervisedRecipe, TrainingBatch, build_seeded, fit
from radssl.errors import DataError
from radssl.models.decoders import UNetDecoder
from radssl.transfer.segmentation_metrics import (
    FOREGROUND_START,
    case_metrics,
    metric_names,
    metric_suffix,
    summarise,
)
from radssl.views.augment import AugmentationParams, BatchAugmenter

PRIMARY_SEGMENTATION_METRIC = "dice_mean"
"""The per-case metric a segmentation study compares (mean Dice over the foreground classes)."""

SEGMENTATION_AUGMENTATION: dict[str, Any] = {
    "crop_scale": (0.75, 1.0), "crop_ratio": (0.9, 1.11), "hflip_p": 0.5, "vflip_p": 0.0, "rotation_degrees": 10.0,
    "brightness": 0.1, "contrast": 0.1, "gamma": (0.8, 1.25), "intensity_p": 0.5,
    "blur_p": 0.1, "blur_sigma": (0.1, 0.8), "noise_p": 0.2, "noise_std": (0.0, 0.03),
}
"""Default training augmentation: mild, geometry shared with the mask. Mild on purpose: a segmentation target must
stay true after the transform (no strong crops that cut structures, no flips that swap labelled sides other than
left–right, which anatomy mirrors); the SSL-view recipe (crop_scale down to 0.35, strong jitter) would not."""

DecoderNorm = Literal["auto", "batch", "instance", "group"]


# --------------------------------------------------------------------------------------------------- network
class SegmentationNetwork(nn.Module):
    """A backbone's multi-scale features decoded by a U-Net decoder into ``num_classes`` logits at input size.

    ``forward`` takes normalised images (B, C, *S) and returns (B, num_classes, *S) for any spatial size (odd sizes
    included: the decoder upsamples to each skip's actual size). ``freeze_encoder=True`` keeps the encoder in eval
    mode with gradients off (a frozen feature extractor, even inside ``model.train()``).

    Args:
        backbone: a :class:`radssl.models.base.Backbone` (``forward_features``, ``feature_channels``,
            ``feature_strides``, ``spatial_dims``). Used as is (not copied): :func:`finetune_segmentation` copies.
        num_classes: output channels, background included (2 for one structure).
        decoder_channels: channels per decoder stage, high → low resolution (default: the encoder's, capped at
            ``max_channels``).
        norm: the decoder's normalisation; ``auto`` = batch norm for 2D, instance norm for 3D (batches of a few
            volumes give poor batch statistics; nnU-Net uses instance norm).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, decoder_channels: Sequence[int] | None = None,
                 norm: DecoderNorm = "auto", max_channels: int = 256, freeze_encoder: bool = False) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a segmentation network needs ≥ 2 classes (background + a structure), got {num_classes}")
        for attribute in ("forward_features", "feature_channels", "feature_strides"):
            if not hasattr(backbone, attribute):
                raise TypeError(f"backbone {type(backbone).__name__} has no '{attribute}': segmentation needs an "
                                "encoder with multi-scale feature maps (a radssl Backbone)")
        self.spatial_dims = int(getattr(backbone, "spatial_dims", 2))
        if norm == "auto":
            norm = "batch" if self.spatial_dims == 2 else "instance"
        self.backbone = backbone
        self.num_classes = num_classes
        self.decoder = UNetDecoder(backbone.feature_channels, backbone.feature_strides, num_classes,
                                   spatial_dims=self.spatial_dims, decoder_channels=decoder_channels, norm=norm,
                                   max_channels=max_channels)
        self.freeze_encoder = freeze_encoder
        self.backbone.requires_grad_(not freeze_encoder)  # a pretext may have frozen weights in memory (MoCo v3)
        if freeze_encoder:
            self.backbone.eval()

    def train(self, mode: bool = True) -> "SegmentationNetwork":
        super().train(mode)
        if self.freeze_encoder:
            self.backbone.eval()  # BatchNorm statistics of a frozen encoder never move
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                features = self.backbone.forward_features(images)
        else:
            features = self.backbone.forward_features(images)
        return self.decoder(features, images.shape[2:])


# --------------------------------------------------------------------------------------------------- result
@dataclass
class SegmentationResult:
    """Outcome of one segmentation fine-tuning run (``model`` holds the restored best-validation weights).

    ``per_case[test_set][metric]`` is a (N_cases,) array aligned with ``rows[test_set]`` (the store rows scored, in
    the order given), so two initialisations scored on the same rows can be compared case by case (paired tests,
    bootstrap). Metric names: ``dice_<class>`` per foreground class, ``dice_mean``, ``hd95_<class>``, ``hd95_mean``
    (:func:`radssl.transfer.segmentation_metrics.metric_names`). ``metrics[test_set][metric]`` are the means over
    cases with NaN left out; ``counts[test_set]`` says how many cases each mean holds (``<metric>_cases``) and how many
    HD95 values were undefined / penalised per class. ``hd95_unit[test_set]`` is ``mm`` or ``voxel``.
    """

    per_case: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]
    rows: dict[str, np.ndarray]
    hd95_unit: dict[str, str]
    class_names: tuple[str, ...]
    val_metric: float
    """Best validation mean foreground Dice (the selection metric)."""
    best_epoch: int
    history: list[dict[str, float]]
    wall_time_s: float
    steps: int
    """Optimiser steps taken (fewer than ``epochs × steps_per_epoch`` after early stopping)."""
    steps_per_epoch: int
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    """Seconds spent in training steps (sampling, augmentation, forward, backward, update), validation excluded."""
    train_samples: int
    """Patches (or whole images/volumes) trained on: ``train_samples / train_seconds`` is the training throughput."""
    settings: dict[str, Any]
    """The protocol's resolved settings (for provenance: patch size, freezing, augmentation, …)."""
    model: SegmentationNetwork = field(repr=False)
    predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Predicted label maps per test set (only with ``return_predictions=True``)."""


# --------------------------------------------------------------------------------------------------- checks
def _rows(rows: Any) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1)


def _mask_column(store: ImageStore, what: str) -> np.ndarray:
    mask = store.meta.get("mask")
    where = store.origin or store.name
    if mask is None:
        raise DataError(where, f"{what} has no segmentation masks (meta['mask']): its rows have no mask to train or "
                        "score on", "read the source with its masks (NIfTI mask_suffix / mask_folder, synthetic "
                        "masks: true) or pass a store that has them")
    if tuple(np.shape(mask)) != (len(store), *store.image_shape):
        raise DataError(where, f"{what}'s masks have shape {tuple(np.shape(mask))}, not the images' "
                        f"{(len(store), *store.image_shape)}", "resample masks onto their images' grid")
    return mask


def resolve_class_names(store: ImageStore, num_classes: int | None, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """Class names (background first) from the arguments or the store's ``mask_classes``; contradictions are errors."""
    where = store.origin or store.name
    declared = tuple(store.mask_classes)
    names = tuple(str(n) for n in class_names) if class_names is not None else None
    if names is not None and declared and names != declared:
        raise DataError(where, f"class_names {list(names)} differ from the store's mask_classes {list(declared)}",
                        "leave class_names out to use the store's, or fix them")
    names = names or declared
    if not names:
        if num_classes is None:
            raise DataError(where, "the store declares no mask_classes and neither num_classes nor class_names was "
                            "given", "pass class_names (background first) or declare mask_classes in the source")
        names = ("background",) + tuple(f"class{i}" for i in range(1, num_classes))
    if num_classes is not None and num_classes != len(names):
        raise DataError(where, f"num_classes={num_classes} but {len(names)} class names {list(names)}",
                        "give one name per label, background (0) first")
    if len(names) < 2:
        raise DataError(where, f"segmentation needs ≥ 2 classes (background + a structure), got {list(names)}")
    try:
        metric_names(names)
    except ValueError as error:
        raise DataError(where, str(error)) from None
    return names


def check_segmentation_inputs(
    backbone: nn.Module,
    store: ImageStore,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    test_sets: Mapping[str, tuple[ImageStore, np.ndarray]],
    num_classes: int,
    patch_size: Sequence[int] | None,
    augment: bool,
) -> None:
    """Every check :func:`finetune_segmentation` makes before compute (public so a study can call it up front)."""
    dims = int(getattr(backbone, "spatial_dims", 2))
    channels = getattr(backbone, "in_channels", None)
    where = store.origin or store.name
    if len(train_rows) < 1 or len(val_rows) < 1:
        raise DataError(where, f"segmentation needs ≥ 1 training and ≥ 1 validation case, got {len(train_rows)} and "
                        f"{len(val_rows)}")
    evaluation = [("the training store", store, np.concatenate([train_rows, val_rows]))]
    evaluation += [(f"test set '{name}'", s, _rows(rows)) for name, (s, rows) in test_sets.items()]
    for what, eval_store, rows in evaluation:
        eval_where = eval_store.origin or eval_store.name
        if len(rows) == 0:
            raise DataError(eval_where, f"{what} selects no rows", "pass at least one case")
        if rows.min() < 0 or rows.max() >= len(eval_store):
            raise DataError(eval_where, f"{what} selects rows outside 0..{len(eval_store) - 1}")
        if eval_store.spatial_dims != dims:
            raise DataError(eval_where, f"{what} holds {eval_store.spatial_dims}D images but the backbone is {dims}D",
                            f"use a {eval_store.spatial_dims}D backbone (e.g. small_cnn_3d for volumes)")
        if channels is not None and eval_store.channels != channels:
            raise DataError(eval_where, f"{what} has {eval_store.channels} channel(s) but the backbone takes {channels}",
                            "build the backbone with in_channels matching the store")
        mask = _mask_column(eval_store, what)
        picked = np.asarray(mask[np.sort(rows)])
        low, high = int(picked.min()), int(picked.max())
        if low < 0 or high >= num_classes:
            flat = picked.reshape(len(rows), -1)
            bad = np.sort(rows)[np.flatnonzero((flat < 0).any(1) | (flat >= num_classes).any(1))[0]]
            raise DataError(eval_where, f"{what}: mask labels span {low}..{high} but {num_classes} classes are declared "
                            f"(labels 0..{num_classes - 1}); first bad row {int(bad)}",
                            "declare every label (class_names / mask_classes) or fix the masks")
        if patch_size is not None and any(p > s for p, s in zip(patch_size, eval_store.image_shape)):
            raise DataError(eval_where, f"patch_size {tuple(patch_size)} is larger than {what}'s images "
                            f"{eval_store.image_shape}", "use a patch no larger than the images (or patch_size None "
                            "for whole images), or pad the images in preprocessing (target_size, crop_or_pad)")
    if patch_size is not None and (len(patch_size) != dims or min(patch_size) < 1):
        raise DataError(where, f"patch_size {tuple(patch_size)} needs {dims} positive sizes for {dims}D images")
    if augment and store.images.is_floating_point():
        train_images = StoreRows(store.images, train_rows)
        outside = False
        for start in range(0, len(train_images), 64):  # a chunk at a time: never the whole split in memory
            chunk = train_images[start:start + 64]
            outside = outside or float(chunk.min()) < 0.0 or float(chunk.max()) > 1.0
        if outside:
            raise DataError(where, "augmentation works on [0, 1] images but the training images are outside it "
                            "(z-scored float16?)", "pass augment=False or store rescaled images (uint8)")


# --------------------------------------------------------------------------------------------------- patches
class PatchSampler:
    """Random patch corners for training cases, a share centred on foreground (nnU-Net's oversampling).

    ``masks`` are the training cases' label maps (n, *S). Each call draws, per sample, whether its patch is centred
    on a foreground voxel (probability ``foreground_ratio``, only for cases with foreground) — then the voxel is
    uniform among the case's foreground voxels and the corner is clamped inside the image — or placed uniformly.
    """

    def __init__(self, masks: np.ndarray, patch_size: Sequence[int], foreground_ratio: float) -> None:
        if not 0.0 <= foreground_ratio <= 1.0:
            raise ValueError(f"foreground_ratio must lie in [0, 1], got {foreground_ratio}")
        self.shape = tuple(int(s) for s in masks.shape[1:])
        self.patch = tuple(int(p) for p in patch_size)
        self.foreground_ratio = foreground_ratio
        self.high = torch.tensor([s - p for s, p in zip(self.shape, self.patch)], dtype=torch.long)
        self.foreground = [torch.from_numpy(np.flatnonzero(np.asarray(m) > 0)) for m in masks]

    def starts(self, cases: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, dims) corners for the training-case indices ``cases`` (B,)."""
        batch, dims = len(cases), len(self.shape)
        corners = (torch.rand(batch, dims, generator=generator) * (self.high + 1).float()).long().minimum(self.high)
        centred = torch.rand(batch, generator=generator) < self.foreground_ratio
        half = torch.tensor(self.patch, dtype=torch.long) // 2
        for b in torch.nonzero(centred).flatten().tolist():
            voxels = self.foreground[int(cases[b])]
            if len(voxels) == 0:
                continue
            flat = int(voxels[torch.randint(len(voxels), (1,), generator=generator)])
            centre = torch.tensor(np.unravel_index(flat, self.shape), dtype=torch.long)
            corners[b] = (centre - half).clamp(min=0).minimum(self.high)
        return corners


def crop_patches(images: torch.Tensor, masks: torch.Tensor, corners: torch.Tensor,
                 patch_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut (B, C, *patch) image and (B, *patch) mask patches at ``corners`` (B, dims)."""
    image_patches, mask_patches = [], []
    for b in range(len(corners)):
        window = tuple(slice(int(c), int(c) + int(p)) for c, p in zip(corners[b], patch_size))
        image_patches.append(images[(b, slice(None), *window)])
        mask_patches.append(masks[(b, *window)])
    return torch.stack(image_patches), torch.stack(mask_patches)


# --------------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, patch_size: Sequence[int] | None = None,
                   sw_batch_size: int = 4, sw_overlap: float = 0.25, sw_mode: str = "gaussian") -> torch.Tensor:
    """Logits (B, K, *S) of normalised ``images`` (B, C, *S): the whole image at once, or MONAI's sliding window.

    With ``patch_size`` the image is covered by windows of that size overlapping by ``sw_overlap`` (a fraction of
    the window), each predicted in batches of ``sw_batch_size`` and blended with ``sw_mode`` weights (Gaussian:
    window centres count more than their borders, where a convolution sees padding).
    """
    if patch_size is None:
        return model(images)
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(images, roi_size=tuple(int(p) for p in patch_size), sw_batch_size=sw_batch_size,
                                    predictor=model, overlap=sw_overlap, mode=sw_mode)


@torch.no_grad()
def predict_labels(model: nn.Module, images: torch.Tensor, patch_size: Sequence[int] | None = None,
                   batch_size: int = 4, sw_batch_size: int = 4, sw_overlap: float = 0.25, sw_mode: str = "gaussian",
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Label maps (N, *S) (argmax of the logits; uint8 up to 256 classes) of stored images (N, C, *S), in eval mode,
    batch by batch."""
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = normalise_for_backbone(images[start:start + batch_size].to(device))
            logits = predict_logits(model, batch, patch_size, sw_batch_size, sw_overlap, sw_mode)
            out.append(logits.argmax(1).to(_label_dtype(logits.shape[1])).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def _case_spacing(eval_store: ImageStore, rows: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray | None:
    """(N, dims) mm per axis for HD95: the caller's ``spacing``, else the store's stored-grid voxel size, else None."""
    dims = eval_store.spatial_dims
    if spacing is not None:
        return np.broadcast_to(np.asarray(spacing, dtype=np.float64), (len(rows), dims)).copy()
    column = eval_store.meta.get("voxel_spacing")
    if column is None:
        return None
    values = np.asarray(column, dtype=np.float64)[rows]
    if values.ndim != 2 or values.shape[1] != dims or not np.isfinite(values).all() or (values <= 0).any():
        return None
    return values


# --------------------------------------------------------------------------------------------------- training
def _augmentation(augment: bool | Mapping[str, Any] | AugmentationParams) -> AugmentationParams | None:
    if augment is False or augment is None:
        return None
    if augment is True:
        return AugmentationParams(**SEGMENTATION_AUGMENTATION)
    if isinstance(augment, AugmentationParams):
        return augment
    return AugmentationParams(**dict(augment))


def _score_test_sets(model: nn.Module, test_sets: Mapping[str, tuple[ImageStore, np.ndarray]],
                     names: tuple[str, ...], evaluate: dict[str, Any], spacing: Sequence[float] | None, hd95: bool,
                     return_predictions: bool) -> dict[str, Any]:
    """Per-case Dice (and HD95) of every test set, their summaries and which structures each case shows."""
    scored: dict[str, dict[str, Any]] = {key: {} for key in ("per_case", "metrics", "counts", "rows", "hd95_unit",
                                                              "predictions")}
    suffixes = [metric_suffix(name) for name in names[FOREGROUND_START:]]
    labels = range(1, len(names))
    for name, (eval_store, rows) in test_sets.items():
        rows = _rows(rows)
        truth = torch.from_numpy(np.ascontiguousarray(eval_store.meta["mask"][rows])).long()
        predicted = predict_labels(model, StoreRows(eval_store.images, rows), **evaluate)
        case_spacing = _case_spacing(eval_store, rows, spacing)
        values = case_metrics(predicted, truth, names, case_spacing, hd95=hd95)
        truth_present = {s: (truth == label).flatten(1).any(1).numpy() for s, label in zip(suffixes, labels)}
        predicted_present = {s: (predicted == label).flatten(1).any(1).numpy() for s, label in zip(suffixes, labels)}
        scored["per_case"][name] = values
        scored["metrics"][name], scored["counts"][name] = summarise(values, truth_present, predicted_present)
        scored["rows"][name] = rows
        scored["hd95_unit"][name] = "mm" if case_spacing is not None else "voxel"
        if return_predictions:
            scored["predictions"][name] = predicted.numpy()
    return scored


@dataclass
class _SegmentationTask:
    """Segmentation's own part of the supervised loop: cases from a continuing shuffled stream, optional
    foreground-biased patches and shared image/mask augmentation, MONAI's DiceCE loss, validation mean Dice."""

    train_images: StoreRows
    train_masks: torch.Tensor
    batch_size: int
    sampler: "PatchSampler | None"
    patch: tuple[int, ...] | None
    augmenter: BatchAugmenter | None
    generator: torch.Generator
    device: torch.device
    val_images: StoreRows
    val_masks: torch.Tensor
    names: tuple[str, ...]
    evaluate: dict[str, Any]
    loss_function: Callable = field(default_factory=lambda: DiceCELoss(to_onehot_y=True, softmax=True, batch=True))
    stream: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def epoch_batches(self, epoch: int, steps: int) -> Iterator[TrainingBatch]:
        n = len(self.train_masks)
        for _ in range(steps):
            while len(self.stream) < self.batch_size:
                self.stream = torch.cat([self.stream, torch.randperm(n, generator=self.generator)])
            cases, self.stream = self.stream[:self.batch_size], self.stream[self.batch_size:]
            images = images_to_float(self.train_images[cases])
            masks = self.train_masks[cases]
            if self.sampler is not None:
                images, masks = crop_patches(images, masks, self.sampler.starts(cases, self.generator), self.patch)
            images, masks = images.to(self.device), masks.to(self.device)
            if self.augmenter is not None:
                images, warped = self.augmenter(images, _device_generator(self.generator, self.device),
                                                masks=masks[:, None])
                masks = warped[:, 0]
            yield TrainingBatch(normalise_for_backbone(images), masks[:, None].long(), len(cases))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_function(outputs, targets)

    def validate(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        predicted = predict_labels(model, self.val_images, **self.evaluate)
        dice = case_metrics(predicted, self.val_masks, self.names, hd95=False)
        record = {f"val_{name}": float(np.mean(values)) for name, values in dice.items()}
        return record[f"val_{PRIMARY_SEGMENTATION_METRIC}"], record


def _settings(recipe: SupervisedRecipe, freeze_encoder: bool, options: dict[str, Any]) -> dict[str, Any]:
    """The resolved settings :class:`SegmentationResult` records (provenance), in their historical order."""
    order = ("epochs", "steps_per_epoch", "batch_size", "lr", "encoder_lr_scale", "weight_decay", "patch_size",
             "foreground_ratio", "early_stopping_patience", "min_epochs", "augment", "seed", "sw_batch_size",
             "sw_overlap", "sw_mode", "loss", "decoder_norm", "class_names", "train_cases", "val_cases")
    values = {**recipe.model_dump(), **options, "loss": "DiceCELoss(batch)"}
    return {"protocol": "segmentation_frozen" if freeze_encoder else "segmentation_finetune",
            "freeze_encoder": freeze_encoder, **{key: values[key] for key in order}}


def finetune_segmentation(
    backbone: nn.Module, store: ImageStore, train_rows: np.ndarray, val_rows: np.ndarray,
    test_sets: Mapping[str, tuple[ImageStore, np.ndarray]], *, num_classes: int | None = None,
    class_names: Sequence[str] | None = None, freeze_encoder: bool = False, recipe: RecipeFields | None = None,
    steps_per_epoch: int | None = None, batch_size: int = 4, encoder_lr_scale: float = 0.1,
    patch_size: Sequence[int] | None = None, foreground_ratio: float = 0.5,
    augment: bool | Mapping[str, Any] | AugmentationParams = True, seed: int = 0, device: str | torch.device = "cpu",
    sw_batch_size: int = 4, sw_overlap: float = 0.25, sw_mode: Literal["gaussian", "constant"] = "gaussian",
    eval_batch_size: int = 4, decoder_channels: Sequence[int] | None = None, decoder_norm: DecoderNorm = "auto",
    spacing: Sequence[float] | None = None, hd95: bool = True, return_predictions: bool = False,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None, **recipe_keys: Any,
) -> SegmentationResult:
    """Train a U-Net decoder (and, unless ``freeze_encoder``, the encoder) on masks; score test sets per case.

    ``store`` holds the training and validation cases (``train_rows`` / ``val_rows``) with ``meta["mask"]``;
    ``test_sets`` maps a name to ``(store, rows)`` (external sets may come from other stores, with masks). Classes:
    ``class_names`` (background first) or ``num_classes``, else the store's ``mask_classes``. The training recipe
    (``epochs`` 30, ``lr`` 1e-3, ``weight_decay`` 1e-4, ``early_stopping_patience`` 10, ``min_epochs`` 1, ``precision``
    '32') comes from ``recipe`` (:class:`~radssl.engine.supervised.RecipeFields`, e.g. a protocol's params) with any of
    those keys given as keywords on top. ``steps_per_epoch`` fixes the optimiser steps per epoch whatever the number
    of training cases (default: one pass, ``ceil(n_train / batch_size)``), so label fractions can share one budget. ``patch_size`` None trains and predicts
    on whole images/volumes; a size trains on random patches (``foreground_ratio`` centred on foreground) and predicts
    by sliding window (``sw_batch_size``, ``sw_overlap``, ``sw_mode``). ``spacing`` (mm per axis) overrides the
    store's ``meta["voxel_spacing"]`` for HD95. ``hd95=False`` skips HD95 (Dice only; much faster on big volumes).
    See the module docstring for the recipe and :class:`SegmentationResult` for what comes back.
    """
    start_time = time.perf_counter()
    device = torch.device(device)
    train_rows, val_rows = _rows(train_rows), _rows(val_rows)
    if batch_size < 1 or not 0.0 <= sw_overlap < 1.0:
        raise ValueError(f"need batch_size ≥ 1 and sw_overlap in [0, 1), got {batch_size} and {sw_overlap}")
    n = len(train_rows)
    per_epoch = steps_per_epoch if steps_per_epoch is not None else max(1, math.ceil(n / batch_size))
    schedule = (recipe or RecipeFields()).recipe(per_epoch, **recipe_keys)
    names = resolve_class_names(store, num_classes, class_names)
    patch = None if patch_size is None else tuple(int(p) for p in patch_size)
    augmentation = _augmentation(augment)
    check_segmentation_inputs(backbone, store, train_rows, val_rows, test_sets, len(names), patch,
                              augmentation is not None)
    if spacing is not None and len(spacing) != store.spatial_dims:
        raise DataError(store.origin or store.name, f"spacing {tuple(spacing)} needs {store.spatial_dims} values (mm)")
    model = build_seeded(seed, lambda: SegmentationNetwork(copy.deepcopy(backbone), len(names), decoder_channels,
                                                           decoder_norm, freeze_encoder=freeze_encoder))
    model.to(device)
    train_masks = torch.from_numpy(np.ascontiguousarray(store.meta["mask"][train_rows])).to(_label_dtype(len(names)))
    evaluate = dict(patch_size=patch, batch_size=eval_batch_size, sw_batch_size=sw_batch_size, sw_overlap=sw_overlap,
                    sw_mode=sw_mode, device=device)
    task = _SegmentationTask(
        train_images=StoreRows(store.images, train_rows), train_masks=train_masks, batch_size=batch_size,
        sampler=PatchSampler(train_masks.numpy(), patch, foreground_ratio) if patch is not None else None,
        patch=patch,
        augmenter=BatchAugmenter(augmentation, tuple(patch or store.image_shape)) if augmentation is not None else None,
        generator=torch.Generator().manual_seed(seed), device=device,
        val_images=StoreRows(store.images, val_rows),
        val_masks=torch.from_numpy(np.ascontiguousarray(store.meta["mask"][val_rows])).long(), names=names,
        evaluate=evaluate)
    # The encoder at its own learning rate; a frozen encoder is not optimised at all.
    parts = [(model.decoder, 1.0)] + ([] if freeze_encoder else [(model.backbone, encoder_lr_scale)])
    outcome = fit(model, parts, task, schedule, device, store.origin or store.name, what="segmentation",
                  on_epoch_end=on_epoch_end)
    scored = _score_test_sets(model, test_sets, names, evaluate, spacing, hd95, return_predictions)
    settings = _settings(schedule, freeze_encoder, dict(
        batch_size=batch_size, encoder_lr_scale=encoder_lr_scale, patch_size=None if patch is None else list(patch),
        foreground_ratio=foreground_ratio, seed=seed,
        augment=None if augmentation is None else augmentation.model_dump(mode="json"), sw_batch_size=sw_batch_size,
        sw_overlap=sw_overlap, sw_mode=sw_mode, decoder_norm=decoder_norm, class_names=list(names), train_cases=int(n),
        val_cases=len(val_rows)))
    return SegmentationResult(
        **scored, class_names=names, val_metric=outcome.best_metric, best_epoch=outcome.best_epoch,
        history=outcome.history, wall_time_s=time.perf_counter() - start_time, steps=outcome.steps_run,
        steps_per_epoch=per_epoch, epochs_run=len(outcome.history), stopped_early=outcome.stopped_early,
        train_seconds=outcome.train_seconds, train_samples=outcome.train_samples, settings=settings, model=model,
    )


def _label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type holding every label (masks are copied to the device in it)."""
    return torch.uint8 if num_classes <= 256 else torch.int64


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The augmenter draws on the batch's device: a CPU run uses the run's generator, an accelerator a generator
    seeded from it (one draw per step, so runs stay deterministic)."""
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
