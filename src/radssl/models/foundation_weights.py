"""Local foundation weights → a spec and a strictly loaded backbone (:mod:`radssl.models.foundation`), offline.

Where the weights come from (never downloaded at run time; a missing file says what to place where):

- ``timm:<folder>``: a timm model folder (``config.json`` with ``architecture``/``model_args``/``pretrained_cfg`` and
  ``model.safetensors`` or ``pytorch_model.bin``, as ``timm.models.save_for_hf`` writes), or
  ``timm:<model name>:<file.pth|.safetensors>`` (architecture and input convention from timm's registry);
- ``hf:<folder>``: a Hugging Face model saved with ``save_pretrained`` (``config.json`` + weights, and the image
  processor's ``preprocessor_config.json`` for size and normalisation). CLIP-style models give their vision tower;
- ``torchvision:<architecture>:<file.pth>`` (any ResNet/ResNeXt/Wide-ResNet, ViT or ConvNeXt torchvision ships;
  size and normalisation from torchvision's weights metadata) or ``torchvision:<folder>`` (a radssl export);
- ``monai:<architecture>:<file.pt>`` (MONAI 3D ResNet state dict; constructor kwargs such as ``shortcut_type`` from
  an optional ``<file>.json``) or ``monai:<folder>`` (a radssl export).

Loading is strict: only the library's classifier / pooler / text-tower keys are dropped (and listed in the
provenance); any other missing, unexpected or mis-shaped key is an error that lists them — never a partial load.
The weights' SHA-256 is recorded beside the spec so outputs say exactly which file they started from.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from radssl.errors import CheckpointError, ConfigError
from radssl.models.base import Backbone
from radssl.models.foundation import FOUNDATION_FAMILIES, MONAI_ARCHITECTURES, torchvision_classifier_keys
from radssl.models.registry import build_from_spec, resolve_spec
from radssl.models.spec import BackboneSpec

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")
INPUT_ADAPTATION = ("grey → model channels by replicating the channel (first layer unchanged), resized to the "
                    "model's input size, normalised with the model's own mean/std")


@dataclass(frozen=True)
class FoundationSource:
    """A parsed foundation initialisation: library, architecture (when named in the string) and path."""

    kind: str
    path: Path
    architecture: str | None = None

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.architecture}:{self.path}" if self.architecture else f"{self.kind}:{self.path}"


def is_foundation(text: str | None) -> bool:
    return bool(text) and str(text).partition(":")[0].strip().lower() in FOUNDATION_FAMILIES


def parse_foundation(text: str) -> FoundationSource:
    """``timm:<folder>`` | ``timm:<name>:<file>`` | ``hf:<folder>`` | ``torchvision:<arch>:<file>`` | … → source."""
    kind, _, rest = str(text).partition(":")
    kind = kind.strip().lower()
    if kind not in FOUNDATION_FAMILIES:
        raise ConfigError(f"initialisation '{text}': '{kind}' is not a foundation library — use one of "
                          f"{', '.join(k + ':' for k in FOUNDATION_FAMILIES)}")
    rest = rest.strip()
    if not rest:
        raise ConfigError(f"initialisation '{text}': '{kind}:' needs a path, e.g. '{kind}:/models/my-model'")
    head, sep, tail = rest.partition(":")
    if sep and "/" not in head and "\\" not in head:
        if kind == "hf":
            raise ConfigError(f"initialisation '{text}': hf takes a model folder ('hf:/models/rad-dino'); the "
                              "architecture comes from its config.json")
        if not tail:
            raise ConfigError(f"initialisation '{text}': '{kind}:{head}:' needs a weights file after the name")
        return FoundationSource(kind, Path(tail), head)
    if kind in ("torchvision", "monai") and rest.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ConfigError(f"initialisation '{text}': a {kind} state dict does not say its architecture — write "
                          f"'{kind}:<architecture>:{rest}' (e.g. '{kind}:resnet18:{rest}')")
    return FoundationSource(kind, Path(rest))


# ------------------------------------------------------------------------------------------------- files
def _missing(path: Path, what: str, source: FoundationSource) -> CheckpointError:
    hints = {
        "timm": "on a networked machine: m = timm.create_model(name, pretrained=True); "
                "timm.models.save_for_hf(m, folder), then copy the folder here",
        "hf": "on a networked machine: AutoModel.from_pretrained(repo).save_pretrained(folder) and "
              "AutoImageProcessor.from_pretrained(repo).save_pretrained(folder), then copy the folder here",
        "torchvision": "on a networked machine: torch.save(torchvision.models.get_model(arch, weights='DEFAULT')"
                       ".state_dict(), file), then copy the file here",
        "monai": "save the network's state_dict() (torch.save) and copy the file here",
    }
    return CheckpointError(f"{path}: {what} not found for initialisation '{source.text}' — radssl never downloads "
                           f"weights at run time; place {what} at {path} ({hints[source.kind]})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read as JSON ({error})") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def weight_files(source: FoundationSource) -> list[Path]:
    """The file(s) holding the weights (a folder's weights file, all shards of a sharded one, or the file)."""
    path = source.path
    if source.architecture is not None:
        if not path.is_file():
            raise _missing(path, "the weights file", source)
        return [path]
    if not path.is_dir():
        raise _missing(path, "the model folder", source)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            shards = sorted(set(_read_json(path / index_name).get("weight_map", {}).values()))
            return [path / shard for shard in shards]
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise _missing(path / WEIGHT_FILES[0], f"a weights file ({' or '.join(WEIGHT_FILES)})", source)


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 over the files' bytes, in order (the provenance of an initialisation)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from ``.safetensors`` or a weights-only torch file (common wrappers unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read as a weights-only torch file ({type(error).__name__}: {error}) "
                              "— re-save it as a plain state dict") from error
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if wrapper in raw and isinstance(raw[wrapper], Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping) or not all(torch.is_tensor(v) for v in raw.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors — save model.state_dict()")
    state = dict(raw)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with the missing, unexpected and mis-shaped keys listed in the error."""
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{source}: weights do not fit {type(module).__name__} — " + "; ".join(parts)
                              + " — check that the architecture (and its kwargs) named for this file is the one "
                              "it was saved from; nothing was loaded")
    module.load_state_dict(dict(state), strict=False)  # strict check done above (old BN files lack the counter)


def _drop(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], list[str]]:
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    return kept, sorted(set(state) - set(kept))


# ---------------------------------------------------------------------------------------- per-library specs
def _timm_options(source: FoundationSource) -> dict[str, Any]:
    import timm

    if source.architecture is not None:
        name, kwargs = source.architecture, {}
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - timm raises different errors across versions for unknown names
            cfg = None
        if cfg is None and not timm.is_model(name.split(".")[0]):
            raise ConfigError(f"initialisation '{source.text}': timm has no model '{name}'")
        pretrained = cfg.to_dict() if cfg is not None else {}
    else:
        config_path = source.path / "config.json"
        if not config_path.is_file():
            raise _missing(config_path, "the timm config.json", source)
        config = _read_json(config_path)
        if "architecture" not in config:
            raise CheckpointError(f"{config_path}: no 'architecture' — not a timm model folder (timm.models."
                                  "save_for_hf writes one)")
        name = str(config["architecture"])
        kwargs = {k: v for k, v in dict(config.get("model_args") or {}).items() if k != "num_classes"}
        pretrained = dict(config.get("pretrained_cfg") or {})
    input_size = list(pretrained.get("input_size") or (3, 224, 224))
    channels = int(kwargs.get("in_chans", input_size[0]))
    patch = kwargs.get("patch_size")
    return {"architecture": name, "model_kwargs": kwargs, "model_channels": channels,
            "input_size": [int(s) for s in input_size[1:]],
            "mean": _per_channel(pretrained.get("mean") or IMAGENET_MEAN, channels),
            "std": _per_channel(pretrained.get("std") or IMAGENET_STD, channels),
            "patch_size": int(patch if isinstance(patch, int) else patch[0]) if patch else None}


def _per_channel(values: Any, channels: int) -> list[float]:
    """Per-channel statistics for a network of ``channels`` inputs (a 1-channel network: their mean)."""
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise CheckpointError(f"normalisation has {len(values)} values for a {channels}-channel network")


def _hf_processor_convention(folder: Path, config: Any) -> tuple[list[int], list[float], list[float]]:
    """(input size, mean, std) from ``preprocessor_config.json`` (crop size, else resize size, else config)."""
    default_size = int(getattr(config, "image_size", 224))
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found — the model's input size and normalisation come from its image "
                              "processor: save it beside the model (AutoImageProcessor.from_pretrained(repo)."
                              f"save_pretrained('{folder}'))")
    data = _read_json(path)

    def side(value: Any) -> list[int] | None:
        if isinstance(value, int):
            return [value, value]
        if isinstance(value, Mapping):
            if "height" in value and "width" in value:
                return [int(value["height"]), int(value["width"])]
            if "shortest_edge" in value:
                return [int(value["shortest_edge"])] * 2
        return None

    size = (side(data.get("crop_size")) if data.get("do_center_crop") else None) or side(data.get("size")) \
        or [default_size, default_size]
    mean = [float(v) for v in data.get("image_mean") or IMAGENET_MEAN]
    std = [float(v) for v in data.get("image_std") or IMAGENET_STD]
    return size, mean, std


def _hf_options(source: FoundationSource) -> tuple[dict[str, Any], str | None]:
    from transformers import AutoConfig

    if not (source.path / "config.json").is_file():
        raise _missing(source.path / "config.json", "the model folder's config.json", source)
    config = AutoConfig.from_pretrained(str(source.path), local_files_only=True)
    tower = None
    if getattr(config, "vision_config", None) is not None:  # CLIP / SigLIP style: the image tower only
        tower = "vision_model."
        config = config.vision_config
    size, mean, std = _hf_processor_convention(source.path, config)
    patch = getattr(config, "patch_size", None)
    data = config.to_dict()
    data["model_type"] = config.model_type
    channels = int(getattr(config, "num_channels", 3))
    return {"architecture": config.model_type, "config": data, "model_channels": channels, "input_size": size,
            "mean": _per_channel(mean, channels), "std": _per_channel(std, channels),
            "patch_size": int(patch if isinstance(patch, int) else patch[0]) if patch else None}, tower


def _torchvision_options(source: FoundationSource) -> dict[str, Any]:
    from torchvision.models import get_model_weights, list_models

    name, kwargs = source.architecture, {}
    if name is None:
        config = _read_json(_config_file(source))
        name, kwargs = str(config.get("architecture")), dict(config.get("model_kwargs") or {})
        convention = config.get("input", {})
        return {"architecture": name, "model_kwargs": kwargs, "model_channels": int(convention.get("channels", 3)),
                "input_size": convention.get("size"), "mean": convention.get("mean"), "std": convention.get("std"),
                "patch_size": convention.get("patch_size")}
    if name not in list_models():
        raise ConfigError(f"initialisation '{source.text}': torchvision has no model '{name}'")
    try:
        transforms = get_model_weights(name).DEFAULT.transforms()
        size, mean, std = list(transforms.crop_size), list(transforms.mean), list(transforms.std)
    except (ValueError, AttributeError):
        size, mean, std = [224], IMAGENET_MEAN, IMAGENET_STD
    patch = int(name.rsplit("_", 1)[-1]) if name.startswith("vit_") else None
    return {"architecture": name, "model_kwargs": kwargs, "model_channels": 3, "input_size": size * 2 if len(size) == 1
            else size, "mean": list(mean), "std": list(std), "patch_size": patch}


def _config_file(source: FoundationSource) -> Path:
    path = source.path / "config.json" if source.architecture is None else Path(str(source.path) + ".json")
    if source.architecture is None and not path.is_file():
        raise _missing(path, f"the {source.kind} config.json (architecture and kwargs)", source)
    return path


def _monai_options(source: FoundationSource, state: Mapping[str, torch.Tensor] | None) -> dict[str, Any]:
    if source.architecture is None:
        config = _read_json(_config_file(source))
        name, kwargs = str(config.get("architecture")), dict(config.get("model_kwargs") or {})
    else:
        name = source.architecture
        sidecar = _config_file(source)
        kwargs = dict(_read_json(sidecar).get("model_kwargs", {})) if sidecar.is_file() else {}
    if name not in MONAI_ARCHITECTURES:
        raise ConfigError(f"initialisation '{source.text}': monai architecture '{name}' is not supported — use one "
                          f"of {list(MONAI_ARCHITECTURES)}")
    if "n_input_channels" not in kwargs and state is not None and "conv1.weight" in state:
        kwargs["n_input_channels"] = int(state["conv1.weight"].shape[1])  # the stem's input width, stated by the file
    return {"architecture": name, "model_kwargs": kwargs, "model_channels": int(kwargs.get("n_input_channels", 1)),
            "input_size": None, "mean": None, "std": None, "patch_size": None}


def foundation_spec(source: FoundationSource | str, in_channels: int, image_size: tuple[int, ...],
                    input_size: list[int] | None = None) -> BackboneSpec:
    """The resolved spec of a foundation initialisation for data of ``in_channels`` × ``image_size``.

    Reads only metadata (configs; for MONAI the stem's width); ``input_size`` overrides the model's own input size.
    """
    spec, _ = _spec_and_tower(parse_foundation(source) if isinstance(source, str) else source, in_channels,
                              image_size, input_size, None)
    return spec


def _spec_and_tower(source: FoundationSource, in_channels: int, image_size: tuple[int, ...],
                    input_size: list[int] | None, state: Mapping[str, torch.Tensor] | None
                    ) -> tuple[BackboneSpec, str | None]:
    tower = None
    if source.kind == "timm":
        options = _timm_options(source)
    elif source.kind == "hf":
        options, tower = _hf_options(source)
    elif source.kind == "torchvision":
        options = _torchvision_options(source)
    else:
        if state is None:
            state = read_state(weight_files(source)[0])
        options = _monai_options(source, state)
    if input_size is not None:
        options["input_size"] = [int(s) for s in input_size]
    dims = 3 if source.kind == "monai" else 2
    if len(image_size) != dims:
        raise ConfigError(f"initialisation '{source.text}': {source.kind} models here take {dims}D images; the data "
                          f"are {len(image_size)}D")
    spec = BackboneSpec(family=source.kind, in_channels=in_channels, spatial_dims=dims,
                        image_size=tuple(image_size), options=options)
    try:
        return resolve_spec(spec), tower
    except ValueError as error:
        raise ConfigError(f"initialisation '{source.text}': {error}") from None


def load_foundation(text: str, in_channels: int, image_size: tuple[int, ...],
                    input_size: list[int] | None = None) -> tuple[Backbone, dict[str, Any]]:
    """Build the backbone of a foundation initialisation and load its weights strictly; (backbone, provenance)."""
    source = parse_foundation(text)
    files = weight_files(source)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_state(path))
    spec, tower = _spec_and_tower(source, in_channels, tuple(image_size), input_size, state)
    try:
        backbone = build_from_spec(spec)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source.path}: cannot build {spec.family} '{spec.options['architecture']}' from its "
                              f"config: {error}") from None
    dropped: list[str] = []
    if source.kind == "timm":
        classifier = getattr(backbone.model, "pretrained_cfg", {}).get("classifier") or "head"
        names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        state, dropped = _drop(state, tuple(f"{n}." for n in names))
    elif source.kind == "torchvision":
        state, dropped = _drop(state, torchvision_classifier_keys(spec.options["architecture"]))
    elif source.kind == "hf":
        state, dropped = _hf_state(source, backbone.model, tower)
    strict_load(backbone.model, state, str(source.path))
    provenance = {
        "init": source.text,
        "library": source.kind,
        "architecture": spec.options["architecture"],
        "files": [str(p) for p in files],
        "sha256": fingerprint(files),
        "dropped_keys": _summarise(dropped),
        "input_adaptation": INPUT_ADAPTATION if spec.options.get("mean") is not None else
        "grey → model channels by replication; radssl's normalisation kept (the network records none)",
        "input_size": spec.options.get("input_size"),
        "mean": spec.options.get("mean"),
        "std": spec.options.get("std"),
        "text_tower": "dropped (zero-shot with the foundation text tower is not offered)" if tower else None,
    }
    return backbone, provenance


def _hf_state(source: FoundationSource, model: nn.Module, tower: str | None
              ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The folder's weights through transformers' own loader (it renames legacy keys), mismatches refused.

    ``from_pretrained`` only warns about missing or unexpected keys; here any of them is an error, except the
    parts radssl does not use: ``ViTModel``'s classification pooler and a CLIP model's text tower.
    """
    from transformers import AutoModel

    loaded, info = AutoModel.from_pretrained(str(source.path), local_files_only=True, output_loading_info=True)

    def unused(key: str) -> bool:
        return key.startswith("pooler.") or (tower is not None and not key.startswith(tower))

    missing = sorted(k for k in info.get("missing_keys", []) if not unused(k))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not unused(k))
    mismatched = [f"{item[0]} {tuple(item[1])} vs model {tuple(item[2])}" if isinstance(item, (tuple, list))
                  else str(item) for item in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(keys[:8])}" + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", mismatched)) if keys]
        raise CheckpointError(f"{source.path}: weights do not fit {type(loaded).__name__} from its config.json — "
                              + "; ".join(parts) + " — nothing was loaded; re-save the model with save_pretrained")
    state = dict(loaded.state_dict())
    dropped: list[str] = []
    if tower is not None:  # CLIP-style: keep the image tower (CLIPVisionModel keys are vision_model.*)
        dropped = sorted(k for k in state if not k.startswith(tower))
        state = {k: v for k, v in state.items() if k.startswith(tower)}
        if not any(k.startswith(tower) for k in model.state_dict()):  # a tower model without the prefix
            state = {k[len(tower):]: v for k, v in state.items()}
    if getattr(model, "pooler", "absent") is None:
        state, more = _drop(state, ("pooler.",))
        dropped += more
    return state, dropped


def _summarise(keys: list[str]) -> list[str]:
    """Dropped keys grouped by their first name part (``text_model.* (196 keys)``) to keep provenance short."""
    groups: dict[str, int] = {}
    for key in keys:
        groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
    return [f"{name}.* ({count} keys)" if count > 1 else name for name, count in sorted(groups.items())]


def provenance_text(provenance: Mapping[str, Any]) -> str:
    """One line for ``initial_backbone`` fields: the init string and the weights' hash."""
    return f"{provenance['init']} (sha256 {str(provenance['sha256'])[:16]})"
