"""DICOM reading on pydicom's shipped real files (and series written from their pixels in the test)."""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import JPEGLSLossless

from radssl.data.dicom import PLUGIN_FIX, DicomSourceConfig, read_dicom_source
from radssl.data.records import BadFileLog
from radssl.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SERIES_UID = "1.2.826.0.1.3680043.8.498.4242"


def shipped(name: str) -> Path:
    """A file pydicom ships (never downloaded: ``download=False``); skip when this pydicom lacks it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not shipped with this pydicom")
    return Path(path)


def read(root: Path, log: BadFileLog | None = None, **config):
    return read_dicom_source(DicomSourceConfig(root=root, **config), log or BadFileLog())


def write_ct_series(
    folder: Path,
    offsets: list[float],
    *,
    tilt_degrees: float = 0.0,
    shuffle_seed: int = 0,
    modalities: list[str] | None = None,
    with_positions: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Slices made from CT_small's pixels at ``offsets`` (mm) along a (tilted) slice normal.

    Slice ``k`` holds CT_small's stored values + 7·k, so its place in the volume can be checked. Files are
    named in a shuffled order and InstanceNumbers run backwards, so neither the file order nor the instance
    numbers give the spatial order. Returns (stored base pixels, slice normal).
    """
    base = pydicom.dcmread(shipped("CT_small.dcm"))
    pixels = base.pixel_array.astype(np.int16)
    theta = np.deg2rad(tilt_degrees)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(theta), np.sin(theta)])
    normal = np.cross(row, col)
    origin = np.array([-80.0, -90.0, 30.0])
    names = [f"IM{n:04d}" for n in range(len(offsets))]
    random.Random(shuffle_seed).shuffle(names)
    folder.mkdir(parents=True, exist_ok=True)
    for k, offset in enumerate(offsets):
        ds = copy.deepcopy(base)
        ds.PixelData = (pixels + 7 * k).astype("<i2").tobytes()
        ds.SeriesInstanceUID = SERIES_UID
        ds.SOPInstanceUID = f"{SERIES_UID}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = len(offsets) - k
        ds.Modality = modalities[k] if modalities else "CT"
        if with_positions:
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
            ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + offset * normal]
        else:
            del ds.ImagePositionPatient, ds.ImageOrientationPatient
        for tag in ("LargestImagePixelValue", "SmallestImagePixelValue", "SliceLocation"):
            if tag in ds:
                delattr(ds, tag)
        ds.save_as(folder / names[k], enforce_file_format=True)  # no suffix: found by the DICM preamble
    return pixels, normal


# ----------------------------------------------------------------------------------------- single images
def test_ct_hu_ids_and_spacing_from_tags(tmp_path):
    shutil.copy(shipped("CT_small.dcm"), tmp_path / "IMG0001")  # no .dcm suffix
    (tmp_path / "notes.txt").write_text("not DICOM")
    (records,) = [read(tmp_path)]
    assert len(records) == 1
    record = records[0]
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert record.pixels.dtype == np.int16  # integral HU kept exact, not widened to float64
    np.testing.assert_array_equal(record.pixels, expected)
    assert (record.patient_id, record.study_id, record.series_id) == (
        str(ds.PatientID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    )
    assert record.modality == "CT" and record.index is None
    assert record.spacing == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert record.extra["layout"] == "HW" and record.extra["invert"] is False


def test_file_window_and_twelve_bit_precision(tmp_path):
    shutil.copy(shipped("MR_small.dcm"), tmp_path / "mr.dcm")
    record = read(tmp_path)[0]
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    assert record.extra["windows"] == [(float(ds.WindowCenter), float(ds.WindowWidth))]
    np.testing.assert_array_equal(record.pixels, ds.pixel_array)
    assert record.pixels.max() > 255  # 12-bit values survive


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_rle_and_jpeg2000_decode_to_the_uncompressed_pixels(tmp_path, name):
    """RLE: pydicom's own decoder; JPEG 2000: Pillow's (a dependency), or the named plugin error where it lacks one."""
    from pydicom.pixels.decoders.base import get_decoder

    reference = pydicom.dcmread(shipped("MR_small.dcm")).pixel_array
    syntax = pydicom.dcmread(shipped(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    shutil.copy(shipped(name), tmp_path / name)
    if syntax.name.startswith("RLE"):
        assert get_decoder(syntax).is_available, "pydicom decodes RLE itself"
    if not get_decoder(syntax).is_available:  # a Pillow built without OpenJPEG: the clear error, never a pass
        with pytest.raises(DataError) as raised:
            read(tmp_path)
        assert raised.value.problem == f"transfer syntax {syntax.name} needs a decoder plugin"
        assert raised.value.fix == PLUGIN_FIX
        return
    np.testing.assert_array_equal(read(tmp_path)[0].pixels, reference)


def test_jpeg_ls_needs_a_plugin_or_decodes(tmp_path):
    from pydicom.pixels.decoders.base import get_decoder

    shutil.copy(shipped("MR_small_jpeg_ls_lossless.dcm"), tmp_path / "jls.dcm")
    if get_decoder(JPEGLSLossless).is_available:
        reference = pydicom.dcmread(shipped("MR_small.dcm")).pixel_array
        np.testing.assert_array_equal(read(tmp_path)[0].pixels, reference)
        return
    with pytest.raises(DataError) as raised:
        read(tmp_path)
    assert raised.value.source == str(tmp_path / "jls.dcm")
    assert raised.value.problem == "transfer syntax JPEG-LS Lossless Image Compression needs a decoder plugin"
    assert raised.value.fix == PLUGIN_FIX


def test_ultrasound_cine_frames_and_volume(tmp_path):
    path = shipped("examples_ybr_color.dcm")  # real ultrasound cine: 30 frames, YBR_FULL_422 JPEG
    ds = pydicom.dcmread(path)
    rgb = ds.pixel_array  # JPEG baseline: Pillow (a dependency) decodes it
    shutil.copy(path, tmp_path / "cine")
    frames = read(tmp_path)
    assert [r.index for r in frames] == list(range(30))
    assert {r.modality for r in frames} == {"US"}
    luma = rgb[7].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert frames[7].pixels.dtype == np.uint8
    np.testing.assert_allclose(frames[7].pixels, luma, atol=0.5 + 1e-3)
    region = ds.SequenceOfUltrasoundRegions[0]  # physical deltas in cm → mm
    assert frames[0].spacing == pytest.approx((10 * region.PhysicalDeltaY, 10 * region.PhysicalDeltaX))

    (volume,) = read(tmp_path, assemble="series")
    assert volume.pixels.shape == (30, 240, 320) and volume.extra["layout"] == "DHW"
    assert volume.extra["depth_axis"] == "time" and np.isnan(volume.spacing[0])
    np.testing.assert_array_equal(volume.pixels[7], frames[7].pixels)


def test_enhanced_multiframe_uses_per_frame_geometry_and_rescale(tmp_path):
    base = pydicom.dcmread(shipped("CT_small.dcm"))
    stored = base.pixel_array.astype(np.int16)
    ds = copy.deepcopy(base)
    z = [10.0, 0.0, 5.0]  # frames stored out of spatial order
    intercepts = [-1024.0, -1000.0, -900.0]
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([stored + 100 * f for f in range(3)]).astype("<i2").tobytes()
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleIntercept",
                    "RescaleSlope", "SliceThickness"):
        delattr(ds, keyword)
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 5.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for f in range(3):
        position, transform, group = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, z[f]]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = 1, intercepts[f], "HU"
        group.PlanePositionSequence = Sequence([position])
        group.PixelValueTransformationSequence = Sequence([transform])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)

    frames = read(tmp_path)
    assert [r.index for r in frames] == [0, 1, 2]
    for f, record in enumerate(frames):
        np.testing.assert_array_equal(record.pixels, stored + 100 * f + intercepts[f])
        assert record.spacing == (0.5, 0.5)
    (volume,) = read(tmp_path, assemble="series")
    order = np.argsort(z)
    np.testing.assert_array_equal(volume.pixels, np.stack([frames[i].pixels for i in order]))
    assert volume.spacing == (5.0, 0.5, 0.5) and volume.extra["slice_positions_mm"] == [0.0, 5.0, 10.0]


# ----------------------------------------------------------------------------------------- series
@pytest.mark.parametrize("tilt", [20.0, 90.0], ids=["tilted-axial", "coronal"])
def test_series_sorted_along_the_slice_normal_with_spacing(tmp_path, tilt):
    # Coronal: every slice has the same z, so sorting by ImagePositionPatient z alone would fail.
    offsets = [7.5, 0.0, 12.5, 2.5, 10.0, 5.0]  # true order: 1, 3, 5, 0, 4, 2
    stored, _ = write_ct_series(tmp_path / "s", offsets, tilt_degrees=tilt)
    ct = pydicom.dcmread(shipped("CT_small.dcm"))
    hu = stored.astype(np.float64) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    order = np.argsort(offsets)

    (volume,) = read(tmp_path, assemble="series")
    assert volume.pixels.shape == (6, 128, 128)
    for rank, k in enumerate(order):
        np.testing.assert_array_equal(volume.pixels[rank], hu + 7 * k)
    assert volume.spacing == pytest.approx((2.5, *[float(v) for v in ct.PixelSpacing]), abs=1e-3)
    assert volume.extra["slice_order"] == "position" and len(volume.extra["files"]) == 6

    slices = read(tmp_path)  # images mode: index = rank along the normal
    by_index = {r.index: r for r in slices}
    assert sorted(by_index) == list(range(6))
    for rank, k in enumerate(order):
        np.testing.assert_array_equal(by_index[rank].pixels, hu + 7 * k)
    again = read(tmp_path)
    assert [(r.path, r.index) for r in again] == [(r.path, r.index) for r in slices]  # deterministic order


def test_series_without_positions_falls_back_to_instance_number(tmp_path):
    stored, _ = write_ct_series(tmp_path, [0.0, 5.0, 10.0], with_positions=False)
    (volume,) = read(tmp_path, assemble="series")
    assert volume.extra["slice_order"] == "instance_number"
    # InstanceNumbers run backwards (slice k has number 3 - k), so the volume holds k = 2, 1, 0.
    offsets = [int(np.round(np.mean(volume.pixels[i] - volume.pixels[2]))) for i in range(3)]
    assert offsets == [14, 7, 0]
    assert volume.spacing[0] == pytest.approx(5.0)  # CT_small's SpacingBetweenSlices


def test_inconsistent_spacing_names_series_and_gaps(tmp_path):
    write_ct_series(tmp_path / "gap", [0.0, 2.5, 5.0, 12.5, 15.0])
    with pytest.raises(DataError) as raised:
        read(tmp_path, assemble="series")
    message = str(raised.value)
    assert SERIES_UID in message and str(tmp_path / "gap") in message
    assert "inconsistent slice spacing" in message and "7.5 mm" in message and "2.5 mm" in message
    log = BadFileLog("skip")
    write_ct_series(tmp_path / "ok", [0.0, 2.5, 5.0], shuffle_seed=1)
    for path in (tmp_path / "ok").iterdir():  # give the good series its own UID
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = SERIES_UID + ".2"
        ds.save_as(path, enforce_file_format=True)
    records = read(tmp_path, log, assemble="series")
    assert len(records) == 1 and records[0].pixels.shape[0] == 3
    assert len(log.skipped) == 1 and "inconsistent slice spacing" in log.skipped[0][1]
    relaxed = read(tmp_path / "gap", assemble="series", slice_spacing_tolerance=None)
    assert relaxed[0].pixels.shape[0] == 5


def test_mixed_modalities_in_one_series(tmp_path):
    write_ct_series(tmp_path, [0.0, 2.5, 5.0], modalities=["CT", "MR", "CT"])
    for assemble in ("series", "images"):
        with pytest.raises(DataError, match=r"mixed modalities in one series \(CT: .*; MR: IM\d{4}\)"):
            read(tmp_path, assemble=assemble)


def test_expected_modality_mismatch_is_an_error(tmp_path):
    shutil.copy(shipped("CT_small.dcm"), tmp_path / "ct.dcm")
    with pytest.raises(DataError, match=r"ct\.dcm: Modality is 'CT' but the source config expects 'MR'"):
        read(tmp_path, modality="MR")
    assert read(tmp_path, modality="ct")[0].modality == "CT"


# ----------------------------------------------------------------------------------------- bad files
def test_truncated_missing_pixels_and_corrupt_files_are_named_and_skippable(tmp_path):
    data = shipped("CT_small.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "no_pixels.dcm", enforce_file_format=True)
    (tmp_path / "random.dcm").write_bytes(bytes(range(256)) * 2)
    shutil.copy(shipped("MR_small.dcm"), tmp_path / "good.dcm")

    with pytest.raises(DataError) as raised:
        read(tmp_path)
    assert Path(raised.value.source).name in {"truncated.dcm", "no_pixels.dcm", "random.dcm"}
    log = BadFileLog("skip")
    records = read(tmp_path, log)
    assert [Path(r.path).name for r in records] == ["good.dcm"]
    problems = {Path(path).name: message for path, message in log.skipped}
    assert set(problems) == {"truncated.dcm", "no_pixels.dcm", "random.dcm"}
    assert "pixel data" in problems["truncated.dcm"] and "less than expected" in problems["truncated.dcm"]
    assert "no PixelData" in problems["no_pixels.dcm"]
    assert "DICM" in problems["random.dcm"]


def test_labels_from_csv_keyed_by_patient_or_path(tmp_path):
    shutil.copy(shipped("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(shipped("MR_small.dcm"), tmp_path / "mr.dcm")
    ct_patient = str(pydicom.dcmread(shipped("CT_small.dcm")).PatientID)
    (tmp_path / "labels.csv").write_text(f"PatientID,finding\n{ct_patient},nodule\n")
    records = read(tmp_path, label_csv=tmp_path / "labels.csv", key_column="PatientID", label_column="finding",
                   classes=["normal", "nodule"])
    labels = {Path(r.path).name: r.label for r in records}
    assert labels == {"ct.dcm": 1, "mr.dcm": None}
    assert records[0].extra["class_names"] == ("normal", "nodule")
    (tmp_path / "by_path.csv").write_text("path,label\nmr.dcm,normal\nct.dcm,cat\n")
    with pytest.raises(DataError, match=r"label 'cat'.*not one of the declared classes"):
        read(tmp_path, label_csv=tmp_path / "by_path.csv", label_key="path", classes=["normal", "nodule"])


# ----------------------------------------------------------------------------------------- label CSV in root
def _dicom_patients(root: Path, n_patients: int = 16) -> list[str]:
    """Two DX images per patient (support.write_dicom_folder); returns the patient ids, label = index % 2."""
    from support import write_dicom_folder

    images = np.random.default_rng(0).integers(0, 256, (2 * n_patients, 8, 8)).astype(np.uint8)
    labels = np.repeat(np.arange(n_patients) % 2, 2)
    write_dicom_folder(root, images, labels)
    return [f"P{p:04d}" for p in range(n_patients)]


def test_relative_label_csv_and_split_column_are_read_from_root(tmp_path, monkeypatch):
    from radssl.data.medical import MedicalDataConfig, load_medical_store

    root = tmp_path / "dicom"
    patients = _dicom_patients(root)
    lines = ["patient_id,label,split"] + [
        f"{p},{['normal', 'pneumonia'][i % 2]},{'test' if i % 4 == 0 else 'train'}" for i, p in enumerate(patients)
    ]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)  # labels.csv is not in the working directory: it is read inside root
    source = {"kind": "dicom", "root": str(root), "label_csv": "labels.csv", "split_column": "split"}
    assert DicomSourceConfig.model_validate(source).label_csv == root / "labels.csv"
    config = MedicalDataConfig.model_validate(
        {"source": source, "cache_dir": str(tmp_path / "cache"), "preprocess": {"target_size": [8, 8]}}
    )
    store = load_medical_store(config, "dx")
    assert store.task.class_names == ("normal", "pneumonia")
    test_patients = {p for i, p in enumerate(patients) if i % 4 == 0}
    assert set(store.patient_id[store.split == "test"].tolist()) == test_patients  # the CSV's split is honoured
    val = set(store.patient_id[store.split == "val"].tolist())
    assert val and not val & test_patients and not val & set(store.patient_id[store.split == "train"].tolist())
    assert any("validation was carved from train" in note for note in store.notes)

    plain = MedicalDataConfig.model_validate(
        {"source": dict(source, split_column=None), "cache_dir": str(tmp_path / "cache"),
         "preprocess": {"target_size": [8, 8]}}
    )
    resplit = load_medical_store(plain, "dx")
    assert any("has a 'split' column that is not used" in note for note in resplit.notes)


def test_missing_relative_label_csv_names_where_it_was_looked_for(tmp_path):
    root = tmp_path / "dicom"
    _dicom_patients(root, n_patients=2)
    config = DicomSourceConfig.model_validate({"kind": "dicom", "root": str(root), "label_csv": "labels.csv"})
    with pytest.raises(DataError, match=r"dicom/labels\.csv: label CSV not found .*read inside `root`"):
        read_dicom_source(config, BadFileLog())
