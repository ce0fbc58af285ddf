"""Batched SSL augmentations for 1-channel radiology images, with per-sample random parameters.

What: random resized crop + flips + small rotation (one affine warp), brightness / contrast / gamma,
Gaussian blur and Gaussian noise, applied to a whole (B, C, H, W) or (B, C, D, H, W) batch on the training
device, each sample with its own parameters drawn from one ``torch.Generator``. The recipe follows SimCLR
(Chen et al., 2020, arXiv:2002.05709) adapted to radiographs as in Azizi et al. 2021 (arXiv:2101.05224) and
Sowrirajan et al. 2021 (MoCo-CXR, arXiv:2010.05352): no colour ops, no vertical flip by default, small rotations,
intensity jitter in place of colour jitter.

Why our own module and not kornia or torchvision v2: it is the fastest per-sample option we measured.
``benchmarks/augment_backends.py --quick --threads 1 2`` (batch 256, 1 channel, CPU, torch 2.14.1, kornia 0.9.0,
torchvision 0.29.1; median wall ms of 3 calls; full rows in ``benchmarks/results/augment_backends.json``)::

    1 torch thread   BatchAugmenter   kornia AugmentationSequential    torchvision v2 per-sample loop
                                      (better of slice/resample crop)
    28 px                  7 ms          18 ms  (2.5x slower)            230 ms (32x slower)
    64 px                 28 ms          84 ms  (3.0x slower)            294 ms (11x slower)
    128 px               131 ms         302 ms  (2.3x slower)            495 ms (3.8x slower)

The machine (2 cores) was shared with ~4 other busy processes during the run. With 2 torch threads every
backend was dominated by OpenMP threads waiting for a descheduled partner (~330 ms for *any* radssl call, even
at 28 px), so those rows measure the load, not the code; there radssl was still fastest (kornia 1.3-1.7x,
torchvision loop 17-26x slower). Rerun on a quiet machine before quoting absolute numbers.

- Crop, flips and rotation are composed into ONE per-sample affine matrix, so the whole geometric part is one
  bilinear ``F.grid_sample`` that writes the output size directly. kornia (profiled) warps twice in
  ``resample`` mode (crop, then rotation), and in ``slice`` mode resizes each crop with its own
  ``F.interpolate`` call (a per-sample Python loop) before warping for the rotation; its probability-gated ops
  run on the whole batch and are merged back with ``torch.where``/``torch.stack``. Its ``RandomGaussianNoise``
  has one fixed ``std`` (no per-sample range) and its brightness is additive.
- torchvision v2 applied to a batched tensor draws ONE parameter set for the whole batch (every sample gets
  the same crop), so the per-sample equivalent is a Python loop over samples. Even the non-equivalent
  single-call batch (22 / 127 / 485 ms at 1 thread) is slower than ours beyond 28 px.
- The sampling grid is built as broadcast sums (``_affine_grid``): ``F.affine_grid`` runs a batched matmul with
  inner size 3 that measured 2-2.5x slower on CPU (1 thread: 17.6 vs 8.9 ms at 64 px, 125 vs 51 ms at 128 px,
  grid + sample). On CPU the warp runs in chunks of ~1M output points (a 33 MB full-batch grid at 128 px is
  re-mmapped and page-faulted every call; chunked min wall 18 vs 29 ms at 2 threads).
- Intensity ops are elementwise with per-sample factors broadcast (identity factors for samples the
  probability skipped, so no branching); blur and noise run only on the samples their probability picked.
- Blur is a separable Gaussian as grouped (depthwise) convolutions with one kernel per sample (kernel radius
  fixed by the *configured* maximum sigma, so shapes never depend on the data). At 128 px, 1 thread, whole
  batch: grouped conv 38 ms, banded-matrix products 67 ms, shifted weighted sums 147 ms.

Known limits: the warp is bilinear without antialiasing, so strong downsampling (crop much larger than the
output) aliases; store images near the training resolution. Not yet run on a GPU (none here); the code uses
only device-generic tensor ops, and accelerators take the one-shot (unchunked) warp.

Volumes (B, C, D, H, W) get the same ops plus, folded into the same single affine warp: a flip of the depth axis
(``dflip_p``), random quarter-turns in a chosen plane (``rot90_p``, ``rot90_planes``; exact on a square plane:
grid points map onto grid points) and small out-of-plane rotations about the H and W axes (``tilt_degrees``),
so a full small 3D rotation costs no extra resampling. Modality-specific intensity (also for 2D slices):

- CT, window jitter (``window_level``, ``window_width``): stored CT is a window [c − w/2, c + w/2] mapped to
  [0, 1], so a new window (c + Δ·w, s·w) is ``(x − 0.5 − Δ) / s + 0.5``: level and width move as a radiologist
  moves them. Values the stored window clipped stay clipped (a wider window cannot recover them).
- MR, a smooth multiplicative bias field (``bias_field_p``): ``exp(Σ c_ijk x^i y^j z^k)`` over normalised
  coordinates, i + j + k ≤ ``bias_field_order``, coefficients uniform in ±``bias_field_coefficient`` — TorchIO's
  ``RandomBiasField`` (Pérez-García et al., CMPB 2021; after Sudre et al. 2017), evaluated exactly as separable
  contractions (about 4 multiply-adds per voxel), never as a per-voxel Python loop. Plus gamma (``gamma``).

``modality: ct | mr`` fills these and all-axis flips / quarter-turns / small tilts as defaults (keys you set
win); ``modality: xray`` (the default) keeps the radiograph recipe above. Parameters of an op that is off are
not drawn, so a radiograph config consumes the generator — and produces bits — exactly as before these ops existed.

Masks: ``apply(images, parameters, masks=...)`` warps segmentation masks by the same affine with
nearest-neighbour sampling (zeros outside), and no intensity op touches them.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Literal

import pydantic
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator, model_validator

from radssl.errors import ConfigError, DataError

ParameterDict = dict[str, torch.Tensor]

_CPU_GRID_POINTS = 2**20
"""Output points per warp chunk on CPU (64 samples at 128 px)."""

Modality = Literal["xray", "ct", "mr"]
Plane = Literal["hw", "dh", "dw"]
PLANES: tuple[str, ...] = ("hw", "dh", "dw")
"""Planes of quarter-turns, by the axes they turn: in-plane (axial for volumes), and the two through depth."""
_PLANE_AXES = {"hw": (0, 1), "dh": (1, 2), "dw": (0, 2)}
"""Plane → the pair of affine coordinates it mixes (x = W, y = H, z = D, as in ``F.affine_grid``)."""

_VOLUME_GEOMETRY: dict[str, Any] = {
    "hflip_p": 0.5, "vflip_p": 0.5, "dflip_p": 0.5, "rot90_p": 0.5, "rot90_planes": ("hw",), "tilt_degrees": 10.0,
}
MODALITY_DEFAULTS: dict[str, dict[str, Any]] = {
    "xray": {},
    # CT: Hounsfield units are absolute, so no brightness/contrast/gamma; the window moves instead.
    "ct": {"brightness": 0.0, "contrast": 0.0, "gamma": (1.0, 1.0), "window_level": 0.1,
           "window_width": (0.8, 1.25), **_VOLUME_GEOMETRY},
    # MR: no absolute unit; coil inhomogeneity (bias field) and contrast curves vary between scanners.
    "mr": {"brightness": 0.2, "contrast": 0.2, "gamma": (0.7, 1.5), "bias_field_p": 0.5, **_VOLUME_GEOMETRY},
}
"""What ``modality`` fills in for keys the user leaves out. Flips on all axes and quarter-turns suit cross-sectional
images (no fixed up/down as on a radiograph; nnU-Net mirrors all axes, Isensee et al. 2021)."""


class AugmentationParams(pydantic.BaseModel):
    """Ranges and probabilities of each augmentation; defaults are a SimCLR recipe for X-rays.

    ``crop_scale`` is the crop's area (volume in 3D) as a fraction of the input; ``crop_ratio`` its width /
    height in pixels. ``brightness`` / ``contrast`` draw a multiplicative factor in ``1 ± value``; ``gamma`` is
    drawn log-uniformly in its range; the three (and the CT window jitter) are applied together with probability
    ``intensity_p``. ``blur_sigma`` is in pixels of the *output*. ``modality`` picks defaults for the keys
    left out (:data:`MODALITY_DEFAULTS`); 3D-only keys (``dflip_p``, ``tilt_degrees``, planes through depth) are
    ignored for 2D images.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Modality = "xray"
    """Defaults for the keys left out: ``xray`` (radiograph recipe), ``ct`` (window jitter, all-axis flips and
    quarter-turns), ``mr`` (gamma, bias field, all-axis flips and quarter-turns)."""
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = Field(0.5, ge=0.0, le=1.0)
    vflip_p: float = Field(0.0, ge=0.0, le=1.0)
    rotation_degrees: float = Field(10.0, ge=0.0, le=180.0)
    brightness: float = Field(0.4, ge=0.0, le=1.0)
    contrast: float = Field(0.4, ge=0.0, le=1.0)
    gamma: tuple[float, float] = (0.7, 1.4)
    intensity_p: float = Field(0.8, ge=0.0, le=1.0)
    blur_p: float = Field(0.5, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_p: float = Field(0.5, ge=0.0, le=1.0)
    noise_std: tuple[float, float] = (0.0, 0.05)
    padding_mode: Literal["zeros", "border", "reflection"] = "zeros"
    """What the warp samples outside the image (rotated corners): zeros match the black border of most films."""
    dflip_p: float = Field(0.0, ge=0.0, le=1.0, description="volumes: flip of the depth axis")
    rot90_p: float = Field(0.0, ge=0.0, le=1.0, description="a quarter-turn (k = 1, 2, 3 equally likely)")
    rot90_planes: tuple[Plane, ...] = Field(("hw",), min_length=1, description="planes a quarter-turn may be in")
    tilt_degrees: float = Field(0.0, ge=0.0, le=45.0, description="volumes: rotation about the H and W axes, ± each")
    window_level: float = Field(0.0, ge=0.0, le=0.5, description="CT: level shift, ± fraction of the window width")
    window_width: tuple[float, float] = (1.0, 1.0)
    """CT: factor on the window width, drawn log-uniformly (> 1 widens: less contrast)."""
    bias_field_p: float = Field(0.0, ge=0.0, le=1.0, description="MR: probability of a multiplicative bias field")
    bias_field_coefficient: float = Field(0.5, ge=0.0, le=2.0, description="MR: max |coefficient| of the log-field")
    bias_field_order: int = Field(3, ge=1, le=5, description="MR: polynomial order of the log-field")

    @model_validator(mode="before")
    @classmethod
    def _modality_defaults(cls, data: Any) -> Any:
        """Fill the keys the user left out from the modality's defaults (before validation: recorded as used)."""
        if not isinstance(data, dict):
            return data
        defaults = MODALITY_DEFAULTS.get(str(data.get("modality", "xray")), {})  # unknown: the field reports it
        return {**defaults, **data} if defaults else data

    @field_validator("crop_scale", "crop_ratio", "gamma", "blur_sigma", "noise_std", "window_width")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"range bounds must be finite numbers, got {value}")
        if low > high:
            raise ValueError(f"range must be (low, high) with low <= high, got {value}; swap the bounds")
        return value

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_fraction(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not (0.0 < value[0] and value[1] <= 1.0):
            raise ValueError(f"crop_scale is an area fraction and must lie in (0, 1], got {value}")
        return value

    @field_validator("crop_ratio", "gamma", "window_width")
    @classmethod
    def _positive(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] <= 0.0:
            raise ValueError(f"range must be strictly positive, got {value}")
        return value

    @field_validator("blur_sigma", "noise_std")
    @classmethod
    def _non_negative(cls, value: tuple[float, float]) -> tuple[float, float]:
        if value[0] < 0.0:
            raise ValueError(f"range must be non-negative, got {value}")
        return value


def _affine_grid(theta: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``F.affine_grid(theta, (B, C, *size), align_corners=False)`` as broadcast sums of per-axis terms.

    Same values (to float rounding); on CPU ``F.affine_grid`` runs a batched matmul with inner size 3, which
    we measured 2-2.5x slower than these outer sums (see the module docstring).
    """
    batch, n = theta.shape[0], theta.shape[1]
    grid: torch.Tensor | None = None
    for axis, length in enumerate(reversed(size)):  # x (W) first, as in the grid's last dimension
        coords = (torch.arange(length, dtype=theta.dtype, device=theta.device) * 2 + 1) / length - 1
        shape = [batch] + [1] * n + [n]
        shape[n - axis] = length
        term = (coords.view(1, length, 1) * theta[:, None, :, axis]).view(shape)
        if grid is None:
            term = term + theta[:, :, n].view(batch, *([1] * n), n)
            grid = term
        else:
            grid = grid + term
    assert grid is not None
    return grid


def _uniform(
    low: float, high: float, batch_size: int, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    u = torch.rand(batch_size, device=device, generator=generator)
    return low + (high - low) * u


def _bernoulli(p: float, batch_size: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(batch_size, device=device, generator=generator) < p


def _quarter_turns(turns: torch.Tensor, planes: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, n, n) exact rotations by ``turns`` × 90° in plane ``PLANES[planes]`` (integer entries, no rounding)."""
    batch = turns.shape[0]
    cos_table = torch.tensor([1.0, 0.0, -1.0, 0.0], dtype=dtype, device=turns.device)
    sin_table = torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=dtype, device=turns.device)
    cos, sin = cos_table[turns], sin_table[turns]
    result = torch.eye(n, dtype=dtype, device=turns.device).repeat(batch, 1, 1)
    for index, plane in enumerate(PLANES):
        a, b = _PLANE_AXES[plane]
        if b >= n:
            continue
        here = planes == index
        # rows/cols a, b of the identity become the 2x2 rotation where this plane was drawn
        result[:, a, a] = torch.where(here, cos, result[:, a, a])
        result[:, a, b] = torch.where(here, -sin, result[:, a, b])
        result[:, b, a] = torch.where(here, sin, result[:, b, a])
        result[:, b, b] = torch.where(here, cos, result[:, b, b])
    return result


def bias_field_exponents(spatial_dims: int, order: int) -> list[tuple[int, ...]]:
    """Exponents (i, j[, k]) of x^i y^j z^k with i + j + k ≤ order: the monomials of a bias field's log."""
    ranges = [range(order + 1)] * spatial_dims
    return [e for e in itertools.product(*ranges) if sum(e) <= order]


def bias_field(coefficients: torch.Tensor, size: tuple[int, ...], order: int) -> torch.Tensor:
    """(S, *size) fields ``exp(Σ c_e x^i y^j z^k)`` over voxel centres in [-1, 1] (x = W, y = H, z = D).

    Evaluated as separable contractions (one axis at a time) over a dense coefficient tensor: about
    (order + 1) multiply-adds per voxel and axis instead of one full-size product per monomial.
    """
    n = len(size)
    exponents = bias_field_exponents(n, order)
    count, device, dtype = coefficients.shape[0], coefficients.device, coefficients.dtype
    dense = torch.zeros(count, *([order + 1] * n), dtype=dtype, device=device)
    index = torch.tensor(exponents, device=device)
    dense[(slice(None), *index.T)] = coefficients  # dense[s, i, j, k] = c for x^i y^j z^k
    powers = []
    for length in reversed(size):  # x (W), y (H)[, z (D)]
        centres = (torch.arange(length, dtype=dtype, device=device) * 2 + 1) / length - 1
        powers.append(centres[:, None] ** torch.arange(order + 1, dtype=dtype, device=device))  # (length, order+1)
    if n == 2:
        t = torch.einsum("sij,xi->sjx", dense, powers[0])
        log_field = torch.einsum("sjx,yj->syx", t, powers[1])
    else:
        t = torch.einsum("sijk,xi->sjkx", dense, powers[0])
        t = torch.einsum("sjkx,yj->skyx", t, powers[1])
        log_field = torch.einsum("skyx,zk->szyx", t, powers[2])
    return log_field.exp_()


@dataclasses.dataclass(frozen=True)
class _Draws:
    """Per-sample random draws for one batch from one generator (call order fixes the bits of every view)."""

    batch_size: int
    device: torch.device
    generator: torch.Generator

    def uniform(self, low: float, high: float) -> torch.Tensor:
        """(B,) uniform in [low, high)."""
        return _uniform(low, high, self.batch_size, self.device, self.generator)

    def log_uniform(self, low: float, high: float) -> torch.Tensor:
        """(B,) log-uniform in [low, high) (both > 0)."""
        return torch.exp(self.uniform(math.log(low), math.log(high)))

    def bernoulli(self, p: float) -> torch.Tensor:
        """(B,) bool, True with probability ``p``."""
        return _bernoulli(p, self.batch_size, self.device, self.generator)

    def signed(self, count: int) -> torch.Tensor:
        """(B, count) uniform in [-1, 1)."""
        return 2.0 * torch.rand(self.batch_size, count, device=self.device, generator=self.generator) - 1.0

    def integers(self, low: int, high: int) -> torch.Tensor:
        """(B,) int64 uniform in [low, high)."""
        return torch.randint(low, high, (self.batch_size,), device=self.device, generator=self.generator)

    def constant(self, value: float) -> torch.Tensor:
        """(B,) filled with ``value`` (no draw): the identity factor of a skipped op."""
        return torch.full((self.batch_size,), value, device=self.device)


def _draw_crop(p: AugmentationParams, size: tuple[int, ...], draws: _Draws) -> ParameterDict:
    """``crop_extent`` and ``crop_center`` (B, n) of a random resized crop of an input of spatial ``size``.

    Szegedy et al. 2015 / torchvision: area fraction uniform, aspect log-uniform. Vectorised: instead of
    torchvision's 10 rejection tries, crops that would overflow are clamped to the full extent along that axis
    (same support, slightly more mass at the edge).
    """
    n = len(size)
    height, width = size[-2], size[-1]
    scale = draws.uniform(*p.crop_scale)
    ratio = draws.log_uniform(*p.crop_ratio)
    plane_area = scale if n == 2 else scale ** (2.0 / 3.0)
    extent_x = torch.sqrt(plane_area * ratio * (height / width)).clamp(max=1.0)
    extent_y = torch.sqrt(plane_area / ratio * (width / height)).clamp(max=1.0)
    extents = [extent_x, extent_y]
    if n == 3:
        extents.append((scale ** (1.0 / 3.0)).clamp(max=1.0))
    crop_extent = torch.stack(extents, dim=1)
    # Centre uniform over positions where the crop fits inside the image (normalised coords).
    crop_center = (1.0 - crop_extent) * draws.signed(n)
    return {"crop_center": crop_center, "crop_extent": crop_extent}


def _draw_radiograph_ops(p: AugmentationParams, draws: _Draws) -> tuple[ParameterDict, torch.Tensor]:
    """Flips, in-plane rotation, brightness / contrast / gamma, blur and noise: the draws of every config.

    Also returns ``intensity_on`` (B,) bool: which samples get the intensity ops (the CT window jitter too).
    """
    hflip = draws.bernoulli(p.hflip_p)
    vflip = draws.bernoulli(p.vflip_p)
    rotation = draws.uniform(-p.rotation_degrees, p.rotation_degrees) * (math.pi / 180.0)
    intensity_on = draws.bernoulli(p.intensity_p)
    one, zero = draws.constant(1.0), draws.constant(0.0)
    brightness = torch.where(intensity_on, draws.uniform(1.0 - p.brightness, 1.0 + p.brightness), one)
    contrast = torch.where(intensity_on, draws.uniform(1.0 - p.contrast, 1.0 + p.contrast), one)
    gamma = torch.where(intensity_on, draws.log_uniform(*p.gamma), one)
    blur_sigma = torch.where(draws.bernoulli(p.blur_p), draws.uniform(*p.blur_sigma), zero)
    noise_std = torch.where(draws.bernoulli(p.noise_p), draws.uniform(*p.noise_std), zero)
    noise_seed = torch.randint(0, 2**62, (), device=draws.device, generator=draws.generator, dtype=torch.int64)
    return {
        "hflip": hflip, "vflip": vflip, "rotation": rotation, "brightness": brightness, "contrast": contrast,
        "gamma": gamma, "blur_sigma": blur_sigma, "noise_std": noise_std, "noise_seed": noise_seed,
    }, intensity_on


def _draw_volume_geometry(p: AugmentationParams, n: int, planes: list[int], draws: _Draws) -> ParameterDict:
    """Depth flip, quarter-turns (in ``planes``, indices into :data:`PLANES`) and tilts, each only if configured."""
    drawn: ParameterDict = {}
    if n == 3 and p.dflip_p > 0:
        drawn["dflip"] = draws.bernoulli(p.dflip_p)
    if p.rot90_p > 0 and planes:
        turned = draws.bernoulli(p.rot90_p)
        turns = draws.integers(1, 4)
        drawn["rot90_k"] = torch.where(turned, turns, torch.zeros_like(turns))
        choice = draws.integers(0, len(planes))
        drawn["rot90_plane"] = torch.tensor(planes, device=draws.device)[choice]
    if n == 3 and p.tilt_degrees > 0:
        drawn["tilt"] = draws.signed(2) * math.radians(p.tilt_degrees)
    return drawn


def _draw_modality_intensity(
    p: AugmentationParams, n: int, intensity_on: torch.Tensor, draws: _Draws
) -> ParameterDict:
    """CT window jitter (gated with the other intensity ops by ``intensity_on``) and MR bias field, if configured."""
    drawn: ParameterDict = {}
    if p.window_level > 0 or p.window_width != (1.0, 1.0):
        level = draws.uniform(-p.window_level, p.window_level)
        drawn["window_level"] = torch.where(intensity_on, level, draws.constant(0.0))
        drawn["window_width"] = torch.where(intensity_on, draws.log_uniform(*p.window_width), draws.constant(1.0))
    if p.bias_field_p > 0:
        on = draws.bernoulli(p.bias_field_p)
        coefficients = draws.signed(len(bias_field_exponents(n, p.bias_field_order)))
        drawn["bias_field"] = on
        drawn["bias_coefficients"] = coefficients * p.bias_field_coefficient * on[:, None]
    return drawn


class BatchAugmenter(torch.nn.Module):
    """Augment a whole batch in a few tensor ops, each sample with its own random parameters.

    ``forward(images, generator)`` = ``apply(images, sample_parameters(...))``; all randomness comes from
    ``generator`` (same seed ⇒ bit-identical output). ``apply`` is deterministic given the parameters, so tests
    and debugging tools can inspect or hand-craft them. Runs under ``torch.no_grad`` (augmentations are inputs,
    not part of the model).
    """

    def __init__(self, params: AugmentationParams, output_size: tuple[int, ...]) -> None:
        super().__init__()
        output_size = tuple(output_size)
        if len(output_size) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in output_size):
            raise ConfigError(
                f"BatchAugmenter output_size: expected 2 (H, W) or 3 (D, H, W) positive ints, got {output_size!r}"
                " — pass e.g. (224, 224) for 2D or (64, 128, 128) for 3D"
            )
        self.params = params
        self.output_size: tuple[int, ...] = output_size
        self.spatial_dims = len(output_size)
        # Quarter-turn planes usable at this dimensionality (2D: the image plane only), as indices into PLANES.
        self._planes = [PLANES.index(plane) for plane in params.rot90_planes if self.spatial_dims == 3 or plane == "hw"]

    # ------------------------------------------------------------------ sampling
    def sample_parameters(
        self,
        batch_size: int,
        device: torch.device | str,
        generator: torch.Generator,
        input_size: tuple[int, ...] | None = None,
    ) -> ParameterDict:
        """Draw per-sample parameters for ``batch_size`` images.

        ``input_size`` is the spatial size of the images the parameters will be applied to (defaults to
        ``output_size``); it only matters for non-square inputs, where crop aspect ratios are in pixels.

        Keys (B = batch, n = spatial dims, coordinate order x=W, y=H[, z=D] as in ``F.affine_grid``):
        ``crop_center`` (B, n) in [-1, 1], ``crop_extent`` (B, n) fraction of the input per axis,
        ``hflip`` / ``vflip`` (B,) bool, ``rotation`` (B,) radians in the H-W plane, ``brightness`` /
        ``contrast`` / ``gamma`` (B,) factors (1 = unchanged), ``blur_sigma`` (B,) output pixels (0 = no blur),
        ``noise_std`` (B,) (0 = no noise), ``noise_seed`` () int64 seed of the noise field.

        Only when their op is configured (so radiograph configs draw exactly what they always drew):
        ``dflip`` (B,) bool; ``rot90_k`` (B,) quarter-turns 0–3 and ``rot90_plane`` (B,) index into
        :data:`PLANES`; ``tilt`` (B, 2) radians about the W (x) and H (y) axes; ``window_level`` (B,) level shift
        and ``window_width`` (B,) width factor (0 and 1 = unchanged); ``bias_field`` (B,) bool and
        ``bias_coefficients`` (B, K) for the monomials of :func:`bias_field_exponents`.
        """
        n = self.spatial_dims
        size = tuple(input_size) if input_size is not None else self.output_size
        if len(size) != n:
            raise DataError(
                "BatchAugmenter.sample_parameters input_size",
                f"has {len(size)} spatial dims but the augmenter was built for {n}",
                f"pass a {n}-tuple or build the augmenter with a matching output_size",
            )
        draws = _Draws(batch_size, torch.device(device), generator)
        # The steps run in this fixed order: each consumes the generator in turn, so the order fixes the bits.
        drawn = _draw_crop(self.params, size, draws)
        common, intensity_on = _draw_radiograph_ops(self.params, draws)
        drawn.update(common)
        # Ops added for volumes and CT/MR come after every draw above and are drawn only when configured, so a
        # radiograph config leaves the generator exactly where it always did (bit-identical views, same speed).
        drawn.update(_draw_volume_geometry(self.params, n, self._planes, draws))
        drawn.update(_draw_modality_intensity(self.params, n, intensity_on, draws))
        return drawn

    # ------------------------------------------------------------------ applying
    def forward(self, images: torch.Tensor, generator: torch.Generator,
                masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images`` (B, C, *spatial) in [0, 1] with fresh per-sample parameters from ``generator``.

        With ``masks`` (B, K, *spatial), returns (images, masks) moved by the same geometry (see :meth:`apply`).
        """
        self._check_images(images)
        if torch.device(generator.device).type != images.device.type:
            raise DataError(
                "BatchAugmenter.forward generator",
                f"lives on {generator.device} but images are on {images.device}",
                f"create it with torch.Generator(device={str(images.device)!r})",
            )
        parameters = self.sample_parameters(images.shape[0], images.device, generator, tuple(images.shape[2:]))
        return self.apply(images, parameters, masks=masks)

    @torch.no_grad()
    def apply(self, images: torch.Tensor, parameters: ParameterDict,
              masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Apply given per-sample ``parameters`` to ``images``; deterministic. Returns (B, C, *output_size).

        ``masks`` (B, K, *spatial, any dtype: integer labels or 0/1 floats) are warped by the same affine with
        nearest-neighbour sampling (zeros — background — outside the image) and returned with the images as
        ``(images, masks)`` in the masks' dtype; intensity, blur and noise never touch them. Labels must be
        exactly representable in float32 (integers below 2**24).

        On an accelerator this synchronises with the host a few times per batch (indices of the samples to blur
        and to noise, and the noise seed): negligible next to a training step, and it saves computing blur and
        noise for samples their probability skipped.
        """
        self._check_images(images)
        theta = self._theta(images, parameters)
        out = self._sample(images, theta, "bilinear", self.params.padding_mode)
        out = self._bias_field(out, parameters)
        out = self._intensity(out, parameters)
        out = self._blur(out, parameters["blur_sigma"])
        out = self._noise(out, parameters["noise_std"], parameters["noise_seed"])
        out = out.clamp_(0.0, 1.0)
        if masks is None:
            return out
        self._check_masks(masks, images)
        warped = self._sample(masks.to(torch.float32), theta.to(torch.float32), "nearest", "zeros")
        return out, warped.to(masks.dtype)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = 2 + self.spatial_dims
        if images.ndim != expected or not images.is_floating_point():
            raise DataError(
                "BatchAugmenter images",
                f"expected a floating tensor (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) in [0, 1], "
                f"got dtype {images.dtype} shape {tuple(images.shape)}",
                "convert stored uint8 images with images.float() / 255 and keep the channel axis",
            )

    @staticmethod
    def _check_masks(masks: torch.Tensor, images: torch.Tensor) -> None:
        if masks.ndim != images.ndim or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
            raise DataError(
                "BatchAugmenter masks",
                f"shape {tuple(masks.shape)} does not match the images {tuple(images.shape)} (batch and spatial size)",
                "pass masks as (B, K, *spatial) on the images' grid, e.g. labels[:, None]",
            )

    def _rotation(self, parameters: ParameterDict, batch: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
        """(B, n, n) rotation in pixel space: in-plane angle, then (3D) tilts, then the quarter-turn."""
        n = self.spatial_dims
        rotation = torch.zeros(batch, n, n, dtype=dtype, device=device)
        cos, sin = torch.cos(parameters["rotation"]).to(dtype), torch.sin(parameters["rotation"]).to(dtype)
        rotation[:, 0, 0], rotation[:, 0, 1] = cos, -sin
        rotation[:, 1, 0], rotation[:, 1, 1] = sin, cos
        if n == 3:
            rotation[:, 2, 2] = 1.0
        tilt = parameters.get("tilt") if n == 3 else None
        if tilt is not None:
            for column, (a, b) in enumerate(((1, 2), (0, 2))):  # about x (W): mixes y, z; about y (H): mixes x, z
                angle = tilt[:, column].to(dtype)
                turn = torch.eye(n, dtype=dtype, device=device).repeat(batch, 1, 1)
                turn[:, a, a], turn[:, a, b] = torch.cos(angle), -torch.sin(angle)
                turn[:, b, a], turn[:, b, b] = torch.sin(angle), torch.cos(angle)
                rotation = rotation @ turn
        turns = parameters.get("rot90_k")
        if turns is not None:
            rotation = rotation @ _quarter_turns(turns, parameters["rot90_plane"], n, dtype)
        return rotation

    def _theta(self, images: torch.Tensor, parameters: ParameterDict) -> torch.Tensor:
        """(B, n, n + 1): crop + flips + rotations as one affine map from output to input coordinates."""
        n = self.spatial_dims
        batch = images.shape[0]
        dtype, device = images.dtype, images.device
        extent = parameters["crop_extent"].to(dtype)
        flip_sign = torch.ones(batch, n, dtype=dtype, device=device)
        flip_sign[:, 0] = 1.0 - 2.0 * parameters["hflip"].to(dtype)
        flip_sign[:, 1] = 1.0 - 2.0 * parameters["vflip"].to(dtype)
        if n == 3 and "dflip" in parameters:
            flip_sign[:, 2] = 1.0 - 2.0 * parameters["dflip"].to(dtype)
        # x_in = centre + P⁻¹ R P S F x_out: S F scales/flips the output square onto the crop window, R rotates
        # it rigidly in *pixel* space (P converts normalised to pixel units, so non-square inputs are not
        # sheared), then the window is moved to its centre.
        rotation = self._rotation(parameters, batch, dtype, device)
        pixels = torch.tensor(images.shape[2:][::-1], dtype=dtype, device=device)  # (W, H[, D])
        linear = (rotation * pixels[None, None, :] / pixels[None, :, None]) * (extent * flip_sign)[:, None, :]
        return torch.cat([linear, parameters["crop_center"].to(dtype)[:, :, None]], dim=2)

    def _sample(self, images: torch.Tensor, theta: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
        """One ``grid_sample`` of the whole batch (accelerators) or in cache-sized chunks (CPU)."""
        if images.device.type != "cpu":
            return F.grid_sample(
                images, _affine_grid(theta, self.output_size), mode=mode, padding_mode=padding_mode,
                align_corners=False,
            )
        # CPU: warp in chunks whose sampling grid (~8 MB) stays in cache and below glibc's mmap threshold; one
        # full-batch grid at 128 px (33 MB) is re-mmapped and page-faulted on every call (~1.6x slower measured).
        batch = images.shape[0]
        out = images.new_empty((batch, images.shape[1], *self.output_size))
        chunk = max(1, _CPU_GRID_POINTS // math.prod(self.output_size))
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            out[start:stop] = F.grid_sample(
                images[start:stop], _affine_grid(theta[start:stop], self.output_size), mode=mode,
                padding_mode=padding_mode, align_corners=False,
            )
        return out

    def _bias_field(self, out: torch.Tensor, parameters: ParameterDict) -> torch.Tensor:
        """Multiply the samples with a bias field by ``exp(polynomial)`` (one field for all channels of a sample)."""
        if "bias_field" not in parameters:
            return out
        selected = torch.nonzero(parameters["bias_field"]).flatten()
        if selected.numel() == 0:
            return out
        coefficients = parameters["bias_coefficients"].index_select(0, selected).to(out.dtype)
        field = bias_field(coefficients, tuple(out.shape[2:]), self.params.bias_field_order)
        picked = out.index_select(0, selected).mul_(field.unsqueeze(1)).clamp_(0.0, 1.0)
        return out.index_copy_(0, selected, picked)

    def _intensity(self, out: torch.Tensor, parameters: ParameterDict) -> torch.Tensor:
        """CT window jitter (if configured), brightness (multiply), contrast (blend with the image mean), gamma;
        clamped after each like torchvision."""
        shape = (-1,) + (1,) * (out.ndim - 1)
        if "window_level" in parameters:
            level = parameters["window_level"].to(out.dtype).view(shape)
            width = parameters["window_width"].to(out.dtype).view(shape)
            out.sub_(0.5 + level).div_(width).add_(0.5).clamp_(0.0, 1.0)
        brightness = parameters["brightness"].to(out.dtype).view(shape)
        contrast = parameters["contrast"].to(out.dtype).view(shape)
        gamma = parameters["gamma"].to(out.dtype).view(shape)
        out.mul_(brightness).clamp_(0.0, 1.0)
        mean = out.mean(dim=tuple(range(1, out.ndim)), keepdim=True)
        out.mul_(contrast).add_((1.0 - contrast) * mean).clamp_(0.0, 1.0)
        return out.pow_(gamma)

    def _blur(self, out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with one kernel per sample, only on samples with sigma > 0."""
        selected = torch.nonzero(sigma > 0).flatten()
        if selected.numel() == 0:
            return out
        picked = out.index_select(0, selected)
        count, channels = picked.shape[:2]
        spatial = picked.shape[2:]
        sig = sigma.index_select(0, selected).to(out.dtype).clamp(min=1e-3)
        conv = (F.conv2d, F.conv3d)[self.spatial_dims - 2]
        # (count, C, *S) -> (1, count*C, *S): each sample-channel is its own group with its own kernel.
        x = picked.reshape(1, count * channels, *spatial)
        radius_max = math.ceil(3.0 * self.params.blur_sigma[1])
        for axis in range(self.spatial_dims):
            radius = min(radius_max, spatial[axis] - 1)  # reflect padding needs radius < size
            if radius <= 0:
                continue
            offsets = torch.arange(-radius, radius + 1, device=out.device, dtype=out.dtype)
            kernel = torch.exp(-0.5 * (offsets[None, :] / sig[:, None]) ** 2)
            kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
            kernel_shape = [count * channels, 1] + [1] * self.spatial_dims
            kernel_shape[2 + axis] = 2 * radius + 1
            pad = [0, 0] * self.spatial_dims
            pad_index = 2 * (self.spatial_dims - 1 - axis)  # F.pad lists the last axis first
            pad[pad_index] = pad[pad_index + 1] = radius
            x = conv(F.pad(x, pad, mode="reflect"), kernel.view(kernel_shape), groups=count * channels)
        return out.index_copy_(0, selected, x.reshape(count, channels, *spatial))

    def _noise(self, out: torch.Tensor, std: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        """Additive Gaussian noise with per-sample std, drawn only for samples with std > 0."""
        selected = torch.nonzero(std > 0).flatten()
        if selected.numel() == 0:
            return out
        generator = torch.Generator(device=out.device).manual_seed(int(seed))
        noise = torch.randn((selected.numel(), *out.shape[1:]), generator=generator, device=out.device, dtype=out.dtype)
        scale = std.index_select(0, selected).to(out.dtype).view((-1,) + (1,) * (out.ndim - 1))
        return out.index_add_(0, selected, noise.mul_(scale))
