"""Segmentation masks stored as image files (PNG/JPEG/TIFF) beside 2D images: finding, reading, merging.

The most common 2D segmentation release is a folder of images with one or more mask images per case, e.g. the
breast-ultrasound archive of Al-Dhabyani et al. 2020 (``benign (1).png``, ``benign (1)_mask.png``,
``benign (1)_mask_1.png`` for a second lesion), or a CSV with an ``image`` and a ``mask`` column. This module turns
such files into one integer label map per image (0 = background), on the image's own pixel grid:

* **Finding** (:func:`mask_name_match`): a mask is ``<image stem><suffix><ext>`` or a numbered copy
  ``<image stem><suffix>_<n><ext>`` (any image extension) in the image's folder, or in ``mask_folder`` at the
  image's relative path. A file whose stem matches the rule is never read as an image.
* **Reading** (:func:`read_mask_file`): one channel of stored values. Palette PNGs give their palette *indices*
  (the label convention of palette masks, e.g. PASCAL VOC); 1-bit files give 0/1; RGB(A) files must be grey
  (equal channels) — a coloured label map has no agreed value → label rule, so it is refused naming the file.
* **Values → labels** (:func:`mask_labels`), stated rather than guessed:

  - one class (no ``mask_values``): foreground where the value ≥ ``threshold``. ``threshold: auto`` takes 1 for a
    0/1 file and half the file's full scale otherwise (128 for 8-bit, 32768 for 16-bit), which reads 0/255 masks
    and the anti-aliased edges of JPEG masks (values near 0 and near 255) alike. A lossless file (PNG/TIFF) that is
    neither 0/1 nor reaches half scale (e.g. a 0/1/2 label map) is refused: it is a label map, not a binary mask.
  - a label map (``mask_values: {benign: 128, malignant: 255}``): label *i* (1-based, in the listed order) where the
    value equals its declared value. Lossless files must hold only 0 and the declared values (anything else is a
    bad file naming the values found); lossy JPEG files cannot, so each pixel takes the label whose declared value
    (or background 0) is nearest.

* **Merging** several mask files of one image: union (per pixel the largest label, so for one class the logical OR;
  where two classes overlap, the later-listed class wins).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from radssl.errors import DataError

LOSSY_SUFFIXES = (".jpg", ".jpeg")
"""Mask files whose values are not exact (JPEG): thresholds and nearest-value labels, never exact matching."""


def mask_stem_pattern(suffix: str) -> re.Pattern[str]:
    """``<stem><suffix>`` or ``<stem><suffix>_<n>`` (numbered copies) on a file *stem*; group ``stem`` is the image's.

    An empty suffix (masks named exactly like their images, in another folder) has no numbered copies: ``case_1``
    is then the mask of ``case_1``, not a copy for ``case``.
    """
    if not suffix:
        return re.compile(r"^(?P<stem>.+)$")
    return re.compile(rf"^(?P<stem>.+?){re.escape(suffix)}(?:_(?P<copy>\d+))?$")


def mask_name_match(stem: str, suffix: str) -> str | None:
    """The image stem a mask file stem belongs to under ``suffix`` (``"a_mask_2"`` → ``"a"``), or None."""
    match = mask_stem_pattern(suffix).match(stem)
    return match.group("stem") if match else None


def index_masks(files: Iterable[Path], suffix: str) -> dict[tuple[Path, str], list[Path]]:
    """{(folder, image stem): mask files} for every file whose stem follows the ``suffix`` rule, copies in order.

    Order: the plain ``<stem><suffix>`` first, then numbered copies by number (``_mask``, ``_mask_1``, ``_mask_2``).
    """
    found: dict[tuple[Path, str], list[tuple[int, Path]]] = {}
    pattern = mask_stem_pattern(suffix)
    for path in files:
        match = pattern.match(Path(path).stem)
        if match:
            copy = match.groupdict().get("copy")
            number = int(copy) + 1 if copy is not None else 0
            found.setdefault((Path(path).parent, match.group("stem")), []).append((number, Path(path)))
    return {key: [p for _, p in sorted(entries)] for key, entries in found.items()}


def read_mask_file(path: Path) -> tuple[np.ndarray, int]:
    """One mask file → (H, W) integer values and the file's bit depth (8 or 16; palette/1-bit files count as 8)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) > 1:
                raise DataError(str(path), f"multi-page mask ({image.n_frames} pages); expected one label image",
                                "save one mask image per file")
            image.load()
            mode = image.mode
            if mode == "1":
                return np.asarray(image, dtype=np.uint8), 8
            if mode in ("L", "P"):  # P: palette indices are the labels
                return np.asarray(image, dtype=np.uint8).copy(), 8
            if mode == "LA":
                return np.asarray(image.getchannel(0), dtype=np.uint8).copy(), 8
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
                return np.asarray(image, dtype=np.uint16).astype(np.int64), 16
            if mode in ("I", "F"):
                values = np.asarray(image)
                if values.min() < 0 or values.max() > 65535 or not np.all(values == np.round(values)):
                    raise DataError(str(path), f"mask holds values {values.min():g}..{values.max():g}; expected "
                                    "non-negative integers (8- or 16-bit)", "save label masks with integer pixels")
                return values.astype(np.int64), 16
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(str(path), f"cannot decode mask ({error})", "re-export or remove the file") from error
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        chroma = float(np.abs(rgb.astype(np.float32) - rgb.mean(-1, keepdims=True)).max())
        if path.suffix.lower() not in LOSSY_SUFFIXES or chroma > 16:
            raise DataError(str(path), f"colour mask ({mode}): its colours have no agreed label values",
                            "save the mask as a single-channel (grey or palette) image, one value per label")
        return np.round(rgb.mean(-1)).astype(np.uint8), 8  # a grey JPEG saved as RGB: chroma noise only
    return rgb[..., 0].copy(), 8


def _values_text(values: np.ndarray, limit: int = 8) -> str:
    distinct = np.unique(values)
    shown = ", ".join(str(int(v)) for v in distinct[:limit])
    return "{" + shown + (f", … ({len(distinct)} values)" if len(distinct) > limit else "") + "}"


def mask_labels(values: np.ndarray, path: Path, bit_depth: int, mask_values: Mapping[str, int] | None,
                threshold: int | None) -> np.ndarray:
    """One file's values → uint8 labels (0 background), by the rules in the module docstring."""
    lossy = Path(path).suffix.lower() in LOSSY_SUFFIXES
    if not mask_values:
        if threshold is None:
            binary = bool(np.isin(values, (0, 1)).all())
            threshold = 1 if binary else (1 << bit_depth) // 2
            if not binary and not lossy and values.max() < threshold:
                raise DataError(str(path), f"mask values {_values_text(values)} are neither 0/1 nor reach "
                                f"{threshold} (half of the {bit_depth}-bit range): a label map or a faint mask",
                                "name its labels with mask_values (e.g. {lesion: 1, cyst: 2}) or set mask_threshold")
        return (values >= threshold).astype(np.uint8)
    declared = np.asarray([0, *mask_values.values()], dtype=np.int64)
    if lossy:
        nearest = np.abs(values[..., None].astype(np.int64) - declared).argmin(-1)
        return nearest.astype(np.uint8)
    unknown = ~np.isin(values, declared)
    if unknown.any():
        raise DataError(str(path), f"mask holds values {_values_text(values[unknown])} besides background 0 and "
                        f"mask_values {dict(mask_values)}",
                        "add the missing labels to mask_values (name: value), or fix the mask")
    lookup = {int(v): i for i, v in enumerate(declared)}
    out = np.zeros(values.shape, dtype=np.uint8)
    for value, label in lookup.items():
        out[values == value] = label
    return out


def merge_mask_files(paths: Sequence[Path], image_shape: tuple[int, int], mask_values: Mapping[str, int] | None,
                     threshold: int | None, image_path: str) -> np.ndarray:
    """The label map of one image from its mask files: each on the image's grid, merged by union (largest label)."""
    merged = np.zeros(image_shape, dtype=np.uint8)
    for path in paths:
        values, bit_depth = read_mask_file(Path(path))
        if values.shape != tuple(image_shape):
            raise DataError(str(path), f"mask is {values.shape[1]}×{values.shape[0]} px (W×H) but its image "
                            f"{image_path} is {image_shape[1]}×{image_shape[0]}",
                            "save the mask on its image's pixel grid (resize with nearest neighbour) or pair the "
                            "right files")
        np.maximum(merged, mask_labels(values, Path(path), bit_depth, mask_values, threshold), out=merged)
    return merged
