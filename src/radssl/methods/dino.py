"""DINO: self-distillation with no labels (Caron et al., ICCV 2021, arXiv:2104.14294).

A student (backbone + DINO head) is trained to match, by cross-entropy, the centred and sharpened softmax of a
momentum teacher over all pairs of *different* views: the teacher sees the two global views, the student every view
(global and local, from the ``multi_crop`` policy), so local crops must predict the global picture. Collapse is
avoided by centring the teacher output (EMA of its batch mean, momentum 0.9) and sharpening it (teacher temperature
0.04, linearly warmed up to ``teacher_temp`` when that is set higher, as the paper's 0.04 → 0.07 over 30 epochs).

lightly's: ``DINOProjectionHead`` (3-layer MLP, l2-normalised bottleneck, weight-normalised last layer) and
``DINOLoss`` (the cross-entropy over view pairs and the centre, a registered buffer, hence in ``state_dict``).
Ours: the schedules are functions of the global step (``self.progress``), never of lightly's epoch counter, so a
resumed run follows them exactly — the teacher temperature is passed to the loss on every call, the last layer is
frozen for the first ``freeze_last_layer_fraction`` of the steps (DINO: 1 of 100 epochs) by dropping its gradients
after backward, and the teacher EMA (cosine 0.996 → 1) is applied by the engine through ``momentum_pairs``.
One deliberate departure: the centre starts at the first batch's teacher mean instead of 0 (``center_init``;
``zero`` restores the reference). It is an EMA of batch means, and a zero start is a biased estimate for its first
~1/(1 − 0.9) = 10 steps, during which the teacher is centred by the wrong vector: on our data the loss then climbs
from 6.1 to ln K (7.6) over 20 steps at 1, 10 and 100 times the preset learning rate, a transient of the centre,
not of learning; with the bias-free start it falls from the first step (tests/test_methods_train.py).
Known, on the synthetic 32 px data with the small CNN (batch 32, 150–300 steps): the logged ``teacher_entropy``
drifts to ln K (uniform collapse) at the preset and at 16× its learning rate, with and without multi-crop; a
sharper teacher (0.02) or a slower one (momentum 0.9995, the reference's advice for small batches) delays it. Tune
``teacher_temp`` and ``momentum_start`` on real validation data before trusting a DINO comparison.
Views of one size go through the networks in one batch (DINO's ``MultiCropWrapper``); a ViT student sees the
smaller local views with its position embeddings interpolated (timm's dynamic image size, switched on only for
those calls). With the ``two_view`` policy (no ``num_global``) every view is global: DINO without multi-crop.

The teacher is what transfers (``transfer_backbone``): the paper evaluates the teacher, which it finds better than
the student throughout training.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.center import center_mean
from pydantic import Field, model_validator
from timm.layers import Format
from torch import nn

from radssl.errors import ConfigError
from radssl.methods.base import MethodOutput, MethodParams, SSLMethod, frozen_copy
from radssl.models.base import Backbone
from radssl.views.batch import ViewBatch, ViewRequirements


class DINOParams(MethodParams):
    """Head sizes follow lightly's small-data DINO example (512 / 64 / 2048); the paper's ImageNet head is
    2048 / 256 / 65536, whose 16.8 M-parameter last layer dominates the cost of 28–64 px CPU runs."""

    hidden_dim: int = Field(512, gt=0, description="head MLP width (paper: 2048)")
    bottleneck_dim: int = Field(64, gt=0, description="l2-normalised bottleneck (paper: 256)")
    output_dim: int = Field(2048, gt=0, description="prototypes K (paper: 65536 for ImageNet)")
    norm_last_layer: bool = Field(True, description="weight-normalised last layer with fixed norm (paper default)")
    student_temp: float = Field(0.1, gt=0.0, description="student temperature (paper: 0.1)")
    warmup_teacher_temp: float = Field(0.04, gt=0.0, description="teacher temperature at step 0 (paper: 0.04)")
    teacher_temp: float = Field(
        0.04, gt=0.0, description="teacher temperature after warm-up (reference code default 0.04; paper 0.07)")
    teacher_temp_warmup_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="share of the steps of the linear warm-up (paper: 30 of 100 epochs)")
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0, description="EMA of the teacher centre (paper: 0.9)")
    center_init: Literal["first_batch", "zero"] = Field(
        "first_batch", description="start the centre EMA at the first batch mean (bias-free) or at 0 (reference)")
    momentum_start: float = Field(0.996, ge=0.0, le=1.0, description="teacher EMA at step 0 (paper: 0.996)")
    momentum_end: float = Field(1.0, ge=0.0, le=1.0, description="teacher EMA at the end (paper: 1)")
    freeze_last_layer_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="share of the steps the last layer is frozen (paper: 1 of 100 epochs)")

    @model_validator(mode="after")
    def _ordered(self) -> "DINOParams":
        if self.momentum_end < self.momentum_start:
            raise ValueError("momentum_end must be >= momentum_start")
        return self


@contextlib.contextmanager
def any_input_size(backbone: nn.Module) -> Iterator[None]:
    """Let a timm ViT backbone take inputs of another size for the duration (position embeddings resampled).

    radssl ViTs are built for one image size (``models/vit.py``); timm interpolates the position embeddings when
    ``dynamic_img_size`` is on, which needs the patch embedding to emit NHWC and not check the size. No parameter
    changes, so the state dict and the transferred backbone are unaffected. Other backbones: nothing to do.
    """
    vit = getattr(backbone, "vit", None)
    if vit is None or getattr(vit, "dynamic_img_size", True):
        yield
        return
    embed = vit.patch_embed
    saved = (vit.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt)
    vit.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = True, False, False, Format.NHWC
    try:
        yield
    finally:
        vit.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = saved


class DINO(SSLMethod):
    """Student/teacher self-distillation with centring and sharpening; the teacher transfers."""

    name = "dino"
    Params = DINOParams
    family = "non-contrastive"
    paper = "Caron et al., ICCV 2021 (arXiv:2104.14294)"

    def __init__(self, backbone: Backbone, params: DINOParams) -> None:
        super().__init__(backbone, params)
        self.projection_head = self._head(backbone, params)
        # The teacher starts as an exact copy of the student (reference: teacher.load_state_dict(student)). The head
        # is rebuilt and loaded rather than deep-copied: lightly's head uses torch's old weight_norm, whose computed
        # weight cannot be deep-copied.
        self.teacher_backbone = frozen_copy(backbone)
        self.teacher_head = self._head(backbone, params)
        self.teacher_head.load_state_dict(self.projection_head.state_dict())
        for parameter in self.teacher_head.parameters():
            parameter.requires_grad = False
        self.criterion = DINOLoss(
            output_dim=params.output_dim, warmup_teacher_temp=params.warmup_teacher_temp,
            teacher_temp=params.teacher_temp, student_temp=params.student_temp,
            center_momentum=params.center_momentum,
        )
        # Saved with the method, so a resumed run does not re-initialise the centre.
        self.register_buffer("center_initialised", torch.tensor(False))
        for parameter in self.projection_head.last_layer.parameters():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(self._drop_last_layer_gradient)

    @staticmethod
    def _head(backbone: Backbone, params: DINOParams) -> DINOProjectionHead:
        with warnings.catch_warnings():  # lightly's head uses torch's deprecated weight_norm; nothing for users to do
            warnings.filterwarnings("ignore", message=".*weight_norm.*", category=FutureWarning)
            return DINOProjectionHead(backbone.feature_dim, params.hidden_dim, params.bottleneck_dim,
                                      params.output_dim, batch_norm=False, norm_last_layer=params.norm_last_layer)

    @classmethod
    def requirements(cls, params: DINOParams) -> ViewRequirements:
        return ViewRequirements(min_views=2, max_views=None, equal_sizes=False)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.teacher_backbone), (self.projection_head, self.teacher_head)]

    def transfer_backbone(self) -> Backbone:
        """The teacher backbone: DINO evaluates (and releases) the teacher, the better network of the two."""
        return self.teacher_backbone  # type: ignore[return-value]

    # ------------------------------------------------------------------ schedules
    def teacher_temperature(self, step: int | None = None) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the first share of the steps."""
        current, total = self.progress
        step = current if step is None else step
        warmup = int(round(self.params.teacher_temp_warmup_fraction * total))
        start, end = self.params.warmup_teacher_temp, self.params.teacher_temp
        if warmup <= 1 or step >= warmup:
            return end if step >= warmup else start
        return start + (end - start) * step / (warmup - 1)

    def last_layer_frozen(self) -> bool:
        step, total = self.progress
        return step < int(round(self.params.freeze_last_layer_fraction * total))

    def _drop_last_layer_gradient(self, parameter: torch.Tensor) -> None:
        # The reference sets p.grad = None for the first epoch(s) (cancel_gradients_last_layer): the optimiser then
        # skips the layer entirely (no weight decay, no moment updates).
        if self.last_layer_frozen():
            parameter.grad = None

    # ------------------------------------------------------------------ forward
    def _student(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Student outputs per view; views of one size share one pass (like DINO's MultiCropWrapper)."""
        outputs: list[torch.Tensor | None] = [None] * len(views)
        native = tuple(getattr(self.backbone.spec, "image_size", None) or views[0].shape[2:])
        for size in dict.fromkeys(tuple(v.shape[2:]) for v in views):
            indices = [i for i, v in enumerate(views) if tuple(v.shape[2:]) == size]
            stacked = torch.cat([views[i] for i in indices])
            context = any_input_size(self.backbone) if size != native else contextlib.nullcontext()
            try:
                with context:
                    features = self.backbone(stacked)
            except AssertionError as error:  # timm's patch-embedding size checks
                raise ConfigError(f"dino: the backbone cannot take {size} views ({error}) — for a ViT make "
                                  "views.local_size a multiple of its patch size") from error
            for i, chunk in zip(indices, self.projection_head(features).float().chunk(len(indices))):
                outputs[i] = chunk
        return outputs  # type: ignore[return-value]

    def forward(self, batch: ViewBatch) -> MethodOutput:
        views = batch.views
        global_views = batch.global_views
        student = self._student(views)
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(global_views))).float()
        teacher_out = list(teacher.chunk(len(global_views)))
        if self.params.center_init == "first_batch" and not bool(self.center_initialised):
            self.criterion.center.copy_(center_mean(torch.stack(teacher_out), dim=(0, 1)))
            self.center_initialised.fill_(True)
        temperature = self.teacher_temperature()
        with torch.no_grad():  # the paper's collapse diagnostic: → ln K if centring dominates, → 0 if sharpening does
            centred = F.softmax((teacher - self.criterion.center.view(1, -1)) / temperature, dim=-1)
            entropy = -(centred * centred.clamp_min(1e-12).log()).sum(dim=-1).mean()
        loss = self.criterion(teacher_out, student, teacher_temp=temperature)
        return {"loss": loss, "teacher_temp": torch.tensor(temperature), "teacher_entropy": entropy}
