"""The one supervised loop on its own: a scripted task shows what it selects, when it stops and what it optimises."""

from __future__ import annotations

from collections.abc import Iterator

import pydantic
import pytest
import torch
from torch import nn

from radssl.engine.supervised import (
    NonFiniteLossError,
    SupervisedRecipe,
    TrainingBatch,
    fit,
    parameter_groups,
)


class _Scripted:
    """Regression of y = 3x with a scripted validation score per epoch (so the selected epoch is known)."""

    def __init__(self, scores: list[float], nan_at_step: int | None = None) -> None:
        self.scores, self.nan_at_step, self.steps = scores, nan_at_step, 0
        self.weights_at_validation: list[float] = []

    def epoch_batches(self, epoch: int, steps: int) -> Iterator[TrainingBatch]:
        for _ in range(steps):
            x = torch.linspace(-1, 1, 8)[:, None]
            yield TrainingBatch(x, 3 * x, 8)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        loss = ((outputs - targets) ** 2).mean()
        return loss * float("nan") if self.steps == self.nan_at_step else loss

    def validate(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        self.weights_at_validation.append(float(model.weight.detach()))
        score = self.scores[len(self.weights_at_validation) - 1]
        return score, {"val_score": score}


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(1, 1, bias=False)


def test_the_best_validation_epoch_is_restored_and_recorded() -> None:
    model, task = _model(), _Scripted([0.2, 0.9, 0.5, 0.4])
    outcome = fit(model, [(model, 1.0)], task, SupervisedRecipe(epochs=4, steps_per_epoch=3, lr=0.05,
                                                                  early_stopping_patience=None),
                  torch.device("cpu"), "toy")
    assert outcome.best_epoch == 2 and outcome.best_metric == 0.9 and not outcome.stopped_early
    assert float(model.weight.detach()) == task.weights_at_validation[1] != task.weights_at_validation[-1]
    assert outcome.steps_run == 12 and outcome.train_samples == 96
    assert [h["val_score"] for h in outcome.history] == [0.2, 0.9, 0.5, 0.4]
    assert not model.training  # handed back in eval mode


def test_early_stopping_waits_for_patience_and_never_stops_before_the_floor() -> None:
    falling = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    model = _model()
    stopped = fit(model, [(model, 1.0)], _Scripted(falling), SupervisedRecipe(epochs=6, early_stopping_patience=2),
                  torch.device("cpu"), "toy")
    assert len(stopped.history) == 3 and stopped.stopped_early and stopped.best_epoch == 1
    model = _model()
    floored = fit(model, [(model, 1.0)], _Scripted(falling),
                  SupervisedRecipe(epochs=6, early_stopping_patience=2, min_epochs=5), torch.device("cpu"), "toy")
    assert len(floored.history) == 5 and floored.stopped_early


def test_a_nan_loss_stops_at_once_naming_the_data_and_the_step() -> None:
    model = _model()
    with pytest.raises(NonFiniteLossError, match=r"toy: segmentation loss became nan at epoch 2, step 1 .*, hint"):
        fit(model, [(model, 1.0)], _Scripted([0.1] * 3, nan_at_step=4), SupervisedRecipe(epochs=3, steps_per_epoch=3),
            torch.device("cpu"), "toy", what="segmentation", hint="hint")


def test_parameter_groups_scale_each_part_and_spare_biases_and_norms_from_decay() -> None:
    backbone, head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)), nn.Linear(4, 2)
    backbone[1].weight.requires_grad_(False)  # a frozen parameter is not optimised at all
    groups = parameter_groups([(backbone, 0.1), (head, 1.0)], lr=1e-3, weight_decay=0.05)
    summary = [(g["lr"], g["weight_decay"], sorted(tuple(p.shape) for p in g["params"])) for g in groups]
    assert summary == [(1e-4, 0.05, [(4, 1, 3, 3)]), (1e-4, 0.0, [(4,), (4,)]), (1e-3, 0.05, [(2, 4)]),
                       (1e-3, 0.0, [(2,)])]


def test_the_recipe_rejects_unknown_keys_and_impossible_values() -> None:
    with pytest.raises(pydantic.ValidationError, match="epoch"):
        SupervisedRecipe(epoch=3)
    with pytest.raises(pydantic.ValidationError):
        SupervisedRecipe(epochs=0)
