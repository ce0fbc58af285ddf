"""The one interface every SSL method implements.

A method is an ``nn.Module`` that owns a ``backbone`` (the encoder transferred later) plus its heads, and maps a
list of views (float tensors, already normalised, one per view) to a scalar loss. Methods with momentum encoders
update them in ``on_step_end``. Hyper-parameters live in a pydantic ``Params`` model so a typo in a YAML key is an
error that names the key, before any compute is spent.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from radssl.models.backbones import Backbone


class MethodParams(BaseModel):
    """Base of every method's hyper-parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class SSLMethod(nn.Module):
    """Backbone + heads + loss. Subclasses set ``name``, ``Params`` and ``num_views``."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    num_views: ClassVar[int] = 2

    def __init__(self, backbone: Backbone, params: MethodParams) -> None:
        super().__init__()
        self.backbone = backbone
        self.params = params

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def on_step_end(self, step: int, max_steps: int) -> None:
        """Called after each optimiser step (momentum encoders update here). Default: nothing."""

    def diagnostics(self) -> dict[str, float]:
        """Extra scalars to log (e.g. the current momentum); default none."""
        return {}
