"""Segmentation protocols: a U-Net decoder on the encoder's multi-scale features, trained on masks, scored per case.

Two read-outs of one recipe (:func:`radssl.transfer.segmentation.finetune_segmentation`), registered as two protocols
so a study can run both side by side as two report rows — like the linear probe and fine-tuning for classification:

- ``segmentation_frozen``: the encoder is frozen and only the decoder trains (what the pretrained features hold);
- ``segmentation_finetune``: encoder and decoder train, the encoder at ``lr × encoder_lr_scale``.

Label fractions are fractions of the labelled (masked) training cases. The fairness rules of classification
fine-tuning hold here too: the same optimiser-step budget at every label fraction (``steps_per_epoch: full``), the same
encoder-LR rule for every initialisation (one value, or the best of a candidate list on validation Dice per cell),
model selection on the study's validation rows (proportional by default) with an early-stopping floor.
Primary metric ``dice``: each test case's Dice averaged over the foreground classes; per-class Dice (``dice_<class>``)
and the 95th-percentile Hausdorff distance (``hd95`` mean over classes, ``hd95_<class>``) are stored per case too.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from radssl.errors import DataError
from radssl.transfer.protocols.base import (
    CaseOutputs,
    Protocol,
    ProtocolContext,
    ProtocolOutcome,
    StudySetup,
)
from radssl.transfer.protocols.finetune import (
    LrScales,
    StepBudgetParams,
    best_on_validation,
    budget_rule_text,
    check_min_rows,
)
from radssl.transfer.segmentation import finetune_segmentation, resolve_class_names

_RENAMED = {"dice_mean": "dice", "hd95_mean": "hd95"}
"""Per-case metric names of :mod:`radssl.transfer.segmentation` → names in the results store."""


class SegmentationParams(StepBudgetParams):
    """Options shared by both segmentation protocols (see :func:`radssl.transfer.segmentation.finetune_segmentation`).

    ``steps_per_epoch`` follows the fine-tuning budget rule: ``full`` (default) = as many steps per epoch as one pass
    over the whole training split at every label fraction, ``subset`` = one pass over the subset (grows with the
    fraction), N = exactly N. Early stopping on validation Dice, never before ``min_epochs``.
    """

    batch_size: int = Field(4, gt=0)
    patch_size: list[int] | None = Field(
        None, description="training patch (one size per axis, or one number for all); null = whole images/volumes")
    foreground_ratio: float = Field(0.5, ge=0.0, le=1.0)
    augment: bool = True
    sw_batch_size: int = Field(4, gt=0)
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    hd95: bool = Field(True, description="also compute HD95 (slow on large volumes)")

    @field_validator("patch_size", mode="before")
    @classmethod
    def _one_number(cls, value: Any) -> Any:
        return [value] if isinstance(value, int) and not isinstance(value, bool) else value

    def steps_for(self, subset_rows: int, full_rows: int) -> int:
        """Optimiser steps per epoch (a pass = ceil(cases / batch), as the segmentation recipe counts it)."""
        if self.steps_per_epoch == "subset":
            return max(1, math.ceil(subset_rows / self.batch_size))
        if self.steps_per_epoch == "full":
            return max(1, math.ceil(full_rows / self.batch_size))
        return int(self.steps_per_epoch)

    def patch(self, spatial_dims: int) -> tuple[int, ...] | None:
        if self.patch_size is None:
            return None
        return tuple(self.patch_size) * spatial_dims if len(self.patch_size) == 1 else tuple(self.patch_size)


class FinetuneSegmentationParams(SegmentationParams):
    """Full fine-tuning adds the encoder-LR rule: one value for every initialisation, or candidates chosen on
    validation Dice per cell (the same for every initialisation, label fraction and seed)."""

    encoder_lr_scale: LrScales = Field(default_factory=lambda: [0.1, 1.0])


class _SegmentationProtocol(Protocol):
    task_kinds = frozenset({"segmentation"})
    metric = "dice"
    case_metric = "values"
    freeze_encoder: ClassVar[bool]
    paper = "Ronneberger et al., U-Net, MICCAI 2015; Isensee et al., nnU-Net, Nature Methods 2021"

    def _scales(self) -> list[float]:
        """Encoder-LR candidates (a frozen encoder trains nothing: one run, the value is unused)."""
        return list(getattr(self.params, "encoder_lr_scale", [1.0]))

    def check(self, setup: StudySetup) -> None:
        params: SegmentationParams = self.params  # type: ignore[assignment]
        check_min_rows(setup, "segmentation", minimum=1)
        names = resolve_class_names(setup.store, None, None)
        patch = params.patch(setup.store.spatial_dims)
        if patch is not None:
            if len(patch) != setup.store.spatial_dims:
                raise DataError(f"{setup.field_name}.patch_size", f"{list(patch)} has {len(patch)} sizes for "
                                f"{setup.store.spatial_dims}D data", "give one size per axis (or one number)")
            for name, (store, _) in setup.test_sets.items():
                if any(p > s for p, s in zip(patch, store.image_shape, strict=True)):
                    raise DataError(f"{setup.field_name}.patch_size", f"patch {list(patch)} is larger than the "
                                    f"images of '{name}' {list(store.image_shape)}", "use a smaller patch or null")
        for name, (store, _) in setup.test_sets.items():
            if store is not setup.store and tuple(store.mask_classes or names) != tuple(names):
                raise DataError(name, f"mask classes {list(store.mask_classes)} differ from the study data's "
                                f"{list(names)}", "use a test set with the same segmentation labels")

    def rules(self, full_train_rows: int) -> str | None:
        params: SegmentationParams = self.params  # type: ignore[assignment]
        steps = params.steps_for(full_train_rows, full_train_rows)
        if self.freeze_encoder:
            text = budget_rule_text(params.steps_per_epoch, params.epochs, steps, None, "encoder frozen")
        else:
            text = budget_rule_text(params.steps_per_epoch, params.epochs, steps, self._scales(), "encoder LR scale")
        return f"{self.name}: {text}"

    def run(self, context: ProtocolContext) -> ProtocolOutcome:
        params: SegmentationParams = self.params  # type: ignore[assignment]
        steps = None if params.steps_per_epoch == "subset" else \
            params.steps_for(len(context.train_rows), context.full_train_rows)
        scale, chosen = best_on_validation(self._scales(), lambda scale: finetune_segmentation(
            context.backbone, context.store, context.train_rows, context.val_rows, dict(context.test_sets),
            freeze_encoder=self.freeze_encoder, recipe=params, steps_per_epoch=steps, batch_size=params.batch_size,
            encoder_lr_scale=scale, patch_size=params.patch(context.store.spatial_dims),
            foreground_ratio=params.foreground_ratio, augment=params.augment, seed=context.run_seed,
            device=context.device, sw_batch_size=params.sw_batch_size, sw_overlap=params.sw_overlap,
            hd95=params.hd95))
        outputs = {}
        for name, (_, rows) in context.test_sets.items():
            if not np.array_equal(chosen.rows[name], rows):
                raise RuntimeError(f"segmentation scored other rows of '{name}' than it was given")
            values = {_RENAMED.get(k, k): np.asarray(v, dtype=np.float64) for k, v in chosen.per_case[name].items()}
            outputs[name] = CaseOutputs(values=values)
        records = {"val_dice": float(chosen.val_metric), "best_epoch": float(chosen.best_epoch),
                   "epochs_run": float(chosen.epochs_run), "steps_per_epoch": float(chosen.steps_per_epoch),
                   "finetune_steps": float(chosen.steps), "finetune_budget_steps":
                   float(params.epochs * chosen.steps_per_epoch), "val_images": float(len(context.val_rows)),
                   "hd95_in_mm": float(all(u == "mm" for u in chosen.hd95_unit.values()))}
        if not self.freeze_encoder:
            records["encoder_lr_scale"] = float(scale)
        return ProtocolOutcome(outputs, records)


class FrozenSegmentationProtocol(_SegmentationProtocol):
    name = "segmentation_frozen"
    title = "segmentation (frozen encoder)"
    Params = SegmentationParams
    freeze_encoder = True


class FinetuneSegmentationProtocol(_SegmentationProtocol):
    name = "segmentation_finetune"
    title = "segmentation (fine-tuned)"
    Params = FinetuneSegmentationParams
    freeze_encoder = False
