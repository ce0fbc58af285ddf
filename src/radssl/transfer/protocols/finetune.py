"""Fine-tuning protocol: backbone + linear head trained end to end, epoch and backbone LR chosen on validation AUC.

See :func:`radssl.transfer.finetune.finetune` for the optimiser, augmentation (2D and 3D) and early stopping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from radssl.engine.supervised import EarlyStoppingFloor, PrecisionField, RecipeFields, SupervisedRecipe
from radssl.errors import DataError
from radssl.transfer.finetune import finetune
from radssl.transfer.protocols.base import (
    Protocol,
    ProtocolContext,
    ProtocolOutcome,
    ProtocolParams,
    StudySetup,
    budget_steps_per_epoch,
)
from radssl.transfer.protocols.linear import classification_outputs

RunT = TypeVar("RunT")


def _scale_list(value: Any) -> Any:
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _positive_scales(values: list[float], info: ValidationInfo) -> list[float]:
    if any(v <= 0 for v in values):
        raise ValueError(f"every {info.field_name} must be > 0, got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"{info.field_name} candidates must not repeat, got {values}")
    return values


LrScales = Annotated[list[float], BeforeValidator(_scale_list), Field(min_length=1), AfterValidator(_positive_scales)]
"""An encoder-LR multiplier rule (fine-tuning's ``backbone_lr_scale``, segmentation's ``encoder_lr_scale``): one
number for every initialisation, or a list of candidates chosen on validation per cell."""


def _positive_steps(value: str | int) -> str | int:
    if isinstance(value, bool) or (isinstance(value, int) and value < 1):
        raise ValueError(f"steps_per_epoch must be 'full', 'subset' or an integer ≥ 1, got {value!r}")
    return value


class StepBudgetParams(ProtocolParams, RecipeFields):
    """The keys every trained read-out shares (fine-tuning, segmentation): the supervised recipe's fields
    (:class:`~radssl.engine.supervised.RecipeFields`: epochs, lr, weight_decay, early_stopping_patience, min_epochs)
    plus the budget rule that resolves each cell's optimiser steps per epoch."""

    steps_per_epoch: Literal["full", "subset"] | int = Field(
        "full", description="full | subset | N: optimiser steps per epoch (see the budget rule)")
    min_epochs: EarlyStoppingFloor = 5

    @field_validator("steps_per_epoch")
    @classmethod
    def _positive_steps(cls, value: str | int) -> str | int:
        return _positive_steps(value)

    @model_validator(mode="after")
    def _floor_within_epochs(self) -> "StepBudgetParams":
        if "min_epochs" in self.model_fields_set and self.min_epochs > self.epochs:
            raise ValueError(f"min_epochs ({self.min_epochs}) is larger than epochs ({self.epochs}); lower it")
        return self

    @property
    def early_stopping_floor(self) -> int:
        """``min_epochs`` capped at ``epochs`` (the default floor must not break a short run)."""
        return min(self.min_epochs, self.epochs)

    def recipe(self, steps_per_epoch: int, **overrides: Any) -> SupervisedRecipe:
        """The cell's recipe: these fields with the early-stopping floor capped at ``epochs``."""
        return super().recipe(steps_per_epoch, **{"min_epochs": self.early_stopping_floor, **overrides})


def best_on_validation(scales: list[float], train: Callable[[float], RunT]) -> tuple[float, RunT]:
    """Train once per LR-scale candidate (the same candidates for every initialisation) and keep the run with the
    best validation metric (``val_metric``); ties keep the earlier candidate."""
    best: tuple[float, RunT] | None = None
    for scale in scales:
        candidate = train(scale)
        if best is None or candidate.val_metric > best[1].val_metric:  # type: ignore[attr-defined]
            best = (scale, candidate)
    assert best is not None, "no LR-scale candidates (the params require at least one)"
    return best


class FinetuneParams(StepBudgetParams, PrecisionField):
    """End-to-end fine-tuning (backbone + linear head) with early stopping on validation AUC.

    Fine-tuning dominates a study's cost (one training run per cell), so ``epochs`` is the knob to turn first.

    Budget rule (``steps_per_epoch``) — curves must compare labels, not optimisation budgets:

    - ``full`` (default): every epoch takes as many optimiser steps as one pass over the *whole* training split,
      whatever the label fraction (a small subset is cycled through several times, with fresh augmentations).
      Every label fraction then gets the same ``epochs × ceil(N_train / batch_size)`` steps and the same
      validation schedule; early stopping counts the same units for all.
    - an integer N: every epoch takes exactly N steps at every label fraction (a fixed budget of ``epochs × N``
      steps; an "epoch" is then the validation interval — a large subset is seen in part per epoch).
    - ``subset``: one pass over the label-fraction subset per epoch (the budget grows with the fraction; the
      behaviour of radssl before this rule existed, kept to reproduce old studies).

    Early stopping: after ``early_stopping_patience`` epochs without a better validation AUC, but never before
    ``min_epochs`` (a floor, so one lucky early score on a small validation set cannot end a run).

    Backbone LR rule (``backbone_lr_scale``, the backbone's LR = ``lr × scale``; the head always uses ``lr``) —
    the same rule for every initialisation: one number is used by all of them; a list is a candidate set and
    every cell (each initialisation, label fraction and seed alike) fine-tunes once per candidate and keeps the
    one with the best validation AUC (the selected value is stored with the cell). Default ``[0.1, 1.0]``:
    a pretrained encoder often prefers the lower, discriminative rate (Howard & Ruder 2018), a random one the
    full rate; choosing on validation gives neither arm a hand-picked advantage, at twice the fine-tuning cost.
    """

    batch_size: int = Field(128, gt=1)
    backbone_lr_scale: LrScales = Field(
        default_factory=lambda: [0.1, 1.0],
        description="backbone LR multiplier for every initialisation; a list is chosen per cell on validation")
    augment: bool = True
    hflip: bool = True
    class_balanced: bool = False

    @model_validator(mode="before")
    @classmethod
    def _no_per_arm_rates(cls, value: Any) -> Any:
        if isinstance(value, dict) and "random_backbone_lr_scale" in value:
            raise ValueError(
                "random_backbone_lr_scale was removed: every initialisation now follows the same backbone_lr_scale "
                "rule, so no arm gets its own hyper-parameters — delete the key, and set backbone_lr_scale to one "
                "number for all initialisations or to a list such as [0.1, 1.0] to choose it on validation per cell"
            )
        return value

    def steps_for(self, subset_rows: int, full_rows: int) -> int:
        """Optimiser steps per epoch of a cell with ``subset_rows`` training cases (see the budget rule)."""
        return budget_steps_per_epoch(self.steps_per_epoch, self.batch_size, subset_rows, full_rows)


def check_min_rows(setup: StudySetup, what: str, minimum: int = 2) -> None:
    """Every label-fraction subset keeps at least ``minimum`` training cases (a training batch needs 2)."""
    where = setup.store.origin or setup.store.name
    for seed, subsets in setup.subsets.items():
        for fraction, rows in subsets.items():
            if len(rows) < minimum:
                raise DataError(f"{where} [label_fractions, seed {seed}]",
                                f"label fraction {fraction:g} keeps {len(rows)} image(s); {what} needs ≥ {minimum}",
                                "raise the smallest label fraction")


def budget_rule_text(rule: str | int, epochs: int, steps: int, scales: list[float] | None, scale_name: str) -> str:
    """'4 × 13 steps at every fraction, backbone LR scale 1 for every init' (the study log's rules line)."""
    steps_text = "one pass over each subset (grows with the fraction)" if rule == "subset" else \
        f"{epochs} × {steps} steps at every fraction"
    if scales is None:
        return f"{steps_text}, {scale_name}"
    lr = f"{scale_name} {scales[0]:g} for every init" if len(scales) == 1 else \
        f"{scale_name} chosen on validation from {[float(v) for v in scales]} for every init"
    return f"{steps_text}, {lr}"


class FinetuneProtocol(Protocol):
    name = "finetune"
    title = "fine-tune"
    Params = FinetuneParams
    paper = "Howard & Ruder, Universal language model fine-tuning (discriminative learning rates), ACL 2018"

    def check(self, setup: StudySetup) -> None:
        check_min_rows(setup, "fine-tuning")

    def rules(self, full_train_rows: int) -> str | None:
        params: FinetuneParams = self.params  # type: ignore[assignment]
        return "fine-tuning: " + budget_rule_text(params.steps_per_epoch, params.epochs,
                                                  params.steps_for(full_train_rows, full_train_rows),
                                                  params.backbone_lr_scale, "backbone LR scale")

    def run(self, context: ProtocolContext) -> ProtocolOutcome:
        params: FinetuneParams = self.params  # type: ignore[assignment]
        # Equal budgets: exactly this many steps per epoch at every fraction ("subset": the legacy one pass).
        steps_per_epoch = None if params.steps_per_epoch == "subset" else \
            params.steps_for(len(context.train_rows), context.full_train_rows)
        scale, chosen = best_on_validation(params.backbone_lr_scale, lambda scale: finetune(
            context.backbone, context.store, context.train_rows, context.val_rows, dict(context.test_sets),
            task=context.store.task, recipe=params, batch_size=params.batch_size, backbone_lr_scale=scale,
            augment=params.augment, hflip=params.hflip, class_balanced=params.class_balanced, seed=context.run_seed,
            device=context.device, steps_per_epoch=steps_per_epoch))
        records = {"val_auc": chosen.val_metric, "best_epoch": float(chosen.best_epoch),
                   "epochs_run": float(chosen.epochs_run), "backbone_lr_scale": float(scale),
                   "steps_per_epoch": float(chosen.steps_per_epoch), "finetune_steps": float(chosen.steps_run),
                   "finetune_budget_steps": float(params.epochs * chosen.steps_per_epoch),
                   "val_images": float(len(context.val_rows))}
        return ProtocolOutcome(classification_outputs(context, chosen.scores, chosen.metrics), records)
