"""Validated configuration: every YAML key checked, unknown keys rejected with the key's name.

One pydantic model per section. A run's config is loaded from YAML, then ``key.path=value`` overrides from the
command line are applied to the raw mapping *before* validation, so an override is checked exactly like a file
entry. The validated config is written beside every output (and inside every checkpoint) for reproducibility.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from radssl.data.medical import MedicalDataConfig
from radssl.data.slices import SlicesConfig
from radssl.data.synthetic3d import SyntheticVolumeData
from radssl.errors import ConfigError
from radssl.methods.registry import METHODS, method_class, validate_params
from radssl.models.foundation import FOUNDATION_FAMILIES
from radssl.models.foundation_weights import foundation_spec, parse_foundation
from radssl.models.registry import BACKBONE_FAMILIES, backbone_class, make_spec
from radssl.models.spec import BackboneSpec
from radssl.registry import did_you_mean
from radssl.views.augment import AugmentationParams
from radssl.views.pairing import PAIRINGS, PairingParams
from radssl.views.policies import POLICIES, ViewSettings, policy_class


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- data
class MedMNISTData(Section):
    """A MedMNIST ``.npz`` by name (downloaded once through the medmnist catalogue when missing)."""

    source: Literal["medmnist"] = "medmnist"
    name: str = "pneumoniamnist"
    size: int = 28
    root: Path | None = Field(None, description="folder holding the .npz files; default $RADSSL_DATA_DIR or the user cache")
    download: bool = True
    slices: SlicesConfig | None = Field(None, description="read a 3D set's volumes as 2D slices (radssl.data.slices)")

    @model_validator(mode="after")
    def _slices_need_volumes(self) -> "MedMNISTData":
        if self.slices is not None and not self.name.endswith("3d"):
            raise ValueError(f"data.slices needs a 3D MedMNIST set (a name ending in '3d'); '{self.name}' is 2D")
        return self


class SyntheticData(Section):
    """The embedded procedural radiograph-like dataset (synthetic; for demos and tests, offline)."""

    source: Literal["synthetic"] = "synthetic"
    n_patients: int = Field(400, gt=0)
    images_per_patient: int = Field(4, gt=0)
    image_size: int = Field(64, ge=16, le=512)
    positive_rate: float = Field(0.5, gt=0.0, lt=1.0)
    site: int = Field(0, ge=0)
    finding_contrast: float | None = Field(None, ge=0.0, description="strength of the diagnostic finding; null = generator default")
    data_seed: int = 0
    reports: bool = Field(False, description="also write a short report per image (for image–text methods); "
                                             "the images are the same either way")
    masks: bool = Field(False, description="also draw the finding's segmentation mask per image (0 background, "
                                           "1 finding; for segmentation); the images are the same either way")


class FilesData(MedicalDataConfig):
    """A user's own files: DICOM, NIfTI or an image folder (+ CSV), preprocessed once into a cache.

    ``source`` is then a mapping with ``kind: dicom | nifti | folder`` (see ``radssl.data.medical``).
    """

    name: str = "dataset"
    slices: SlicesConfig | None = Field(None, description="read volumes (NIfTI, DICOM series) as 2D slices "
                                                          "(radssl.data.slices)")


def _data_source_tag(value: Any) -> str:
    """``medmnist`` / ``synthetic`` by name; a mapping under ``source`` describes files; default MedMNIST."""
    source = value.get("source", "medmnist") if isinstance(value, dict) else getattr(value, "source", "medmnist")
    if isinstance(source, (dict, BaseModel)):
        return "files"
    return str(source)


DataSection = Annotated[
    Annotated[MedMNISTData, Tag("medmnist")]
    | Annotated[SyntheticData, Tag("synthetic")]
    | Annotated[SyntheticVolumeData, Tag("synthetic3d")]
    | Annotated[FilesData, Tag("files")],
    Discriminator(_data_source_tag),
]


# ---------------------------------------------------------------------------------------------- model
class ModelSection(Section):
    """The encoder: a registered backbone family plus the knobs of its spec (see ``radssl.models``).

    ``weights`` starts from foundation weights in a local file or folder (``timm:…``, ``hf:…``,
    ``torchvision:<arch>:…``, ``monai:<arch>:…``; :mod:`radssl.transfer.foundation`): the backbone is then that
    model, built from the weights' own config (``backbone`` is set to the library's family), and pretraining
    continues SSL from those weights. ``options`` may then only override ``input_size``.
    """

    backbone: str = "resnet18"
    small_input: bool | None = Field(None, description="3×3 stride-1 stem for ≤64 px images; null = automatic")
    patch_size: int | None = Field(None, gt=0, description="ViT patch size; null = automatic from the image size")
    options: dict[str, Any] = Field(default_factory=dict, description="family-specific options, e.g. {width: 32}")
    weights: str | None = Field(None, description="foundation weights to start from: timm:<folder>, hf:<folder>, "
                                "torchvision:<arch>:<file.pth> or monai:<arch>:<file.pt> (local files only)")

    @model_validator(mode="before")
    @classmethod
    def _family_from_weights(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or not raw.get("weights"):
            return raw

        try:
            kind = parse_foundation(str(raw["weights"])).kind
        except ConfigError as error:
            raise ValueError(str(error)) from None
        given = raw.get("backbone")
        if given not in (None, kind):
            raise ValueError(f"backbone '{given}' conflicts with weights '{raw['weights']}' — the architecture comes "
                             f"from the weights: leave backbone out (or set it to '{kind}')")
        extra = sorted(set(raw.get("options") or {}) - {"input_size"})
        if extra:
            raise ValueError(f"options {extra} cannot be set with weights (the weights' config fixes the "
                             "architecture); only input_size may be overridden")
        return {**raw, "backbone": kind}

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONE_FAMILIES:
            raise ValueError(f"unknown backbone '{value}'; choose one of {sorted(BACKBONE_FAMILIES)}")
        return value

    @model_validator(mode="after")
    def _valid_options(self) -> "ModelSection":
        if self.weights:
            return self
        if self.backbone in FOUNDATION_FAMILIES:
            raise ValueError(f"backbone '{self.backbone}' is built from foundation weights — set model.weights "
                             f"(e.g. '{self.backbone}:/path/to/model') instead of the backbone name")
        backbone_class(self.backbone).Options(**self.options)  # unknown option keys are errors naming the key
        return self

    def spec_for(self, in_channels: int, image_size: tuple[int, ...]) -> BackboneSpec:
        """The resolved spec for data of ``in_channels`` channels and spatial size ``image_size``."""
        if self.weights:
            return foundation_spec(self.weights, in_channels, tuple(image_size), self.options.get("input_size"))
        try:
            return make_spec(self.backbone, in_channels, tuple(image_size), self.small_input, self.patch_size,
                             spatial_dims=len(image_size), options=self.options)
        except ValueError as error:
            raise ConfigError(f"model: {error}") from None


class MethodSection(BaseModel):
    """``name`` plus that method's own hyper-parameters (validated by the method's ``Params`` model)."""

    model_config = ConfigDict(extra="allow")

    name: str = "simclr"
    preset: bool = Field(True, description="fill views/optim/method keys you leave out from the method's radiology preset")

    @model_validator(mode="after")
    def _validate_params(self) -> "MethodSection":
        if self.name not in METHODS:
            raise ValueError(f"unknown method '{self.name}'; choose one of {sorted(METHODS)}")
        validate_params(self.name, self.params())
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ViewsSection(AugmentationParams):
    """Which view policy (``policy``), its own keys, the augmentation ranges, the view size and the pairing.

    Extra keys are the policy's own parameters, validated by the policy's ``Params`` model (e.g. multi-crop sizes).
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    policy: str = "two_view"
    output_size: int | None = Field(None, ge=8)
    pairing: PairingParams = Field(default_factory=PairingParams)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown view policy '{value}'; choose one of {sorted(POLICIES)}")
        return value

    @field_validator("pairing")
    @classmethod
    def _known_pairing(cls, value: PairingParams) -> PairingParams:
        if value.kind not in PAIRINGS:
            raise ValueError(f"unknown pairing '{value.kind}'; choose one of {sorted(PAIRINGS)}")
        return value

    @model_validator(mode="after")
    def _policy_params(self) -> "ViewsSection":
        policy_class(self.policy).Params(**self.policy_params())
        return self

    def policy_params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def augmentation(self) -> AugmentationParams:
        return AugmentationParams(**{name: getattr(self, name) for name in AugmentationParams.model_fields})

    def settings(self) -> ViewSettings:
        return ViewSettings(policy=self.policy, augment=self.augmentation(), pairing=self.pairing,
                            params=self.policy_params())


class OptimSection(Section):
    optimizer: Literal["sgd", "lars", "adamw"] = "lars"
    lr: float = Field(0.3, gt=0.0, description="base learning rate for a global batch of 256 (linear scaling)")
    lr_scaling: Literal["linear", "none"] = "linear"
    weight_decay: float = Field(1e-6, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    betas: tuple[float, float] = (0.9, 0.999)


class TrainSection(Section):
    steps: int | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0.0)
    batch_size: int = Field(256, gt=1, description="per-device batch size")
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"] = "auto"
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed"] = "32-true"
    sync_batchnorm: bool = True
    channels_last: bool = True
    compile: bool = False
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (CPU); null = torch default")
    checkpoint_every: int = Field(200, gt=0)
    log_every: int = Field(10, gt=0)
    progress_bar: bool = True
    pretrain_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of the pretraining images used")
    clip_grad: float | None = Field(None, gt=0.0, description="clip the gradients' global L2 norm to this value before "
                                                              "each optimiser step (Fabric clip_gradients); null = off")
    device_cache: Literal["auto", "always", "never"] = Field(
        "auto", description="always: the pretraining images sit on the device (resident); never: each step's rows are "
                            "read from the store (memory-mapped cache) into pinned memory (streamed); auto: resident "
                            "when they fit device_cache_budget_gb, else streamed. Never changes a result")
    device_cache_budget_gb: float | None = Field(
        None, gt=0.0, description="auto: the most GB the resident images may take; null = half the free device "
                                  "memory (available RAM on CPU)")
    prefetch: bool = Field(True, description="build the next step's views (gather, augment, normalise) while the "
                                             "current step computes: a background thread, a side CUDA stream on GPU")
    prefetch_threads: int = Field(1, gt=0, description="torch intra-op threads of the prefetch thread on CPU (the "
                                                       "model keeps train.threads)")

    @model_validator(mode="after")
    def _length(self) -> "TrainSection":
        if self.steps is None and self.epochs is None:
            self.epochs = 10.0
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set either train.steps or train.epochs, not both")
        return self


class EvalSection(Section):
    enabled: bool = True
    knn_k: int = Field(20, gt=0)
    knn_temperature: float = Field(0.07, gt=0.0)
    compare_random: bool = Field(True, description="also evaluate a random-init backbone, as the baseline")


PRESET_SECTIONS = ("views", "optim", "method", "train")


def merge_method_preset(raw: Any) -> Any:
    """Fill ``views``/``optim``/``method``/``train`` keys the user left out from the method's radiology preset (user keys win).

    Applied to raw mappings before validation (pretraining configs and a study's pretraining entries), so the
    validated, recorded config shows the values actually used. ``method.preset: false`` turns it off.
    """
    if not isinstance(raw, dict):
        return raw
    method = raw.get("method") or {}
    if not isinstance(method, dict) or method.get("preset", True) is False:
        return raw

    name = method.get("name", "simclr")
    if name not in METHODS:
        return raw  # the method validator reports the unknown name
    preset = method_class(name).preset
    merged = dict(raw)
    for section in PRESET_SECTIONS:
        defaults = dict(preset.get(section) or {})
        given = raw.get(section)
        if section == "views" and isinstance(given, dict) and "policy" in given \
                and given["policy"] != defaults.get("policy", "two_view"):
            # The user chose another view policy: the preset's keys that belong to its own policy do not apply.
            defaults = {k: v for k, v in defaults.items() if k in ViewsSection.model_fields and k != "policy"}
        if section == "optim" and isinstance(given, dict) and "optimizer" in given \
                and given["optimizer"] != defaults.get("optimizer", given["optimizer"]):
            # The user chose another optimiser: the preset's momentum, schedule and decay were tuned with its own
            # optimiser and do not carry over (e.g. SGD's momentum 0 would silently reach a LARS config).
            defaults = {}
        if defaults and (given is None or isinstance(given, dict)):
            merged[section] = {**defaults, **(given or {})}
    return merged


def preset_view_policy(raw: Any) -> Any:
    """A pretraining mapping whose ``views`` name keys of a view policy but no ``policy``: the preset's policy added.

    Which views keys are valid depends on the policy (``tokenizer`` belongs to ``image_text``), and a method's
    preset may choose the policy (ConVIRT and CLIP: ``image_text``). :class:`PretrainConfig` merges the whole preset
    before validating; a study's ``pretraining`` entry keeps only the keys the user wrote (the engine merges the
    preset again when it runs), so it takes just the policy — and only where the user's keys need it, so entries
    that validated before are recorded unchanged (resumed studies compare recorded entries).
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("views"), dict) or "policy" in raw["views"]:
        return raw
    if not set(raw["views"]) - set(ViewsSection.model_fields):
        return raw
    policy = (merge_method_preset({"method": raw.get("method") or {}, "views": {}}).get("views") or {}).get("policy")
    if policy is None:
        return raw
    return {**raw, "views": {"policy": policy, **raw["views"]}}


class PretrainConfig(Section):
    """Everything ``radssl pretrain`` needs."""

    seed: int = 0
    output_dir: Path = Path("runs/pretrain")
    data: DataSection = Field(default_factory=MedMNISTData)
    model: ModelSection = Field(default_factory=ModelSection)
    method: MethodSection = Field(default_factory=MethodSection)
    views: ViewsSection = Field(default_factory=ViewsSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, raw: Any) -> Any:
        return merge_method_preset(raw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain mapping (paths as strings): what checkpoints and result folders record."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------- loading
def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{text}' has an empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested mapping, in place."""
    for text in overrides:
        parts, value = _parse_override(text)
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _union_members(annotation: Any) -> list[Any]:
    """Pydantic models inside an annotation (unwrapping Annotated, unions and Optional)."""
    args = getattr(annotation, "__args__", None)
    if hasattr(annotation, "model_fields"):
        return [annotation]
    if not args:
        return []
    return [m for a in args for m in _union_members(a)]


def _source_tag_of(model: Any) -> str:
    """The tag a union member is selected by: its ``source`` or ``kind`` default, else ``files``."""
    for name in ("source", "kind"):
        field = model.model_fields.get(name)
        if field is not None and isinstance(field.default, str):
            return field.default
    return "files"


def _raw_at(raw: Any, location: tuple[Any, ...]) -> Any:
    """The raw mapping (or value) at a pydantic location, list indices included; None where it leaves the input."""
    node = raw
    for part in location:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return None
    return node


def _allowed_keys(model: type[BaseModel], location: tuple[Any, ...], raw: dict[str, Any]) -> list[str]:
    """Field names valid at ``location`` (a raw pydantic location, list indices and union tags included)."""
    current = _section_model(model, location)
    if current is None:
        return []
    keys = set(getattr(current, "model_fields", {}))
    section = _raw_at(raw, location[:-1])  # the mapping holding this section (the file, or one list entry)
    section = section if isinstance(section, dict) else {}
    if current is MethodSection:  # the method's own hyper-parameters are allowed keys too
        name = (section.get("method") or {}).get("name", "simclr")
        if name in METHODS:
            keys |= set(method_class(name).Params.model_fields)
    if current is ViewsSection:  # and the view policy's own keys
        name = (section.get("views") or {}).get("policy", "two_view")
        if name in POLICIES:
            keys |= set(policy_class(name).Params.model_fields)
    return sorted(keys)


def _owner_hint(model: Any, key: str) -> str:
    """Where an unknown views/method key does belong: the view policies (and the methods whose preset picks one)
    or the methods that define it — the usual cause is a key of another policy or method."""
    if model is ViewsSection:
        policies = sorted(name for name in POLICIES if key in policy_class(name).Params.model_fields)
        if not policies:
            return ""
        by_preset = sorted(m for m in METHODS if (method_class(m).preset.get("views") or {}).get("policy") in policies)
        presets = f" (the preset of method {', '.join(by_preset)})" if by_preset else ""
        return f" — '{key}' is a key of view policy {' / '.join(policies)}: set policy: {policies[0]}{presets}"
    if model is MethodSection:
        methods = sorted(name for name in METHODS if key in method_class(name).Params.model_fields)
        return f" — '{key}' is a parameter of method {', '.join(methods)}" if methods else ""
    return ""


def _section_model(model: type[BaseModel], location: tuple[Any, ...]) -> Any:
    """The section model at ``location`` (ViewsSection, MethodSection, ...); None where the location leaves it."""
    current: Any = model
    parts = [p for p in location if not isinstance(p, int)]
    while parts:
        fields = getattr(current, "model_fields", {})
        part = parts.pop(0)
        if part not in fields:
            return None
        members = _union_members(fields[part].annotation)
        if len(members) > 1 and parts:
            tag = parts.pop(0)
            members = [m for m in members if _source_tag_of(m) == tag]
        if not members:
            return None
        current = members[0]
    return current


def _entry_label(raw: dict[str, Any], location: tuple[Any, ...]) -> str:
    """`` [pretraining entry 'convirt']`` for a location inside a list of named entries ('' elsewhere)."""
    labels = []
    for i, part in enumerate(location):
        if isinstance(part, int) and i > 0:
            entry = _raw_at(raw, location[: i + 1])
            name = entry.get("name") if isinstance(entry, dict) else None
            labels.append(f"{location[i - 1]} entry " + (f"'{name}'" if name else f"#{part}"))
    return f" [{', '.join(labels)}]" if labels else ""


def format_validation_error(error: ValidationError, source: str, model: type[BaseModel], raw: dict[str, Any]) -> str:
    """Readable, one line per problem: file, dotted key, what is wrong, close valid keys, and which list entry."""
    lines = [f"{source}: invalid configuration"]
    tags = {"medmnist", "synthetic", "synthetic3d", "files", "dicom", "nifti", "folder"}
    for item in error.errors():
        location = tuple(p if isinstance(p, int) else str(p) for p in item["loc"])
        shown = tuple(p for p in location if not isinstance(p, int) and p not in tags)  # union tags are noise
        key = ".".join(shown) or "<root>"
        entry = _entry_label(raw, tuple(p for p in location if p not in tags))
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, location[:-1], raw)
            owner = _owner_hint(_section_model(model, location[:-1]), str(location[-1]))
            hint = did_you_mean(str(location[-1]), allowed) or (
                owner or (f" — allowed: {', '.join(allowed)}" if allowed else ""))
            line = f"  unknown key '{key}'{hint}{entry}"
        else:
            line = f"  {key}: {item['msg']}{entry}"
        if line not in lines:  # one problem, one line (pydantic may report a union's member twice)
            lines.append(line)
    return "\n".join(lines)


def read_yaml_mapping(path: Path | None, what: str = "sections") -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for ``None``); ConfigError naming the file otherwise."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {what}, got {type(loaded).__name__}")
    return loaded


def load_config(
    path: Path | None, overrides: list[str] | None = None, model: type[BaseModel] = PretrainConfig
) -> Any:
    """Load YAML (or defaults when ``path`` is None), apply overrides, validate; ConfigError on any problem."""
    source = str(path) if path else "<defaults>"
    raw = read_yaml_mapping(path)
    apply_overrides(raw, overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source, model, raw)) from None


def dump_config(config: BaseModel) -> str:
    """YAML text of a validated config (what is written beside outputs)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
