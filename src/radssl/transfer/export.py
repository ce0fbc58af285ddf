"""Weights out: a pretrained radssl backbone as a file/folder its target library loads without radssl installed.

``radssl export CHECKPOINT --to T --out FOLDER`` writes into FOLDER the model in T's own format, ``radssl_export.json``
(the spec: channels, input size, normalisation, method, data fingerprint, how to load it) and a short README.md.

Which targets fit which backbones (anything else is a clear error listing the targets that fit):

============================  ==================================================================
backbone                      targets
============================  ==================================================================
resnet18 / resnet50 (ImageNet stem)  torchvision, timm, torchscript, onnx
resnet18 / resnet50 (small stem)     torchscript, onnx (the 3×3 stride-1 stem is no library ResNet)
vit_tiny / vit_small          timm, hf (transformers ``ViTModel``), torchscript, onnx
resnet18_3d                   monai, torchscript, onnx
small_cnn, other 3D encoders  torchscript, onnx
timm / hf / torchvision / monai (foundation)  its own library, torchscript, onnx
============================  ==================================================================

Input conventions. torchscript and onnx export radssl's whole forward: input = stored pixels in [0, 1],
``(x - 0.449) / 0.226`` on each of the data's channels (foundation models adapt inside the graph). Library exports are
the library's plain network: a 1-channel radssl ResNet becomes a 3-channel torchvision ResNet whose conv1 holds the
grey kernel divided by 3 on each RGB channel, so the grey image replicated to RGB gives the same features; timm and
MONAI take ``in_chans`` / ``n_input_channels`` natively. A foundation model is exported as the library network it
is, with its own input size and normalisation. ``radssl_export.json`` states which, and how to get there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from radssl.atomic import torch_save_atomic, write_text_atomic
from radssl.data.store import NORMALISATION_MEAN, NORMALISATION_STD
from radssl.errors import ConfigError
from radssl.models.base import Backbone
from radssl.models.foundation_weights import fingerprint, strict_load
from radssl.transfer.initialisation import _load, initialise_backbone

EXPORT_TARGETS = ("torchvision", "timm", "monai", "hf", "torchscript", "onnx")
SPEC_FILE = "radssl_export.json"


def supported_targets(backbone: Backbone) -> tuple[str, ...]:
    """The export targets that fit a backbone (see the module table)."""
    family = backbone.spec.family
    native: tuple[str, ...] = ()
    if family in ("resnet18", "resnet50") and backbone.spec.stem != "small":
        native = ("torchvision", "timm")
    elif family in ("vit_tiny", "vit_small"):
        native = ("timm", "hf")
    elif family == "resnet18_3d":
        native = ("monai",)
    elif family in ("timm", "hf", "torchvision", "monai"):
        native = (family,)
    return native + ("torchscript", "onnx")


def _radssl_input(backbone: Backbone) -> dict[str, Any]:
    channels = backbone.spec.in_channels
    return {"channels": channels, "size": list(backbone.spec.image_size) if backbone.spec.image_size else None,
            "grey_to_channels": None, "pixels": "float in [0, 1] (uint8 / 255)",
            "mean": [NORMALISATION_MEAN] * channels, "std": [NORMALISATION_STD] * channels,
            "resize": "none: feed images at this size"}


def _foundation_input(backbone: Backbone) -> dict[str, Any]:
    options = backbone.spec.options
    size = options.get("input_size")
    return {"channels": int(options["model_channels"]), "size": size,
            "grey_to_channels": "replicate" if backbone.spec.in_channels < int(options["model_channels"]) else None,
            "pixels": "float in [0, 1] (uint8 / 255)",
            "mean": options.get("mean") or [NORMALISATION_MEAN] * int(options["model_channels"]),
            "std": options.get("std") or [NORMALISATION_STD] * int(options["model_channels"]),
            "resize": ("bilinear" if backbone.spec.spatial_dims == 2 else "trilinear") + ", align_corners=False"
            if size else "none"}


# --------------------------------------------------------------------------------------------- per target
def _save_state(state: Mapping[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
    else:
        torch_save_atomic(path, {k: v.detach().cpu() for k, v in state.items()})


def _export_torchvision(backbone: Backbone, out: Path) -> dict[str, Any]:
    if backbone.spec.family == "torchvision":
        name = backbone.spec.options["architecture"]
        state = backbone.model.state_dict()
        convention = _foundation_input(backbone)
        classifier = {"vit_": "m.heads = torch.nn.Identity()", "convnext_": "m.classifier[2] = torch.nn.Identity()"}
        strip = next((v for k, v in classifier.items() if name.startswith(k)), "m.fc = torch.nn.Identity()")
    else:
        name = backbone.spec.family
        state = dict(backbone.net.state_dict())
        convention = _radssl_input(backbone)
        if backbone.spec.in_channels == 1:  # grey kernel spread over RGB: (x, x, x) gives the grey response
            state["conv1.weight"] = state["conv1.weight"].repeat(1, 3, 1, 1) / 3.0
            convention.update(channels=3, grey_to_channels="replicate", mean=[NORMALISATION_MEAN] * 3,
                              std=[NORMALISATION_STD] * 3, resize="none: any size works (CNN); trained at 'size'")
        elif backbone.spec.in_channels != 3:
            raise ConfigError(f"export --to torchvision: a {backbone.spec.in_channels}-channel ResNet has no "
                              "torchvision equivalent — export --to timm (in_chans) or torchscript/onnx")
        strip = "m.fc = torch.nn.Identity()"
    _save_state(state, out / "model.pth")
    return {"files": ["model.pth"], "input": convention,
            "load": f"import torch, torchvision; m = torchvision.models.get_model('{name}', weights=None); {strip}; "
                    "m.load_state_dict(torch.load('model.pth', weights_only=True)); m.eval()"}


def _timm_vit_kwargs(backbone: Backbone) -> dict[str, Any]:
    vit = backbone.vit
    return {"img_size": list(backbone.spec.image_size), "patch_size": int(backbone.spec.patch_size),
            "in_chans": backbone.spec.in_channels, "embed_dim": int(vit.embed_dim), "depth": len(vit.blocks),
            "num_heads": int(vit.blocks[0].attn.num_heads), "global_pool": "token", "num_classes": 0}


def _export_timm(backbone: Backbone, out: Path) -> dict[str, Any]:
    family = backbone.spec.family
    if family == "timm":
        name = backbone.spec.options["architecture"]
        kwargs = {**backbone.spec.options.get("model_kwargs", {}), "num_classes": 0}
        state, convention = backbone.model.state_dict(), _foundation_input(backbone)
    elif family in ("vit_tiny", "vit_small"):
        name, kwargs = "vit_tiny_patch16_224", _timm_vit_kwargs(backbone)
        state, convention = backbone.vit.state_dict(), _radssl_input(backbone)
    else:
        name, kwargs = family, {"in_chans": backbone.spec.in_channels, "num_classes": 0}
        state, convention = backbone.net.state_dict(), _radssl_input(backbone)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    _save_state(state, out / "model.safetensors")
    size = convention["size"] or [224, 224]
    config = {"architecture": name, "num_classes": 0, "model_args": kwargs,
              "pretrained_cfg": {"input_size": [convention["channels"], *size], "mean": convention["mean"],
                                 "std": convention["std"], "num_classes": 0}}
    write_text_atomic(out / "config.json", json.dumps(config, indent=2))
    return {"files": ["model.safetensors", "config.json"], "input": convention,
            "load": "import json, timm, safetensors.torch as st; c = json.load(open('config.json')); "
                    "m = timm.create_model(c['architecture'], pretrained=False, **c['model_args']); "
                    "m.load_state_dict(st.load_file('model.safetensors')); m.eval()"}


def _timm_vit_to_hf(state: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ViT keys → transformers ``ViTModel`` keys (as transformers' own timm conversion script maps them)."""
    out = {"embeddings.cls_token": state["cls_token"], "embeddings.position_embeddings": state["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
           "layernorm.weight": state["norm.weight"], "layernorm.bias": state["norm.bias"]}
    for i in range(depth):
        block, layer = f"blocks.{i}.", f"layers.{i}."
        q, k, v = state[block + "attn.qkv.weight"].chunk(3, dim=0)
        qb, kb, vb = state[block + "attn.qkv.bias"].chunk(3, dim=0)
        out.update({
            layer + "attention.q_proj.weight": q, layer + "attention.q_proj.bias": qb,
            layer + "attention.k_proj.weight": k, layer + "attention.k_proj.bias": kb,
            layer + "attention.v_proj.weight": v, layer + "attention.v_proj.bias": vb,
            layer + "attention.o_proj.weight": state[block + "attn.proj.weight"],
            layer + "attention.o_proj.bias": state[block + "attn.proj.bias"],
            layer + "layernorm_before.weight": state[block + "norm1.weight"],
            layer + "layernorm_before.bias": state[block + "norm1.bias"],
            layer + "layernorm_after.weight": state[block + "norm2.weight"],
            layer + "layernorm_after.bias": state[block + "norm2.bias"],
            layer + "mlp.fc1.weight": state[block + "mlp.fc1.weight"],
            layer + "mlp.fc1.bias": state[block + "mlp.fc1.bias"],
            layer + "mlp.fc2.weight": state[block + "mlp.fc2.weight"],
            layer + "mlp.fc2.bias": state[block + "mlp.fc2.bias"],
        })
    return out


def _export_hf(backbone: Backbone, out: Path) -> dict[str, Any]:
    if backbone.spec.family == "hf":
        model, convention = backbone.model, _foundation_input(backbone)
    else:
        from transformers import ViTConfig, ViTModel

        kwargs = _timm_vit_kwargs(backbone)
        vit = backbone.vit
        config = ViTConfig(hidden_size=kwargs["embed_dim"], num_hidden_layers=kwargs["depth"],
                           num_attention_heads=kwargs["num_heads"],
                           intermediate_size=int(vit.blocks[0].mlp.fc1.out_features),
                           image_size=kwargs["img_size"][0], patch_size=kwargs["patch_size"],
                           num_channels=kwargs["in_chans"], layer_norm_eps=float(vit.norm.eps), qkv_bias=True,
                           hidden_act="gelu")
        if kwargs["img_size"][0] != kwargs["img_size"][1]:
            raise ConfigError("export --to hf: transformers' ViTModel takes square images; export --to timm instead")
        model = ViTModel(config, add_pooling_layer=False)
        strict_load(model, _timm_vit_to_hf(vit.state_dict(), kwargs["depth"]), "timm→transformers ViT conversion")
        convention = _radssl_input(backbone)
    model.save_pretrained(str(out))
    if type(model).__name__ == "ViTModel":  # AutoModel would add ViT's (untrained) dense+tanh pooler: not built
        load = ("from transformers import ViTModel; m = ViTModel.from_pretrained('.', add_pooling_layer=False, "
                "local_files_only=True).eval(); features = m(pixel_values=x).last_hidden_state[:, 0]")
    else:
        load = ("from transformers import AutoModel; m = AutoModel.from_pretrained('.', local_files_only=True).eval(); "
                "features = m(pixel_values=x).pooler_output")
    return {"files": sorted(p.name for p in out.iterdir() if p.name not in (SPEC_FILE, "README.md")),
            "input": convention, "load": load}


def _export_monai(backbone: Backbone, out: Path) -> dict[str, Any]:
    if backbone.spec.family == "monai":
        name = backbone.spec.options["architecture"]
        kwargs = {**backbone.spec.options.get("model_kwargs", {}),
                  "n_input_channels": int(backbone.spec.options["model_channels"])}
        state, convention = backbone.model.state_dict(), _foundation_input(backbone)
    else:
        net = backbone.net
        small = backbone.spec.stem == "small"
        options = backbone.options(backbone.spec)
        name = "resnet18"
        kwargs = {"n_input_channels": backbone.spec.in_channels, "conv1_t_size": 3 if small else 7,
                  "conv1_t_stride": 1 if small else 2, "no_max_pool": small, "shortcut_type": options.shortcut_type,
                  "widen_factor": options.widen_factor}
        state, convention = net.state_dict(), _radssl_input(backbone)
    _save_state(state, out / "model.pt")
    config = {"architecture": name, "model_kwargs": kwargs}
    write_text_atomic(out / "config.json", json.dumps(config, indent=2))
    return {"files": ["model.pt", "config.json"], "input": convention,
            "load": "import json, torch, monai.networks.nets as nets; c = json.load(open('config.json')); "
                    "m = getattr(nets, c['architecture'])(spatial_dims=3, feed_forward=False, **c['model_kwargs']); "
                    "m.load_state_dict(torch.load('model.pt', weights_only=True)); m.eval()"}


def _example_input(backbone: Backbone) -> torch.Tensor:
    size = backbone.spec.image_size or ((32,) * backbone.spec.spatial_dims)
    return torch.randn(2, backbone.spec.in_channels, *size)


def _export_torchscript(backbone: Backbone, out: Path) -> dict[str, Any]:
    example = _example_input(backbone)
    with torch.no_grad():
        traced = torch.jit.trace(backbone.eval(), example, strict=False, check_trace=False)
    tmp = out / "model.pt.tmp"
    torch.jit.save(traced, str(tmp))
    tmp.replace(out / "model.pt")
    return {"files": ["model.pt"], "input": _radssl_input(backbone),
            "load": "import torch; m = torch.jit.load('model.pt').eval(); features = m(x)"}


def _export_onnx(backbone: Backbone, out: Path) -> dict[str, Any]:
    example = _example_input(backbone)
    tmp = out / "model.onnx.tmp"
    # The TorchScript-based exporter (dynamo=False): a few seconds for these encoders on a CPU, where the
    # torch.export-based one takes ~15 s to start; both give a graph onnxruntime runs with a free batch axis.
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(backbone.eval(), (example,), str(tmp), dynamo=False, input_names=["images"],
                          output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                          opset_version=17)
    tmp.replace(out / "model.onnx")
    return {"files": ["model.onnx"], "input": _radssl_input(backbone),
            "load": "import onnxruntime as ort; s = ort.InferenceSession('model.onnx'); "
                    "features = s.run(None, {'images': x})[0]"}


_EXPORTERS = {"torchvision": _export_torchvision, "timm": _export_timm, "hf": _export_hf, "monai": _export_monai,
              "torchscript": _export_torchscript, "onnx": _export_onnx}


def check_target(backbone: Backbone, target: str) -> None:
    """A clear error when ``target`` is unknown or has no equivalent of this backbone."""
    if target not in EXPORT_TARGETS:
        raise ConfigError(f"export target '{target}' unknown — choose one of {list(EXPORT_TARGETS)}")
    fitting = supported_targets(backbone)
    if target not in fitting:
        raise ConfigError(f"export --to {target}: a {backbone.spec.describe()} backbone has no {target} equivalent — "
                          f"targets that fit it: {', '.join(fitting)}")
    if target == "onnx":
        try:
            import onnx  # noqa: F401 - torch.onnx needs it
        except ImportError:
            raise ConfigError("export --to onnx needs the onnx package (pip install 'radssl[export]')") from None


def export_backbone(backbone: Backbone, target: str, out: Path | str,
                    provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``backbone`` to folder ``out`` in ``target``'s format, with ``radssl_export.json`` and README.md."""
    check_target(backbone, target)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: export folder exists and is not empty — choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    backbone = backbone.cpu().eval()
    record = _EXPORTERS[target](backbone, out)
    spec = {"target": target, "backbone_spec": backbone.spec.to_dict(), "feature_dim": int(backbone.feature_dim),
            "output": "pooled feature vector (batch, feature_dim)", **record, **dict(provenance or {})}
    write_text_atomic(out / SPEC_FILE, json.dumps(spec, indent=2, default=str))
    write_text_atomic(out / "README.md", _readme(spec))
    return out


def _readme(spec: Mapping[str, Any]) -> str:
    convention = spec["input"]
    steps = [f"pixels: {convention['pixels']}"]
    if convention.get("size"):
        steps.append(f"size: {'×'.join(map(str, convention['size']))} ({convention.get('resize')})")
    if convention.get("grey_to_channels"):
        steps.append(f"grey → {convention['channels']} channels: {convention['grey_to_channels']}")
    steps.append(f"normalise per channel: mean {convention['mean']}, std {convention['std']}")
    lines = [f"# radssl export ({spec['target']})", "",
             f"Backbone: {spec['backbone_spec']['family']}; method: {spec.get('method') or 'n/a'}; "
             f"data fingerprint: {spec.get('data_fingerprint') or 'n/a'}.", "",
             "Input:", *[f"- {s}" for s in steps], "",
             f"Output: {spec['output']}, feature_dim {spec['feature_dim']}.", "",
             "Load (radssl not needed):", "", "```python", spec["load"], "```", "",
             f"Full spec: {SPEC_FILE}.", ""]
    return "\n".join(lines)


def export_checkpoint(checkpoint: Path | str, target: str, out: Path | str) -> Path:
    """Export the backbone of a radssl pretraining checkpoint (``radssl export``)."""
    checkpoint = Path(checkpoint)
    state = _load(checkpoint, "ssl", "resnet18")
    if not isinstance(state, Mapping) or "backbone_spec" not in state:
        raise ConfigError(f"{checkpoint}: not a radssl pretraining checkpoint (no backbone_spec) — export takes the "
                          "checkpoints/final.pt of a `radssl pretrain` run")
    backbone = initialise_backbone(f"ssl:{checkpoint}")
    check_target(backbone, target)
    provenance = {"method": state.get("method_name"), "data_fingerprint": state.get("data_fingerprint"),
                  "initial_backbone": state.get("initial_backbone") or None, "checkpoint": str(checkpoint),
                  "checkpoint_sha256": fingerprint([checkpoint]), "steps": state.get("step")}
    return export_backbone(backbone, target, out, provenance)
