"""Models Genesis corruptions and the ``restoration`` view policy: one corrupted view + its restoration target.

Models Genesis (Zhou et al., MICCAI 2019; MedIA 2021, arXiv:2004.07882) learns by restoring an image from four
transformations, applied in the reference code's order and with its probabilities
(github.com/MrGiovanni/ModelsGenesis, ``pytorch/utils.py`` ``generate_pair`` and ``pytorch/config.py``):

1. local pixel shuffling (p = ``local_rate`` 0.5): small windows have their pixels permuted within themselves,
   so texture is destroyed but the global shape and the intensity histogram of each window are kept;
2. non-linear intensity mapping (p = ``nonlinear_rate`` 0.9): a monotone cubic Bézier curve through (0, 0), two
   random control points and (1, 1) remaps intensities; half of the time the curve is reversed (f(0)=1, f(1)=0);
3. in-painting or out-painting (p = ``paint_rate`` 0.9, mutually exclusive; in-painting with probability
   ``inpaint_rate`` = 1 − ``outpaint_rate`` = 0.2): in-painting fills up to five boxes of 1/6–1/3 of each side with
   uniform noise; out-painting replaces everything with noise except up to five boxes of 3/7–4/7 of each side.

The target is the uncorrupted image after the geometric augmentation (the reference flips image and target
together), normalised like the view, so the network restores the *image*, not the augmentation.

Why our own code: the reference is per-sample NumPy with Python loops (10,000 windows per cube for the shuffle) on
the CPU; here every transformation is a batched tensor op on the training device with per-sample parameters from
the step's generator, in 2D and 3D (the same code: every function works on ``(B, C, *spatial)``). Measured on this
2-core CPU (1 thread, shared with other jobs): the reference's shuffle alone takes 1.9 s for its batch of six
64×64×32 cubes, all four transformations here 0.56 s; a batch of 64 images of 28 px takes 38 ms. Differences from
the reference, all distribution-level: the shuffle permutes a random *partition* into windows (random window size
per sample and axis in 1..max(2, side/10), never 1 on every axis, random grid offset) covering
``local_shuffle_coverage`` of the windows, instead of 10,000 overlapping random windows — which cover ≈ 85 % of a
64×64×32 cube (1 − exp(−10⁴·3.5·3.5·2/131072)), the default; the Bézier curve is sampled at 1,000 instead of
100,000 points (largest difference 3e-5 of the range over 2,000 random curves, far below one grey level, 1/255);
in-painting draws one noise field per sample rather than one per box (both are i.i.d. uniform).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from radssl.data.store import images_to_float
from radssl.views.augment import BatchAugmenter
from radssl.views.batch import ViewBatch, ViewLayout
from radssl.views.columns import PairingColumns
from radssl.views.policies import PolicyContext, ViewPolicy, ViewSettings, normalise_view

ParameterDict = dict[str, torch.Tensor]

BEZIER_POINTS = 1000
"""Samples of each Bézier curve (reference: 100,000; 1,000 differ from it by at most 3e-5 of the range)."""
MAX_BOXES = 5
"""In-/out-painting boxes per image at most (reference: ``cnt = 5``; out-painting: 1 + ``cnt = 4``)."""
BOX_CONTINUE_P = 0.95
"""Probability of drawing one more box (reference: ``random.random() < 0.95``)."""
BOX_MARGIN = 3
"""Pixels between a box and the image border (reference: ``random.randint(3, size - box - 3)``)."""


class RestorationParams(BaseModel):
    """The ``restoration`` policy's own ``views`` keys; defaults are the Models Genesis reference configuration."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nonlinear_p: float = Field(0.9, ge=0.0, le=1.0, description="Bézier intensity mapping (reference nonlinear_rate)")
    local_shuffle_p: float = Field(0.5, ge=0.0, le=1.0, description="local pixel shuffling (reference local_rate)")
    local_shuffle_max_window: float = Field(
        0.1, gt=0.0, le=0.5, description="largest shuffle window as a fraction of each side (reference: side // 10)")
    local_shuffle_coverage: float = Field(
        0.85, ge=0.0, le=1.0, description="share of windows shuffled (≈ the reference's 10,000 windows per cube)")
    paint_p: float = Field(0.9, ge=0.0, le=1.0, description="in- or out-painting (reference paint_rate)")
    inpaint_share: float = Field(
        0.2, ge=0.0, le=1.0, description="share of painted images in-painted; the rest out-painted (reference 0.2)")


# --------------------------------------------------------------------------------------------- sampling helpers
def _rand(generator: torch.Generator, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _randint(low: torch.Tensor, high: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive, like ``random.randint``), elementwise; high < low gives low."""
    span = (high - low + 1).clamp(min=1)
    u = torch.rand(low.shape, generator=generator, device=low.device)
    return low + torch.minimum((u * span).long(), span - 1)


def _shape_tensor(spatial: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(spatial, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------- Bézier mapping
def bezier_curves(controls: torch.Tensor, points: int = BEZIER_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic Bézier curves from (0, 0) over two control points to (1, 1), sampled at ``points`` values of t.

    ``controls`` (B, 2, 2): per sample the (x, y) of the two inner control points, in [0, 1]. Returns xs, ys (B, P),
    both non-decreasing from 0 to 1: with every control coordinate in [0, 1], x(t) and y(t) are monotone (the
    derivative's Bernstein coefficients a, b − a, 1 − b satisfy b − a ≥ −√(a(1 − b))), which is why the reference
    may sort both coordinates independently; we sort too, to be robust to rounding.
    """
    t = torch.linspace(0.0, 1.0, points, device=controls.device, dtype=controls.dtype)
    b1 = 3 * (1 - t) ** 2 * t
    b2 = 3 * (1 - t) * t**2
    b3 = t**3
    xs = b1 * controls[:, 0, 0, None] + b2 * controls[:, 1, 0, None] + b3
    ys = b1 * controls[:, 0, 1, None] + b2 * controls[:, 1, 1, None] + b3
    return xs.sort(dim=1).values, ys.sort(dim=1).values


def _interp(values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Row-wise ``np.interp(values[b], xs[b], ys[b])`` for (B, M) values and (B, P) ascending xs."""
    points = xs.shape[1]
    index = torch.searchsorted(xs, values.contiguous()).clamp_(1, points - 1)
    x0, x1 = xs.gather(1, index - 1), xs.gather(1, index)
    y0, y1 = ys.gather(1, index - 1), ys.gather(1, index)
    weight = ((values - x0) / (x1 - x0).clamp_min(1e-12)).clamp_(0.0, 1.0)
    return y0 + weight * (y1 - y0)


def sample_bezier(batch: int, device: torch.device, generator: torch.Generator, p: float) -> ParameterDict:
    """Per-sample Bézier mapping parameters: ``apply`` (B,), ``controls`` (B, 2, 2), ``inverted`` (B,).

    ``inverted`` is the reference's "half chance to get flip": x sorted but y left decreasing, i.e. the mapping
    runs from (0, 1) to (1, 0) — an intensity inversion through the same curve.
    """
    return {
        "apply": _rand(generator, batch, device=device) < p,
        "controls": _rand(generator, batch, 2, 2, device=device),
        "inverted": _rand(generator, batch, device=device) < 0.5,
    }


def bezier_mapping(x: torch.Tensor, params: ParameterDict, points: int = BEZIER_POINTS) -> torch.Tensor:
    """Map intensities in [0, 1] of samples with ``apply`` through their curves; others are returned unchanged."""
    batch = x.shape[0]
    xs, ys = bezier_curves(params["controls"].to(x.dtype), points)
    ys = torch.where(params["inverted"][:, None], ys.flip(1), ys)
    mapped = _interp(x.reshape(batch, -1), xs, ys).view_as(x)
    return torch.where(params["apply"].view((-1,) + (1,) * (x.ndim - 1)), mapped, x)


# --------------------------------------------------------------------------------------------- local shuffling
def sample_local_shuffle(batch: int, spatial: tuple[int, ...], device: torch.device, generator: torch.Generator,
                         p: float, max_window_fraction: float, coverage: float) -> ParameterDict:
    """Per-sample shuffle parameters.

    ``window`` (B, n) window side per axis in 1..max(2, ⌊fraction·side⌋) (at most the side), drawn uniformly among
    the shapes that are not 1 on every axis; ``offset`` (B, n) grid offset in 0..window−1; ``chosen`` (B, W) which
    window ids are shuffled (W bounds the number of ids); ``keys`` (B, N) random sort keys for the pixels;
    ``apply`` (B,).

    Why never 1 × 1: a 1-pixel window cannot be shuffled. Drawn per axis in 1..⌊side/10⌋, 28 px images (largest 2)
    got 1 × 1 windows — an unchanged image — for a quarter of the samples, so the effective shuffle rate was
    0.375, not ``p`` = 0.5; and below 20 px every window was 1 × 1. The reference draws a size per window among
    10,000 windows, so a 1 × 1 draw only loses that window, never the whole image.
    """
    sides = _shape_tensor(spatial, device)
    largest = torch.minimum((sides.float() * max_window_fraction).long().clamp(min=2), sides).expand(batch, -1)
    window = _window_shapes(largest, generator)
    offset = _randint(torch.zeros_like(window), window - 1, generator)
    ids_bound = math.prod(side + 1 for side in spatial)
    pixels = math.prod(spatial)
    return {
        "apply": _rand(generator, batch, device=device) < p,
        "window": window,
        "offset": offset,
        "chosen": _rand(generator, batch, ids_bound, device=device) < coverage,
        "keys": torch.randint(0, pixels, (batch, pixels), generator=generator, device=device),
    }


def _window_shapes(largest: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, n) window sides, uniform over the shapes in ∏ 1..largest[:, i] other than all-ones (when one exists)."""
    counts = largest.prod(dim=1)  # shapes per sample; index 0 in mixed radix is the all-ones shape
    low = (counts > 1).long()
    index = _randint(low, counts - 1, generator)
    strides = torch.cumprod(torch.cat([torch.ones_like(largest[:, :1]), largest[:, :-1]], dim=1), dim=1)
    return 1 + (index[:, None] // strides) % largest


def window_ids(spatial: tuple[int, ...], window: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(B, N) id of the shuffle window each pixel (flattened, row-major) belongs to."""
    batch = window.shape[0]
    ids = torch.zeros((batch,) + tuple(spatial), dtype=torch.long, device=window.device)
    for axis, side in enumerate(spatial):
        coords = torch.arange(side, device=window.device)
        index = (coords[None, :] + offset[:, axis, None]) // window[:, axis, None]  # (B, side), at most side
        shape = [batch] + [1] * len(spatial)
        shape[1 + axis] = side
        ids = ids * (side + 1) + index.view(shape)
    return ids.view(batch, -1)


def local_pixel_shuffle(x: torch.Tensor, params: ParameterDict) -> torch.Tensor:
    """Permute pixels within each chosen window (all channels alike) of samples with ``apply``.

    Vectorised for the whole batch: sorting pixels by (window id, pixel index) lists every window's positions;
    sorting by (window id, random key) lists the same windows' pixels in random order; writing the second list
    into the first moves every pixel to a random position *of its own window*. Unchosen windows use the pixel
    index as key, so they stay in place. Stable sorts keep it deterministic.
    """
    batch, channels = x.shape[:2]
    spatial = tuple(x.shape[2:])
    pixels = math.prod(spatial)
    ids = window_ids(spatial, params["window"], params["offset"])
    position = torch.arange(pixels, device=x.device).expand(batch, -1)
    chosen = params["chosen"].gather(1, ids) & params["apply"][:, None]
    order = torch.argsort(ids * pixels + position, dim=1, stable=True)
    shuffled = torch.argsort(ids * pixels + torch.where(chosen, params["keys"], position), dim=1, stable=True)
    flat = x.reshape(batch, channels, pixels)
    out = torch.empty_like(flat)
    source = flat.gather(2, shuffled[:, None, :].expand(-1, channels, -1))
    out.scatter_(2, order[:, None, :].expand(-1, channels, -1), source)
    return out.view_as(x)


# --------------------------------------------------------------------------------------------- in-/out-painting
def sample_boxes(batch: int, spatial: tuple[int, ...], device: torch.device, generator: torch.Generator,
                 size_range: tuple[torch.Tensor, torch.Tensor], first_always: bool) -> ParameterDict:
    """Up to ``MAX_BOXES`` boxes per sample: ``start``/``size`` (B, K, n) in pixels, ``active`` (B, K).

    Box sides are uniform integers in ``size_range`` (per axis), starts keep ``BOX_MARGIN`` pixels from the border
    where the image allows. Box k is drawn while every earlier coin came up (p = ``BOX_CONTINUE_P``), as in the
    reference's ``while cnt > 0 and random.random() < 0.95``; out-painting's first box is unconditional.
    """
    sides = _shape_tensor(spatial, device)
    low, high = (bound.expand(batch, MAX_BOXES, -1) for bound in size_range)
    size = _randint(low, high, generator)
    lowest = torch.minimum(torch.full_like(size, BOX_MARGIN), sides - size).clamp(min=0)
    start = _randint(lowest, torch.maximum(lowest, sides - size - BOX_MARGIN), generator)
    coins = _rand(generator, batch, MAX_BOXES, device=device) < BOX_CONTINUE_P
    if first_always:
        coins[:, 0] = True
    return {"start": start, "size": size, "active": torch.cumprod(coins.long(), dim=1).bool()}


def box_mask(spatial: tuple[int, ...], boxes: ParameterDict) -> torch.Tensor:
    """(B, *spatial) bool: inside any active box."""
    start, size, active = boxes["start"], boxes["size"], boxes["active"]
    batch, count = active.shape
    inside = active.view(batch, count, *([1] * len(spatial)))
    for axis, side in enumerate(spatial):
        coords = torch.arange(side, device=start.device)
        along = (coords >= start[:, :, axis, None]) & (coords < (start + size)[:, :, axis, None])  # (B, K, side)
        shape = [batch, count] + [1] * len(spatial)
        shape[2 + axis] = side
        inside = inside & along.view(shape)
    return inside.any(dim=1)


def inpaint_sizes(spatial: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference in-painting box sides: ``randint(side // 6, side // 3)``."""
    sides = _shape_tensor(spatial, device)
    return (sides // 6).clamp(min=1), (sides // 3).clamp(min=1)


def outpaint_sizes(spatial: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference out-painting box sides: ``side − randint(3·side // 7, 4·side // 7)``."""
    sides = _shape_tensor(spatial, device)
    return (sides - 4 * sides // 7).clamp(min=1), (sides - 3 * sides // 7).clamp(min=1)


def sample_painting(shape: tuple[int, ...], device: torch.device, generator: torch.Generator, p: float,
                    inpaint_share: float) -> ParameterDict:
    """Per-sample painting: ``inpaint`` / ``outpaint`` (B,) exclusive flags, their boxes, and the noise fill."""
    batch, spatial = shape[0], tuple(shape[2:])
    painted = _rand(generator, batch, device=device) < p
    inpaint = painted & (_rand(generator, batch, device=device) < inpaint_share)
    inner = sample_boxes(batch, spatial, device, generator, inpaint_sizes(spatial, device), first_always=False)
    outer = sample_boxes(batch, spatial, device, generator, outpaint_sizes(spatial, device), first_always=True)
    return {
        "inpaint": inpaint,
        "outpaint": painted & ~inpaint,
        **{f"inpaint_{k}": v for k, v in inner.items()},
        **{f"outpaint_{k}": v for k, v in outer.items()},
        "noise": torch.rand(shape, generator=generator, device=device),
    }


def _boxes(params: ParameterDict, prefix: str) -> ParameterDict:
    return {key: params[f"{prefix}_{key}"] for key in ("start", "size", "active")}


def paint(x: torch.Tensor, params: ParameterDict) -> torch.Tensor:
    """In-paint (noise inside the boxes) or out-paint (noise outside the boxes) the flagged samples."""
    spatial = tuple(x.shape[2:])
    flag_shape = (-1,) + (1,) * (x.ndim - 1)
    inside_in = box_mask(spatial, _boxes(params, "inpaint")).unsqueeze(1)
    inside_out = box_mask(spatial, _boxes(params, "outpaint")).unsqueeze(1)
    replace = (params["inpaint"].view(flag_shape) & inside_in) | (params["outpaint"].view(flag_shape) & ~inside_out)
    noise = params["noise"].to(x.dtype)
    return torch.where(replace, noise, x)


# --------------------------------------------------------------------------------------------- the whole corruption
class GenesisCorruption:
    """The four Models Genesis transformations in the reference order, batched, per-sample parameters.

    ``sample(shape, device, generator)`` draws everything; ``apply(x, parameters)`` is deterministic, so tests can
    inspect and hand-craft parameters; ``__call__(x, generator)`` does both. ``x`` is (B, C, *spatial) in [0, 1].
    """

    def __init__(self, params: RestorationParams | None = None) -> None:
        self.params = params or RestorationParams()

    def sample(self, shape: tuple[int, ...], device: torch.device | str, generator: torch.Generator) -> ParameterDict:
        p = self.params
        device = torch.device(device)
        batch, spatial = shape[0], tuple(shape[2:])
        shuffle = sample_local_shuffle(batch, spatial, device, generator, p.local_shuffle_p,
                                       p.local_shuffle_max_window, p.local_shuffle_coverage)
        bezier = sample_bezier(batch, device, generator, p.nonlinear_p)
        painting = sample_painting(tuple(shape), device, generator, p.paint_p, p.inpaint_share)
        return {**{f"shuffle_{k}": v for k, v in shuffle.items()},
                **{f"bezier_{k}": v for k, v in bezier.items()},
                **painting}

    @torch.no_grad()
    def apply(self, x: torch.Tensor, parameters: ParameterDict) -> torch.Tensor:
        shuffle = {k[len("shuffle_"):]: v for k, v in parameters.items() if k.startswith("shuffle_")}
        bezier = {k[len("bezier_"):]: v for k, v in parameters.items() if k.startswith("bezier_")}
        out = local_pixel_shuffle(x, shuffle)
        out = bezier_mapping(out, bezier)
        return paint(out, parameters)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(tuple(x.shape), x.device, generator))


# --------------------------------------------------------------------------------------------- the policy
class RestorationPolicy(ViewPolicy):
    """One corrupted view and its target: ``views[0]`` = corrupt(augment(x)), ``targets[0]`` = augment(x).

    Both are normalised with the project's input convention. The augmentation is whatever the ``views`` section
    says; Models Genesis' own preset keeps it geometric (crop + flips), as the reference only flips, so the target
    is the image itself seen through the crop.
    """

    name = "restoration"
    Params: ClassVar[type[BaseModel]] = RestorationParams
    uses_pairing = False

    def __init__(self, settings: ViewSettings, context: PolicyContext) -> None:
        super().__init__(settings, context)
        self.augmenter = BatchAugmenter(settings.augment, context.output_size)
        self.corruption = GenesisCorruption(self.params)

    def layout(self) -> ViewLayout:
        return ViewLayout(sizes=(self.context.output_size,), targets=True)

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, images: torch.Tensor, columns: PairingColumns,
                 generator: torch.Generator) -> ViewBatch:
        target = self.augmenter(images_to_float(images.index_select(0, rows)), generator)
        view = self.corruption(target, generator)
        channels_last = self.context.channels_last
        return ViewBatch(views=[normalise_view(view, channels_last)], rows=rows,
                         targets=[normalise_view(target, channels_last)])
