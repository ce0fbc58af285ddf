"""The transfer-protocol plugin interface and its registry.

A *protocol* turns an initialised encoder into per-case test outputs: a linear probe, kNN, fine-tuning, zero-shot
classification from prompts, segmentation, … . The study grid (:mod:`radssl.study.plan` and :mod:`radssl.study.tasks`) only talks to this
interface, so adding a protocol is one module with one :class:`Protocol` subclass plus one line in
:data:`PROTOCOLS` (or a :func:`register_protocol` call, e.g. from a test or a user's own package).

What a protocol declares (class attributes):

- ``name`` and ``Params`` — its own options, a pydantic model (unknown keys are errors); the study config's
  ``protocols:`` section maps protocol names to these params.
- ``task_kinds`` — the tasks it reads out: ``binary`` / ``multiclass`` / ``multilabel`` (class labels) and/or
  ``segmentation`` (masks in ``store.meta["mask"]``); ``spatial_dims`` — 2D and/or 3D data.
- ``metric`` — its primary metric name in the results store (``auc``, ``dice``; the report and statistics follow
  it) and ``case_metric`` — how per-case outputs become that metric: ``scores`` (the protocol returns per-case
  scores and labels; AUC/accuracy are computed from them) or ``values`` (per-case metric values, e.g. each case's
  Dice; the set's metric is their mean).
- ``frozen_features`` — reads the encoder's frozen pooled features from the study's shared feature cache
  (``context.features``) instead of running the encoder itself.
- ``uses_labels`` — False for label-free read-outs (zero-shot): the label-fraction and seed axes do not apply,
  so the grid runs it once per encoder and test set (label fraction 0, the study's seed).
- ``selects_on_validation`` — whether it picks anything on the validation rows (the study's validation rule).

``check(setup)`` runs in ``prepare_study`` before any compute (bad input → an error naming the field) and
``applies_to(encoder)`` lets a protocol skip encoders it cannot read out (zero-shot needs an image–text model).
``run(context)`` returns a :class:`ProtocolOutcome`: per test set a :class:`CaseOutputs` (per-case scores or
values, in the test set's fixed case order, so paired tests between initialisations work) and per-cell records
(selected hyper-parameters, validation metric, steps run).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import nn

from radssl.data.store import ImageStore
from radssl.registry import Registry, did_you_mean

__all__ = [
    "PROTOCOLS",
    "CaseOutputs",
    "EncoderInfo",
    "Protocol",
    "ProtocolContext",
    "ProtocolOutcome",
    "ProtocolParams",
    "StudySetup",
    "build_protocol",
    "one_pass_steps",
    "protocol_class",
    "protocol_names",
    "register_protocol",
    "validate_protocols",
]

TaskKind = Literal["binary", "multiclass", "multilabel", "segmentation"]
CLASS_TASKS: frozenset[str] = frozenset({"binary", "multiclass", "multilabel"})


class ProtocolParams(BaseModel):
    """Base of every protocol's ``Params``: unknown keys are errors (the config names them)."""

    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class EncoderInfo:
    """What a protocol may know about the encoder of a cell (never its weights' origin beyond this)."""

    init: str
    """``random`` | ``imagenet`` | ``ssl`` | ``imagenet+ssl``."""
    pretrain: str
    """Pretraining run name (``none`` for random / ImageNet)."""
    method: str | None = None
    """SSL method of the pretraining run (``simclr``, ``convirt``, …); None without pretraining."""
    family: str | None = None
    """That method's family (``contrastive`` | ``non-contrastive`` | ``generative`` | ``multimodal``)."""
    checkpoint: Path | None = None
    """The SSL checkpoint (exists when ``run`` is called; may not exist yet at ``check`` time)."""
    label: str = ""
    """Readable name for messages, e.g. ``ssl(convirt)``."""


@dataclass(frozen=True)
class StudySetup:
    """Everything a protocol may check before compute (``Protocol.check``)."""

    store: ImageStore
    train_rows: np.ndarray
    val_rows: np.ndarray
    test_sets: Mapping[str, tuple[ImageStore, np.ndarray]]
    subsets: Mapping[int, Mapping[float, np.ndarray]]
    """Training rows per seed and label fraction."""
    encoders: tuple[EncoderInfo, ...]
    field_name: str
    """The config key of this protocol, e.g. ``protocols.finetune`` (for error messages)."""


@dataclass
class ProtocolContext:
    """One cell's inputs: the encoder, the labelled rows of its label fraction and seed, the test sets."""

    backbone: nn.Module
    encoder: EncoderInfo
    store: ImageStore
    train_rows: np.ndarray
    """This cell's labelled training rows (the label-fraction subset; all training rows for label-free ones)."""
    val_rows: np.ndarray
    """This cell's model-selection rows (the study's validation rule already applied)."""
    test_sets: Mapping[str, tuple[ImageStore, np.ndarray]]
    """Test sets to score: name → (store, rows)."""
    full_train_rows: int
    """Size of the whole training split (the equal-budget rule counts steps from it)."""
    label_fraction: float
    seed: int
    """The cell's seed (label subset and read-out randomness)."""
    run_seed: int
    """A seed derived from the study seed and the cell's seed, for the read-out's own random generators."""
    device: torch.device
    features: Callable[[ImageStore], torch.Tensor] | None = None
    """Frozen pooled features of every row of a store (shared cache); set for ``frozen_features`` protocols."""
    log: Callable[[str], None] = print


@dataclass
class CaseOutputs:
    """One test set's per-case outputs, in the test set's case order.

    ``scores`` protocols fill ``y_true``/``y_score`` (the project's score convention, see
    :mod:`radssl.transfer.metrics`); ``values`` protocols fill ``values`` (metric name → one value per case, the
    primary metric among them). ``metrics`` holds further whole-set numbers (e.g. balanced accuracy).
    """

    y_true: np.ndarray | None = None
    y_score: np.ndarray | None = None
    values: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ProtocolOutcome:
    """What ``Protocol.run`` returns: per-case outputs per test set and per-cell records."""

    outputs: dict[str, CaseOutputs]
    records: dict[str, float] = field(default_factory=dict)
    """Scalars stored with every test set's cell: validation metric, selected hyper-parameters, steps run, …"""


# ---------------------------------------------------------------------------------------------- protocol
class Protocol:
    """Base class of transfer protocols; subclasses set the class attributes and implement :meth:`run`."""

    name: ClassVar[str]
    Params: ClassVar[type[ProtocolParams]] = ProtocolParams
    task_kinds: ClassVar[frozenset[str]] = CLASS_TASKS
    spatial_dims: ClassVar[frozenset[int]] = frozenset({2, 3})
    metric: ClassVar[str] = "auc"
    case_metric: ClassVar[Literal["scores", "values"]] = "scores"
    frozen_features: ClassVar[bool] = False
    uses_labels: ClassVar[bool] = True
    selects_on_validation: ClassVar[bool] = True
    title: ClassVar[str] = ""
    """Readable name for the report (``linear probe``); defaults to ``name``."""
    paper: ClassVar[str] = ""

    def __init__(self, params: ProtocolParams | Mapping[str, Any] | None = None) -> None:
        if params is None or isinstance(params, Mapping):
            params = self.Params.model_validate(dict(params or {}))
        if not isinstance(params, self.Params):
            raise TypeError(f"protocol '{self.name}' takes {self.Params.__name__}, got {type(params).__name__}")
        self.params = params

    @property
    def target(self) -> Literal["class", "mask"]:
        """What test cases are scored against: class labels or masks."""
        return "mask" if "segmentation" in self.task_kinds and not (self.task_kinds & CLASS_TASKS) else "class"

    def applies_to(self, encoder: EncoderInfo) -> str | None:
        """None when this protocol can read out ``encoder``; otherwise the reason its cells are skipped."""
        return None

    def check(self, setup: StudySetup) -> None:
        """Checks that need the data, before any compute; raise ConfigError/DataError naming the field."""

    def rules(self, full_train_rows: int) -> str | None:
        """One line on this protocol's budget and selection rules for the study log (None: nothing to state)."""
        return None

    def run(self, context: ProtocolContext) -> ProtocolOutcome:  # pragma: no cover - interface
        raise NotImplementedError


def one_pass_steps(rows: int, batch_size: int) -> int:
    """Optimiser steps of one pass over ``rows`` cases (a last batch of one case is dropped: BatchNorm)."""
    return max(1, rows // batch_size + (1 if rows % batch_size >= 2 else 0))


def budget_steps_per_epoch(rule: str | int, batch_size: int, subset_rows: int, full_rows: int) -> int:
    """Steps per epoch under the equal-budget rule: ``full`` (one pass over the whole training split at every label
    fraction), ``subset`` (one pass over the subset; grows with the fraction) or a fixed integer."""
    if rule == "subset":
        return one_pass_steps(subset_rows, batch_size)
    if rule == "full":
        return one_pass_steps(full_rows, batch_size)
    return int(rule)


# ---------------------------------------------------------------------------------------------- registry
PROTOCOLS: Registry[Protocol] = Registry("protocol", base=Protocol, entries={
    "linear": "radssl.transfer.protocols.linear:LinearProbeProtocol",
    "knn": "radssl.transfer.protocols.knn:KnnProtocol",
    "finetune": "radssl.transfer.protocols.finetune:FinetuneProtocol",
    "zero_shot": "radssl.transfer.protocols.zero_shot:ZeroShotProtocol",
    "segmentation_frozen": "radssl.transfer.protocols.segmentation:FrozenSegmentationProtocol",
    "segmentation_finetune": "radssl.transfer.protocols.segmentation:FinetuneSegmentationProtocol",
})
"""Protocol name → class or ``module:Class`` import path (imported on first use)."""


register_protocol = PROTOCOLS.register
"""Register a Protocol subclass under its ``name`` (usable as a decorator); a later registration wins."""
protocol_names = PROTOCOLS.names
protocol_class = PROTOCOLS.load


def build_protocol(name: str, params: ProtocolParams | Mapping[str, Any] | None = None) -> Protocol:
    return protocol_class(name)(params)


def validate_protocols(value: Mapping[str, Any], prefix: str = "protocols") -> dict[str, ProtocolParams | None]:
    """``{name: params mapping | None}`` → ``{name: validated Params | None}``.

    Raises one :class:`pydantic.ValidationError` holding every problem with its location inside the mapping
    (``('linear', 'Cz')``), so a config loader reports ``protocols.linear.Cz`` — an unknown protocol name (the
    registry's own :class:`~radssl.registry.UnknownNameError` message) or an unknown key, each with the closest
    valid spelling.
    """
    errors: list[InitErrorDetails] = []
    out: dict[str, ProtocolParams | None] = {}
    for name, params in value.items():
        name = str(name)
        if name not in PROTOCOLS:
            errors.append(InitErrorDetails(
                type=PydanticCustomError("unknown_protocol", "unknown key '{key}': {problem}",
                                         {"key": f"{prefix}.{name}", "problem": str(PROTOCOLS.unknown(name))}),
                loc=(name,), input=params))
            continue
        if params is None or params is False:
            out[name] = None
            continue
        cls = protocol_class(name)
        try:
            out[name] = cls.Params.model_validate({} if params is True else params)
        except ValidationError as error:
            errors.extend(_params_errors(name, list(cls.Params.model_fields), error, prefix))
    if errors:
        raise ValidationError.from_exception_data("protocols", errors)
    return out


def _params_errors(name: str, allowed: list[str], error: ValidationError, prefix: str) -> list[InitErrorDetails]:
    """A protocol's params errors located under its name; an unknown key gets the closest spelling (or the keys)."""
    details: list[InitErrorDetails] = []
    for item in error.errors():
        loc = (name, *item["loc"])
        if item["type"] == "extra_forbidden":
            key = str(item["loc"][-1]) if item["loc"] else ""
            hint = did_you_mean(key, allowed) or f" — '{name}' takes: {', '.join(allowed)}"
            dotted = ".".join(str(p) for p in (prefix, *loc))
            details.append(InitErrorDetails(
                type=PydanticCustomError("unknown_key", "unknown key '{key}'{hint}", {"key": dotted, "hint": hint}),
                loc=loc, input=item["input"]))
        else:
            details.append(InitErrorDetails(
                type=PydanticCustomError("protocol_params", "{msg}", {"msg": item["msg"]}),
                loc=loc, input=item.get("input")))
    return details
