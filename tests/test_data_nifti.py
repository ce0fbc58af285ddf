"""NIfTI reader: RAS reorientation and (D, H, W) layout, spacing, 4D handling, masks, sequences, labels."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radssl.data.nifti import NiftiSourceConfig, read_nifti_source
from radssl.data.records import BadFileLog
from radssl.errors import DataError

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _brats_dir() -> Path:
    root = os.environ.get("RADSSL_DATA_DIR")
    folder = Path(root) / "nifti" / "brats20_case001" if root else None
    if folder is None or not (folder / "BraTS20_Training_001_flair.nii.gz").is_file():
        pytest.skip("BraTS case needs RADSSL_DATA_DIR with nifti/brats20_case001")
    return folder


def _assert_world_consistent(
    pixels: np.ndarray, dhw_affine: np.ndarray, original: Path, samples: int = 50, frame: int | None = None
) -> None:
    """Each (d, h, w) voxel, mapped to world mm by the record's affine, lands on the same value in the file."""
    image = nib.load(str(original))
    data = np.asanyarray(image.dataobj)
    if frame is not None:
        data = data[..., frame]
    inverse = np.linalg.inv(image.affine)
    rng = np.random.default_rng(0)
    for _ in range(samples):
        dhw = [int(rng.integers(0, s)) for s in pixels.shape]
        world = dhw_affine @ np.array([*dhw, 1.0])
        ijk = np.rint(inverse @ world)[:3].astype(int)
        assert data[tuple(ijk)] == pixels[tuple(dhw)]


def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path


def test_brats_case_sequences_mask_orientation_spacing():
    folder = _brats_dir()
    config = NiftiSourceConfig(
        root=folder.parent,
        pattern=f"{folder.name}/*.nii*",
        sequences=["_flair", "_t1", "_t1ce", "_t2"],
        mask_suffix="seg",
        modality="MR",
    )
    (record,) = read_nifti_source(config, BadFileLog())
    assert record.pixels.shape == (4, 155, 240, 240)  # (C, D, H, W) from 240×240×155 files
    assert record.spacing == (1.0, 1.0, 1.0)
    assert record.patient_id == "brats20_case001"  # patient_from: folder
    assert record.extra["case_id"] == "BraTS20_Training_001"
    assert record.extra["channel_names"] == ["_flair", "_t1", "_t1ce", "_t2"]
    affine = np.asarray(record.extra["affine"])
    # columns of the (d, h, w) affine point superior, posterior, left in RAS
    assert affine[2, 0] > 0 and affine[1, 1] < 0 and affine[0, 2] < 0
    for channel, ending in enumerate(record.extra["channel_names"]):  # _t1 and _t1ce not confused
        _assert_world_consistent(record.pixels[channel], affine, folder / f"BraTS20_Training_001{ending}.nii.gz", 20)
    mask = record.extra["mask"]
    assert mask.shape == (155, 240, 240)
    assert set(np.unique(mask).tolist()) == {0, 1, 2, 4}
    _assert_world_consistent(mask, affine, folder / "BraTS20_Training_001_seg.nii.gz", 20)
    # the tumour is inside the brain: FLAIR is non-zero wherever the mask is
    assert (record.pixels[0][mask > 0] > 0).mean() > 0.99


def test_nibabel_4d_as_frames_and_channels():
    frames = read_nifti_source(NiftiSourceConfig(root=NIBABEL_DATA, pattern="example4d.nii.gz"), BadFileLog())
    assert [r.index for r in frames] == [0, 1]
    assert all(r.pixels.shape == (24, 96, 128) for r in frames)
    assert frames[0].spacing == pytest.approx((2.2, 2.0, 2.0), abs=1e-5)
    raw = np.asanyarray(nib.load(str(NIBABEL_DATA / "example4d.nii.gz")).dataobj)
    _assert_world_consistent(frames[1].pixels, np.asarray(frames[1].extra["affine"]), NIBABEL_DATA / "example4d.nii.gz", frame=1)
    assert not np.array_equal(frames[0].pixels, frames[1].pixels)
    assert frames[1].pixels.sum() == raw[..., 1].sum()

    (stacked,) = read_nifti_source(
        NiftiSourceConfig(root=NIBABEL_DATA, pattern="example4d.nii.gz", fourth_axis="channels"), BadFileLog()
    )
    assert stacked.pixels.shape == (2, 24, 96, 128)
    np.testing.assert_array_equal(stacked.pixels[1], frames[1].pixels)


def test_nibabel_anatomical_las_file_is_reoriented():
    image = nib.load(str(NIBABEL_DATA / "anatomical.nii"))
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")  # stored left-to-right flipped
    (record,) = read_nifti_source(NiftiSourceConfig(root=NIBABEL_DATA, pattern="anatomical.nii"), BadFileLog())
    assert record.pixels.shape == (25, 41, 33)
    assert record.extra["layout"] == "DHW"
    _assert_world_consistent(record.pixels, np.asarray(record.extra["affine"]), NIBABEL_DATA / "anatomical.nii", 200)


def test_same_anatomy_in_ras_and_lps_files_reads_identically(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(6, 5, 4)).astype(np.int16)
    ras = np.diag([0.8, 0.9, 2.5, 1.0])
    # LPS storage of the same voxels: x and y flipped, affine adjusted so world positions are unchanged
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    _write(tmp_path / "a" / "ras.nii.gz", data, ras)
    _write(tmp_path / "b" / "lps.nii.gz", data[::-1, ::-1].copy(), ras @ flip)
    first = read_nifti_source(NiftiSourceConfig(root=tmp_path / "a"), BadFileLog())[0]
    second = read_nifti_source(NiftiSourceConfig(root=tmp_path / "b"), BadFileLog())[0]
    np.testing.assert_array_equal(first.pixels, second.pixels)
    assert first.spacing == second.spacing == pytest.approx((2.5, 0.9, 0.8))
    # layout: pixels[d, h, w] = ras[X-1-w, Y-1-h, d]
    assert first.pixels[1, 0, 0] == data[5, 4, 1]
    assert first.pixels[3, 4, 5] == data[0, 0, 3]


def test_spacing_in_metres_is_converted_to_mm(tmp_path):
    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([0.001, 0.001, 0.002, 1.0]))
    image.header.set_xyzt_units("meter")
    nib.save(image, str(tmp_path / "m.nii"))
    (record,) = read_nifti_source(NiftiSourceConfig(root=tmp_path), BadFileLog())
    assert record.spacing == pytest.approx((2.0, 1.0, 1.0))


def _two_cases(root: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for i, patient in enumerate(["p1", "p2"]):
        data = np.full((4, 4, 3), 10 * (i + 1), np.int16)
        _write(root / patient / f"case{i}.nii.gz", data, affine)
        mask = np.zeros((4, 4, 3), np.uint8)
        mask[0, 0, i] = 1
        _write(root / patient / f"case{i}_seg.nii.gz", mask, affine)


def test_masks_pair_by_name_and_slices_layout(tmp_path):
    _two_cases(tmp_path)
    volumes = read_nifti_source(NiftiSourceConfig(root=tmp_path, mask_suffix="seg"), BadFileLog())
    assert [r.extra["case_id"] for r in volumes] == ["case0", "case1"]  # masks are not read as images
    assert [r.patient_id for r in volumes] == ["p1", "p2"]
    for i, record in enumerate(volumes):
        assert record.extra["mask"].shape == record.pixels.shape == (3, 4, 4)
        assert record.extra["mask"][i, 3, 3] == 1 and record.extra["mask"].sum() == 1

    slices = read_nifti_source(
        NiftiSourceConfig(root=tmp_path, mask_suffix="_seg", layout="axial_slices", patient_from="file"), BadFileLog()
    )
    assert len(slices) == 6
    assert [r.index for r in slices[:3]] == [0, 1, 2]
    assert slices[0].patient_id == "case0" and slices[0].pixels.shape == (4, 4)
    assert slices[0].spacing == (1.0, 1.0) and slices[0].extra["slice_thickness"] == 2.0
    assert [int(r.extra["mask"].sum()) for r in slices[3:]] == [0, 1, 0]


def test_missing_mask_is_a_bad_file(tmp_path):
    _two_cases(tmp_path)
    (tmp_path / "p2" / "case1_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case1\.nii\.gz.*no mask 'case1_seg"):
        read_nifti_source(NiftiSourceConfig(root=tmp_path, mask_suffix="seg"), BadFileLog())
    log = BadFileLog("skip")
    records = read_nifti_source(NiftiSourceConfig(root=tmp_path, mask_suffix="seg"), log)
    assert [r.extra["case_id"] for r in records] == ["case0"]
    assert [Path(p).name for p, _ in log.skipped] == ["case1.nii.gz"]


def test_missing_sequence_and_mismatched_grid(tmp_path):
    affine = np.eye(4)
    _write(tmp_path / "c1" / "c1_t1.nii.gz", np.zeros((4, 4, 4), np.int16), affine)
    _write(tmp_path / "c1" / "c1_t2.nii.gz", np.zeros((4, 4, 5), np.int16), affine)
    _write(tmp_path / "c2" / "c2_t1.nii.gz", np.zeros((4, 4, 4), np.int16), affine)
    config = NiftiSourceConfig(root=tmp_path, sequences=["_t1", "_t2"])
    log = BadFileLog("skip")
    with pytest.raises(DataError, match="no NIfTI case could be read"):
        read_nifti_source(config, log)
    messages = " | ".join(message for _, message in log.skipped)
    assert "c1_t2.nii.gz" in messages and "grid" in messages
    assert "missing sequences ['_t2']" in messages


def test_label_csv_maps_cases_to_classes(tmp_path):
    _two_cases(tmp_path)
    (tmp_path / "labels.csv").write_text("case_id,diagnosis\ncase0,benign\ncase1,malignant\n")
    config = NiftiSourceConfig(
        root=tmp_path,
        mask_suffix="seg",
        label_csv=tmp_path / "labels.csv",
        label_column="diagnosis",
        classes=["malignant", "benign"],
    )
    records = read_nifti_source(config, BadFileLog())
    assert [r.label for r in records] == [1, 0]
    assert records[0].extra["class_names"] == ("malignant", "benign")

    (tmp_path / "labels.csv").write_text("case_id,diagnosis\ncase0,benign\ncase1,unknown\n")
    with pytest.raises(DataError, match=r"labels\.csv: line 3.*'unknown'.*declared classes"):
        read_nifti_source(config, BadFileLog())


def test_config_rejects_unknown_keys_and_repeated_sequences():
    with pytest.raises(ValueError):
        NiftiSourceConfig(root=Path("."), sequence=["_t1"])  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        NiftiSourceConfig(root=Path("."), sequences=["_t1", "_t1"])


def test_relative_label_csv_is_read_inside_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _two_cases(root)
    (root / "labels.csv").write_text("case_id,label\ncase0,a\ncase1,b\n")
    monkeypatch.chdir(tmp_path)
    config = NiftiSourceConfig(root=root, mask_suffix="seg", label_csv=Path("labels.csv"))
    assert config.label_csv == root / "labels.csv"
    assert [r.label for r in read_nifti_source(config, BadFileLog())] == [0, 1]
