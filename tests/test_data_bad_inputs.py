"""Every case of the bad-input corpus (``tests/data/bad``, see its README) fails with an error naming the file
and the problem; ``on_bad_file: skip`` loads the good files and lists the bad ones; failing loads leave no cache.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from radssl.data.cache import load_or_build_cache
from radssl.data.folder import FolderSourceConfig, list_folder_files, read_folder_source
from radssl.data.nifti import NiftiSourceConfig, list_nifti_files, read_nifti_source
from radssl.data.records import BadFileLog, Record
from radssl.errors import DataError

BAD = Path(__file__).parent / "data" / "bad"


def _folder_config(case: str, **kwargs) -> FolderSourceConfig:
    root = BAD / case
    return FolderSourceConfig(root=root, csv=root / "labels.csv", label_columns=["label"], patient_column="patient", **kwargs)


def _to_chw(record: Record) -> np.ndarray:
    return np.asarray(record.pixels, dtype=np.uint8)[None]


# ----------------------------------------------------------------------------------------- image folders
def test_csv_naming_missing_file():
    with pytest.raises(DataError) as raised:
        read_folder_source(_folder_config("folder_missing_file"), BadFileLog())
    message = str(raised.value)
    assert "missing.png" in message and "file not found" in message and "labels.csv line 3" in message


def test_csv_duplicate_paths():
    with pytest.raises(DataError) as raised:
        read_folder_source(_folder_config("folder_duplicate_paths"), BadFileLog())
    message = str(raised.value)
    assert "labels.csv: line 4" in message and "duplicate path 'a.png'" in message and "line 2" in message


def test_label_outside_declared_set():
    with pytest.raises(DataError) as raised:
        read_folder_source(_folder_config("folder_label_outside", classes=["normal", "pneumonia"]), BadFileLog())
    message = str(raised.value)
    assert "labels.csv: line 3" in message and "b.png" in message
    assert "'cat'" in message and "['normal', 'pneumonia']" in message


def test_csv_path_outside_the_data_root():
    for policy in ("error", "skip"):
        with pytest.raises(DataError) as raised:
            read_folder_source(_folder_config("folder_outside_root"), BadFileLog(policy))
        message = str(raised.value)
        assert "labels.csv: line 3" in message and "'../folder_label_outside/a.png'" in message
        assert "outside the data root" in message


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images .*found"):
        read_folder_source(FolderSourceConfig(root=tmp_path / "empty"), BadFileLog())


def test_skip_loads_good_rows_and_reports_bad_ones(tmp_path):
    config = _folder_config("folder_missing_file")
    store = load_or_build_cache(
        tmp_path / "cache", "bad", list_folder_files(config), config, "p", lambda log: read_folder_source(config, log),
        _to_chw, on_bad_file="skip",
    )
    assert [Path(p).name for p in store.meta["path"]] == ["a.png", "b.png"]
    assert store.labels.tolist() == [0, 1]  # classes derived from all rows: normal, pneumonia
    report = json.loads((Path(store.origin) / "bad_files.json").read_text())
    assert report["skipped"] == 1
    assert report["files"][0]["path"].endswith("missing.png") and "line 3" in report["files"][0]["error"]


@pytest.mark.parametrize(
    "case, classes",
    [("folder_missing_file", None), ("folder_duplicate_paths", None), ("folder_label_outside", ["normal", "pneumonia"])],
)
def test_failing_load_leaves_no_cache(tmp_path, case, classes):
    config = _folder_config(case, classes=classes)
    with pytest.raises(DataError):
        load_or_build_cache(
            tmp_path / "cache", "bad", list_folder_files(config), config, "p",
            lambda log: read_folder_source(config, log), _to_chw,
        )
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------------------- NIfTI
def test_nifti_with_nan_voxels():
    config = NiftiSourceConfig(root=BAD / "nifti_nan")
    with pytest.raises(DataError) as raised:
        read_nifti_source(config, BadFileLog())
    message = str(raised.value)
    assert "case_nan.nii.gz" in message and "4 of 256 voxels are NaN or inf" in message


def test_nifti_skip_keeps_the_good_volume(tmp_path):
    for case in ("nifti_nan", "nifti_good"):
        shutil.copytree(BAD / case, tmp_path / "data" / case)
    config = NiftiSourceConfig(root=tmp_path / "data")
    store = load_or_build_cache(
        tmp_path / "cache", "nan", list_nifti_files(config), config, "p", lambda log: read_nifti_source(config, log),
        lambda r: (r.pixels[None] / 200).astype(np.float16), on_bad_file="skip",
    )
    assert len(store) == 1 and store.meta["path"][0].endswith("case_good.nii.gz")
    assert store.images.shape == (1, 1, 4, 8, 8)  # (N, C, D, H, W)
    report = json.loads((Path(store.origin) / "bad_files.json").read_text())
    assert [Path(f["path"]).name for f in report["files"]] == ["case_nan.nii.gz"]
    with pytest.raises(DataError, match="NaN"):
        load_or_build_cache(
            tmp_path / "cache2", "nan", list_nifti_files(config), config, "p",
            lambda log: read_nifti_source(config, log), lambda r: r.pixels[None].astype(np.float16),
        )
    assert not (tmp_path / "cache2").exists()


# ----------------------------------------------------------------------------------------- DICOM
DICOM_CASES = [
    # (folder, file named in the error, pattern the problem must match)
    ("dicom_corrupt", "corrupt.dcm", r"not a (readable )?dicom|dicm|invalid dicom|corrupt"),
    ("dicom_truncated", "truncated.dcm", r"truncat|incomplete|less than expected|end of file"),
    ("dicom_no_pixels", "no_pixel_data.dcm", r"pixel ?data"),
    ("dicom_unsupported_syntax", "jpeg2000_declared.dcm", r"transfer syntax|jpeg ?2000|1\.2\.840\.10008\.1\.2\.4\.90|decod"),
    ("dicom_inconsistent_spacing", "slice_", r"spacing|gap|position"),
    ("dicom_mixed_modality", "slice_", r"modalit"),
]


@pytest.fixture
def dicom():
    """The DICOM reader module (a fixture so the tests below read ``dicom.read_dicom_source``)."""
    from radssl.data import dicom as module

    return module


def _dicom_config(dicom, root: Path):
    return dicom.DicomSourceConfig.model_validate({"kind": "dicom", "root": str(root)})


@pytest.mark.parametrize("folder, named, problem", DICOM_CASES, ids=[c[0] for c in DICOM_CASES])
def test_dicom_case_error_names_file_and_problem(dicom, folder, named, problem):
    with pytest.raises(DataError) as raised:
        dicom.read_dicom_source(_dicom_config(dicom, BAD / folder), BadFileLog())
    message = str(raised.value)
    assert named in message or folder in message, message
    assert re.search(problem, message, flags=re.IGNORECASE), message


def test_dicom_skip_loads_the_good_series(dicom, tmp_path):
    root = tmp_path / "dicom"
    shutil.copytree(BAD / "dicom_good", root / "good")
    bad_files = ["dicom_corrupt/corrupt.dcm", "dicom_truncated/truncated.dcm", "dicom_no_pixels/no_pixel_data.dcm"]
    for name in bad_files:
        (root / "bad").mkdir(exist_ok=True)
        shutil.copy(BAD / name, root / "bad" / Path(name).name)
    log = BadFileLog("skip")
    records = dicom.read_dicom_source(_dicom_config(dicom, root), log)
    assert records and all("good" in Path(r.path).parts for r in records)
    skipped = sorted(Path(path).name for path, _ in log.skipped)
    assert skipped == sorted(Path(n).name for n in bad_files)


def test_medical_skip_writes_bad_files_report(tmp_path):
    from radssl.data import medical

    root = BAD / "folder_missing_file"
    source = {"kind": "folder", "root": str(root), "csv": str(root / "labels.csv"), "label_columns": ["label"]}
    base = {"source": source, "cache_dir": str(tmp_path / "cache"), "preprocess": {"target_size": [8, 8]}}
    with pytest.raises(DataError, match="missing.png"):
        medical.load_medical_store(medical.MedicalDataConfig.model_validate(base), "bad")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    store = medical.load_medical_store(medical.MedicalDataConfig.model_validate(dict(base, on_bad_file="skip")), "bad")
    assert len(store) == 2
    report = json.loads(medical.bad_files_report(store).read_text())
    assert report["skipped"] == 1 and report["files"][0]["path"].endswith("missing.png")


def test_medical_dicom_skip_lists_bad_files(dicom, tmp_path):
    from radssl.data import medical

    root = tmp_path / "dicom"
    shutil.copytree(BAD / "dicom_good", root / "good")
    for name in ("dicom_truncated/truncated.dcm", "dicom_no_pixels/no_pixel_data.dcm"):
        shutil.copy(BAD / name, root / Path(name).name)
    base = {
        "source": {"kind": "dicom", "root": str(root), "assemble": "series"},
        "cache_dir": str(tmp_path / "cache"),
        "preprocess": {"modality": "ct", "target_size": [3, 8, 8]},
    }
    with pytest.raises(DataError, match=r"truncated\.dcm|no_pixel_data\.dcm"):
        medical.load_medical_store(medical.MedicalDataConfig.model_validate(base), "ct")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    store = medical.load_medical_store(medical.MedicalDataConfig.model_validate(dict(base, on_bad_file="skip")), "ct")
    assert store.images.shape == (1, 1, 3, 8, 8)
    assert store.meta["modality"].tolist() == ["CT"]
    report = json.loads(medical.bad_files_report(store).read_text())
    assert sorted(Path(f["path"]).name for f in report["files"]) == ["no_pixel_data.dcm", "truncated.dcm"]
