"""Procedural, chest-radiograph-like 2D images: the embedded default dataset.

THESE IMAGES ARE SYNTHETIC. No patient data are involved, nothing is downloaded, and nothing here is
clinically meaningful. The generator exists so that ``radssl demo``, the tests and the benchmarks run on any
machine in seconds, while still exercising what a real radiology study needs:

* **Anatomy with per-patient variation** — body silhouette, two lung fields (size, position, apex taper,
  costophrenic tilt), posterior and anterior ribs (spacing, curvature, phase), spine with vertebrae,
  mediastinum, heart shadow, clavicles, humeral heads and a per-patient "vascular marking" texture.
* **Several images per patient** (``patient_id``) that differ by positioning (shift, rotation, scale),
  exposure, field inhomogeneity and noise, so patient-level positive pairs and patient-level splits make sense.
* **A diagnostic label carried by a small local finding**: a faint round opacity (projected sphere, radius
  ≈ 4–7 % of the image width, i.e. 2.6–4.5 px at 64 px) wholly inside a lung field. Disease is
  **per patient**: every image of a positive patient shows the nodule at the same anatomical place (moving
  with positioning, plus a small per-image jitter of place and size); negative patients show none. A
  linear model on raw pixels sees it only weakly (the nodule can be anywhere in either lung, and its
  contribution to any fixed pixel is swamped by exposure, anatomy and noise variation); a small CNN trained
  on a few thousand images detects it. Measured at the defaults (500 training / 250 test patients, 64 px):
  logistic regression on raw pixels AUC ≈ 0.61–0.67, a linear probe on a random small CNN ≈ 0.59, a small
  CNN trained 8 epochs on CPU ≈ 0.96 (≈ 0.85 on site 1, the domain shift).
* **Reports** (``reports=True``): a short free-text report per image naming the finding (or a normal report),
  its side, zone and size, the site, and technique remarks (rotation, exposure) — varied phrasing, truthful content
  (:func:`synthetic_reports`), for image–report pretraining. Off by default; the images are identical either way.
* **Masks** (``masks=True``): the finding's segmentation mask per image (``store.meta["mask"]`` (N, H, W) uint8,
  0 background, 1 finding; :data:`MASK_CLASSES`), the pixels whose centre lies inside the rendered nodule's disc,
  from the same geometry the renderer uses (so image and mask agree by construction); empty for negative
  patients. For segmentation demos and tests. Off by default; the images are identical either way.
* **Acquisition site / scanner** (``site``; 0 = internal): a site fixes the detector's characteristic curve
  (gamma, slope), noise level, blur, intensity offset, collimation border width and a burnt-in side marker.
  Site styles are a fixed function of the site number (not of the seed), so "site 2" always looks the same.
  Anatomy and disease are drawn from the same distribution at every site, but different sites never share
  patients (the patient stream is seeded by ``(seed, site)``), so an external test set is honestly external.

Rendering is vectorised numpy/scipy over the whole batch (chunks of patients), no per-pixel or per-image
Python loops; a few thousand 64 px images take about a second on one core.

The image model: an attenuation map ``A`` (soft tissue thickness + bone − lung air + markings + finding)
is mapped through a sigmoid "characteristic curve" (film/detector response) with per-image exposure,
multiplied by a smooth heel-effect/inhomogeneity field, blurred by the detector PSF, given signal-dependent
(quantum-like) noise, then site offsets, collimation and marker burn-in are applied and it is quantised.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from scipy import ndimage

from radssl.data.splits import assign_patient_splits
from radssl.data.store import ImageStore, TaskInfo
from radssl.data.synthetic_spec import check_spec, common_checks, spec_stream
from radssl.errors import DataError

_SOURCE = "synthetic radiographs"
MASK_CLASSES = ("background", "finding")
"""Labels of the finding masks (``masks=True``): index = label value."""
_PATIENTS_PER_CHUNK = 64  # fixed: per-pixel random streams are seeded per chunk, so it is part of the output


@dataclass(frozen=True)
class SyntheticSpec:
    """Every knob of the synthetic dataset; the defaults give the ``radssl demo`` data set.

    ``finding_contrast`` is the nodule's peak attenuation in the generator's units (lung air ≈ 0.75, a rib
    ≈ 0.2); 0 makes the task impossible, 0.3 hard, 0.6 easy. ``site`` picks the acquisition style
    (0 = internal).
    """

    n_patients: int = 300
    images_per_patient: int = 4
    image_size: int = 64
    positive_rate: float = 0.5
    site: int = 0
    finding_contrast: float = 0.45
    seed: int = 0
    reports: bool = False
    """Also write a short free-text report per image (:func:`synthetic_reports`); the images do not change."""
    masks: bool = False
    """Also draw the finding's segmentation mask per image (:func:`finding_masks`); the images do not change."""

    def __post_init__(self) -> None:
        common = common_checks(self)
        check_spec("SyntheticSpec", (
            common["n_patients"],
            (self.images_per_patient >= 1, f"images_per_patient={self.images_per_patient}", "use at least 1"),
            (self.image_size >= 16, f"image_size={self.image_size}", "use image_size >= 16 pixels"),
            common["positive_rate"], common["site"], common["finding_contrast"],
        ))

    @property
    def n_images(self) -> int:
        return self.n_patients * self.images_per_patient


# ----------------------------------------------------------------------------------------------- randomness
_STREAM_PATIENTS, _STREAM_IMAGES, _STREAM_PIXELS, _STREAM_REPORTS = 1, 2, 3, 4  # purposes of `spec_stream`


# ----------------------------------------------------------------------------------------------- site style
@dataclass(frozen=True)
class SiteStyle:
    """How one acquisition site renders: detector curve, noise, blur, offsets, borders, marker."""

    slope: float  # characteristic-curve steepness (contrast)
    gamma: float  # display gamma applied after the curve
    noise: float  # quantum-like noise scale
    blur_px: float  # detector PSF sigma in pixels at 64 px (scaled with image size)
    offset: float  # additive intensity offset after processing
    exposure_mean: float  # mean exposure shift (attenuation units)
    collimation: float  # mean collimation border width as a fraction of the image (0 = none)
    marker_corner: int  # 0..3: top-left, top-right, bottom-right, bottom-left
    marker_glyph: str  # "L" or "R"


_INTERNAL_STYLE = SiteStyle(
    slope=3.0, gamma=1.0, noise=0.045, blur_px=0.55, offset=0.0, exposure_mean=0.0,
    collimation=0.0, marker_corner=1, marker_glyph="L",
)


def _site_style(site: int) -> SiteStyle:
    """The fixed acquisition style of ``site`` (0 = internal); independent of the data seed.

    External styles differ clearly but plausibly (another vendor's LUT, a noisier or blurrier detector,
    collimated borders), which lowers transfer performance without making the finding invisible.
    """
    if site == 0:
        return _INTERNAL_STYLE
    rng = np.random.default_rng(np.random.SeedSequence([7919, site]))
    return SiteStyle(
        slope=float(rng.uniform(2.0, 2.6) if rng.random() < 0.5 else rng.uniform(3.9, 4.6)),
        gamma=float(rng.choice([rng.uniform(0.65, 0.8), rng.uniform(1.3, 1.55)])),
        noise=float(rng.uniform(0.06, 0.085)),
        blur_px=float(rng.uniform(0.8, 1.1)),
        offset=float(rng.uniform(-0.08, 0.08)),
        exposure_mean=float(rng.uniform(-0.25, 0.25)),
        collimation=float(rng.uniform(0.04, 0.08)),
        marker_corner=int(rng.integers(0, 4)),
        marker_glyph=str(rng.choice(["L", "R"])),
    )


# --------------------------------------------------------------------------------------------- parameters
def _sample_patients(spec: SyntheticSpec) -> dict[str, np.ndarray]:
    """Per-patient anatomy and disease; the same distribution at every site (the site only seeds it)."""
    rng = spec_stream(spec, _STREAM_PATIENTS)
    n = spec.n_patients
    u = rng.uniform
    params = {
        "body_halfwidth": u(0.80, 0.93, n),
        "neck_halfwidth": u(0.17, 0.23, n),
        "shoulder_level": u(-0.78, -0.68, n),
        "lung_offset": u(0.37, 0.42, n),  # lateral distance of lung centres from the midline
        "lung_y": u(-0.06, 0.04, n),
        "lung_a": u(0.25, 0.31, n),  # half-width
        "lung_b": u(0.50, 0.60, n),  # half-height
        "lung_tilt": u(0.10, 0.25, n),  # costophrenic angle lower than the medial dome
        "left_drop": u(0.00, 0.06, n),  # image-right (patient-left) hemidiaphragm sits lower
        "lung_air": u(0.70, 0.82, n),
        "heart_x": u(0.07, 0.13, n),
        "heart_y": u(0.24, 0.32, n),
        "heart_a": u(0.27, 0.33, n),
        "heart_b": u(0.19, 0.24, n),
        "rib_spacing": u(0.135, 0.165, n),
        "rib_curve": u(0.55, 0.85, n),
        "rib_phase": u(0.0, 1.0, n),
        "rib_amp": u(0.15, 0.24, n),
        "ant_rib_phase": u(0.0, 1.0, n),
        "vert_spacing": u(0.09, 0.11, n),
        "clavicle_y": u(-0.66, -0.58, n),
        "soft_tissue": u(0.85, 1.05, n),
        "marking_amp": u(0.10, 0.15, n),
    }
    n_pos = int(round(spec.positive_rate * n))
    label = np.zeros(n, dtype=np.int64)
    label[rng.permutation(n)[:n_pos]] = 1
    params["label"] = label
    # Finding: a place inside a lung field (rejection-sampled with the same lung/heart functions used to
    # render, so it never lands in the mediastinum or below the diaphragm), a radius and a per-patient
    # contrast factor. Drawn for every patient so the random stream does not depend on the labels.
    candidates = 48
    side = np.where(rng.random((n, candidates)) < 0.5, -1.0, 1.0)
    cu = side * (params["lung_offset"][:, None] + rng.uniform(-1, 1, (n, candidates)) * params["lung_a"][:, None])
    cv = params["lung_y"][:, None] + rng.uniform(-1, 1, (n, candidates)) * params["lung_b"][:, None]
    params["finding_r"] = u(0.08, 0.14, n)  # radius in half-widths of the image: 2.6–4.5 px at 64 px
    pc, r = _col(params, 1), params["finding_r"][:, None] * 1.1
    inside = np.ones((n, candidates), dtype=bool)
    for du, dv in ((0, 0), (r, 0), (-r, 0), (0, r), (0, -r)):  # the whole nodule, not just its centre
        inside &= (_lung_field(cu + du, cv + dv, pc) * (1.0 - _heart(cu + du, cv + dv, pc))) > 0.8
    inside[:, -1] |= ~inside.any(1)  # practically never needed; keeps the choice defined
    pick = np.argmax(inside, axis=1)
    rows = np.arange(n)
    params["finding_u"] = cu[rows, pick]
    params["finding_v"] = cv[rows, pick]
    params["finding_gain"] = u(0.8, 1.2, n)
    return params


def _sample_images(spec: SyntheticSpec, style: SiteStyle) -> dict[str, np.ndarray]:
    """Per-image positioning, exposure, inhomogeneity and finding jitter."""
    rng = spec_stream(spec, _STREAM_IMAGES)
    m = spec.n_images
    u = rng.uniform
    k_field = 3
    return {
        "shift_x": rng.normal(0, 0.035, m),
        "shift_y": rng.normal(0, 0.035, m),
        "rotation": np.deg2rad(rng.normal(0, 3.0, m)),
        "scale": np.exp(rng.normal(0, 0.05, m)),
        "exposure": style.exposure_mean + rng.normal(0, 0.18, m),
        "contrast": np.exp(rng.normal(0, 0.10, m)),
        "heel": rng.normal(0, 0.08, m),  # linear anode heel-effect gradient
        "field_amp": u(0.0, 0.06, (m, k_field)),
        "field_fx": u(-1.2, 1.2, (m, k_field)),
        "field_fy": u(-1.2, 1.2, (m, k_field)),
        "field_phase": u(0, 2 * np.pi, (m, k_field)),
        "finding_du": rng.normal(0, 0.012, m),
        "finding_dv": rng.normal(0, 0.012, m),
        "finding_scale": np.exp(rng.normal(0, 0.08, m)),
        "collimation": np.clip(rng.normal(style.collimation, 0.015, (m, 4)), 0, None) * (style.collimation > 0),
        "marker_jitter": u(-0.02, 0.02, (m, 2)),
    }


def _col(params: dict[str, np.ndarray], extra_dims: int) -> dict[str, np.ndarray]:
    """Reshape per-patient vectors to broadcast against ``extra_dims`` trailing axes."""
    # float32 on purpose: a float64 parameter would silently promote every pixel array (2× slower).
    return {k: v.astype(np.float32).reshape(v.shape + (1,) * extra_dims) for k, v in params.items() if v.ndim == 1}


# ------------------------------------------------------------------------------------------ anatomy shapes
def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow → inf → 0, the correct limit
        return 1.0 / (1.0 + np.exp(-x))


def _lung_field(u: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray], edge: float = 0.03) -> np.ndarray:
    """Soft mask (0..1) of both lung fields in anatomy coordinates ``u`` (right of image +), ``v`` (down +)."""
    total = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=np.float32)
    for side in (-1.0, 1.0):
        du = (side * u - p["lung_offset"]) / p["lung_a"]  # + is lateral
        dv = (v - p["lung_y"] - (p["left_drop"] if side > 0 else 0.0)) / p["lung_b"]
        # Apex taper: narrower towards the top; the lateral border bulges like a rib cage.
        width = 1.0 - 0.38 * np.clip(-dv, 0, 1) ** 2
        radial = np.abs(du / width) ** 2.4 + np.abs(np.minimum(dv, 0)) ** 2.0
        # Diaphragm: the lower border is a dome, lowest at the lateral costophrenic angle.
        floor = 0.78 + p["lung_tilt"] * du - 0.12 * du**2
        inside = _sigmoid((1.0 - radial) / (edge * 4)) * _sigmoid((floor - dv) * p["lung_b"] / edge)
        total = np.maximum(total, inside.astype(np.float32))
    return total


def _heart(u: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Soft heart shadow: a tilted ellipse left of the midline (image right), overlapping the lung."""
    cos, sin = np.cos(-0.35), np.sin(-0.35)
    du, dv = u - p["heart_x"], v - p["heart_y"]
    ru, rv = cos * du - sin * dv, sin * du + cos * dv
    radial = (ru / p["heart_a"]) ** 2 + (rv / p["heart_b"]) ** 2
    return _sigmoid((1.0 - radial) / 0.12).astype(np.float32)


def _band(x: np.ndarray, width: float) -> np.ndarray:
    """Periodic bright bands with period 1 (phase ``x``) and relative ``width``: a rib/vertebra profile."""
    frac = x - np.floor(x) - 0.5
    return np.exp(-((frac / width) ** 2)).astype(np.float32)


def _attenuation(u: np.ndarray, v: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation map (without markings or finding) and the lung mask, on anatomy coordinates."""
    au = np.abs(u)
    halfwidth = p["neck_halfwidth"] + (p["body_halfwidth"] - p["neck_halfwidth"]) * _sigmoid(
        (v - p["shoulder_level"]) / 0.09
    )
    body = _sigmoid((halfwidth - au) / 0.015)
    thickness = np.sqrt(np.clip(1.0 - (u / (halfwidth + 0.05)) ** 2, 0, 1))
    soft = p["soft_tissue"] * body * (0.35 + 0.45 * thickness)
    # Abdomen below the diaphragm is denser than the chest wall.
    soft = soft * (1.0 + 0.25 * _sigmoid((v - p["lung_y"] - 0.5) / 0.08))

    lungs = _lung_field(u, v, p)
    heart = _heart(u, v, p)
    air = p["lung_air"] * lungs * (1.0 - 0.8 * heart)

    thorax = body * _sigmoid((0.62 - v) / 0.05) * _sigmoid((v + 0.72) / 0.04)
    rib_zone = thorax * _sigmoid((halfwidth - 0.03 - au) / 0.02)
    posterior = _band((v - p["rib_curve"] * u**2) / p["rib_spacing"] + p["rib_phase"], 0.16)
    anterior = _band((v + 0.55 * (au - 0.9)) / (1.25 * p["rib_spacing"]) + p["ant_rib_phase"], 0.13)
    ribs = rib_zone * (p["rib_amp"] * posterior + 0.45 * p["rib_amp"] * anterior * _sigmoid((au - 0.12) / 0.03))

    spine_core = _sigmoid((0.065 - au) / 0.012) * body
    vertebrae = 0.75 + 0.25 * _band(v / p["vert_spacing"], 0.3)
    spine = 0.3 * spine_core * vertebrae
    mediastinum = 0.3 * _sigmoid((0.13 - au) / 0.03) * _sigmoid((0.2 - v) / 0.1) * body

    # Clavicles: from the sternal end outward and slightly upward, an S-shaped bright band.
    t = np.clip((au - 0.06) / 0.5, 0, 1)
    clavicle_line = p["clavicle_y"] - 0.10 * t + 0.03 * np.sin(np.pi * t)
    clavicles = 0.45 * np.exp(-(((v - clavicle_line) / 0.03) ** 2)) * _sigmoid((au - 0.06) / 0.02)
    clavicles = clavicles * _sigmoid((0.58 - au) / 0.03)
    # Humeral heads at the upper corners.
    humeri = 0.5 * _sigmoid((1.0 - ((au - p["body_halfwidth"] + 0.02) ** 2 + (v + 0.62) ** 2) / 0.016) / 0.15)

    bone = ribs + spine + clavicles + humeri
    attenuation = soft + bone + mediastinum + 0.08 * heart * body - air
    return attenuation.astype(np.float32), lungs


def _markings(n: int, side: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Per-patient band-pass noise with a vertical streak bias: bronchovascular lung markings."""
    scale = size / 64.0
    white = rng.standard_normal((n, side, side), dtype=np.float32)
    fine = ndimage.gaussian_filter(white, sigma=(0, 1.4 * scale, 0.9 * scale), mode="reflect")
    coarse = ndimage.gaussian_filter(white, sigma=(0, 3.0 * scale, 3.0 * scale), mode="reflect")
    band = fine - coarse
    return band / (band.std(axis=(1, 2), keepdims=True) + 1e-6)


_CANVAS_EXTENT = 1.3  # canonical anatomy grid spans [-1.3, 1.3]: positioning never samples far outside it


def _canonical_attenuation(p: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Each patient's attenuation (anatomy + lung markings) on a canonical grid, float32 (P, S, S)."""
    side = int(np.ceil(size * _CANVAS_EXTENT))
    axis = ((np.arange(side, dtype=np.float32) + 0.5) / side * 2.0 - 1.0) * _CANVAS_EXTENT
    # The canonical grid is axis-aligned, so u and v stay 1-D and broadcasting computes every term that
    # depends on only one of them (body width, rib zone, spine, ...) on a line instead of the whole grid.
    u, v = axis[None, None, :], axis[None, :, None]
    attenuation, lungs = _attenuation(u, v, p)
    markings = _markings(len(p["label"]), side, size, rng)
    hilum = _sigmoid((0.75 - np.abs(np.abs(u) - 0.15) / 0.45) / 0.15)  # denser towards the hila
    return attenuation + p["marking_amp"] * markings * lungs * (0.4 + 0.6 * hilum)


_GLYPHS = {
    "L": np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 1, 1]], dtype=np.float32),
    "R": np.array([[1, 1, 0], [1, 0, 1], [1, 1, 0], [1, 0, 1], [1, 0, 1]], dtype=np.float32),
}


# ----------------------------------------------------------------------------------------------- rendering
def _render_chunk(
    spec: SyntheticSpec,
    style: SiteStyle,
    patients: dict[str, np.ndarray],
    images: dict[str, np.ndarray],
    patient_rows: np.ndarray,
    chunk: int,
    render_finding: bool,
) -> np.ndarray:
    """Render all images of ``patient_rows`` as float32 (M, H, W) in [0, 1]."""
    size, k = spec.image_size, spec.images_per_patient
    rng = spec_stream(spec, _STREAM_PIXELS, chunk)
    image_rows = (patient_rows[:, None] * k + np.arange(k)).reshape(-1)
    owner = np.repeat(np.arange(len(patient_rows)), k)  # image → patient within the chunk
    p = {name: values[patient_rows][owner] for name, values in patients.items()}
    q = {name: values[image_rows] for name, values in images.items()}

    # Anatomy (with the patient's lung markings) is rendered once per patient on a canonical grid that is
    # larger than the field of view, then each image resamples it with its own positioning (shift, rotation,
    # scale): cheaper than rendering per image, and the markings move rigidly with the patient.
    canonical = _canonical_attenuation(_col({n: v[patient_rows] for n, v in patients.items()}, 2), size, rng)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    gy, gx = np.meshgrid(axis, axis, indexing="ij")
    c3 = lambda a: a.reshape(-1, 1, 1).astype(np.float32)  # noqa: E731 — local broadcasting helper
    cos, sin = c3(np.cos(q["rotation"])), c3(np.sin(q["rotation"]))
    x0, y0 = gx[None] - c3(q["shift_x"]), gy[None] - c3(q["shift_y"])
    u = (cos * x0 + sin * y0) / c3(q["scale"])
    v = (-sin * x0 + cos * y0) / c3(q["scale"])
    grid = torch.from_numpy(np.stack([u, v], axis=-1) / _CANVAS_EXTENT)
    source = torch.from_numpy(canonical).unsqueeze(1).index_select(0, torch.from_numpy(owner))
    attenuation = torch.nn.functional.grid_sample(
        source, grid, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0].numpy()

    if render_finding and spec.finding_contrast > 0:
        center, radius = _finding_geometry(spec, patients, images, image_rows)
        distance2 = ((gy - c3(center[:, 0])) ** 2 + (gx - c3(center[:, 1])) ** 2) / c3(radius) ** 2
        sphere = np.sqrt(np.clip(1.0 - distance2, 0.0, 1.0))  # projected thickness of a sphere
        gain = c3(p["finding_gain"] * p["label"]) * spec.finding_contrast
        attenuation = attenuation + gain * sphere

    # Detector: characteristic curve with exposure and contrast, then display gamma.
    slope = style.slope * c3(q["contrast"])
    signal = _sigmoid(slope * (attenuation - 0.5 + c3(q["exposure"])))
    if style.gamma != 1.0:
        signal = np.clip(signal, 1e-4, 1.0) ** style.gamma
    # Field inhomogeneity: heel effect plus a few smooth low-frequency waves.
    # cos(a·x + b·y + c) = cos(a·x)cos(b·y + c) − sin(a·x)sin(b·y + c): outer products of 1-D profiles,
    # so no transcendental function runs over the full (M, H, W) array.
    field = 1.0 + c3(q["heel"]) * gx[None]
    for j in range(q["field_amp"].shape[1]):  # 3 terms, each vectorised over the batch
        ax = np.pi * q["field_fx"][:, j, None].astype(np.float32) * axis  # (M, W)
        by = np.pi * q["field_fy"][:, j, None].astype(np.float32) * axis + q["field_phase"][:, j, None]
        amp = c3(q["field_amp"][:, j])
        cos_y, sin_y = np.cos(by)[:, :, None], np.sin(by)[:, :, None]
        field += amp * (cos_y * np.cos(ax)[:, None] - sin_y * np.sin(ax)[:, None])
    signal = signal * field
    sigma = style.blur_px * size / 64.0
    signal = ndimage.gaussian_filter(signal, sigma=(0, sigma, sigma), mode="nearest")
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    signal = signal + style.noise * np.sqrt(np.clip(signal, 0, 1) * 0.8 + 0.05) * noise
    signal = signal + style.offset

    # Collimation: shuttered borders render near white on this processing chain.
    if style.collimation > 0:
        col = q["collimation"]
        lo_x, hi_x = c3(-1 + 2 * col[:, 0]), c3(1 - 2 * col[:, 1])
        lo_y, hi_y = c3(-1 + 2 * col[:, 2]), c3(1 - 2 * col[:, 3])
        open_field = (gx >= lo_x) & (gx <= hi_x) & (gy >= lo_y) & (gy <= hi_y)
        signal = np.where(open_field, signal, 0.92 + 0.03 * noise)
    signal = _burn_in_marker(signal, style, q["marker_jitter"], size)
    return np.clip(signal, 0.0, 1.0)


def _burn_in_marker(signal: np.ndarray, style: SiteStyle, jitter: np.ndarray, size: int) -> np.ndarray:
    """Burn a bright side-marker letter into a site-specific corner (vectorised over the batch)."""
    glyph = _GLYPHS[style.marker_glyph]
    cell = max(1, round(size / 64))
    h, w = glyph.shape[0] * cell, glyph.shape[1] * cell
    margin = 0.09 + jitter  # (M, 2) fractions of the image
    top = np.where(style.marker_corner in (0, 1), margin[:, 0] * size, size - h - margin[:, 0] * size)
    left = np.where(style.marker_corner in (0, 3), margin[:, 1] * size, size - w - margin[:, 1] * size)
    top, left = np.round(top).astype(int), np.round(left).astype(int)
    rows = np.arange(size)[None, :, None] - top[:, None, None]
    cols = np.arange(size)[None, None, :] - left[:, None, None]
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    lit = glyph[np.clip(rows // cell, 0, glyph.shape[0] - 1), np.clip(cols // cell, 0, glyph.shape[1] - 1)]
    return np.where(inside & (lit > 0), 0.97, signal)


# ------------------------------------------------------------------------------------------------- reports
_POSITIVE_TEMPLATES = (
    "{Size} rounded opacity in the {side} {zone} zone, suspicious for a pulmonary nodule.",
    "There is a {size} nodular opacity projecting over the {side} {zone} zone.",
    "{Side} {zone} zone nodule, {size}.",
    "Focal round density in the {zone} zone of the {side} lung, consistent with a nodule.",
    "A {size} pulmonary nodule is seen in the {side} {zone} zone. CT follow-up is recommended.",
    "Well-defined {size} nodule at the {side} {zone} zone. Remaining lung fields are clear.",
)
_NEGATIVE_TEMPLATES = (
    "The lungs are clear. No focal opacity or nodule.",
    "No pulmonary nodule or mass identified. Normal chest radiograph.",
    "Clear lungs without focal lesion.",
    "Heart size is normal. Lungs are clear, no nodule.",
    "No acute cardiopulmonary abnormality. No focal lung lesion.",
)
_SITE_TEMPLATES = ("Acquired at site {site}.", "Site {site}.", "Examination performed at site {site}.")
_ZONE_EDGES = (-0.3, 0.3)  # lung-relative height (−1 apex … +1 base) separating upper / middle / lower zones


def finding_place(spec: SyntheticSpec, patients: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: the finding's side (``"left"``/``"right"``, the patient's) and zone (upper/middle/lower).

    Anatomy coordinates are PA: image right (u > 0) is the patient's left. The zone is the finding's height within
    its own lung field (centre ``lung_y``, half-height ``lung_b``; the left lung sits ``left_drop`` lower).
    """
    u, v = patients["finding_u"], patients["finding_v"]
    left = u > 0
    height = (v - patients["lung_y"] - np.where(left, patients["left_drop"], 0.0)) / patients["lung_b"]
    zone = np.where(height < _ZONE_EDGES[0], "upper", np.where(height > _ZONE_EDGES[1], "lower", "middle"))
    return np.where(left, "left", "right"), zone


def synthetic_reports(spec: SyntheticSpec, patients: dict[str, np.ndarray], images: dict[str, np.ndarray]) -> np.ndarray:
    """One short report per image: the finding (or a normal report), its side, zone and size, and the site.

    Phrasing varies per image (templates and sentence order drawn from a seeded stream of their own, so the images
    are the same with or without reports); the content is the image's truth: every image of a positive patient
    names the same side, zone and size. Images rotated by more than 4° or exposed off the site's mean by more than
    0.25 also get a technique remark, as real reports note positioning and exposure.
    """
    rng = spec_stream(spec, _STREAM_REPORTS)
    k = spec.images_per_patient
    side, zone = finding_place(spec, patients)
    size = np.where(patients["finding_r"] < 0.11, "small", "moderate-sized")
    style = _site_style(spec.site)
    positive_choice = rng.integers(len(_POSITIVE_TEMPLATES), size=spec.n_images)
    negative_choice = rng.integers(len(_NEGATIVE_TEMPLATES), size=spec.n_images)
    site_choice = rng.integers(len(_SITE_TEMPLATES), size=spec.n_images)
    site_first = rng.random(spec.n_images) < 0.3
    reports = []
    for image in range(spec.n_images):
        patient = image // k
        if patients["label"][patient] == 1:
            words = {"side": side[patient], "zone": zone[patient], "size": size[patient]}
            words.update(Side=words["side"].capitalize(), Size=words["size"].capitalize())
            finding = _POSITIVE_TEMPLATES[positive_choice[image]].format(**words)
        else:
            finding = _NEGATIVE_TEMPLATES[negative_choice[image]]
        site = _SITE_TEMPLATES[site_choice[image]].format(site=spec.site if spec.site else "0 (internal)")
        technique = []
        if abs(np.rad2deg(images["rotation"][image])) > 4.0:
            technique.append("Patient slightly rotated.")
        exposure = images["exposure"][image] - style.exposure_mean
        if abs(exposure) > 0.25:
            # The detector curve maps a larger exposure term to a lighter image: light = underexposed, as on film.
            technique.append("Image appears light (underexposed)." if exposure > 0 else
                             "Image appears dark (overexposed).")
        parts = [site, finding, *technique] if site_first[image] else [finding, *technique, site]
        reports.append(" ".join(parts))
    return np.asarray(reports, dtype=str)


def generate_radiographs(spec: SyntheticSpec, *, render_finding: bool = True) -> dict[str, np.ndarray]:
    """Render the data set described by ``spec``; deterministic in ``spec``.

    Returns ``images`` uint8 (N, H, W), ``labels`` int64 (N,), ``patient_id`` str (N,) like ``s0-p00012``,
    ``site`` int64 (N,), plus ``finding_center`` float32 (N, 2) as (row, col) pixels (NaN for negatives) and
    ``finding_radius`` float32 (N,) pixels (0 for negatives), for visualisation and tests, ``report`` str (N,)
    when ``spec.reports`` (:func:`synthetic_reports`) and ``mask`` uint8 (N, H, W) when ``spec.masks``
    (:func:`finding_masks`).
    Images are patient-major: rows ``i*k … i*k+k-1`` belong to patient ``i``.

    ``render_finding=False`` renders exactly the same images (same random draws) with the finding left out,
    so callers can check that the label is carried by a small local region only.
    """
    style = _site_style(spec.site)
    patients = _sample_patients(spec)
    images = _sample_images(spec, style)
    size, k = spec.image_size, spec.images_per_patient
    out = np.empty((spec.n_images, size, size), dtype=np.uint8)
    for chunk, start in enumerate(range(0, spec.n_patients, _PATIENTS_PER_CHUNK)):
        rows = np.arange(start, min(start + _PATIENTS_PER_CHUNK, spec.n_patients))
        rendered = _render_chunk(spec, style, patients, images, rows, chunk, render_finding)
        out[start * k : (start + len(rows)) * k] = np.round(rendered * 255.0).astype(np.uint8)

    owner = np.repeat(np.arange(spec.n_patients), k)
    labels = patients["label"][owner]
    center, radius = _finding_geometry(spec, patients, images, np.arange(spec.n_images))
    center, radius = (center + 1.0) * size / 2.0 - 0.5, radius * size / 2.0  # → pixels (row, col)
    return {
        "images": out,
        "labels": labels.astype(np.int64),
        "patient_id": np.char.add(f"s{spec.site}-p", np.char.zfill(owner.astype(str), 5)),
        "site": np.full(spec.n_images, spec.site, dtype=np.int64),
        "finding_center": np.where(labels[:, None] == 1, center, np.nan).astype(np.float32),
        "finding_radius": np.where(labels == 1, radius, 0.0).astype(np.float32),
        **({"report": synthetic_reports(spec, patients, images)} if spec.reports else {}),
        **({"mask": finding_masks(spec, patients, images, render_finding)} if spec.masks else {}),
    }


def finding_masks(spec: SyntheticSpec, patients: dict[str, np.ndarray], images: dict[str, np.ndarray],
                  render_finding: bool = True) -> np.ndarray:
    """(N, H, W) uint8 segmentation masks: 1 where a pixel centre lies inside the rendered finding's disc.

    Same grid and geometry as :func:`_render_chunk` (pixel centres in normalised coordinates, the finding's centre
    and radius from :func:`_finding_geometry`), so the mask covers exactly the pixels whose projected nodule
    thickness is > 0. Empty for negative patients, and everywhere when no finding is rendered
    (``finding_contrast`` 0 or ``render_finding=False``): the mask is what the image shows. No random draw, so the
    images are the same with or without masks.
    """
    size = spec.image_size
    out = np.zeros((spec.n_images, size, size), dtype=np.uint8)
    if not render_finding or spec.finding_contrast <= 0:
        return out
    center, radius = _finding_geometry(spec, patients, images, np.arange(spec.n_images))
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    positive = np.flatnonzero(patients["label"][np.arange(spec.n_images) // spec.images_per_patient] == 1)
    for start in range(0, len(positive), 256):  # bounded memory: 256 × H × W floats at a time
        rows = positive[start:start + 256]
        dy = (axis[None, :] - center[rows, 0, None].astype(np.float32)) ** 2  # (M, H)
        dx = (axis[None, :] - center[rows, 1, None].astype(np.float32)) ** 2  # (M, W)
        r2 = (radius[rows].astype(np.float32) ** 2)[:, None, None]
        out[rows] = (dy[:, :, None] + dx[:, None, :] < r2).astype(np.uint8)
    return out


def _finding_geometry(
    spec: SyntheticSpec, patients: dict[str, np.ndarray], images: dict[str, np.ndarray], image_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Finding centre (y, x) and radius of each image in normalised image coordinates ([-1, 1])."""
    owner = image_rows // spec.images_per_patient
    fu = patients["finding_u"][owner] + images["finding_du"][image_rows]
    fv = patients["finding_v"][owner] + images["finding_dv"][image_rows]
    rotation, scale = images["rotation"][image_rows], images["scale"][image_rows]
    cos, sin = np.cos(rotation), np.sin(rotation)
    x = scale * (cos * fu - sin * fv) + images["shift_x"][image_rows]  # inverse of the mapping in _render_chunk
    y = scale * (sin * fu + cos * fv) + images["shift_y"][image_rows]
    radius = patients["finding_r"][owner] * images["finding_scale"][image_rows] * scale
    return np.stack([y, x], axis=1), radius


# ------------------------------------------------------------------------------------------------- stores
def make_synthetic_store(
    spec: SyntheticSpec,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    name: str | None = None,
) -> ImageStore:
    """The synthetic data as an :class:`ImageStore` with seeded, patient-level train/val/test splits."""
    data = generate_radiographs(spec)
    name = name or f"synthetic-site{spec.site}"
    split = assign_patient_splits(data["patient_id"], data["labels"], split_fractions, seed=spec.seed, source=name)
    return _to_store(data, split, name, spec)


def make_external_store(spec: SyntheticSpec, site: int) -> ImageStore:
    """An external test set: new patients from the same anatomy/disease distribution, imaged at ``site``.

    Every row is ``split="test"``. ``site`` must differ from ``spec.site`` (otherwise it is not external).
    """
    if site == spec.site:
        raise DataError(
            "make_external_store",
            f"site={site} equals the internal site of the spec",
            "pass a different site number for an external test set",
        )
    external = replace(spec, site=site)
    data = generate_radiographs(external)
    split = np.full(external.n_images, "test", dtype="<U10")
    return _to_store(data, split, f"synthetic-site{site}-external", external)


def _to_store(data: dict[str, np.ndarray], split: np.ndarray, name: str, spec: SyntheticSpec) -> ImageStore:
    return ImageStore(
        name=name,
        images=torch.from_numpy(data["images"]).unsqueeze(1),
        labels=torch.from_numpy(data["labels"]),
        split=split,
        patient_id=data["patient_id"].astype(str),
        task=TaskInfo("binary", 2, ("normal", "finding")),
        meta={"site": data["site"], **({"report": data["report"]} if "report" in data else {}),
              **({"mask": data["mask"]} if "mask" in data else {})},
        origin=f"{_SOURCE} ({spec})",
        mask_classes=MASK_CLASSES if "mask" in data else (),
    )
