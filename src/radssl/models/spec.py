"""The recorded description of a backbone: enough to rebuild it exactly, without reading state-dict keys.

Every pretraining checkpoint stores ``backbone_spec`` (``BackboneSpec.to_dict()``); transfer rebuilds the encoder
from it through the backbone registry and then loads the weights strictly. Guessing an architecture from key names
breaks as soon as two families share a layout (a 1-channel small-stem ResNet-18 and a 3×3-stem ResNet-18 with a
different pool, a ViT with another patch size), so radssl never does it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from radssl.errors import CheckpointError

Stem = Literal["standard", "small"]


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: family (registry name), input channels, spatial dims, built-for size, stem, patch size.

    ``image_size`` is the spatial size the encoder was built for ((H, W) or (D, H, W)); convolutional families accept
    other sizes, ViTs need it for their position embeddings. ``options`` holds family-specific settings (e.g. a
    width or depth) validated by the family.
    """

    family: str
    in_channels: int = 1
    spatial_dims: int = 2
    image_size: tuple[int, ...] | None = None
    stem: Stem | None = None
    patch_size: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.in_channels < 1:
            raise ValueError(f"backbone in_channels must be ≥ 1, got {self.in_channels}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"backbone spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.image_size is not None:
            object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
            if len(self.image_size) != self.spatial_dims:
                raise ValueError(f"image_size {self.image_size} does not have {self.spatial_dims} dimensions")
        object.__setattr__(self, "options", dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe mapping (what checkpoints record)."""
        data = asdict(self)
        data["image_size"] = list(self.image_size) if self.image_size is not None else None
        data["options"] = dict(self.options)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> "BackboneSpec":
        """Rebuild a spec from :meth:`to_dict` output; a clear error for anything else."""
        if not isinstance(data, Mapping) or "family" not in data:
            raise CheckpointError(f"{source}: no usable 'backbone_spec' (got {type(data).__name__}) — the file "
                                  "predates backbone specs or was not written by radssl; re-run pretraining")
        known = {"family", "in_channels", "spatial_dims", "image_size", "stem", "patch_size", "options"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{source}: backbone_spec has unknown fields {unknown} (written by a newer radssl?)")
        values = dict(data)
        if values.get("image_size") is not None:
            values["image_size"] = tuple(values["image_size"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{source}: invalid backbone_spec ({error})") from error

    def describe(self) -> str:
        """Short human text: ``resnet18 (1 ch, 2D, small stem)``."""
        parts = [f"{self.in_channels} ch", f"{self.spatial_dims}D"]
        if self.stem:
            parts.append(f"{self.stem} stem")
        if self.patch_size:
            parts.append(f"patch {self.patch_size}")
        if self.image_size:
            parts.append("×".join(map(str, self.image_size)) + (" px" if self.spatial_dims == 2 else " voxels"))
        return f"{self.family} ({', '.join(parts)})"
