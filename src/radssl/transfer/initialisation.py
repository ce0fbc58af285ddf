"""Backbone initialisations compared in a study: ``random``, ``imagenet:<file.pth>`` and ``ssl:<checkpoint.pt>``.

ImageNet weights on 1-channel radiographs: conv1's RGB kernels are **summed** into one grey kernel. For a
grey image x the RGB network sees (x, x, x), and Σ_c W_c * x = (Σ_c W_c) * x, so the adapted network gives
exactly the ImageNet network's response to the grey image replicated to RGB (same normalisation,
:func:`radssl.transfer.features.normalise_for_backbone`). Averaging instead would scale conv1 by 1/3 and put
bn1's running statistics off by that factor, which matters for frozen-feature evaluation (eval-mode BN).

Small-input stem and ImageNet weights: the 3×3 stride-1 stem of ``small_input`` backbones cannot hold the
7×7 stride-2 ImageNet conv1. We keep the **ImageNet 7×7 stem (and its max-pool)** for ``imagenet:``
initialisation instead of cropping or resizing the kernel: every later ImageNet layer (and every BatchNorm
running statistic) was learned on the stride-4 output of that stem, so a re-shaped kernel changes the input
statistics of all frozen layers and degrades exactly the frozen-feature protocols (probe, kNN) that
compare initialisations. ``small_input=None`` therefore resolves to ``False`` for ``imagenet:``, and an
explicit ``small_input=True`` is an error. Note for studies: at 28 px this stem leaves a 1×1 map in layer4;
compare ImageNet against random/SSL at the same stem (or use 64–224 px MedMNIST images) to separate the
effect of the stem from the effect of the initialisation.

No network access at run time: a missing file raises :class:`~radssl.errors.CheckpointError` that says
where to download it; :func:`try_download_imagenet_weights` is the explicit, opt-in download.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from radssl.errors import CheckpointError, ConfigError
from radssl.models.base import Backbone
from radssl.models.registry import build_from_spec, make_spec
from radssl.models.spec import BackboneSpec
from radssl.transfer.foundation import initialise_foundation

INIT_KINDS = ("random", "imagenet", "ssl", "timm", "hf", "torchvision", "monai")
IMAGENET_BACKBONES = ("resnet18", "resnet50")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``'random'`` → ('random', None); ``'imagenet:/x.pth'`` → ('imagenet', '/x.pth'); same for ``ssl:``."""
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in INIT_KINDS:
        raise ConfigError(
            f"initialisation '{spec}': unknown kind '{kind}' — use 'random', 'imagenet:<weights.pth>', "
            f"'ssl:<checkpoint.pt>' or foundation weights ('timm:…', 'hf:…', 'torchvision:<arch>:…', 'monai:<arch>:…')"
        )
    if kind == "random":
        if path:
            raise ConfigError(f"initialisation '{spec}': 'random' takes no path")
        return kind, None
    if not path:
        raise ConfigError(f"initialisation '{spec}': '{kind}:' needs a file path, e.g. '{kind}:/path/to/file'")
    return kind, path


def imagenet_weights_source(name: str) -> tuple[str, str]:
    """(file name, URL) of torchvision's default ImageNet weights for a ResNet (static data, no network)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    return weights.url.rsplit("/", 1)[-1], weights.url


def _missing_file_error(kind: str, path: Path, name: str) -> CheckpointError:
    if kind == "imagenet":
        file_name, url = imagenet_weights_source(name)
        fix = (
            f"this machine cannot download weights at run time: on a networked machine download {url} "
            f"(e.g. radssl.transfer.initialisation.try_download_imagenet_weights('{name}', folder)), copy "
            f"{file_name} here and pass 'imagenet:/path/to/{file_name}'"
        )
    else:
        fix = "pretrain first (radssl pretrain) and pass 'ssl:/path/to/checkpoint.pt' of that run"
    return CheckpointError(f"{path}: {kind} weights file not found — {fix}")


def _load(path: Path, kind: str, name: str) -> object:
    if not path.is_file():
        raise _missing_file_error(kind, path, name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path}: cannot read as a weights-only torch file ({type(error).__name__}: {error}) — the file is "
            f"truncated, not a PyTorch file, or pickles arbitrary objects; re-save it as a plain state dict"
        ) from error


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop a prefix every key carries (``module.`` from DataParallel/DDP checkpoints)."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items()}
    return dict(state)


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with missing, unexpected and mis-shaped keys spelled out."""
    expected = module.state_dict()
    # Old torchvision files predate BatchNorm's num_batches_tracked buffer; load_state_dict fills it in.
    missing = sorted(k for k in expected if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        for label, keys in problems:
            if keys:
                shown = ", ".join(keys[:6]) + (f", … ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(
            f"{source}: weights do not fit {type(module).__name__} — " + "; ".join(parts)
            + " — check that the file matches the backbone name (resnet18 vs resnet50) and stem"
        )
    module.load_state_dict(state, strict=True)


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB conv kernel (O, 3, k, k) → ``in_channels`` input channels with identical response to grey input.

    1 channel: the sum over RGB. C ≠ 3 channels: the sum spread evenly over C, so C identical channels again
    reproduce the RGB response to (x, x, x). 3 channels: unchanged.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 4-d conv weight, got shape {tuple(weight.shape)}")
    if in_channels == weight.shape[1]:
        return weight.clone()
    grey = weight.sum(dim=1, keepdim=True)
    return grey.repeat(1, in_channels, 1, 1) / in_channels


def _imagenet_backbone(path: Path, name: str, in_channels: int, small_input: bool | None,
                       image_size: int | tuple[int, ...] | None = None) -> Backbone:
    if name not in IMAGENET_BACKBONES:
        raise ConfigError(
            f"initialisation 'imagenet:{path}': backbone '{name}' has no ImageNet weights; "
            f"use one of {list(IMAGENET_BACKBONES)}"
        )
    if small_input:
        raise ConfigError(
            f"initialisation 'imagenet:{path}': small_input=True cannot hold the 7×7 ImageNet conv1 — leave "
            f"small_input unset (ImageNet init keeps the ImageNet stem; see radssl.transfer.initialisation)"
        )
    raw = _load(path, "imagenet", name)
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):  # timm / training-script wrappers
            if wrapper in raw and isinstance(raw[wrapper], Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping) or "conv1.weight" not in _strip_prefix(raw, "module."):
        raise CheckpointError(
            f"{path}: not a torchvision/timm ResNet state dict (no 'conv1.weight') — pass the .pth file of "
            f"torchvision's {name} ImageNet weights ({imagenet_weights_source(name)[0]})"
        )
    state = _strip_prefix(raw, "module.")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], in_channels)
    backbone = build_from_spec(make_spec(name, in_channels=in_channels, small_input=False, image_size=image_size))
    _load_strict(backbone.net, state, str(path))
    return backbone


def checkpoint_backbone_spec(checkpoint: Mapping[str, object], source: str) -> BackboneSpec:
    """The recorded spec of a radssl checkpoint's backbone (never guessed from state-dict key names)."""
    return BackboneSpec.from_dict(checkpoint.get("backbone_spec"), source)  # type: ignore[arg-type]


def _ssl_backbone(path: Path, name: str | None, in_channels: int | None, small_input: bool | None) -> Backbone:
    checkpoint = _load(path, "ssl", name or "resnet18")
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("backbone"), Mapping):
        raise CheckpointError(
            f"{path}: no 'backbone' state dict in this checkpoint — pass a checkpoint written by radssl "
            f"pretraining (keys 'backbone', 'backbone_spec' and 'config'), not a method or optimiser state"
        )
    spec = checkpoint_backbone_spec(checkpoint, str(path))
    if name is not None and name != spec.family:
        raise CheckpointError(
            f"{path}: checkpoint holds a '{spec.family}' backbone but '{name}' was requested — use "
            f"backbone '{spec.family}' for this checkpoint"
        )
    if in_channels is not None and spec.in_channels != in_channels:
        raise CheckpointError(
            f"{path}: backbone was pretrained on {spec.in_channels}-channel images but in_channels={in_channels} "
            f"was requested — use in_channels={spec.in_channels}"
        )
    if small_input is not None and spec.stem is not None and (spec.stem == "small") != bool(small_input):
        raise CheckpointError(
            f"{path}: checkpoint stem is '{spec.stem}' but small_input={small_input} was requested — "
            f"leave small_input unset to use the checkpoint's stem"
        )
    try:
        backbone = build_from_spec(spec)
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot rebuild {spec.describe()}: {error}") from None
    _load_strict(backbone, _strip_prefix(checkpoint["backbone"], "module."), str(path))  # type: ignore[arg-type]
    return backbone


def initialise_backbone(
    spec: str,
    backbone_name: str | None = None,
    in_channels: int | None = None,
    small_input: bool | None = None,
    image_size: int | tuple[int, ...] | None = None,
    seed: int | None = None,
    backbone_spec: BackboneSpec | None = None,
) -> Backbone:
    """Build a backbone and initialise it from ``spec`` (``random``, ``imagenet:<pth>``, ``ssl:<pt>``, or foundation
    weights ``timm:…``/``hf:…``/``torchvision:<arch>:…``/``monai:<arch>:…``, see :mod:`radssl.transfer.foundation`;
    these need ``image_size`` and carry a ``provenance`` attribute).

    ``ssl`` rebuilds the checkpoint's own recorded spec (``backbone_name``/``in_channels``/``small_input``, when
    given, are then checks). ``in_channels`` defaults to 1 for ``random``/``imagenet``. ``random`` and ``imagenet`` build ``backbone_spec`` when given, else the spec made from
    ``backbone_name`` (default resnet18), ``in_channels``, ``small_input`` and ``image_size`` (≤ 64 px → small stem;
    ImageNet always keeps the ImageNet stem). ``seed`` makes a random initialisation reproducible without touching
    the global RNG.
    """
    kind, path = parse_spec(spec)
    if kind in ("timm", "hf", "torchvision", "monai"):
        size = backbone_spec.image_size if backbone_spec is not None else image_size
        if size is None:
            raise ConfigError(f"initialisation '{spec}': foundation weights need the data's image_size")
        size = (size,) * (3 if kind == "monai" else 2) if isinstance(size, int) else tuple(size)
        channels = backbone_spec.in_channels if backbone_spec is not None else (in_channels or 1)
        return initialise_foundation(spec, channels, size).backbone
    if kind == "ssl":
        return _ssl_backbone(Path(path), backbone_name, in_channels, small_input)  # type: ignore[arg-type]
    if backbone_spec is not None:
        backbone_name, in_channels = backbone_spec.family, backbone_spec.in_channels
        image_size = backbone_spec.image_size
    name = backbone_name or "resnet18"
    in_channels = 1 if in_channels is None else in_channels
    if kind == "imagenet":
        return _imagenet_backbone(Path(path), name, in_channels, small_input, image_size)  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if backbone_spec is not None:
            return build_from_spec(backbone_spec)
        return build_from_spec(make_spec(name, in_channels, image_size, small_input))


def try_download_imagenet_weights(name: str, dest: str | Path) -> Path:
    """Download torchvision's default ImageNet weights for ``name`` into folder ``dest`` (hash-checked).

    Opt-in only (never called by radssl itself or its tests). Returns the file path to pass as
    ``imagenet:<path>``. Offline, raises :class:`CheckpointError` with the URL to fetch elsewhere.
    """
    if name not in IMAGENET_BACKBONES:
        raise ConfigError(f"no ImageNet weights known for backbone '{name}'; use one of {list(IMAGENET_BACKBONES)}")
    file_name, url = imagenet_weights_source(name)
    dest = Path(dest)
    target = dest if dest.suffix in (".pth", ".pt") else dest / file_name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    match = re.search(r"-([a-f0-9]+)\.", file_name)
    try:
        # download_url_to_file writes to a temporary file and renames it, and checks the hash prefix.
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a hash mismatch is a RuntimeError
        raise CheckpointError(
            f"{url}: download failed ({type(error).__name__}: {error}) — this machine may be offline: download "
            f"the file on a networked machine, copy it to {target} and pass 'imagenet:{target}'"
        ) from error
    return target
