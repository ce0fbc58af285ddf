"""CLIP-style image–report pretraining (Radford et al., ICML 2021, arXiv:2103.00020).

Linear projections of both towers into one space and a **symmetric** InfoNCE (image→text and text→image weighted
equally) with a **learnable logit scale**: ``s = exp(t)``, ``t`` initialised at ``log(1/0.07)`` and kept in
``[0, log 100]`` (``1 ≤ s ≤ 100``, the paper's bound). The bound is applied to the parameter after each optimiser
step (:meth:`CLIP.after_optimizer_step`), as OpenCLIP does (``logit_scale.clamp_(0, math.log(100))`` under
``torch.no_grad()`` after ``optimizer.step()``, mlfoundations/open_clip ``src/open_clip_train/train.py``), not in the
forward pass: a clamp there has zero gradient above the bound, so a scale pushed past it could never come down.
The loss is :func:`radssl.methods.image_text.image_text_loss` (identical reports are kept apart from the negatives;
rows without a report are skipped).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from radssl.methods.image_text import ImageTextMethod, ImageTextParams
from radssl.models.base import Backbone


class CLIPParams(ImageTextParams):
    initial_temperature: float = Field(0.07, gt=0.0, description="1 / initial logit scale (paper: 0.07)")
    max_logit_scale: float = Field(100.0, gt=1.0, description="clamp of the learnt scale (paper: 100)")


class CLIP(ImageTextMethod):
    name = "clip"
    Params = CLIPParams
    paper = "Radford et al., ICML 2021 (arXiv:2103.00020)"

    def __init__(self, backbone: Backbone, params: CLIPParams) -> None:
        super().__init__(backbone, params)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / params.initial_temperature)))

    def make_projection(self, input_dim: int, params: CLIPParams) -> nn.Module:  # type: ignore[override]
        return nn.Linear(input_dim, params.projection_dim, bias=False)

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Clamp the log-scale into [0, log max_logit_scale] (OpenCLIP's post-step clamp)."""
        self.log_logit_scale.clamp_(0.0, math.log(self.params.max_logit_scale))
