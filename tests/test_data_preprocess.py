"""Modality-aware preprocessing on real DICOM pixels (pydicom's shipped files) and small made-up shapes."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from radssl.data.dicom import DicomSourceConfig, read_dicom_source
from radssl.data.preprocess import (
    PreprocessConfig,
    preprocess_mask,
    preprocess_record,
    ultrasound_sector,
)
from radssl.data.records import BadFileLog, Record
from radssl.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def shipped(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not shipped with this pydicom")
    return Path(path)


def read_one(tmp_path: Path, name: str, **config) -> list[Record]:
    folder = tmp_path / Path(name).stem
    folder.mkdir(exist_ok=True)
    shutil.copy(shipped(name), folder / name)
    return read_dicom_source(DicomSourceConfig(root=folder, **config), BadFileLog())


def preprocess(record: Record, **config) -> np.ndarray:
    return preprocess_record(record, PreprocessConfig(**config))


# ----------------------------------------------------------------------------------------- CT windows
def test_window_maps_centre_to_mid_grey_and_clips_outside(tmp_path):
    record = read_one(tmp_path, "CT_small.dcm")[0]
    hu = record.pixels.astype(np.float64)
    centre, width = float(np.median(hu)), 200.0
    out = preprocess(record, modality="ct", windows=[(centre, width)])
    assert out.shape == (1, 128, 128) and out.dtype == np.uint8
    assert set(np.unique(out[0][hu == centre])) == {128}  # 0.5 → round(127.5) = 128
    assert (out[0][hu <= centre - width / 2] == 0).all() and (out[0][hu >= centre + width / 2] == 255).all()
    inside = (hu > centre - width / 2) & (hu < centre + width / 2)
    expected = np.round((hu[inside] - (centre - width / 2)) / width * 255)
    np.testing.assert_array_equal(out[0][inside], expected)


def test_several_windows_are_channels_and_presets_are_their_numbers(tmp_path):
    record = read_one(tmp_path, "CT_small.dcm")[0]
    named = preprocess(record, modality="ct", windows=["lung", "bone", "brain"])
    numbers = preprocess(record, modality="ct", windows=[(-600, 1500), (400, 1800), (40, 80)])
    assert named.shape == (3, 128, 128)
    np.testing.assert_array_equal(named, numbers)
    assert not np.array_equal(named[0], named[1])
    default = preprocess(record)  # auto + CT → the soft-tissue window
    np.testing.assert_array_equal(default, preprocess(record, windows=["abdomen"]))


def test_file_window_and_missing_file_window(tmp_path):
    mr = read_one(tmp_path, "MR_small.dcm")[0]
    centre, width = mr.extra["windows"][0]
    np.testing.assert_array_equal(preprocess(mr, windows=["file"]), preprocess(mr, windows=[(centre, width)]))
    ct = read_one(tmp_path, "CT_small.dcm")[0]  # CT_small has no window in its header
    with pytest.raises(DataError, match=r"CT_small\.dcm: window 'file' asked for, but the file has no"):
        preprocess(ct, windows=["file"])


def test_monochrome1_inverted_after_the_window(tmp_path):
    """A MONOCHROME1 copy of MR_small (stored values mirrored) must look like the MONOCHROME2 original."""
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    stored = ds.pixel_array.astype(np.int32)
    top = int(stored.max() + stored.min())
    mono1 = copy.deepcopy(ds)
    mono1.PhotometricInterpretation = "MONOCHROME1"
    mono1.PixelData = (top - stored).astype("<i2").tobytes()
    centre, width = 1000.0, 600.0
    mono1.WindowCenter, mono1.WindowWidth = top - centre, width  # the same tissue window, mirrored
    (tmp_path / "m1").mkdir()
    mono1.save_as(tmp_path / "m1" / "mono1.dcm", enforce_file_format=True)
    inverted = read_dicom_source(DicomSourceConfig(root=tmp_path / "m1"), BadFileLog())[0]
    original = read_one(tmp_path, "MR_small.dcm")[0]
    assert inverted.extra["invert"] is True and original.extra["invert"] is False

    # Percentile normalisation is mirror-symmetric, so inversion must give the original back (±1 level).
    a, b = preprocess(inverted, modality="xray"), preprocess(original, modality="xray")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1

    # The file's window is applied to the stored (mirrored) values first, then inverted.
    out = preprocess(inverted, windows=["file"])[0]
    raw = inverted.pixels.astype(np.float64)
    assert (out[raw <= top - centre - width / 2] == 255).all()  # low MONOCHROME1 values display white
    assert (out[raw >= top - centre + width / 2] == 0).all()
    same_tissue = preprocess(original, windows=[(centre, width)])[0].astype(int)
    assert np.abs(out.astype(int) - same_tissue).max() <= 1  # 1 − x rounds ties the other way
    assert (out.astype(int) == same_tissue).mean() > 0.99


# ----------------------------------------------------------------------------------------- MR, X-ray
def test_mr_percentile_rescale_and_zscore(tmp_path):
    record = read_one(tmp_path, "MR_small.dcm")[0]
    values = record.pixels.astype(np.float64)
    foreground = values[values != 0]
    lo, hi = np.percentile(foreground, [0.5, 99.5])
    out = preprocess(record, modality="mr")[0]
    assert (out[values <= lo] == 0).all() and (out[values >= hi] == 255).all()
    inside = (values > lo) & (values < hi)
    np.testing.assert_array_equal(out[inside], np.round((values[inside] - lo) / (hi - lo) * 255))

    z = preprocess(record, modality="mr", mr_normalisation="zscore", output_dtype="float16")[0]
    assert z.dtype == np.float16
    clipped = np.clip(values, lo, hi)
    assert float(z.astype(np.float64).mean()) == pytest.approx(0.0, abs=1e-2)
    assert float(z.astype(np.float64).std()) == pytest.approx(1.0, abs=1e-2)
    np.testing.assert_allclose(z, (clipped - clipped.mean()) / clipped.std(), atol=5e-3)
    # Zero background (masked / skull-stripped MR): statistics over the non-zero voxels only.
    padded = Record(pixels=np.pad(record.pixels, 32), path="padded", modality="MR", extra={"layout": "HW"})
    zp = preprocess(padded, mr_normalisation="zscore", output_dtype="float16")[0].astype(np.float64)
    inner = zp[32:-32, 32:-32]
    assert inner.mean() == pytest.approx(0.0, abs=1e-2) and inner.std() == pytest.approx(1.0, abs=1e-2)
    np.testing.assert_allclose(inner, z, atol=5e-3)
    with pytest.raises(ValueError, match="zscore needs output_dtype: float16"):
        PreprocessConfig(mr_normalisation="zscore")


def test_xray_clahe_spreads_the_histogram(tmp_path):
    record = read_one(tmp_path, "CT_small.dcm")[0]
    plain = preprocess(record, modality="xray")[0]
    equalised = preprocess(record, modality="xray", equalisation="clahe")[0]

    def entropy(image: np.ndarray) -> float:
        p = np.bincount(image.ravel(), minlength=256) / image.size
        return float(-(p[p > 0] * np.log2(p[p > 0])).sum())

    assert entropy(equalised) > entropy(plain) + 0.2
    # CLAHE is monotone within a tile neighbourhood: darker stays darker on average.
    assert np.corrcoef(plain.ravel(), equalised.ravel())[0, 1] > 0.8


# ----------------------------------------------------------------------------------------- ultrasound
def test_ultrasound_crop_keeps_the_sector_and_drops_text(tmp_path):
    rng = np.random.default_rng(0)
    image = np.zeros((120, 160), dtype=np.float32)
    rows, cols = np.mgrid[:120, :160]
    angle = np.abs(np.arctan2(cols - 80, rows - 10))
    radius = np.hypot(rows - 10, cols - 80)
    fan = (angle < np.deg2rad(35)) & (radius > 15) & (radius < 105)
    image[fan] = rng.gamma(2.0, 40.0, fan.sum()).clip(0, 255)  # speckle
    image[40:60, 60:80][fan[40:60, 60:80]] = 0  # an anechoic cyst inside the sector
    image[2:8, 2:40] = 255  # burnt-in text block, top left
    image[100:106, 130:134] = 255  # a calliper mark outside the fan
    record = Record(pixels=image.astype(np.uint8), path="fan.png", modality="US", extra={"layout": "HW"})
    box, keep = ultrasound_sector(image)
    fan_rows, fan_cols = np.nonzero(fan)
    assert abs(box[0].start - fan_rows.min()) <= 3 and abs(box[0].stop - 1 - fan_rows.max()) <= 3
    assert abs(box[1].start - fan_cols.min()) <= 3 and abs(box[1].stop - 1 - fan_cols.max()) <= 3
    assert keep[50 - box[0].start, 70 - box[1].start]  # the cyst is inside the hull

    out = preprocess(record)[0]  # auto → us: crop, then /255
    assert out.shape == (box[0].stop - box[0].start, box[1].stop - box[1].start)
    np.testing.assert_array_equal(out[keep], image[box][keep].astype(np.uint8))
    assert (out[~keep] == 0).all()
    full = preprocess(record, us_crop=False)[0]
    assert full.shape == image.shape and full[4, 10] == 255  # without cropping the text stays


def test_real_ultrasound_cine_crop_and_resize(tmp_path):
    frames = read_one(tmp_path, "examples_ybr_color.dcm")  # JPEG baseline: Pillow (a dependency) decodes it
    frame = frames[0]
    box, keep = ultrasound_sector(frame.pixels)
    height, width = frame.pixels.shape
    assert 0.15 < keep.mean() * keep.size / (height * width) < 0.9  # a real sector, not everything/nothing
    assert box[1].start > 0.1 * width and box[1].stop < 0.95 * width  # side labels and scales dropped
    out = preprocess(frame, target_size=(64, 64))
    assert out.shape == (1, 64, 64) and out.dtype == np.uint8 and out.max() > 100
    volume = read_dicom_source(DicomSourceConfig(root=tmp_path / "examples_ybr_color", assemble="series"),
                               BadFileLog())[0]
    cine = preprocess(volume, target_size=(30, 64, 64), resize="stretch")
    assert cine.shape == (1, 30, 64, 64)


# ----------------------------------------------------------------------------------------- geometry
def _ramp_volume(depth: int = 6) -> Record:
    pixels = np.broadcast_to(np.arange(depth, dtype=np.float32)[:, None, None] * 100.0, (depth, 16, 16)).copy()
    return Record(pixels=pixels, path="ramp", modality="CT", spacing=(5.0, 1.0, 1.0), extra={"layout": "DHW"})


def test_resample_volume_to_target_spacing_is_linear_on_hu():
    record = _ramp_volume()
    out = preprocess(record, windows=[(250.0, 1000.0)], target_spacing=(2.5, 2.0, 2.0), output_dtype="float16")
    assert out.shape == (1, 12, 8, 8)
    depth_profile = out[0, :, 4, 4].astype(np.float64) * 1000.0 - 250.0  # window back to HU
    # align_corners=False: new sample i sits at old coordinate (i + 0.5) / 2 - 0.5, clamped at the ends.
    expected = np.clip((np.arange(12) + 0.5) / 2 - 0.5, 0, 5) * 100.0
    np.testing.assert_allclose(depth_profile, expected, atol=1.0)
    in_plane_only = preprocess(record, windows=[(250.0, 1000.0)], target_spacing=(2.0, 2.0))
    assert in_plane_only.shape == (1, 6, 8, 8)
    cine = Record(pixels=record.pixels, path="cine", modality="US", spacing=(float("nan"), 1.0, 1.0),
                  extra={"layout": "DHW"})
    assert preprocess(cine, target_spacing=(2.5, 0.5, 0.5), us_crop=False).shape == (1, 6, 32, 32)


def test_pad_keeps_aspect_stretch_does_not_and_mask_follows():
    pixels = np.zeros((40, 80), dtype=np.float32)
    pixels[10:30, 30:50] = 1000.0  # a 20×20 square
    mask = (pixels > 0).astype(np.uint8)
    record = Record(pixels=pixels, path="square", modality="CT", extra={"layout": "HW", "mask": mask})

    def extent(image: np.ndarray) -> tuple[int, int, int, int]:
        rows, cols = np.nonzero(image > 127)
        return rows.min(), rows.max(), cols.min(), cols.max()

    padded = preprocess(record, windows=[(500.0, 1000.0)], target_size=(64, 64))[0]
    r0, r1, c0, c1 = extent(padded)
    assert abs((r1 - r0) - (c1 - c0)) <= 1 and 14 <= r1 - r0 <= 17  # 20 px × 64/80, still square
    assert (padded[:12] == 0).all() and (padded[-12:] == 0).all()  # padding rows above/below
    stretched = preprocess(record, windows=[(500.0, 1000.0)], target_size=(64, 64), resize="stretch")[0]
    r0s, r1s, c0s, c1s = extent(stretched)
    assert (r1s - r0s) > 1.6 * (c1s - c0s)  # stretched: 32 px tall, 16 px wide

    config = PreprocessConfig(windows=[(500.0, 1000.0)], target_size=(64, 64))
    resized_mask = preprocess_mask(record, config)
    assert resized_mask.shape == (64, 64) and set(np.unique(resized_mask)) == {0, 1}
    mr0, mr1, mc0, mc1 = extent(resized_mask * 255)
    assert max(abs(mr0 - r0), abs(mr1 - r1), abs(mc0 - c0), abs(mc1 - c1)) <= 1

    cropped = preprocess(record, windows=[(500.0, 1000.0)], target_size=(20, 100), resize="crop_or_pad")[0]
    assert cropped.shape == (20, 100)
    np.testing.assert_array_equal(cropped[:, 10:90], padded_source := np.where(pixels[10:30] > 0, 255, 0))
    assert (cropped[:, :10] == 0).all() and padded_source.shape == (20, 80)


def test_layouts_channels_and_volume_output(tmp_path):
    two_sequences = np.stack([_ramp_volume().pixels, _ramp_volume().pixels[::-1].copy()])
    record = Record(pixels=two_sequences, path="case", modality="MR", spacing=(5.0, 1.0, 1.0),
                    extra={"layout": "CDHW"})
    out = preprocess(record, target_size=(4, 8, 8))
    assert out.shape == (2, 4, 8, 8) and out.dtype == np.uint8
    ct_two_windows = Record(pixels=two_sequences[0], path="ct", modality="CT", spacing=(5.0, 1.0, 1.0),
                            extra={"layout": "DHW"})
    assert preprocess(ct_two_windows, windows=["lung", "bone"]).shape == (2, 6, 16, 16)
    with pytest.raises(DataError, match="target_size .* has 2 values but the record is a volume"):
        preprocess(ct_two_windows, target_size=(8, 8))
    flat = Record(pixels=np.zeros((8, 8), np.uint8), path="a.png", modality="DX", extra={"layout": "HW"})
    with pytest.raises(DataError, match=r"a\.png: no pixel spacing to resample"):
        preprocess(flat, target_spacing=(1.0, 1.0))


def test_dicom_series_to_cached_volume(tmp_path):
    from test_data_dicom import write_ct_series

    write_ct_series(tmp_path, [0.0, 2.5, 5.0, 7.5])
    (volume,) = read_dicom_source(DicomSourceConfig(root=tmp_path, assemble="series"), BadFileLog())
    out = preprocess(volume, windows=["lung", "mediastinum"], target_spacing=(2.5, 2.0, 2.0), target_size=(4, 32, 32))
    assert out.shape == (2, 4, 32, 32) and out.dtype == np.uint8 and out.std() > 10


# ----------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_and_tracks_every_field():
    base = PreprocessConfig.model_validate({"modality": "ct", "windows": ["lung", [40, 400]], "target_size": [64, 64]})
    same = PreprocessConfig(modality="ct", windows=[(-600, 1500), "abdomen"], target_size=(64, 64))
    assert base.config_fingerprint() == same.config_fingerprint()
    changed = [
        base.model_copy(update={"target_size": (32, 32)}),
        base.model_copy(update={"windows": ["lung"]}),
        base.model_copy(update={"output_dtype": "float16"}),
        base.model_copy(update={"percentiles": (1.0, 99.0)}),
        base.model_copy(update={"resize": "stretch"}),
    ]
    prints = {c.config_fingerprint() for c in changed} | {base.config_fingerprint()}
    assert len(prints) == len(changed) + 1
    code = (
        "from radssl.data.preprocess import PreprocessConfig as P;"
        "print(P(modality='ct', windows=['lung', (40, 400)], target_size=(64, 64)).config_fingerprint())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == base.config_fingerprint()


def test_config_rejects_unknown_keys_and_windows():
    with pytest.raises(ValueError):
        PreprocessConfig.model_validate({"windos": ["lung"]})
    with pytest.raises(ValueError, match="unknown window 'liver'"):
        PreprocessConfig(windows=["liver"])
    with pytest.raises(ValueError, match="non-positive width"):
        PreprocessConfig(windows=[(40.0, 0.0)])
