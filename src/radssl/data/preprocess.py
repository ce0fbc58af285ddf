"""Modality-aware preprocessing: a reader's ``Record`` → a compact (C, H, W) or (C, D, H, W) array for the cache.

Order of operations (each step's reason in brackets):

1. Layout: pixels become channels-first float32 (``extra["layout"]``: HW, CHW, DHW or CDHW).
2. Ultrasound sector crop (modality ``us``, ``us_crop``) on the raw values [the fan is found best before any
   rescaling]. Heuristic: a pixel is foreground when it is brighter than 4 % of the image's range *and*
   textured (standard deviation in its 5×5 neighbourhood above 2 % of the range: speckle is, flat header
   bands and black margins are not). A binary opening (square of side ~2 % of the shorter image side) removes
   text strokes and cuts thin bridges from text and calliper marks to the fan; the largest connected
   component is the imaging sector. Its convex hull (a B-mode fan or a linear-probe rectangle is convex, and
   the hull re-includes dark anechoic areas at its edge) is kept: everything outside the hull is set to the
   image minimum (burnt-in text, logos, colour bars, depth scales) and the image is cropped to the hull's
   bounding box. Overlays *inside* the sector (callipers drawn on the anatomy) stay: they cannot be told
   apart from echoes by intensity alone. If the largest component covers < 5 % of the image there is no
   sector to find and nothing is cropped. Volumes (cine) use one crop, found on the maximum over frames, so
   every frame is cut alike.
3. Resampling to ``target_spacing`` (mm) with linear interpolation on the raw values [HU stay HU, so windowing
   afterwards is exact]; axes without a physical spacing (NaN, e.g. cine time) are left alone. Where an axis
   shrinks, a Gaussian pre-filter (σ = (factor − 1) / 2, as ``skimage.transform.resize`` does) avoids aliasing.
4. Intensity, per modality (``modality: auto`` reads the record's DICOM modality code):
   * CT: one channel per window in ``windows`` (presets or (centre, width) in HU; default the soft-tissue
     window ``abdomen``); ``"file"`` takes the file's own window / VOI LUT. Linear windows map
     [c − w/2, c + w/2] to [0, 1] and clip outside (the continuous form of PS3.3 C.11.2.1.2.1); the file's
     SIGMOID VOI function is honoured.
   * MR: clip to the (0.5, 99.5) percentiles of the non-zero voxels [MR has no absolute unit; zero is the
     background of masked/skull-stripped data, as in nnU-Net, Isensee et al. 2021] then rescale to [0, 1] or
     z-score (mean 0, sd 1; stored as float16).
   * X-ray: percentile normalisation (0.5, 99.5) to [0, 1], then optional CLAHE (Zuiderveld 1994, via
     ``skimage.exposure.equalize_adapthist``).
   * Ultrasound: 8-bit display values divided by 255 [they already are display intensities; stretching each
     image would erase gain differences the sonographer chose]; wider data get percentile normalisation.
   * Anything else (``auto`` with an unknown or empty modality): percentile normalisation.
   ``windows``, when set, replace the modality's normalisation for any modality (e.g. ``["file"]`` for
   mammograms, whose files carry the reading window).
5. MONOCHROME1 inversion (``extra["invert"]``): x → 1 − x (z-scores: x → −x) *after* the window, which is
   DICOM's order (VOI LUT, then presentation LUT), so a window from the file still selects the right values.
6. Size: ``target_size`` by ``resize``: ``pad`` (default) pads symmetrically to the target's aspect ratio with
   each channel's minimum, then resizes (keeps anatomy undistorted); ``stretch`` resizes directly;
   ``crop_or_pad`` centre-crops or pads each axis without interpolation (for volumes already resampled to a
   spacing). 2D downsampling uses antialiased bilinear interpolation; 3D uses the pre-filter of step 3.
7. Output dtype: uint8 (round(255 x)) or float16.

``preprocess_mask`` applies the same geometry (crop, resample, pad, resize) to ``extra["mask"]`` with
nearest-neighbour interpolation, so segmentation labels stay aligned with the image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from radssl.data.records import Record
from radssl.errors import DataError

PREPROCESS_VERSION = 1
"""Bump when a change alters outputs for an unchanged config: the cache keys on ``config_fingerprint``."""

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
"""CT windows as (centre, width) in HU."""

FILE_WINDOW = "file"
DEFAULT_CT_WINDOWS: tuple[str, ...] = ("abdomen",)

_AUTO_MODALITY = {
    "CT": "ct",
    "MR": "mr",
    "US": "us",
    "IVUS": "us",
    **{code: "xray" for code in ("CR", "DX", "DR", "MG", "RF", "XA", "PX", "IO", "RG", "DF")},
}

Modality = Literal["ct", "mr", "xray", "us", "generic"]
WindowSpec = str | tuple[float, float]


class PreprocessConfig(BaseModel):
    """How records become compact arrays. Every field changes ``config_fingerprint`` (and so the cache)."""

    model_config = ConfigDict(extra="forbid")

    modality: Literal["ct", "mr", "xray", "us", "auto"] = "auto"
    windows: list[WindowSpec] | None = None
    """Preset names, (centre, width) pairs or ``"file"``; several give several channels. None: CT → abdomen."""
    percentiles: tuple[float, float] = (0.5, 99.5)
    """Clipping percentiles for MR, X-ray and generic images."""
    mr_normalisation: Literal["rescale", "zscore"] = "rescale"
    mr_foreground_only: bool = True
    """MR statistics over non-zero voxels only (zero = background of masked data)."""
    equalisation: Literal["none", "clahe"] = "none"
    """X-ray only: CLAHE after percentile normalisation."""
    clahe_clip_limit: float = 0.01
    us_crop: bool = True
    target_spacing: tuple[float, ...] | None = None
    """mm per axis: (D, H, W) for volumes or (H, W); a 3-value spacing gives 2D images its last two values."""
    target_size: tuple[int, ...] | None = None
    """(H, W) for 2D images, (D, H, W) for volumes."""
    resize: Literal["pad", "stretch", "crop_or_pad"] = "pad"
    output_dtype: Literal["uint8", "float16"] = "uint8"

    @field_validator("windows")
    @classmethod
    def _known_windows(cls, value: list[WindowSpec] | None) -> list[WindowSpec] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("`windows` must name at least one window (or be left out)")
        for spec in value:
            if isinstance(spec, str) and spec != FILE_WINDOW and spec not in WINDOW_PRESETS:
                names = sorted(WINDOW_PRESETS)
                raise ValueError(f"unknown window '{spec}'; use one of {names}, 'file' or [centre, width]")
            if isinstance(spec, tuple) and not spec[1] > 0:
                raise ValueError(f"window {spec} has a non-positive width")
        return value

    @field_validator("percentiles")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 100.0:
            raise ValueError(f"percentiles {value} must satisfy 0 <= low < high <= 100")
        return value

    @field_validator("target_spacing")
    @classmethod
    def _spacing(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and (len(value) not in (2, 3) or min(value) <= 0):
            raise ValueError(f"target_spacing {value} must be 2 or 3 positive numbers (mm)")
        return value

    @field_validator("target_size")
    @classmethod
    def _size(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (len(value) not in (2, 3) or min(value) < 1):
            raise ValueError(f"target_size {value} must be 2 (H, W) or 3 (D, H, W) positive integers")
        return value

    @model_validator(mode="after")
    def _zscore_needs_float(self) -> "PreprocessConfig":
        if self.mr_normalisation == "zscore" and self.output_dtype != "float16":
            raise ValueError("mr_normalisation: zscore needs output_dtype: float16 (z-scores are not in [0, 1])")
        return self

    def resolved_windows(self) -> list[tuple[float, float] | str] | None:
        """Windows with presets replaced by their numbers (``"file"`` stays)."""
        if self.windows is None:
            return None
        return [WINDOW_PRESETS[w] if isinstance(w, str) and w != FILE_WINDOW else w for w in self.windows]

    def config_fingerprint(self) -> str:
        """SHA-256 of the normalised config and ``PREPROCESS_VERSION``: equal outputs ⇔ equal fingerprints.

        Presets are hashed as their numbers, so ``lung`` and ``[-600, 1500]`` share a cache entry.
        """
        payload = self.model_dump(mode="json")
        windows = self.resolved_windows()
        if windows is not None:
            payload["windows"] = [w if isinstance(w, str) else [float(v) for v in w] for w in windows]
        payload["version"] = PREPROCESS_VERSION
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------- intensity
def apply_window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Map a (centre, width) window to [0, 1]: centre → 0.5, below/above the window → 0/1 (float32)."""
    x = np.asarray(values, dtype=np.float32)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))).astype(np.float32)
    return np.clip((x - (centre - width / 2.0)) / width, 0.0, 1.0).astype(np.float32)


def apply_voi_lut(values: np.ndarray, lut: dict) -> np.ndarray:
    """A VOI LUT table from the file (PS3.3 C.11.2.1.1): values outside the table clamp to its ends; → [0, 1]."""
    table = np.asarray(lut["table"], dtype=np.float64)
    index = np.rint(np.asarray(values, dtype=np.float64)) - int(lut["first"])
    index = np.clip(index, 0, len(table) - 1).astype(np.int64)
    top = float(2 ** int(lut["bits"]) - 1) or 1.0
    return (table[index] / top).astype(np.float32)


def percentile_normalise(
    values: np.ndarray, low: float, high: float, foreground_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Clip to the (low, high) percentiles and rescale to [0, 1]; also returns the clipped values.

    ``foreground_only`` takes the percentiles over non-zero values. A constant image maps to 0.
    """
    x = np.asarray(values, dtype=np.float32)
    sample = x[x != 0] if foreground_only else x.ravel()
    if sample.size == 0:
        return np.zeros_like(x), x
    lo, hi = np.percentile(sample, [low, high])
    clipped = np.clip(x, lo, hi)
    if hi <= lo:
        return np.zeros_like(x), clipped
    return ((clipped - lo) / (hi - lo)).astype(np.float32), clipped


def zscore(clipped: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """(x − mean) / sd with statistics over ``foreground`` (a boolean mask; all values when None or empty).

    The mask must come from the values *before* clipping: clipping lifts the zero background to the low
    percentile, after which it can no longer be told apart.
    """
    x = np.asarray(clipped, dtype=np.float32)
    sample = x[foreground] if foreground is not None and foreground.any() else x.ravel()
    mean, sd = float(sample.mean()), float(sample.std())
    if sd == 0.0:
        return np.zeros_like(x)
    return ((x - mean) / sd).astype(np.float32)


# ----------------------------------------------------------------------------------------- ultrasound
def ultrasound_sector(image: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Bounding box and convex-hull mask (inside the box) of the imaging sector of a 2D ultrasound frame.

    See the module docstring (step 2) for the heuristic; None when no sector is found.
    """
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    x = np.asarray(image, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return None
    # Speckle is textured: a pixel is sector foreground when it is neither dark nor in a flat area. Flat
    # header bands and black margins fail the texture test; text strokes pass it but the opening removes them.
    mean = ndimage.uniform_filter(x, 5)
    local_sd = np.sqrt(np.maximum(ndimage.uniform_filter(x * x, 5) - mean * mean, 0.0))
    foreground = (x > lo + 0.04 * (hi - lo)) & (local_sd > 0.02 * (hi - lo))
    side = max(3, int(round(0.02 * min(x.shape))) | 1)
    opened = ndimage.binary_opening(foreground, structure=np.ones((side, side), dtype=bool))
    labels, count = ndimage.label(opened)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    if largest.sum() < 0.05 * largest.size:
        return None
    hull = convex_hull_image(largest)
    rows, cols = np.nonzero(hull)
    box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
    return box, hull[box]


# ----------------------------------------------------------------------------------------- geometry
def _interpolate(array: np.ndarray, size: tuple[int, ...], linear: bool) -> np.ndarray:
    """Resize the trailing spatial axes of (C, *S) to ``size`` (torch; antialiased where it shrinks)."""
    import torch
    import torch.nn.functional as F

    spatial = array.shape[1:]
    if tuple(size) == tuple(spatial):
        return array
    if not linear:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        return F.interpolate(tensor, size=tuple(size), mode="nearest-exact")[0].numpy()
    if len(spatial) == 2:
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        out = F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        return out[0].numpy()
    # torch has no antialiased trilinear mode: Gaussian pre-filter on shrinking axes (skimage's sigma rule).
    from scipy import ndimage

    sigma = [0.0] + [max(0.0, (s / n - 1.0) / 2.0) for s, n in zip(spatial, size)]
    if any(sigma):
        array = ndimage.gaussian_filter(array.astype(np.float32), sigma=sigma, mode="nearest")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return F.interpolate(tensor, size=tuple(size), mode="trilinear", align_corners=False)[0].numpy()


@dataclass
class _Plan:
    """The geometry of one record, computed once so image and mask are transformed alike."""

    crop: tuple[slice, slice] | None = None  # in-plane (H, W) box of the ultrasound sector
    keep: np.ndarray | None = None  # hull mask inside the box
    resample_to: tuple[int, ...] | None = None
    pads: tuple[tuple[int, int], ...] | None = None  # per spatial axis, before the final resize
    cuts: tuple[slice, ...] | None = None  # centre crops (crop_or_pad)
    resize_to: tuple[int, ...] | None = None


def _target_shape_plan(shape: tuple[int, ...], config: PreprocessConfig, plan: _Plan, where: str) -> None:
    target = config.target_size
    if target is None:
        return
    if len(target) != len(shape):
        kind = "volume (D, H, W)" if len(shape) == 3 else "2D image (H, W)"
        raise DataError(where, f"target_size {tuple(target)} has {len(target)} values but the record is a {kind}",
                        f"set target_size to {len(shape)} values")
    if config.resize == "stretch":
        plan.resize_to = tuple(target)
    elif config.resize == "pad":
        scale = max(s / t for s, t in zip(shape, target))
        padded = [max(s, int(round(scale * t))) for s, t in zip(shape, target)]
        plan.pads = tuple(((p - s) // 2, p - s - (p - s) // 2) for s, p in zip(shape, padded))
        plan.resize_to = tuple(target)
    else:
        plan.cuts = tuple(slice(max(0, (s - t) // 2), max(0, (s - t) // 2) + min(s, t)) for s, t in zip(shape, target))
        plan.pads = tuple(((t - min(s, t)) // 2, t - min(s, t) - (t - min(s, t)) // 2) for s, t in zip(shape, target))


def _plan(record: Record, image: np.ndarray, modality: Modality, config: PreprocessConfig) -> _Plan:
    """Crop box, resample size, pads and resize for a channels-first ``image``."""
    plan = _Plan()
    spatial = image.shape[1:]
    if modality == "us" and config.us_crop:
        projection = image.max(axis=tuple(range(image.ndim - 2)))  # over channels (and frames)
        sector = ultrasound_sector(projection)
        if sector is not None:
            plan.crop, plan.keep = sector
            spatial = spatial[:-2] + tuple(s.stop - s.start for s in plan.crop)
    if config.target_spacing is not None:
        spacing = tuple(float(s) for s in record.spacing)
        if len(spacing) != len(spatial) or not any(np.isfinite(spacing)):
            raise DataError(
                record.path,
                f"no pixel spacing to resample to target_spacing {config.target_spacing} (record spacing {spacing})",
                "unset target_spacing for sources without spacing (image folders), or fix the headers",
            )
        target = tuple(config.target_spacing)[-len(spatial):]
        if len(target) < len(spatial):  # an in-plane target for a volume: keep the depth
            target = (spacing[0],) + target
        plan.resample_to = tuple(
            n if not np.isfinite(s) else max(1, int(round(n * s / t))) for n, s, t in zip(spatial, spacing, target)
        )
        spatial = plan.resample_to
    _target_shape_plan(tuple(spatial), config, plan, record.path)
    return plan


def _crop_sector(array: np.ndarray, plan: _Plan, fill: float) -> np.ndarray:
    if plan.crop is None:
        return array
    cropped = array[(..., *plan.crop)].copy()
    cropped[..., ~plan.keep] = fill  # type: ignore[operator]
    return cropped


def _pad_and_resize(array: np.ndarray, plan: _Plan, linear: bool, fill: np.ndarray | float) -> np.ndarray:
    if plan.cuts is not None:
        array = array[(slice(None), *plan.cuts)]
    if plan.pads is not None and any(a or b for a, b in plan.pads):
        fills = np.broadcast_to(np.asarray(fill, dtype=np.float32), (array.shape[0],))
        array = np.stack(
            [np.pad(channel, plan.pads, mode="constant", constant_values=float(v)) for channel, v in zip(array, fills)]
        )
    if plan.resize_to is not None:
        array = _interpolate(array, plan.resize_to, linear)
    return array


# ----------------------------------------------------------------------------------------- record → array
def _channels_first(record: Record) -> tuple[np.ndarray, str]:
    pixels = np.asarray(record.pixels)
    layout = record.extra.get("layout")
    if layout is None:
        if pixels.ndim == 2:
            layout = "HW"
        elif pixels.ndim == 3:
            layout = "DHW" if len(record.spacing) == 3 else "CHW"
        else:
            layout = "CDHW"
    layout = str(layout)
    if layout not in ("HW", "CHW", "DHW", "CDHW") or len(layout) != pixels.ndim:
        raise DataError(record.path, f"pixels of shape {pixels.shape} do not match layout '{layout}'")
    if pixels.dtype.kind not in "biuf":
        raise DataError(record.path, f"pixels have dtype {pixels.dtype}; expected numbers")
    image = pixels.astype(np.float32)
    if not layout.startswith("C"):
        image = image[None]
    if not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise DataError(record.path, f"{bad} NaN/inf pixel values", "fix or remove the file")
    return image, layout


def modality_branch(code: str, config: PreprocessConfig) -> Modality:
    """The preprocessing branch for a DICOM modality code: the config's modality, or (``auto``) the code's."""
    if config.modality != "auto":
        return config.modality
    return _AUTO_MODALITY.get(code.strip().upper(), "generic")  # type: ignore[return-value]


def resolve_modality(record: Record, config: PreprocessConfig) -> Modality:
    """The preprocessing branch: the config's modality, or (``auto``) the record's DICOM code."""
    return modality_branch(record.modality, config)


def _file_window(channel: np.ndarray, record: Record) -> np.ndarray:
    windows = record.extra.get("windows") or []
    if windows:
        centre, width = windows[0]  # type: ignore[misc]
        return apply_window(channel, float(centre), float(width), str(record.extra.get("voi_function", "LINEAR")))
    lut = record.extra.get("voi_lut")
    if isinstance(lut, dict):
        return apply_voi_lut(channel, lut)
    raise DataError(
        record.path,
        "window 'file' asked for, but the file has no WindowCenter/WindowWidth or VOI LUT",
        "use a preset or [centre, width] in preprocess.windows",
    )


def _intensity(image: np.ndarray, record: Record, modality: Modality, config: PreprocessConfig) -> np.ndarray:
    """Channels-first float32 in modality units → normalised channels (see the module docstring, step 4)."""
    windows = config.resolved_windows()
    if windows is None and modality == "ct":
        windows = [WINDOW_PRESETS[w] for w in DEFAULT_CT_WINDOWS]
    low, high = config.percentiles
    if windows:
        return np.stack(
            [
                _file_window(channel, record) if isinstance(spec, str) else apply_window(channel, *spec)
                for channel in image
                for spec in windows
            ]
        )
    out = []
    for channel in image:
        if modality == "mr":
            scaled, clipped = percentile_normalise(channel, low, high, config.mr_foreground_only)
            if config.mr_normalisation == "zscore":
                scaled = zscore(clipped, channel != 0 if config.mr_foreground_only else None)
            out.append(scaled)
        elif modality == "us" and channel.min() >= 0 and channel.max() <= 255:
            out.append(channel / np.float32(255.0))
        else:
            scaled, _ = percentile_normalise(channel, low, high)
            if modality == "xray" and config.equalisation == "clahe":
                from skimage.exposure import equalize_adapthist

                scaled = equalize_adapthist(scaled, clip_limit=config.clahe_clip_limit).astype(np.float32)
            out.append(scaled)
    return np.stack(out)


def preprocess_record(record: Record, config: PreprocessConfig) -> np.ndarray:
    """One record → uint8 or float16 array, (C, H, W) for 2D records or (C, D, H, W) for volumes.

    Channels: the record's channels × the windows (CT), else the record's channels.
    """
    image, _ = _channels_first(record)
    modality = resolve_modality(record, config)
    zscored = modality == "mr" and config.mr_normalisation == "zscore" and config.windows is None
    plan = _plan(record, image, modality, config)
    image = _crop_sector(image, plan, float(image.min()))
    if plan.resample_to is not None:
        image = _interpolate(image, plan.resample_to, linear=True)
    image = _intensity(image, record, modality, config)
    if record.extra.get("invert"):
        image = -image if zscored else 1.0 - image
    fill = image.reshape(image.shape[0], -1).min(axis=1)
    image = _pad_and_resize(image, plan, linear=True, fill=fill)
    if config.output_dtype == "uint8":
        return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image.astype(np.float16)


def preprocess_mask(record: Record, config: PreprocessConfig) -> np.ndarray | None:
    """``extra["mask"]`` under the same geometry as ``preprocess_record`` (nearest neighbour), or None.

    Shape: the output's spatial shape (H, W) or (D, H, W); dtype kept (integer labels).
    """
    mask = record.extra.get("mask")
    if mask is None:
        return None
    mask = np.asarray(mask)
    image, _ = _channels_first(record)
    if mask.shape != image.shape[1:]:
        shape = image.shape[1:]
        raise DataError(record.path, f"mask shape {mask.shape} differs from the image's spatial shape {shape}")
    plan = _plan(record, image, resolve_modality(record, config), config)
    out = _crop_sector(mask[None].astype(np.float32), plan, 0.0)
    if plan.resample_to is not None:
        out = _interpolate(out, plan.resample_to, linear=False)
    out = _pad_and_resize(out, plan, linear=False, fill=0.0)
    return np.rint(out[0]).astype(mask.dtype)
