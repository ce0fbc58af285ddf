"""The study configuration: which encoders, label budgets, seeds, protocols and test sets a grid compares.

One YAML file describes a whole label-efficiency study (``radssl study study.yaml``). It is validated like every
radssl config (unknown keys are errors that name the key; ``key=value`` overrides are applied before
validation). Checks that need only the file run here; checks that need the data (classes per split, label
fractions, checkpoint files) run in :func:`radssl.study.grid.prepare_study`, still before any training.

Example::

    name: pneumonia-ssl
    data: {source: medmnist, name: pneumoniamnist}
    model: {backbone: resnet18, small_input: true}
    pretraining:
      - name: simclr
        method: {name: simclr, temperature: 0.2}
        train: {epochs: 100, batch_size: 256}
    initialisations: [random, ssl:simclr]
    label_fractions: [0.01, 0.1, 1.0]
    seeds: [0, 1, 2]
    protocols: {linear: {}, knn: {k: 20}, finetune: {epochs: 30}}
    validation: proportional        # or full (see StudyConfig)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from radssl.config import (
    DataSection,
    MedMNISTData,
    MethodSection,
    ModelSection,
    OptimSection,
    Section,
    TrainSection,
    ViewsSection,
)
from radssl.errors import ConfigError

INIT_KINDS = ("random", "imagenet", "ssl", "imagenet+ssl")
"""Initialisation kinds, in the order the report draws them."""

INTERNAL_TEST_SET = "test"
"""Cell test-set name of the internal test split (external sets use their own ``name``)."""

NO_PRETRAINING = "none"
"""Cell ``pretrain`` value of encoders that come from no pretraining run (random, ImageNet)."""

_RESERVED_NAMES = {INTERNAL_TEST_SET, NO_PRETRAINING, "val", "train", "unlabelled"}


def _check_name(value: str, what: str) -> str:
    """Names become cell-key parts and folder names: keep them plain."""
    if not value or not value.strip():
        raise ValueError(f"{what} must not be empty")
    bad = sorted({c for c in value if not (c.isalnum() or c in "-_.")})
    if bad:
        raise ValueError(f"{what} '{value}' may only hold letters, digits, '-', '_' and '.' (found {bad})")
    return value


# --------------------------------------------------------------------------------------------- sections
class ExternalTestSet(Section):
    """A test set from another site or file: every row of ``data`` is treated as a test case."""

    name: str
    data: DataSection

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        _check_name(value, "external_test_sets.name")
        if value in _RESERVED_NAMES:
            raise ValueError(f"external test set name '{value}' is reserved; choose another (e.g. 'site2')")
        return value


class PretrainingRun(Section):
    """One SSL pretraining run shared by every cell that uses it (``ssl:<name>`` / ``imagenet+ssl:<name>``).

    Sections are those of :class:`radssl.config.PretrainConfig`; ``seed``, ``data`` and ``output_dir`` come from
    the study, ``model`` defaults to the study's ``model`` and ``train.pretrain_fraction`` comes from the study's
    ``pretrain_fractions`` axis.
    """

    name: str
    method: MethodSection = Field(default_factory=MethodSection)
    model: ModelSection | None = Field(None, description="default: the study's model section")
    views: ViewsSection = Field(default_factory=ViewsSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        _check_name(value, "pretraining.name")
        if value in _RESERVED_NAMES:
            raise ValueError(f"pretraining name '{value}' is reserved; choose another (e.g. 'simclr')")
        return value

    @model_validator(mode="after")
    def _no_own_fraction(self) -> "PretrainingRun":
        if "pretrain_fraction" in self.train.model_fields_set:
            raise ValueError(
                f"pretraining '{self.name}': set the study's pretrain_fractions list instead of train.pretrain_fraction"
            )
        return self


class LinearProtocol(Section):
    """Logistic regression on frozen features; C chosen on the validation split's AUC."""

    Cs: list[float] = Field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], min_length=1)
    max_iter: int = Field(1000, gt=0)

    @field_validator("Cs")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(c <= 0 for c in values):
            raise ValueError("every C must be > 0")
        return values


class KnnProtocol(Section):
    """Similarity-weighted kNN on frozen features (Wu et al. 2018)."""

    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0.0)


class FinetuneProtocol(Section):
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

    epochs: int = Field(30, gt=0)
    steps_per_epoch: Literal["full", "subset"] | int = Field(
        "full", description="full | subset | N: optimiser steps per epoch (see the budget rule)")
    min_epochs: int = Field(5, gt=0, description="early stopping never stops before this epoch (floor)")
    batch_size: int = Field(128, gt=1)
    lr: float = Field(1e-3, gt=0.0)
    backbone_lr_scale: list[float] = Field(
        default_factory=lambda: [0.1, 1.0], min_length=1,
        description="backbone LR multiplier for every initialisation; a list is chosen per cell on validation")
    weight_decay: float = Field(1e-4, ge=0.0)
    early_stopping_patience: int | None = Field(10, gt=0)
    augment: bool = True
    hflip: bool = True
    class_balanced: bool = False
    precision: Literal["32", "bf16"] = "32"

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

    @field_validator("backbone_lr_scale", mode="before")
    @classmethod
    def _scale_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("backbone_lr_scale")
    @classmethod
    def _positive_scales(cls, values: list[float]) -> list[float]:
        if any(v <= 0 for v in values):
            raise ValueError(f"every backbone_lr_scale must be > 0, got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"backbone_lr_scale candidates must not repeat, got {values}")
        return values

    @field_validator("steps_per_epoch")
    @classmethod
    def _positive_steps(cls, value: str | int) -> str | int:
        if isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise ValueError(f"steps_per_epoch must be 'full', 'subset' or an integer ≥ 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _floor_within_epochs(self) -> "FinetuneProtocol":
        if "min_epochs" in self.model_fields_set and self.min_epochs > self.epochs:
            raise ValueError(f"min_epochs ({self.min_epochs}) is larger than epochs ({self.epochs}); lower it")
        return self

    @property
    def early_stopping_floor(self) -> int:
        """``min_epochs`` capped at ``epochs`` (the default floor must not break a short run)."""
        return min(self.min_epochs, self.epochs)


class ProtocolsSection(Section):
    """Which read-outs run, with their options; a protocol left out (or null) does not run.

    ``protocols: [linear, knn]`` is shorthand for ``{linear: {}, knn: {}}``.
    """

    linear: LinearProtocol | None = None
    knn: KnnProtocol | None = None
    finetune: FinetuneProtocol | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            unknown = [v for v in value if v not in ("linear", "knn", "finetune")]
            if unknown:
                raise ValueError(f"unknown protocol(s) {unknown}; choose from linear, knn, finetune")
            return {name: {} for name in value}
        if isinstance(value, dict):  # `linear:` with no value in YAML means "run it with defaults"
            return {k: ({} if v is None and k in ("linear", "knn", "finetune") else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _at_least_one(self) -> "ProtocolsSection":
        if not self.enabled():
            raise ValueError("enable at least one protocol: linear, knn or finetune")
        return self

    def enabled(self) -> dict[str, Section]:
        """Enabled protocols by name, frozen-feature ones first (they are cheap and share features)."""
        return {n: p for n in ("linear", "knn", "finetune") if (p := getattr(self, n)) is not None}


# ------------------------------------------------------------------------------------------ initialisations
@dataclass(frozen=True)
class InitSpec:
    """A parsed ``initialisations`` entry: ``kind`` plus a weights path (imagenet) or pretraining name (ssl)."""

    kind: str
    target: str | None = None

    @property
    def text(self) -> str:
        return self.kind if self.target is None else f"{self.kind}:{self.target}"


def parse_initialisation(text: str) -> InitSpec:
    """``random`` | ``imagenet`` | ``imagenet:<file>`` | ``ssl:<run>`` | ``imagenet+ssl:<run>`` → InitSpec."""
    kind, sep, target = str(text).partition(":")
    kind = kind.strip().lower()
    target = target.strip()
    if kind not in INIT_KINDS:
        raise ValueError(
            f"initialisation '{text}': unknown kind '{kind}' — use random, imagenet[:<weights.pth>], "
            "ssl:<pretraining name> or imagenet+ssl:<pretraining name>"
        )
    if kind == "random":
        if target:
            raise ValueError(f"initialisation '{text}': 'random' takes nothing after it")
        return InitSpec("random")
    if kind == "imagenet":
        return InitSpec("imagenet", target or None)
    if not target:
        raise ValueError(
            f"initialisation '{text}': '{kind}:' needs the name of a pretraining run, e.g. '{kind}:simclr'"
        )
    return InitSpec(kind, target)


def is_checkpoint_path(target: str | None) -> bool:
    """An ``ssl:`` target that is a file path (an existing pretraining run) rather than a run name."""
    return bool(target) and (target.endswith((".pt", ".pth", ".ckpt")) or "/" in target or "\\" in target)


def checkpoint_run_name(target: str) -> str:
    """The cell ``pretrain`` name of an external checkpoint: its run folder (``<run>/checkpoints/final.pt``)."""
    path = Path(target)
    stem = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
    cleaned = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in stem) or "checkpoint"
    return cleaned


# ------------------------------------------------------------------------------------------------- study
class StudyConfig(Section):
    """Everything ``radssl study`` needs: a grid of {pretraining × init × fraction × seed × protocol × test set}.

    Validation rule (``validation``), i.e. which labelled rows select the probe's C and the fine-tuning epoch
    and backbone LR scale:

    - ``proportional`` (default): the same label fraction of the validation split, drawn like the training
      subsets (stratified, nested, patient-grouped, per seed, an independent stream of the same seed), with a
      floor of ``validation_min_per_class`` images per class so AUC is defined. A team with 1 % of the labels
      has about 1 % of the validation labels too; selecting on the full split (524 images for 48 training
      images on PneumoniaMNIST at 1 %) reports a result no such team could reproduce and flatters the arm
      whose read-out depends most on selection.
    - ``full``: the whole validation split for every fraction (lower-variance selection; an upper bound on
      what selection can do at small budgets). The report states which rule was used.
    """

    name: str = "study"
    seed: int = Field(0, description="seed of pretraining runs and of the random initialisation")
    output_dir: Path = Path("runs/study")
    data: DataSection = Field(default_factory=MedMNISTData)
    external_test_sets: list[ExternalTestSet] = Field(default_factory=list)
    model: ModelSection = Field(default_factory=ModelSection)
    pretraining: list[PretrainingRun] = Field(default_factory=list)
    initialisations: list[str] = Field(default_factory=lambda: ["random"], min_length=1)
    imagenet_weights: Path | None = Field(
        None, description="torchvision ResNet ImageNet .pth used by 'imagenet' and 'imagenet+ssl:<run>'"
    )
    require_imagenet: bool = Field(
        True, description="false: drop imagenet inits (with a note) when imagenet_weights is null"
    )
    label_fractions: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    protocols: ProtocolsSection = Field(default_factory=lambda: ProtocolsSection(linear=LinearProtocol()))
    pretrain_fractions: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="device of transfer protocols")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (CPU); null = torch default")
    validation: Literal["full", "proportional"] = Field(
        "proportional", description="model-selection rows per cell: the whole validation split, or the same label "
        "fraction of it (stratified, nested, patient-grouped, per seed)")
    validation_min_per_class: int = Field(
        5, gt=0, description="proportional validation: floor of validation images per class (AUC needs both)")
    bootstrap_samples: int = Field(1000, ge=100, description="test-case bootstrap resamples per metric CI")
    feature_batch_size: int = Field(512, gt=0)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return _check_name(value, "name")

    @field_validator("label_fractions", "pretrain_fractions")
    @classmethod
    def _fractions(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0.0 < v <= 1.0]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        if len(set(values)) != len(values):
            raise ValueError(f"fractions must not repeat, got {values}")
        return sorted(values)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values):
            raise ValueError(f"seeds must not repeat, got {values}")
        return values

    @field_validator("initialisations")
    @classmethod
    def _parse_inits(cls, values: list[str]) -> list[str]:
        parsed = [parse_initialisation(v) for v in values]  # ValueError → readable config error
        texts = [p.text for p in parsed]
        if len(set(texts)) != len(texts):
            raise ValueError(f"initialisations must not repeat, got {values}")
        return texts

    @model_validator(mode="after")
    def _cross_checks(self) -> "StudyConfig":
        names = [run.name for run in self.pretraining]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"pretraining names must be unique; repeated: {duplicates}")
        external = [t.name for t in self.external_test_sets]
        duplicates = sorted({n for n in external if external.count(n) > 1})
        if duplicates:
            raise ValueError(f"external_test_sets names must be unique; repeated: {duplicates}")
        specs = self.init_specs(include_optional=True)
        for spec in specs:
            if spec.kind == "ssl" and spec.target not in names and not is_checkpoint_path(spec.target):
                raise ValueError(
                    f"initialisations: '{spec.text}' names no pretraining run — known runs: {names or 'none'}; "
                    f"add a pretraining entry named '{spec.target}', or give a checkpoint path ending in .pt"
                )
            if spec.kind == "imagenet+ssl" and spec.target not in names:
                raise ValueError(
                    f"initialisations: '{spec.text}' names no pretraining run — known runs: {names or 'none'}; "
                    f"add a pretraining entry named '{spec.target}' (it is continued from the ImageNet weights)"
                )
        if sum(s.kind == "imagenet" for s in specs) > 1:
            raise ValueError("initialisations: list at most one 'imagenet' entry (cells would share one name)")
        external = [checkpoint_run_name(s.target) for s in specs if s.kind == "ssl" and s.target not in names]
        clashes = sorted({n for n in external if external.count(n) > 1 or n in names})
        if clashes:
            raise ValueError(f"initialisations: checkpoint paths give clashing run names {clashes}; "
                             "put each checkpoint in its own run folder")
        if self.require_imagenet:
            for spec in self.init_specs():
                if spec.kind in ("imagenet", "imagenet+ssl") and self.imagenet_file(spec) is None:
                    raise ValueError(
                        f"initialisations: '{spec.text}' needs ImageNet weights — set imagenet_weights to the "
                        "torchvision .pth file (e.g. resnet18-f37072fd.pth), or set require_imagenet: false to "
                        "skip ImageNet initialisations when no file is configured"
                    )
        return self

    # ------------------------------------------------------------------------------------------------ helpers
    def init_specs(self, include_optional: bool = False) -> list[InitSpec]:
        """Parsed initialisations; ImageNet ones are dropped when no weights are configured and not required."""
        specs = [parse_initialisation(text) for text in self.initialisations]
        if include_optional or self.require_imagenet or self.imagenet_weights is not None:
            return specs
        return [s for s in specs if not (s.kind == "imagenet+ssl" or (s.kind == "imagenet" and not s.target))]

    def dropped_initialisations(self) -> list[str]:
        """Initialisations left out because ImageNet weights are optional and not configured."""
        kept = {s.text for s in self.init_specs()}
        return [s.text for s in self.init_specs(include_optional=True) if s.text not in kept]

    def imagenet_file(self, spec: InitSpec) -> Path | None:
        """The ImageNet weights file an ``imagenet``/``imagenet+ssl`` initialisation uses (None if unset)."""
        if spec.kind == "imagenet" and spec.target:
            return Path(spec.target)
        if self.imagenet_weights is not None:
            return Path(self.imagenet_weights)
        explicit = [s.target for s in self.init_specs(include_optional=True) if s.kind == "imagenet" and s.target]
        return Path(explicit[0]) if explicit else None

    def pretraining_run(self, name: str) -> PretrainingRun:
        for run in self.pretraining:
            if run.name == name:
                return run
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe mapping (what the results store and ``config.yaml`` record)."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------------ stored configs
LEGACY_SETTINGS: dict[str, Any] = {"validation": "full", "validation_min_per_class": None}
"""What a study stored before these fields existed did (radssl ≤ 0.1: the full validation split)."""
LEGACY_FINETUNE: dict[str, Any] = {"steps_per_epoch": "subset", "min_epochs": 1}
"""Fine-tuning options stored before they existed, at the values that reproduce the old behaviour."""


def legacy_study_settings(config: dict[str, Any]) -> dict[str, Any]:
    """A stored study config with fields it predates filled in at the values its cells were computed with.

    Before the budget, validation and one-LR-rule fields existed, fine-tuning ran one pass over the subset per
    epoch, selected on the full validation split and used ``backbone_lr_scale`` for pretrained encoders but
    ``random_backbone_lr_scale`` for random ones. An old config whose two scales agree is the one-value rule.
    """
    out = {**LEGACY_SETTINGS, **config}
    finetune = (config.get("protocols") or {}).get("finetune")
    if isinstance(finetune, dict):
        finetune = {**LEGACY_FINETUNE, **finetune}
        scale = finetune.get("backbone_lr_scale")
        if not isinstance(scale, list):
            random_scale = finetune.get("random_backbone_lr_scale", scale)
            if random_scale == scale:
                finetune.pop("random_backbone_lr_scale", None)
                finetune["backbone_lr_scale"] = [scale]
        out["protocols"] = {**config["protocols"], "finetune": finetune}
    return out


# ------------------------------------------------------------------------------------------------ loading
_NAMED_LISTS = ("pretraining", "external_test_sets")


def apply_named_override(raw: dict[str, Any], text: str) -> bool:
    """Apply ``pretraining.<name>.a.b=value`` (or ``.<index>.``) to that list entry; False if not such a key."""
    from radssl.config import apply_overrides

    key, sep, value = text.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not sep or len(parts) < 3 or parts[0] not in _NAMED_LISTS:
        return False
    entries = raw.get(parts[0])
    if not isinstance(entries, list):
        raise ConfigError(f"override '{text}': the study has no '{parts[0]}' list to change")
    names = [e.get("name") if isinstance(e, dict) else None for e in entries]
    if parts[1] in names:
        entry = entries[names.index(parts[1])]
    elif parts[1].isdigit() and int(parts[1]) < len(entries):
        entry = entries[int(parts[1])]
    else:
        raise ConfigError(f"override '{text}': no {parts[0]} entry named '{parts[1]}' — known: {names}")
    if not isinstance(entry, dict):
        raise ConfigError(f"override '{text}': {parts[0]} entry '{parts[1]}' is not a mapping")
    apply_overrides(entry, [".".join(parts[2:]) + "=" + value])
    return True


def load_study_config(path: Path | str | None, overrides: list[str] | None = None) -> StudyConfig:
    """Load a study YAML (defaults when None), apply overrides, validate; ConfigError naming file and key.

    Besides ``key.path=value`` (as :func:`radssl.config.load_config`), list entries are addressed by name:
    ``pretraining.simclr.train.steps=200``, ``external_test_sets.site2.data.n_patients=50``.
    """
    from pydantic import ValidationError

    from radssl.config import apply_overrides, format_validation_error, read_yaml_mapping

    source = str(path) if path else "<defaults>"
    raw = read_yaml_mapping(path, "study fields")
    if isinstance(raw.get("protocols"), list):  # shorthand → mapping, so `protocols.knn.k=5` can apply
        raw["protocols"] = {str(name): {} for name in raw["protocols"]}
    plain = [text for text in overrides or [] if not apply_named_override(raw, text)]
    apply_overrides(raw, plain)
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source, StudyConfig, raw)) from None
