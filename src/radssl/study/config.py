"""The study configuration: which encoders, label budgets, seeds, protocols and test sets a grid compares.

One YAML file describes a whole label-efficiency study (``radssl study study.yaml``). It is validated like every
radssl config (unknown keys are errors that name the key; ``key=value`` overrides are applied before
validation). Checks that need only the file run here; checks that need the data (classes per split, label
fractions, checkpoint files) run in :func:`radssl.study.plan.prepare_study`, still before any training.

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
    protocols: {linear: {}, knn: {k: 20}, finetune: {epochs: 30}}   # any registered protocol, with its params
    validation: proportional        # or full (see StudyConfig)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from radssl.config import (
    DataSection,
    MedMNISTData,
    MethodSection,
    ModelSection,
    OptimSection,
    Section,
    TrainSection,
    ViewsSection,
    apply_overrides,
    format_validation_error,
    preset_view_policy,
    read_yaml_mapping,
)
from radssl.errors import ConfigError
from radssl.models.foundation_weights import parse_foundation
from radssl.transfer.protocols import PROTOCOLS, build_protocol, protocol_class, protocol_names, validate_protocols

INIT_KINDS = ("random", "imagenet", "timm", "hf", "torchvision", "monai", "ssl", "imagenet+ssl")
"""Initialisation kinds, in the order the report draws them."""

FOUNDATION_KINDS = ("timm", "hf", "torchvision", "monai")
"""Initialisations from foundation weights in local files (no pretraining run; see radssl.transfer.foundation)."""

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


def _check_entry_name(value: str, field: str, what: str, example: str) -> str:
    """A list entry's name: plain (:func:`_check_name`) and none of the names the grid itself uses."""
    _check_name(value, field)
    if value in _RESERVED_NAMES:
        raise ValueError(f"{what} name '{value}' is reserved; choose another (e.g. '{example}')")
    return value


# --------------------------------------------------------------------------------------------- sections
class ExternalTestSet(Section):
    """A test set from another site or file: every row of ``data`` is treated as a test case."""

    name: str
    data: DataSection

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return _check_entry_name(value, "external_test_sets.name", "external test set", "site2")


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

    @model_validator(mode="before")
    @classmethod
    def _preset_policy(cls, raw: Any) -> Any:
        """Validate the views keys against the policy the method's preset chooses, as ``radssl pretrain`` does."""
        return preset_view_policy(raw)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return _check_entry_name(value, "pretraining.name", "pretraining", "simclr")

    @model_validator(mode="after")
    def _no_own_fraction(self) -> "PretrainingRun":
        if "pretrain_fraction" in self.train.model_fields_set:
            raise ValueError(
                f"pretraining '{self.name}': set the study's pretrain_fractions list instead of train.pretrain_fraction"
            )
        return self


class ProtocolsSection(BaseModel):
    """Which read-outs run, with their options: protocol name → that protocol's ``Params`` (validated by it).

    Names come from the protocol registry (:data:`radssl.transfer.protocols.PROTOCOLS`: linear, knn, finetune,
    zero_shot, segmentation_frozen, segmentation_finetune, and any registered later); unknown names and unknown
    keys are errors naming them. ``protocols: [linear, knn]`` is shorthand for ``{linear: {}, knn: {}}``; an entry
    with no value (``linear:``) runs with defaults; ``false`` (or leaving it out) does not run it. Attribute access
    gives a protocol's params or None: ``config.protocols.finetune.epochs``.
    """

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _validate(cls, value: Any) -> Any:
        if isinstance(value, ProtocolsSection):
            return value.model_dump()
        if isinstance(value, (list, tuple)):
            value = {str(name): {} for name in value}
        if not isinstance(value, dict):
            raise ValueError("protocols must map protocol names to their options (or list protocol names)")
        # `linear:` with no value in YAML means "run it with defaults"; `false` switches a protocol off.
        value = {str(k): ({} if v is None else v) for k, v in value.items()}
        validated = validate_protocols(value)
        if not any(p is not None for p in validated.values()):
            raise ValueError(f"enable at least one protocol: {', '.join(protocol_names())}")
        return validated

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # type: ignore[misc]
        except AttributeError:
            if name in PROTOCOLS:  # a registered protocol that is not enabled
                return None
            raise

    @model_serializer(mode="plain")
    def _dump(self) -> dict[str, Any]:
        return {name: params.model_dump(mode="json") for name, params in self.enabled().items()}

    def enabled(self) -> dict[str, Any]:
        """Enabled protocols by name: frozen-feature ones first (cheap, sharing one feature extraction), then
        the others, in registry order."""
        entries = {n: p for n, p in (self.model_extra or {}).items() if p is not None}
        order = {name: i for i, name in enumerate(PROTOCOLS)}
        return dict(sorted(entries.items(), key=lambda kv: (not protocol_class(kv[0]).frozen_features,
                                                            order.get(kv[0], len(order)))))

    def build(self) -> dict[str, Any]:
        """Enabled protocols as :class:`~radssl.transfer.protocols.Protocol` instances, in :meth:`enabled` order."""
        return {name: build_protocol(name, params) for name, params in self.enabled().items()}


class TaskResources(Section):
    """What one task asks of an executor's worker (Ray): CPU cores and GPUs, fractions allowed (GPUs shared)."""

    cpus: float = Field(1.0, gt=0, description="CPU cores per task (also its torch threads unless threads is set)")
    gpus: float = Field(0.0, ge=0, description="GPUs per task; a fraction shares one GPU (e.g. 0.25: four cells)")


class ResourcesSection(Section):
    """Per-task resources of ``radssl study --executor ray`` (the serial executor ignores them)."""

    pretrain: TaskResources = Field(default_factory=TaskResources)
    cell: TaskResources = Field(default_factory=TaskResources)


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
    """``random`` | ``imagenet`` | ``imagenet:<file>`` | ``ssl:<run>`` | ``imagenet+ssl:<run>`` → InitSpec.

    Foundation weights (:mod:`radssl.transfer.foundation`): ``timm:<folder>`` or ``timm:<name>:<file>``,
    ``hf:<folder>``, ``torchvision:<arch>:<file>``, ``monai:<arch>:<file>`` (target: everything after the kind).
    """
    kind, sep, target = str(text).partition(":")
    kind = kind.strip().lower()
    target = target.strip()
    if kind not in INIT_KINDS:
        raise ValueError(
            f"initialisation '{text}': unknown kind '{kind}' — use random, imagenet[:<weights.pth>], "
            "ssl:<pretraining name>, imagenet+ssl:<pretraining name> or foundation weights (timm:<folder>, "
            "hf:<folder>, torchvision:<arch>:<file.pth>, monai:<arch>:<file.pt>)"
        )
    if kind in FOUNDATION_KINDS:
        try:
            parse_foundation(f"{kind}:{target}")
        except ConfigError as error:
            raise ValueError(str(error)) from None
        return InitSpec(kind, target)
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


def foundation_run_name(target: str) -> str:
    """The cell ``pretrain`` name of a foundation initialisation: its folder or file stem (``rad-dino``)."""
    path = Path(target.rsplit(":", 1)[-1] if ":" in target and "/" not in target.split(":", 1)[0] else target)
    stem = path.name if path.suffix == "" else path.stem
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in stem) or "foundation"


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
    protocols: ProtocolsSection = Field(default_factory=lambda: ProtocolsSection.model_validate({"linear": {}}))
    pretrain_fractions: list[float] = Field(default_factory=lambda: [1.0], min_length=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="device of transfer protocols")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (CPU); null = torch default")
    resources: ResourcesSection = Field(default_factory=ResourcesSection,
                                        description="per-task CPUs/GPUs under --executor ray")
    validation: Literal["full", "proportional"] = Field(
        "proportional", description="model-selection rows per cell: the whole validation split, or the same label "
        "fraction of it (stratified, nested, patient-grouped, per seed)")
    validation_min_per_class: int = Field(
        5, gt=0, description="proportional validation: floor of validation images per class (AUC needs both)")
    bootstrap_samples: int = Field(1000, ge=100, description="test-case bootstrap resamples per metric CI")
    feature_batch_size: int = Field(512, gt=0)
    bn_stats: Literal["checkpoint", "reestimate"] = Field(
        "reestimate", description="BatchNorm statistics of every frozen encoder (linear, kNN, frozen segmentation): "
        "re-estimated on the unlabelled training images (the same rule for every initialisation), or the ones the "
        "checkpoint / initialisation comes with (radssl.transfer.bn_stats)")

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
        found = [(s.kind, foundation_run_name(str(s.target))) for s in specs if s.kind in FOUNDATION_KINDS]
        clashing = sorted({f"{kind}({name})" for kind, name in found if found.count((kind, name)) > 1})
        if clashing:
            raise ValueError(f"initialisations: foundation weights give clashing cell names {clashing} (named after "
                             "their folder or file); give each model its own folder/file name")
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
LEGACY_SETTINGS: dict[str, Any] = {"validation": "full", "validation_min_per_class": None, "bn_stats": "checkpoint"}
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
