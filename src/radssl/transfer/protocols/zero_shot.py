"""Zero-shot protocol: classify test cases from class prompts with an image–text model (ConVIRT / CLIP), no labels.

CLIP's zero-shot classifier (Radford et al., ICML 2021) on a ConVIRT- or CLIP-style checkpoint (Zhang et al. 2020);
see :mod:`radssl.transfer.zero_shot`. It uses no training labels, so in a study it is recorded once per encoder and
test set — at label fraction 0 and the study's seed (the only randomness is the pretraining run's) — and the report
draws it as a horizontal reference line beside the label-efficiency curves.

Which encoders: only those whose checkpoint holds an image–text method (pretraining runs of the ``multimodal``
family). Other encoders of the same study are skipped with a note; a study that lists ``zero_shot`` but no
image–text encoder is refused before compute.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError, field_validator

from radssl.errors import ConfigError
from radssl.transfer.protocols.base import (
    CaseOutputs,
    EncoderInfo,
    Protocol,
    ProtocolContext,
    ProtocolOutcome,
    ProtocolParams,
    StudySetup,
)
from radssl.transfer.zero_shot import ZeroShotPrompts, load_image_text_method, zero_shot_classify


class ZeroShotParams(ProtocolParams):
    """Class name → prompt(s); the prompts of a class are embedded, averaged and compared with each image."""

    prompts: dict[str, list[str]] = Field(
        description="class name (as the data name them, e.g. normal / finding) → one prompt or a list of prompts")

    @field_validator("prompts", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("prompts")
    @classmethod
    def _valid(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        try:
            ZeroShotPrompts(prompts=value)  # ≥ 2 classes, no empty prompt
        except ValidationError as error:
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None
        return value


def is_image_text(encoder: EncoderInfo) -> bool:
    return encoder.family == "multimodal"


class ZeroShotProtocol(Protocol):
    name = "zero_shot"
    title = "zero-shot"
    Params = ZeroShotParams
    task_kinds = frozenset({"binary", "multiclass"})
    uses_labels = False
    selects_on_validation = False
    paper = "Radford et al., Learning transferable visual models from natural language supervision, ICML 2021"

    def applies_to(self, encoder: EncoderInfo) -> str | None:
        if is_image_text(encoder):
            return None
        what = f"method '{encoder.method}'" if encoder.method else "no pretraining"
        return f"{encoder.label or encoder.init} has {what}, not an image–text model (ConVIRT / CLIP)"

    def check(self, setup: StudySetup) -> None:
        params: ZeroShotParams = self.params  # type: ignore[assignment]
        try:
            ZeroShotPrompts(prompts=params.prompts).ordered(setup.store.task)
        except ConfigError as error:
            raise ConfigError(f"{setup.field_name}.prompts: {error}") from None
        if not any(is_image_text(e) for e in setup.encoders):
            listed = ", ".join(e.label or e.init for e in setup.encoders)
            raise ConfigError(
                f"{setup.field_name}: zero-shot needs an image–text encoder, but the study's encoders are {listed} — "
                "add a pretraining run with method convirt or clip and initialisation ssl:<its name>, or remove "
                "zero_shot from protocols")

    def run(self, context: ProtocolContext) -> ProtocolOutcome:
        params: ZeroShotParams = self.params  # type: ignore[assignment]
        if context.encoder.checkpoint is None:
            raise ConfigError(f"zero-shot: encoder {context.encoder.label} has no checkpoint to load")
        method = load_image_text_method(context.encoder.checkpoint, context.device)
        prompts = ZeroShotPrompts(prompts=params.prompts)
        outputs = {}
        for name, (store, rows) in context.test_sets.items():
            result = zero_shot_classify(method, store, rows, prompts, name=name)
            if not np.array_equal(result.rows, rows):  # the study checked every test row has a label
                raise ConfigError(f"zero-shot: test set '{name}' has unlabelled rows")
            outputs[name] = CaseOutputs(y_true=store.labels[torch.from_numpy(rows)].numpy(), y_score=result.scores,
                                        metrics={"balanced_accuracy": float(result.metrics["balanced_accuracy"])})
        return ProtocolOutcome(outputs, {"prompts": float(sum(len(p) for p in params.prompts.values()))})
