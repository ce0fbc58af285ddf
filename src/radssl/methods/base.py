"""The one interface every SSL method implements.

A method is an ``nn.Module`` that owns a ``backbone`` (the encoder transferred later) plus its heads, and maps a
:class:`~radssl.views.batch.ViewBatch` to ``{"loss": tensor, <scalar name>: tensor, ...}``: the loss to minimise and
any scalars worth logging. It declares

- ``requirements(params)``: the views it needs (number, sizes, targets, text, 2D/3D, backbone family), checked
  against the view policy before any compute;
- ``momentum_pairs()``: its (online, target) module pairs, so the engine applies the EMA update generically and the
  targets are saved with the method's state (BYOL, MoCo, DINO);
- ``after_optimizer_step()``: parameter constraints applied after each optimiser step (CLIP's bound on its logit
  scale), so a bound never sits in the forward pass where it would cut the gradient;
- ``preset``: its radiology defaults for the ``views``/``optim``/``method``/``train`` sections (a user's own keys
  always win), looked up by ``name`` in the shipped ``radssl/presets/methods.yaml`` (:mod:`radssl.methods.presets`).

Hyper-parameters live in a pydantic ``Params`` model so a typo in a YAML key is an error that names the key, before
any compute is spent. Schedules (momentum, teacher temperature) are functions of the global step only, so a resumed
run follows exactly the schedule of an uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Literal

import torch
from lightly.models.utils import update_momentum
from lightly.utils.scheduler import cosine_schedule
from pydantic import BaseModel, ConfigDict
from torch import nn

from radssl.methods.presets import NO_PRESET, Preset, method_presets
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements

Family = Literal["contrastive", "non-contrastive", "generative", "multimodal"]
MethodOutput = dict[str, torch.Tensor]


class MethodParams(BaseModel):
    """Base of every method's hyper-parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class SSLMethod(nn.Module):
    """Backbone + heads + loss. Subclasses set ``name``, ``Params``, ``family``, ``paper`` and implement ``forward``."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    family: ClassVar[Family] = "contrastive"
    paper: ClassVar[str] = ""
    preset: ClassVar[Preset] = NO_PRESET
    """Radiology defaults per config section (``views``, ``optim``, ...); applied under the user's own keys. Set
    from the method's entry in ``radssl/presets/methods.yaml`` (a subclass without an entry inherits its parent's)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        entry = method_presets().get(cls.__dict__.get("name", ""))
        if entry is not None and "preset" not in cls.__dict__:
            cls.preset = entry.sections

    def __init__(self, backbone: Backbone, params: MethodParams) -> None:
        super().__init__()
        self.backbone = backbone
        self.params = params
        self._progress = (0, 1)

    @classmethod
    def requirements(cls, params: MethodParams) -> ViewRequirements:
        """Default: two views of one size, 2D."""
        return ViewRequirements()

    def forward(self, batch: ViewBatch) -> MethodOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone, then the method's ``projection_head``: the embedding its loss compares (methods with that head)."""
        return self.projection_head(self.backbone(images))

    # ------------------------------------------------------------------ schedules
    def set_progress(self, step: int, max_steps: int) -> None:
        """Called by the engine before each step's forward: schedules read ``self.progress``."""
        self._progress = (int(step), max(1, int(max_steps)))

    @property
    def progress(self) -> tuple[int, int]:
        """(current step, total steps)."""
        return self._progress

    # ------------------------------------------------------------------ momentum (EMA) targets
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) pairs updated as target ← m·target + (1−m)·online after each optimiser step."""
        return []

    def momentum_at(self, step: int, max_steps: int) -> float:
        """EMA coefficient at ``step``: cosine from ``momentum_start`` to ``momentum_end`` (BYOL's schedule)."""
        start = float(getattr(self.params, "momentum_start", 0.99))
        end = float(getattr(self.params, "momentum_end", 1.0))
        return float(cosine_schedule(step, max_steps, start, end))

    # ------------------------------------------------------------------ constraints after the step
    def after_optimizer_step(self) -> None:
        """Called by the engine right after each ``optimizer.step()`` (before the EMA update); default: nothing.

        For constraints on parameters (a clamp, a projection) that must not be applied in ``forward``: a clamp
        there has zero gradient beyond its bound, so a parameter that crossed it could never come back.
        """

    def transfer_backbone(self) -> Backbone:
        """The encoder that transfers (default: the online backbone)."""
        return self.backbone


@torch.no_grad()
def apply_momentum(method: SSLMethod, step: int, max_steps: int) -> float | None:
    """Generic EMA update of a method's declared target modules; returns the coefficient used (None: no targets)."""
    pairs = method.momentum_pairs()
    if not pairs:
        return None
    momentum = method.momentum_at(step, max_steps)
    for online, target in pairs:
        update_momentum(online, target, m=momentum)
    return momentum


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with gradients off: the starting point of a momentum target."""
    target = copy.deepcopy(module)
    for parameter in target.parameters():
        parameter.requires_grad = False
    return target
