"""The one supervised training loop: fine-tuning a classifier and training a segmentation decoder share it.

What it owns (and the two transfer tasks therefore do the same way): AdamW over parameter groups with weight decay on
conv/linear weights only (Goyal et al. 2017) and a learning-rate scale per part (discriminative fine-tuning, Howard &
Ruder, ACL 2018), cosine decay per optimiser step, a NaN/inf guard at the first bad loss, validation after every
epoch, early stopping (``early_stopping_patience`` epochs without gain, never before ``min_epochs``) and the
best-validation weights restored at the end. Devices and precision come from Lightning Fabric, as in the pretraining
engine (``bf16`` autocasts the forward pass on CUDA only, so CPU runs stay in float32 and reproducible).

What a task supplies (:class:`SupervisedTask`): the batches of an epoch (sampling, augmentation, device copies — so
its random draws keep their order), the loss, and the validation score. The loop never sees images or labels.

The recipe's keys are declared once, in :class:`RecipeFields` (and :class:`PrecisionField`): the protocol configs of a
study (``transfer.protocols``) inherit them, and ``params.recipe(steps_per_epoch)`` makes the :class:`SupervisedRecipe`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, TypeVar

import torch
from lightning.fabric import Fabric
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from radssl.errors import RadsslError

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class NonFiniteLossError(RadsslError, FloatingPointError):
    """The training loss became NaN or inf; raised at the first such step, before weights are ruined."""


EarlyStoppingFloor = Annotated[int, Field(gt=0, description="early stopping never stops before this epoch (floor)")]
"""The ``min_epochs`` field's type: one validation and description, a default per place (the engine's recipe floors
at epoch 1, a study's protocol configs at epoch 5)."""


class RecipeFields(BaseModel):
    """The training keys every supervised read-out shares, declared once (validation, defaults, descriptions).

    :class:`SupervisedRecipe` (what :func:`fit` runs) and the protocol configs (``transfer.protocols``: fine-tuning,
    segmentation) both inherit them, so a key a user writes in a study config is the key the engine reads.
    :meth:`recipe` is the one way from such settings to a recipe.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(30, gt=0, description="training epochs; the validation split is scored after each")
    lr: float = Field(1e-3, gt=0.0, description="peak learning rate of the new head/decoder (cosine decay per step)")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW decay on conv/linear weights (none on biases, norms)")
    early_stopping_patience: int | None = Field(
        10, gt=0, description="epochs without a better validation score before stopping; null trains every epoch")
    min_epochs: EarlyStoppingFloor = 1

    def recipe(self, steps_per_epoch: int, **overrides: Any) -> "SupervisedRecipe":
        """This object's recipe fields with ``overrides`` on top and the task's resolved steps per epoch.

        Unknown override keys and bad values raise :class:`pydantic.ValidationError` naming the key, before compute.
        """
        values = self.model_dump(include=set(SupervisedRecipe.model_fields))
        return SupervisedRecipe.model_validate({**values, **overrides, "steps_per_epoch": steps_per_epoch})


class PrecisionField(BaseModel):
    """The ``precision`` key (its own model: fine-tuning's config has it, segmentation's does not)."""

    model_config = ConfigDict(extra="forbid")

    precision: Literal["32", "bf16"] = Field(
        "32", description="bf16 autocasts the forward pass on CUDA only (CPU runs stay float32, reproducible)")


class SupervisedRecipe(RecipeFields, PrecisionField):
    """How long and how fast to train, and when to stop: the shared fields plus the task's resolved steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps_per_epoch: int = Field(1, ge=1, description="optimiser steps between two validations")

    @property
    def total_steps(self) -> int:
        return max(1, self.epochs * self.steps_per_epoch)


def build_seeded(seed: int, build: Callable[[], ModuleT]) -> ModuleT:
    """``build()`` with the global RNG seeded by ``seed`` (new layers' initial weights), the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@dataclass
class TrainingBatch:
    """One step's inputs (normalised, on the device), targets (on the device) and how many samples it holds."""

    inputs: torch.Tensor
    targets: torch.Tensor
    size: int


class SupervisedTask(Protocol):
    """The task-specific part of supervised training (head + loss + metric live here, the loop in :func:`fit`)."""

    def epoch_batches(self, epoch: int, steps: int) -> Iterator[TrainingBatch]:
        """Exactly ``steps`` batches for this epoch, drawn lazily (one per optimiser step)."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def validate(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        """(the primary validation metric, higher is better; the ``val_*`` entries for the epoch's record)."""


@dataclass
class SupervisedOutcome:
    """What the loop did; the model passed to :func:`fit` holds the restored best-validation weights."""

    best_epoch: int
    best_metric: float
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    steps_run: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0


def parameter_groups(parts: Sequence[tuple[nn.Module, float]], lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups per (module, LR scale): decay on weights (ndim > 1), none on biases and norm parameters."""
    groups: list[dict] = []
    for module, scale in parts:
        decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
        groups += [{"params": decay, "lr": lr * scale, "weight_decay": weight_decay},
                   {"params": no_decay, "lr": lr * scale, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_fabric(device: torch.device, precision: Literal["32", "bf16"]) -> Fabric:
    """A single-device Fabric on ``device``; bf16 mixed precision only where it is fast and asked for (CUDA)."""
    if device.type == "cuda":
        return Fabric(accelerator="cuda", devices=[device.index or 0],
                      precision="bf16-mixed" if precision == "bf16" else "32-true")
    return Fabric(accelerator="cpu", devices=1, precision="32-true")


def fit(model: nn.Module, parts: Sequence[tuple[nn.Module, float]], task: SupervisedTask,
        recipe: SupervisedRecipe, device: torch.device, where: str, what: str = "fine-tuning", hint: str = "",
        on_epoch_end: Callable[[dict[str, float]], None] | None = None) -> SupervisedOutcome:
    """Train ``model`` (its ``parts`` at their LR scales) on ``task`` under ``recipe``; restore the best epoch.

    ``where`` and ``what`` name the data and the job in the NaN error, ``hint`` adds the fix to try.
    """
    fabric = make_fabric(device, recipe.precision)
    optimiser = torch.optim.AdamW(parameter_groups(parts, recipe.lr, recipe.weight_decay))
    total = recipe.total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    trained, fabric_optimiser = fabric.setup(model, optimiser)
    outcome = SupervisedOutcome(best_epoch=0, best_metric=-math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_gain = 0
    for epoch in range(1, recipe.epochs + 1):
        trained.train()
        epoch_start = time.perf_counter()
        running, seen = 0.0, 0
        for step, batch in enumerate(task.epoch_batches(epoch, recipe.steps_per_epoch)):
            loss = task.loss(trained(batch.inputs).float(), batch.targets)
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(
                    f"{where}: {what} loss became {loss.detach().item()} at epoch {epoch}, step {step + 1} "
                    f"(lr {scheduler.get_last_lr()[0]:.3g}) — lower lr, check the initialisation's weights for NaN"
                    + (f", {hint}" if hint else ""))
            fabric_optimiser.zero_grad(set_to_none=True)
            fabric.backward(loss)
            fabric_optimiser.step()
            scheduler.step()
            outcome.steps_run += 1
            running += float(loss.detach()) * batch.size
            seen += batch.size
        outcome.train_seconds += time.perf_counter() - epoch_start
        outcome.train_samples += seen
        metric, validation = task.validate(model)
        record = {"epoch": float(epoch), "train_loss": running / max(seen, 1), "train_samples": float(seen),
                  "lr": scheduler.get_last_lr()[-1], **validation}
        outcome.history.append(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
        if metric > outcome.best_metric:
            outcome.best_metric, outcome.best_epoch, epochs_without_gain = metric, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            epochs_without_gain += 1
            if (recipe.early_stopping_patience is not None and epochs_without_gain >= recipe.early_stopping_patience
                    and epoch >= recipe.min_epochs):
                outcome.stopped_early = epoch < recipe.epochs
                break
    assert best_state is not None  # epoch 1 always sets it (any metric beats -inf, NaN aside)
    model.load_state_dict(best_state)
    model.eval()
    return outcome
