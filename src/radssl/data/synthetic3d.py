"""Procedural small CT- or MR-like volumes with a finding and its segmentation mask: the embedded 3D default.

THESE VOLUMES ARE SYNTHETIC. No patient data, no downloads, nothing clinically meaningful. They exist so that 3D
pretraining, 3D classification and segmentation run offline on any machine in seconds, while exercising what a
volumetric study needs:

* **Anatomy with per-patient variation**: an elliptical body cross-section extruded along depth with a tapering
  outline, fat rim, a spine (bright in CT) posteriorly, two paired organs (kidney-like ellipsoids, label 1) whose
  size, place and orientation vary per patient, and a smooth per-patient tissue texture.
* **Several volumes per patient** (``patient_id``) that differ by positioning (shift, in-plane rotation, scale)
  and acquisition noise, so patient-level splits and patient pairings make sense.
* **A finding with its mask**: in positive patients (label 1) a small round lesion (label 2 in the mask) inside one
  organ, at the same anatomical place in every volume of the patient (moving with positioning), brighter than the
  organ by ``finding_contrast``. Negative patients have none. Mask labels: 0 background, 1 organ, 2 finding.
* **Modality**: ``ct`` renders tissue in Hounsfield-like units through a soft-tissue window (additive noise);
  ``mr`` renders arbitrary-unit signal with a smooth multiplicative coil bias field and Rician noise, scaled to
  [0, 1] by its 99.5th percentile. ``channels`` > 1 (MR) stacks sequences with different tissue contrasts
  (T1-, T2-, FLAIR- and contrast-like tables), BraTS-style.
* **Site** (``site``; 0 = internal): fixes noise level, contrast curve and intensity offset, so a shifted site is
  an external test set (its patients are drawn from a stream seeded by the site, never shared).

Rendering is vectorised numpy over chunks of volumes; the mask comes from the same geometry (hard boundaries), so
image and mask are aligned by construction. Masks are stored as ``store.meta["mask"]`` (N, D, H, W) uint8, the
layout the NIfTI/DICOM cache uses, so segmentation code reads both alike.

Config: ``data: {source: synthetic3d, ...}`` (:class:`SyntheticVolumeData`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from radssl.data.splits import assign_patient_splits
from radssl.data.store import ImageStore, TaskInfo
from radssl.data.synthetic_spec import check_spec, common_checks, spec_stream
from radssl.errors import DataError

MASK_CLASSES = ("background", "organ", "finding")
"""Labels of the mask: index = label value."""
_CHUNK = 32  # volumes per rendering chunk (fixed: per-voxel noise is seeded per chunk, so it shapes the output)
_STREAM_PATIENTS, _STREAM_VOLUMES, _STREAM_VOXELS = 11, 12, 13

# Tissue values per sequence: (background, soft tissue, fat rim, bone, organ, finding offset sign).
# CT: Hounsfield-like units (the finding is hyperdense, like an enhancing lesion); MR: arbitrary units.
_CT_TABLE = {"background": -1000.0, "tissue": 40.0, "fat": -90.0, "bone": 700.0, "organ": 120.0}  # enhancing organ
_CT_WINDOW = (40.0, 400.0)  # the abdomen window (centre, width) the stored [0, 1] values come from
_MR_TABLES = (  # T1-like, T2-like, FLAIR-like, T1-contrast-like
    {"background": 0.0, "tissue": 0.45, "fat": 0.9, "bone": 0.15, "organ": 0.25, "finding": +1.0},
    {"background": 0.0, "tissue": 0.35, "fat": 0.6, "bone": 0.1, "organ": 0.7, "finding": +1.0},
    {"background": 0.0, "tissue": 0.4, "fat": 0.5, "bone": 0.1, "organ": 0.6, "finding": +1.0},
    {"background": 0.0, "tissue": 0.45, "fat": 0.85, "bone": 0.15, "organ": 0.3, "finding": +1.0},
)


@dataclass(frozen=True)
class SyntheticVolumeSpec:
    """Every knob of the synthetic volumes. ``finding_contrast`` is the lesion's brightness above the organ in
    stored units (CT: a fraction of the 400 HU window, 0.35 ≈ 140 HU; MR: signal before the bias field); 0 makes
    the label impossible to learn, larger values make it easier (not calibrated against a model yet)."""

    n_patients: int = 120
    volumes_per_patient: int = 2
    volume_size: int = 32
    channels: int = 1
    modality: Literal["ct", "mr"] = "ct"
    positive_rate: float = 0.5
    finding_contrast: float = 0.35
    site: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        common = common_checks(self)
        check_spec("SyntheticVolumeSpec", (
            common["n_patients"],
            (self.volumes_per_patient >= 1, f"volumes_per_patient={self.volumes_per_patient}", "use at least 1"),
            (16 <= self.volume_size <= 128, f"volume_size={self.volume_size}", "use 16 to 128 voxels per side"),
            (1 <= self.channels <= 4, f"channels={self.channels}", "use 1 to 4 channels (sequences)"),
            (self.modality in ("ct", "mr"), f"modality={self.modality!r}", "use 'ct' or 'mr'"),
            (self.modality == "mr" or self.channels == 1, f"channels={self.channels} with modality 'ct'",
             "CT volumes have one channel; use modality 'mr' for multi-sequence volumes"),
            common["positive_rate"], common["finding_contrast"], common["site"],
        ))

    @property
    def n_volumes(self) -> int:
        return self.n_patients * self.volumes_per_patient


class SyntheticVolumeData(BaseModel):
    """``data: {source: synthetic3d}``: the embedded procedural CT/MR-like volumes with finding masks."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["synthetic3d"] = "synthetic3d"
    n_patients: int = Field(120, gt=0)
    volumes_per_patient: int = Field(2, gt=0)
    volume_size: int = Field(32, ge=16, le=128)
    channels: int = Field(1, ge=1, le=4, description="MR sequences stacked as channels (CT: 1)")
    modality: Literal["ct", "mr"] = "ct"
    positive_rate: float = Field(0.5, gt=0.0, lt=1.0)
    finding_contrast: float | None = Field(None, ge=0.0, description="strength of the finding; null = default")
    site: int = Field(0, ge=0)
    data_seed: int = 0

    def spec(self) -> SyntheticVolumeSpec:
        extra = {} if self.finding_contrast is None else {"finding_contrast": self.finding_contrast}
        return SyntheticVolumeSpec(
            n_patients=self.n_patients, volumes_per_patient=self.volumes_per_patient, volume_size=self.volume_size,
            channels=self.channels, modality=self.modality, positive_rate=self.positive_rate, site=self.site,
            seed=self.data_seed, **extra,
        )


# ----------------------------------------------------------------------------------------------- randomness
@dataclass(frozen=True)
class _SiteStyle:
    noise: float  # noise sd in stored [0, 1] units
    curve: float  # display gamma
    offset: float  # additive offset after rendering


def _site_style(site: int) -> _SiteStyle:
    """A fixed function of the site number (not of the seed): "site 2" always looks the same."""
    if site == 0:
        return _SiteStyle(noise=0.03, curve=1.0, offset=0.0)
    rng = np.random.default_rng(np.random.SeedSequence([104729, site]))
    return _SiteStyle(noise=float(rng.uniform(0.045, 0.07)),
                      curve=float(rng.choice([rng.uniform(0.7, 0.8), rng.uniform(1.25, 1.4)])),
                      offset=float(rng.uniform(-0.06, 0.06)))


# --------------------------------------------------------------------------------------------- parameters
def _sample_patients(spec: SyntheticVolumeSpec) -> dict[str, np.ndarray]:
    """Per-patient anatomy (normalised coordinates in [-1, 1]) and disease."""
    rng = spec_stream(spec, _STREAM_PATIENTS)
    n = spec.n_patients
    u = rng.uniform
    params = {
        "body_a": u(0.78, 0.9, n),  # lateral half-width (x)
        "body_b": u(0.58, 0.7, n),  # antero-posterior half-height (y)
        "body_taper": u(0.05, 0.15, n),  # outline shrinks towards both depth ends
        "fat": u(0.05, 0.1, n),  # fat rim thickness
        "organ_x": u(0.34, 0.46, n),  # lateral distance of each organ from the midline
        "organ_y": u(0.0, 0.15, n),  # posterior shift (image down)
        "organ_z": u(-0.15, 0.15, n),
        "organ_a": u(0.16, 0.22, n),
        "organ_b": u(0.22, 0.3, n),
        "organ_c": u(0.4, 0.55, n),  # along depth
        "organ_tilt": u(-0.35, 0.35, n),  # in-plane rotation of each organ (radians, mirrored)
        "texture": u(0.6, 1.4, n),
    }
    n_pos = int(round(spec.positive_rate * n))
    label = np.zeros(n, dtype=np.int64)
    label[rng.permutation(n)[:n_pos]] = 1
    params["label"] = label
    # Finding: inside one organ (side ±1), at a radius ≤ 45 % of the organ's extent so it stays inside; drawn for
    # every patient so the random stream does not depend on the labels.
    params["finding_side"] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    direction = rng.standard_normal((n, 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    params["finding_rel"] = direction * u(0.0, 0.45, n)[:, None]  # in organ-axis units (a, b, c)
    params["finding_r"] = u(0.09, 0.14, n)  # radius in half-widths: 1.4–2.2 voxels at 32³
    params["finding_gain"] = u(0.8, 1.2, n)
    params["texture_seed"] = rng.integers(0, 2**31, n)
    return params


def _sample_volumes(spec: SyntheticVolumeSpec, patients: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-volume positioning: patient index, shift (x, y, z), in-plane rotation, scale."""
    rng = spec_stream(spec, _STREAM_VOLUMES)
    m = spec.n_volumes
    return {
        "patient": np.repeat(np.arange(spec.n_patients), spec.volumes_per_patient),
        "shift": rng.uniform(-0.06, 0.06, (m, 3)),
        "rotation": rng.uniform(-0.12, 0.12, m),
        "scale": rng.uniform(0.94, 1.06, m),
        "finding_jitter": rng.uniform(-0.02, 0.02, (m, 3)),
        "intensity": rng.uniform(0.95, 1.05, m),
    }


# ----------------------------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, count: int, size: int, coarse: int) -> np.ndarray:
    """(count, size, size, size) smooth unit-variance noise: a coarse grid upsampled trilinearly."""
    grid = torch.from_numpy(rng.standard_normal((count, 1, coarse, coarse, coarse)).astype(np.float32))
    field = torch.nn.functional.interpolate(grid, size=(size,) * 3, mode="trilinear", align_corners=True)[:, 0]
    field = field - field.mean(dim=(1, 2, 3), keepdim=True)
    return (field / field.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)).numpy()


def _soft_inside(distance: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume membership from a normalised distance (1 on the boundary): a ramp of width ``edge``."""
    return np.clip((1.0 - distance) / edge + 0.5, 0.0, 1.0)


def _col(values: np.ndarray) -> np.ndarray:
    """Per-volume values as a (m, 1, 1, 1) float32 column that broadcasts over a chunk's voxels."""
    return values.astype(np.float32).reshape((len(values),) + (1, 1, 1))


def _patient_coords(size: int, v: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """Patient coordinates (x, y, z) of every voxel of the volumes ``rows`` (shift, in-plane rotation, scale)."""
    coords = (np.arange(size, dtype=np.float32) * 2 + 1) / size - 1
    z, y, x = coords[None, :, None, None], coords[None, None, :, None], coords[None, None, None, :]
    scale, angle = _col(v["scale"][rows]), _col(v["rotation"][rows])
    shift = v["shift"][rows].astype(np.float32)
    xs, ys, zs = (x - shift[:, 0, None, None, None]), (y - shift[:, 1, None, None, None]), (z - shift[:, 2, None, None, None])
    cos, sin = np.cos(angle), np.sin(angle)
    return (cos * xs + sin * ys) / scale, (-sin * xs + cos * ys) / scale, zs / scale


def _body(patient_col: Callable[[str], np.ndarray], px: np.ndarray, py: np.ndarray, pz: np.ndarray,
          edge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Partial-volume body, inside of the fat rim, fat rim and spine."""
    taper = 1.0 - patient_col("body_taper") * pz**2
    body_r = np.sqrt((px / (patient_col("body_a") * taper)) ** 2 + (py / (patient_col("body_b") * taper)) ** 2)
    body = _soft_inside(body_r, edge / 0.8)
    inner = _soft_inside(body_r / (1.0 - patient_col("fat")), edge / 0.8)
    fat = np.clip(body - inner, 0.0, 1.0)
    spine_r = np.sqrt((px / 0.11) ** 2 + ((py - 0.75 * patient_col("body_b")) / 0.11) ** 2) + 0.0 * pz
    spine = _soft_inside(spine_r, edge / 0.11) * inner
    return body, inner, fat, spine


def _organs(p: dict[str, np.ndarray], v: dict[str, np.ndarray], rows: np.ndarray,
            coords: tuple[np.ndarray, ...], edge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Partial-volume organs and finding, and the hard mask (0 background, 1 organ, 2 finding)."""
    patient = v["patient"][rows]
    px, py, pz = coords

    def patient_col(name: str) -> np.ndarray:
        return _col(p[name][patient])

    shape = np.broadcast_shapes(px.shape, py.shape, pz.shape)
    organ = np.zeros(shape, dtype=np.float32)
    organ_hard = np.zeros(shape, dtype=bool)
    finding = np.zeros(shape, dtype=np.float32)
    finding_hard = np.zeros(shape, dtype=bool)
    a, b, c = patient_col("organ_a"), patient_col("organ_b"), patient_col("organ_c")
    for side in (-1.0, 1.0):
        ox, oy, oz = side * patient_col("organ_x"), patient_col("organ_y"), patient_col("organ_z")
        tilt = side * patient_col("organ_tilt")
        dx, dy, dz = px - ox, py - oy, pz - oz
        rx, ry = np.cos(tilt) * dx + np.sin(tilt) * dy, -np.sin(tilt) * dx + np.cos(tilt) * dy
        r = np.sqrt((rx / a) ** 2 + (ry / b) ** 2 + (dz / c) ** 2)
        organ = np.maximum(organ, _soft_inside(r, edge / a))
        organ_hard |= r <= 1.0
        # the finding sits in organ-axis units inside this organ (for patients whose side it is)
        rel = p["finding_rel"][patient].astype(np.float32)
        jitter = v["finding_jitter"][rows].astype(np.float32)
        fx = rel[:, 0, None, None, None] * a + jitter[:, 0, None, None, None]
        fy = rel[:, 1, None, None, None] * b + jitter[:, 1, None, None, None]
        fz = rel[:, 2, None, None, None] * c + jitter[:, 2, None, None, None]
        radius = patient_col("finding_r")
        rf = np.sqrt((rx - fx) ** 2 + (ry - fy) ** 2 + (dz - fz) ** 2) / radius
        present = _col((p["label"][patient] == 1) & (p["finding_side"][patient] == side))
        finding = np.maximum(finding, _soft_inside(rf, edge / radius) * present)
        finding_hard |= (rf <= 1.0) & (present > 0)
    mask = np.where(finding_hard, 2, np.where(organ_hard, 1, 0)).astype(np.uint8)
    return organ, finding, mask


def _mr_channels(spec: SyntheticVolumeSpec, rng: np.random.Generator, tissues: dict[str, np.ndarray],
                 texture: np.ndarray, gain: np.ndarray, noise: float) -> list[np.ndarray]:
    """One [0, 1]-scaled magnitude image per MR sequence: coil bias field and Rician noise."""
    m, size = texture.shape[0], spec.volume_size
    inner, fat, spine, organ, finding = (tissues[k] for k in ("inner", "fat", "spine", "organ", "finding"))
    bias = np.exp(0.25 * _smooth_noise(rng, m, size, coarse=3))
    channels = []
    for table in _MR_TABLES[: spec.channels]:
        soft = (table["tissue"] * (1.0 + 0.08 * texture)) * inner + table["fat"] * fat
        signal = soft * (1.0 - spine) + table["bone"] * spine
        signal = signal * (1.0 - organ) + table["organ"] * (1.0 + 0.05 * texture) * organ
        signal = np.clip(signal + table["finding"] * gain * finding, 0.0, None) * bias
        # Rician noise: magnitude of a complex signal with Gaussian noise on both parts
        real = signal + rng.normal(0.0, noise, signal.shape).astype(np.float32)
        imaginary = rng.normal(0.0, noise, signal.shape).astype(np.float32)
        magnitude = np.sqrt(real**2 + imaginary**2)
        top = np.percentile(magnitude.reshape(m, -1), 99.5, axis=1).reshape(m, 1, 1, 1)
        channels.append(magnitude / np.maximum(top, 1e-6))
    return channels


def _ct_channel(rng: np.random.Generator, tissues: dict[str, np.ndarray], texture: np.ndarray, gain: np.ndarray,
                noise: float) -> np.ndarray:
    """The CT image in stored units: Hounsfield-like values through the abdomen window, additive noise."""
    body, inner, fat, spine = tissues["body"], tissues["inner"], tissues["fat"], tissues["spine"]
    organ, finding = tissues["organ"], tissues["finding"]
    hu_soft = (_CT_TABLE["tissue"] + 12.0 * texture) * inner + _CT_TABLE["fat"] * fat
    hu = _CT_TABLE["background"] * (1.0 - body) + hu_soft * (1.0 - spine) + _CT_TABLE["bone"] * spine
    hu = hu * (1.0 - organ) + (_CT_TABLE["organ"] + 8.0 * texture) * organ
    centre, width = _CT_WINDOW
    stored = (hu - (centre - width / 2)) / width + gain * finding
    return stored + rng.normal(0.0, noise, stored.shape).astype(np.float32)


def _render_chunk(spec: SyntheticVolumeSpec, p: dict[str, np.ndarray], v: dict[str, np.ndarray],
                  rows: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (m, C, S, S, S) float in [0, 1] and masks (m, S, S, S) uint8 for the volumes ``rows``."""
    size, m = spec.volume_size, len(rows)
    rng = spec_stream(spec, _STREAM_VOXELS, chunk)
    patient = v["patient"][rows]

    def patient_col(name: str) -> np.ndarray:
        return _col(p[name][patient])

    coords = _patient_coords(size, v, rows)
    edge = 2.0 / size
    body, inner, fat, spine = _body(patient_col, *coords, edge)
    organ, finding, mask = _organs(p, v, rows, coords, edge)
    tissues = {"body": body, "inner": inner, "fat": fat, "spine": spine, "organ": organ * inner, "finding": finding}
    texture = _smooth_noise(rng, m, size, coarse=max(4, size // 6)) * patient_col("texture")
    style = _site_style(spec.site)
    gain = patient_col("finding_gain") * spec.finding_contrast
    if spec.modality == "ct":
        channels = [_ct_channel(rng, tissues, texture, gain, style.noise)]
    else:
        channels = _mr_channels(spec, rng, tissues, texture, gain, style.noise)
    images = np.stack(channels, axis=1) * _col(v["intensity"][rows])[:, None]
    images = np.clip(images + style.offset, 0.0, 1.0) ** style.curve
    return images.astype(np.float32), mask


def generate_volumes(spec: SyntheticVolumeSpec) -> dict[str, np.ndarray]:
    """Arrays of the whole dataset: ``images`` (N, C, S, S, S) uint8, ``masks`` (N, S, S, S) uint8, ``labels``
    (N,), ``patient_id`` (N,), ``site`` (N,)."""
    patients = _sample_patients(spec)
    volumes = _sample_volumes(spec, patients)
    n, size = spec.n_volumes, spec.volume_size
    images = np.empty((n, spec.channels, size, size, size), dtype=np.uint8)
    masks = np.empty((n, size, size, size), dtype=np.uint8)
    for chunk, start in enumerate(range(0, n, _CHUNK)):
        rows = np.arange(start, min(start + _CHUNK, n))
        rendered, mask = _render_chunk(spec, patients, volumes, rows, chunk)
        images[rows] = np.round(rendered * 255.0).astype(np.uint8)
        masks[rows] = mask
    patient = volumes["patient"]
    return {
        "images": images,
        "masks": masks,
        "labels": patients["label"][patient],
        "patient_id": np.asarray([f"s{spec.site}-p{i:05d}" for i in patient]),
        "site": np.full(n, spec.site, dtype=np.int64),
    }


def _to_store(data: dict[str, np.ndarray], split: np.ndarray, name: str, spec: SyntheticVolumeSpec) -> ImageStore:
    return ImageStore(
        name=name,
        images=torch.from_numpy(data["images"]),
        labels=torch.from_numpy(data["labels"]),
        split=split,
        patient_id=data["patient_id"].astype(str),
        task=TaskInfo("binary", 2, ("normal", "finding")),
        meta={"site": data["site"], "mask": data["masks"]},
        mask_classes=MASK_CLASSES,
        origin=f"synthetic volumes ({spec})",
        notes=(f"synthetic {spec.modality.upper()}-like volumes (not patient data); mask labels "
               + ", ".join(f"{i} {name}" for i, name in enumerate(MASK_CLASSES)),),
    )


def make_synthetic_volume_store(spec: SyntheticVolumeSpec, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
                                name: str | None = None) -> ImageStore:
    """The synthetic volumes as an :class:`ImageStore` with seeded, patient-level, stratified splits."""
    data = generate_volumes(spec)
    name = name or f"synthetic3d-{spec.modality}-site{spec.site}"
    split = assign_patient_splits(data["patient_id"], data["labels"], split_fractions, seed=spec.seed, source=name)
    return _to_store(data, split, name, spec)


def make_external_volume_store(spec: SyntheticVolumeSpec, site: int) -> ImageStore:
    """An external test set: new patients imaged at ``site`` (≠ the spec's), every row ``test``."""
    if site == spec.site:
        raise DataError("make_external_volume_store", f"site={site} equals the internal site of the spec",
                        "pass a different site number for an external test set")
    external = replace(spec, site=site)
    data = generate_volumes(external)
    return _to_store(data, np.full(external.n_volumes, "test", dtype="<U10"),
                     f"synthetic3d-{spec.modality}-site{site}-external", external)
