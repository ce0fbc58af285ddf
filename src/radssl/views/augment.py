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
only device-generic tensor ops, and accelerators take the one-shot (unchunked) warp. 3D volumes get crop,
flips, in-plane rotation (about the depth axis), intensity, blur (3 axes) and noise.
"""

from __future__ import annotations

import math
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator

from radssl.errors import ConfigError, DataError

ParameterDict = dict[str, torch.Tensor]

_CPU_GRID_POINTS = 2**20
"""Output points per warp chunk on CPU (64 samples at 128 px)."""


class AugmentationParams(pydantic.BaseModel):
    """Ranges and probabilities of each augmentation; defaults are a SimCLR recipe for X-rays.

    ``crop_scale`` is the crop's area (volume in 3D) as a fraction of the input; ``crop_ratio`` its width /
    height in pixels. ``brightness`` / ``contrast`` draw a multiplicative factor in ``1 ± value``; ``gamma`` is
    drawn log-uniformly in its range; the three are applied together with probability ``intensity_p``.
    ``blur_sigma`` is in pixels of the *output*.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

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

    @field_validator("crop_scale", "crop_ratio", "gamma", "blur_sigma", "noise_std")
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

    @field_validator("crop_ratio", "gamma")
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
        """
        p = self.params
        device = torch.device(device)
        n = self.spatial_dims
        size = tuple(input_size) if input_size is not None else self.output_size
        if len(size) != n:
            raise DataError(
                "BatchAugmenter.sample_parameters input_size",
                f"has {len(size)} spatial dims but the augmenter was built for {n}",
                f"pass a {n}-tuple or build the augmenter with a matching output_size",
            )
        height, width = size[-2], size[-1]
        g = generator

        def uniform(low: float, high: float) -> torch.Tensor:
            return _uniform(low, high, batch_size, device, g)

        # Random resized crop (Szegedy et al. 2015 / torchvision): area fraction uniform, aspect log-uniform.
        # Vectorised: instead of torchvision's 10 rejection tries, crops that would overflow are clamped to the
        # full extent along that axis (same support, slightly more mass at the edge).
        scale = uniform(*p.crop_scale)
        ratio = torch.exp(uniform(math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])))
        plane_area = scale if n == 2 else scale ** (2.0 / 3.0)
        extent_x = torch.sqrt(plane_area * ratio * (height / width)).clamp(max=1.0)
        extent_y = torch.sqrt(plane_area / ratio * (width / height)).clamp(max=1.0)
        extents = [extent_x, extent_y]
        if n == 3:
            extents.append((scale ** (1.0 / 3.0)).clamp(max=1.0))
        crop_extent = torch.stack(extents, dim=1)
        # Centre uniform over positions where the crop fits inside the image (normalised coords).
        crop_center = (1.0 - crop_extent) * (2.0 * torch.rand(batch_size, n, device=device, generator=g) - 1.0)

        hflip = _bernoulli(p.hflip_p, batch_size, device, g)
        vflip = _bernoulli(p.vflip_p, batch_size, device, g)
        rotation = uniform(-p.rotation_degrees, p.rotation_degrees) * (math.pi / 180.0)

        intensity_on = _bernoulli(p.intensity_p, batch_size, device, g)
        one = torch.ones(batch_size, device=device)
        brightness = torch.where(intensity_on, uniform(1.0 - p.brightness, 1.0 + p.brightness), one)
        contrast = torch.where(intensity_on, uniform(1.0 - p.contrast, 1.0 + p.contrast), one)
        gamma = torch.where(intensity_on, torch.exp(uniform(math.log(p.gamma[0]), math.log(p.gamma[1]))), one)

        zero = torch.zeros(batch_size, device=device)
        blur_sigma = torch.where(_bernoulli(p.blur_p, batch_size, device, g), uniform(*p.blur_sigma), zero)
        noise_std = torch.where(_bernoulli(p.noise_p, batch_size, device, g), uniform(*p.noise_std), zero)
        noise_seed = torch.randint(0, 2**62, (), device=device, generator=g, dtype=torch.int64)

        return {
            "crop_center": crop_center,
            "crop_extent": crop_extent,
            "hflip": hflip,
            "vflip": vflip,
            "rotation": rotation,
            "brightness": brightness,
            "contrast": contrast,
            "gamma": gamma,
            "blur_sigma": blur_sigma,
            "noise_std": noise_std,
            "noise_seed": noise_seed,
        }

    # ------------------------------------------------------------------ applying
    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment ``images`` (B, C, *spatial) in [0, 1] with fresh per-sample parameters from ``generator``."""
        self._check_images(images)
        if torch.device(generator.device).type != images.device.type:
            raise DataError(
                "BatchAugmenter.forward generator",
                f"lives on {generator.device} but images are on {images.device}",
                f"create it with torch.Generator(device={str(images.device)!r})",
            )
        parameters = self.sample_parameters(images.shape[0], images.device, generator, tuple(images.shape[2:]))
        return self.apply(images, parameters)

    @torch.no_grad()
    def apply(self, images: torch.Tensor, parameters: ParameterDict) -> torch.Tensor:
        """Apply given per-sample ``parameters`` to ``images``; deterministic. Returns (B, C, *output_size).

        On an accelerator this synchronises with the host a few times per batch (indices of the samples to blur
        and to noise, and the noise seed): negligible next to a training step, and it saves computing blur and
        noise for samples their probability skipped.
        """
        self._check_images(images)
        out = self._warp(images, parameters)
        out = self._intensity(out, parameters)
        out = self._blur(out, parameters["blur_sigma"])
        out = self._noise(out, parameters["noise_std"], parameters["noise_seed"])
        return out.clamp_(0.0, 1.0)

    def _check_images(self, images: torch.Tensor) -> None:
        expected = 2 + self.spatial_dims
        if images.ndim != expected or not images.is_floating_point():
            raise DataError(
                "BatchAugmenter images",
                f"expected a floating tensor (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) in [0, 1], "
                f"got dtype {images.dtype} shape {tuple(images.shape)}",
                "convert stored uint8 images with images.float() / 255 and keep the channel axis",
            )

    def _warp(self, images: torch.Tensor, parameters: ParameterDict) -> torch.Tensor:
        """Crop + flips + rotation as one affine map from output to input coordinates, one grid_sample."""
        n = self.spatial_dims
        batch = images.shape[0]
        dtype, device = images.dtype, images.device
        extent = parameters["crop_extent"].to(dtype)
        flip_sign = torch.ones(batch, n, dtype=dtype, device=device)
        flip_sign[:, 0] = 1.0 - 2.0 * parameters["hflip"].to(dtype)
        flip_sign[:, 1] = 1.0 - 2.0 * parameters["vflip"].to(dtype)
        # x_in = centre + P⁻¹ R P S F x_out: S F scales/flips the output square onto the crop window, R rotates
        # it rigidly in *pixel* space (P converts normalised to pixel units, so non-square inputs are not
        # sheared), then the window is moved to its centre.
        rotation = torch.zeros(batch, n, n, dtype=dtype, device=device)
        cos, sin = torch.cos(parameters["rotation"]).to(dtype), torch.sin(parameters["rotation"]).to(dtype)
        rotation[:, 0, 0], rotation[:, 0, 1] = cos, -sin
        rotation[:, 1, 0], rotation[:, 1, 1] = sin, cos
        if n == 3:
            rotation[:, 2, 2] = 1.0
        pixels = torch.tensor(images.shape[2:][::-1], dtype=dtype, device=device)  # (W, H[, D])
        linear = (rotation * pixels[None, None, :] / pixels[None, :, None]) * (extent * flip_sign)[:, None, :]
        theta = torch.cat([linear, parameters["crop_center"].to(dtype)[:, :, None]], dim=2)
        if device.type != "cpu":
            return F.grid_sample(
                images, _affine_grid(theta, self.output_size), mode="bilinear",
                padding_mode=self.params.padding_mode, align_corners=False,
            )
        # CPU: warp in chunks whose sampling grid (~8 MB) stays in cache and below glibc's mmap threshold; one
        # full-batch grid at 128 px (33 MB) is re-mmapped and page-faulted on every call (~1.6x slower measured).
        out = images.new_empty((batch, images.shape[1], *self.output_size))
        chunk = max(1, _CPU_GRID_POINTS // math.prod(self.output_size))
        for start in range(0, batch, chunk):
            stop = min(start + chunk, batch)
            out[start:stop] = F.grid_sample(
                images[start:stop], _affine_grid(theta[start:stop], self.output_size), mode="bilinear",
                padding_mode=self.params.padding_mode, align_corners=False,
            )
        return out

    def _intensity(self, out: torch.Tensor, parameters: ParameterDict) -> torch.Tensor:
        """Brightness (multiply), contrast (blend with the image mean), gamma; clamped after each like torchvision."""
        shape = (-1,) + (1,) * (out.ndim - 1)
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
