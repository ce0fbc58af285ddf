"""Foundation-model encoders from other libraries (timm, Hugging Face transformers, torchvision, MONAI) as backbones.

Each wrapper is a registered backbone family (``timm``, ``hf``, ``torchvision``, ``monai``) whose spec records the
library's own architecture description (timm model name + kwargs, the HF config dict, a torchvision or MONAI
constructor name + kwargs) together with the model's own input size and normalisation. A checkpoint written after
continued SSL therefore rebuilds the network from its spec alone, without the original folder. The library network
sits unchanged in ``self.model`` (state-dict keys ``model.<library key>``), so weights load strictly by key and
export back to the library is a prefix strip.

Input adaptation (one place, :meth:`FoundationBackbone.adapt_input`), applied to radssl-normalised input
(``(x - 0.449) / 0.226``, :func:`radssl.data.store.normalise_for_backbone`):

1. back to [0, 1] pixels;
2. resized (bilinear / trilinear) to the model's own input size when the data differ (``input_size``: timm
   ``pretrained_cfg``, the HF image processor's crop/size, the torchvision weights' transforms; MONAI volumes are
   used at their own size);
3. **grey → 3 channels by replicating the channel** (not by summing the first conv's kernels): the first layer is
   kept byte-identical to the published weights, which (a) is exact whatever the first layer is — a padded conv, a
   ViT patch embedding, a conv with bias — under the model's *per-channel* mean/std, where a kernel sum is exact only
   if every channel is normalised alike and borders are not zero-padded; (b) keeps the provenance hash and the
   export back to the library exact (the exported model is the published architecture, 3 channels). The cost is
   the first layer's input read three times, a negligible share of any foundation model's FLOPs;
4. normalised with the model's own per-channel mean and std (MONAI networks carry none: radssl's normalisation is
   kept).

Patch-size constraints are checked when the spec is resolved (the input size must be a multiple of the patch).
Multi-scale features for U-Net decoders: CNNs return their stage outputs; ViTs return token maps of four evenly
spaced blocks (UNETR-style, all at the patch stride), or a clear error where a library gives no access to them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from radssl.data.store import NORMALISATION_MEAN, NORMALISATION_STD
from radssl.models.base import Backbone, resnet_feature_maps
from radssl.models.spec import BackboneSpec

FOUNDATION_FAMILIES = ("timm", "hf", "torchvision", "monai")
"""Backbone families whose network comes from another library (and whose weights come from a local file)."""


class FoundationOptions(BaseModel):
    """What a foundation backbone's spec records: the library architecture and the model's own input convention."""

    model_config = ConfigDict(extra="forbid")
    architecture: str = Field(..., description="timm model name, HF model_type, torchvision or MONAI constructor")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor kwargs (timm / MONAI)")
    config: dict[str, Any] | None = Field(None, description="HF config dict (hf family)")
    model_channels: int = Field(3, gt=0, description="input channels the library network takes")
    input_size: list[int] | None = Field(None, description="spatial size the network is fed (null: the data's)")
    mean: list[float] | None = Field(None, description="the model's per-channel mean on [0, 1] pixels")
    std: list[float] | None = Field(None, description="the model's per-channel std on [0, 1] pixels")
    patch_size: int | None = Field(None, description="ViT patch size (input size must be a multiple)")


def _last_norm_channels(module: nn.Module) -> int:
    """Output channels of a CNN stage: the width of its last normalisation layer."""
    norms = [m for m in module.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                                                           nn.LayerNorm))]
    if not norms:
        raise ValueError(f"cannot tell the output channels of {type(module).__name__}")
    last = norms[-1]
    if isinstance(last, nn.GroupNorm):
        return int(last.num_channels)
    if isinstance(last, nn.LayerNorm):
        return int(last.normalized_shape[0])
    return int(last.num_features)


class FoundationBackbone(Backbone):
    """A library network in ``self.model`` behind radssl's backbone interface and input convention."""

    Options = FoundationOptions
    spatial_dims_supported = (2,)

    @classmethod
    def resolve(cls, spec: BackboneSpec) -> BackboneSpec:
        options = FoundationOptions(**spec.options)
        if options.input_size is not None and len(options.input_size) != spec.spatial_dims:
            raise ValueError(f"{spec.family}: input_size {options.input_size} is not {spec.spatial_dims}D")
        if options.patch_size and options.input_size and any(s % options.patch_size for s in options.input_size):
            raise ValueError(
                f"{spec.family} '{options.architecture}': input size {options.input_size} is not a multiple of the "
                f"patch size {options.patch_size} — set model.options.input_size to a multiple of it"
            )
        if spec.in_channels not in (1, options.model_channels):
            raise ValueError(
                f"{spec.family} '{options.architecture}' takes {options.model_channels}-channel input; the data have "
                f"{spec.in_channels} channels — only 1-channel data are adapted (replicated); select "
                f"{options.model_channels} channels or a model built for {spec.in_channels}"
            )
        return spec

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__(spec)
        self.settings = FoundationOptions(**spec.options)
        self.model_channels = self.settings.model_channels
        self.input_size = tuple(self.settings.input_size) if self.settings.input_size else None
        shape = (1, -1) + (1,) * spec.spatial_dims
        renormalise = self.settings.mean is not None and self.settings.std is not None
        self.renormalise = renormalise
        mean = torch.tensor(self.settings.mean or [0.0]).reshape(shape)
        std = torch.tensor(self.settings.std or [1.0]).reshape(shape)
        # Not persistent: the state dict holds exactly the library network's weights (strict loads, exports).
        self.register_buffer("model_mean", mean, persistent=False)
        self.register_buffer("model_std", std, persistent=False)
        self.model = self.build_model()

    # -------------------------------------------------------------------------------------------- interface
    def build_model(self) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        raise ValueError(f"{self.spec.family} '{self.settings.architecture}': multi-scale features are not "
                         "supported for this architecture — use a frozen-feature or fine-tuning protocol")

    def adapt_input(self, images: torch.Tensor) -> torch.Tensor:
        """radssl-normalised data → the model's own input (size, channels, normalisation); see module docstring."""
        x = images
        if self.renormalise:
            x = x * NORMALISATION_STD + NORMALISATION_MEAN
        if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
            mode = "bilinear" if x.ndim == 4 else "trilinear"
            x = F.interpolate(x, size=self.input_size, mode=mode, align_corners=False)
        if x.shape[1] != self.model_channels:
            x = x.expand(-1, self.model_channels, *x.shape[2:])
        if self.renormalise:
            x = (x - self.model_mean) / self.model_std
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(self.adapt_input(images))

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.encode_features(self.adapt_input(images))

    def _data_strides(self, model_strides: list[int]) -> tuple[int, ...]:
        """Strides relative to the data's pixels (the model may see a resized image)."""
        data = self.spec.image_size
        if self.input_size is None or data is None:
            return tuple(int(s) for s in model_strides)
        scale = min(data) / min(self.input_size)
        return tuple(max(1, round(s * scale)) for s in model_strides)


def _evenly_spaced(depth: int, count: int = 4) -> list[int]:
    count = min(count, depth)
    return sorted({round((i + 1) * depth / count) - 1 for i in range(count)})


# --------------------------------------------------------------------------------------------------- timm
class TimmBackbone(FoundationBackbone):
    """Any timm model (``timm.create_model(architecture, num_classes=0, **model_kwargs)``): pooled pre-logits."""

    family = "timm"

    def build_model(self) -> nn.Module:
        import timm

        kwargs = {k: v for k, v in self.settings.model_kwargs.items() if k != "num_classes"}
        model = timm.create_model(self.settings.architecture, pretrained=False, num_classes=0, **kwargs)
        info = list(getattr(model, "feature_info", []) or [])
        self.feature_dim = int(model.num_features)
        reductions = [int(i["reduction"]) for i in info]
        self._token_model = bool(info) and len(set(reductions)) == 1 and len(info) > 1
        self._indices = _evenly_spaced(len(info)) if self._token_model else list(range(len(info)))
        self.feature_channels = tuple(int(info[i]["num_chs"]) for i in self._indices)
        self.feature_strides = self._data_strides([reductions[i] for i in self._indices])
        return model

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def encode_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        if not hasattr(self.model, "forward_intermediates") or not self._indices:
            return super().encode_features(images)
        return list(self.model.forward_intermediates(images, indices=self._indices, intermediates_only=True))


# ---------------------------------------------------------------------------------------------------- hf
def hf_config_from_dict(data: dict[str, Any]) -> Any:
    """A transformers config object from its ``to_dict()`` (the class chosen by ``model_type``)."""
    from transformers import AutoConfig

    values = dict(data)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


class HFBackbone(FoundationBackbone):
    """A Hugging Face vision transformer (ViT, DINOv2, RAD-DINO, a CLIP/SigLIP vision tower) built from its config.

    Pooled feature: the model's ``pooler_output`` when it has a parameter-free or pretrained one (DINOv2: the normed
    class token; CLIP: the post-layernorm class token), else the normed class token (``ViTModel``'s dense+tanh
    pooler is a classification head and is not built).
    """

    family = "hf"

    def build_model(self) -> nn.Module:
        from transformers import AutoModel

        config = hf_config_from_dict(self.settings.config or {})
        model = AutoModel.from_config(config)
        if getattr(model, "pooler", None) is not None and type(model).__name__ == "ViTModel":
            model.pooler = None
        self.hf_config = config
        hidden = getattr(config, "hidden_size", None)
        layers = getattr(config, "num_hidden_layers", None)
        if hidden is None or layers is None:
            raise ValueError(f"hf '{self.settings.architecture}': not a vision transformer config (needs "
                             "hidden_size and num_hidden_layers) — ViT, DINOv2 and CLIP/SigLIP vision towers load")
        self.feature_dim = int(hidden)
        self._indices = _evenly_spaced(int(layers))
        self.feature_channels = (int(hidden),) * len(self._indices)
        self.feature_strides = self._data_strides([int(self.settings.patch_size or 1)] * len(self._indices))
        accepts = inspect.signature(model.forward).parameters
        config_size = getattr(config, "image_size", None)
        self._interpolate = ("interpolate_pos_encoding" in accepts and self.input_size is not None
                             and config_size is not None and tuple(self.input_size) != (config_size, config_size))
        return model

    def _run(self, images: torch.Tensor, hidden_states: bool) -> Any:
        kwargs: dict[str, Any] = {"output_hidden_states": hidden_states}
        if self._interpolate:
            kwargs["interpolate_pos_encoding"] = True
        return self.model(pixel_values=images, **kwargs)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self._run(images, False)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    def encode_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self._run(images, True)
        patch = int(self.settings.patch_size or 0)
        if not patch:
            return super().encode_features(images)
        grid = (images.shape[2] // patch, images.shape[3] // patch)
        maps = []
        for index in self._indices:
            tokens = out.hidden_states[index + 1]  # hidden_states[0] is the embedding output
            tokens = tokens[:, tokens.shape[1] - grid[0] * grid[1]:]  # drop class and register tokens
            maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid))
        return maps


# -------------------------------------------------------------------------------------------- torchvision
TORCHVISION_PREFIXES = ("resnet", "resnext", "wide_resnet", "vit_", "convnext_")
"""torchvision architectures this wrapper knows how to strip of their classifier and split into stages."""


def torchvision_classifier_keys(architecture: str) -> tuple[str, ...]:
    """State-dict key prefixes of a torchvision model's ImageNet classifier (dropped on load)."""
    if architecture.startswith("vit_"):
        return ("heads.",)
    if architecture.startswith("convnext_"):
        return ("classifier.2.",)
    return ("fc.",)


class TorchvisionBackbone(FoundationBackbone):
    """A torchvision ResNet/ResNeXt/Wide-ResNet, ViT or ConvNeXt without its ImageNet classifier."""

    family = "torchvision"

    def build_model(self) -> nn.Module:
        from torchvision.models import get_model

        name = self.settings.architecture
        if not name.startswith(TORCHVISION_PREFIXES):
            raise ValueError(f"torchvision '{name}': supported families are {list(TORCHVISION_PREFIXES)}")
        model = get_model(name, weights=None, **self.settings.model_kwargs)
        if name.startswith("vit_"):
            self.feature_dim = int(model.hidden_dim)
            model.heads = nn.Identity()
            self.feature_channels, self.feature_strides = (), ()
        elif name.startswith("convnext_"):
            self.feature_dim = int(model.classifier[2].in_features)
            model.classifier[2] = nn.Identity()
            self.feature_channels = tuple(_last_norm_channels(model.features[i]) for i in (1, 3, 5, 7))
            self.feature_strides = self._data_strides([4, 8, 16, 32])
        else:
            self.feature_dim = int(model.fc.in_features)
            model.fc = nn.Identity()
            self.feature_channels = (int(model.bn1.num_features),) + tuple(
                _last_norm_channels(getattr(model, f"layer{i}")) for i in range(1, 5))
            self.feature_strides = self._data_strides([2, 4, 8, 16, 32])
        return model

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def encode_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        name, net = self.settings.architecture, self.model
        if name.startswith("vit_"):
            raise ValueError(f"torchvision '{name}': multi-scale features are not supported for torchvision ViTs "
                             "(no intermediate-token API) — use the same weights through timm or hf for "
                             "segmentation, or a frozen-feature / fine-tuning protocol")
        if name.startswith("convnext_"):
            maps, x = [], images
            for i, stage in enumerate(net.features):
                x = stage(x)
                if i in (1, 3, 5, 7):
                    maps.append(x)
            return maps
        return resnet_feature_maps(net, images, net.relu)


# -------------------------------------------------------------------------------------------------- monai
MONAI_ARCHITECTURES = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")
"""MONAI networks loadable as 3D encoders (the MedicalNet family; Chen et al., arXiv:1904.00625)."""


class MonaiBackbone(FoundationBackbone):
    """A MONAI 3D ResNet (``monai.networks.nets.<architecture>(spatial_dims=3, feed_forward=False, **kwargs)``)."""

    family = "monai"
    spatial_dims_supported = (3,)

    def build_model(self) -> nn.Module:
        from monai.networks import nets

        name = self.settings.architecture
        if name not in MONAI_ARCHITECTURES:
            raise ValueError(f"monai '{name}': supported architectures are {list(MONAI_ARCHITECTURES)}")
        kwargs = dict(self.settings.model_kwargs)
        kwargs.setdefault("n_input_channels", self.model_channels)
        model = getattr(nets, name)(spatial_dims=3, feed_forward=False, **kwargs)
        self.feature_dim = _last_norm_channels(model.layer4)
        self.feature_channels = (int(model.bn1.num_features),) + tuple(
            _last_norm_channels(getattr(model, f"layer{i}")) for i in range(1, 5))
        stem = int(kwargs.get("conv1_t_stride", 1))
        pooled = stem if model.no_max_pool else stem * 2
        self.feature_strides = self._data_strides([stem, pooled, pooled * 2, pooled * 4, pooled * 8])
        return model

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def encode_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return resnet_feature_maps(self.model, images, self.model.act, max_pool=not self.model.no_max_pool)
