"""Pairing metadata reaches PairingColumns from every source: DICOM (series as images, cine loops, enhanced
multi-frame), NIfTI (axial slices, 4D frames, data.slices), folder CSV columns, and any 3D store as 2D slices."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from radssl.config import ConfigError, FilesData, MedMNISTData, load_config
from radssl.data.build import build_store
from radssl.data.medical import MedicalDataConfig, load_medical_store
from radssl.data.slices import volumes_to_slices
from radssl.data.store import ImageStore, TaskInfo
from radssl.errors import DataError
from radssl.views.columns import PairingColumns
from radssl.views.pairing import PairingParams, build_pairing

from test_data_dicom import SERIES_UID, shipped, write_ct_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _columns(store: ImageStore) -> PairingColumns:
    return PairingColumns.from_store(store, np.arange(len(store)))


def _medical(tmp_path: Path, source: dict, **kwargs) -> ImageStore:
    config = MedicalDataConfig.model_validate(
        {"source": source, "cache_dir": str(tmp_path / "cache"), "preprocess": {"target_size": [16, 16]}, **kwargs})
    return load_medical_store(config, "pairs")


def _partners(store: ImageStore, seed: int = 0, draws: int = 50, **params) -> tuple[np.ndarray, np.ndarray]:
    pairing = build_pairing(PairingParams(**params), _columns(store))
    rows = torch.arange(len(store)).repeat(draws)
    return rows.numpy(), pairing.partners(rows, torch.Generator().manual_seed(seed)).numpy()


# ----------------------------------------------------------------------------------------- DICOM
def test_dicom_series_read_as_images_carries_slice_rank_and_series(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "ct", [0.0, 5.0, 10.0, 15.0, 20.0], tilt_degrees=20.0)
    store = _medical(tmp_path, {"kind": "dicom", "root": str(tmp_path / "ct")})
    columns = _columns(store)
    # slice k was written at offset 5k mm along the normal, with SOPInstanceUID ending in k + 1
    truth = [int(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID.rsplit(".", 1)[1]) - 1
             for path in store.meta["path"]]
    assert columns.slice_index.tolist() == truth
    assert set(store.meta["series_id"].tolist()) == {SERIES_UID} and len(set(columns.series.tolist())) == 1
    assert columns.frame_index.tolist() == [-1] * 5
    rows, partners = _partners(store, kind="slice", max_offset=1)
    delta = np.abs(columns.slice_index.numpy()[partners] - columns.slice_index.numpy()[rows])
    assert set(delta.tolist()) == {1}
    with pytest.raises(ConfigError, match="'frame_index'"):
        build_pairing(PairingParams(kind="frame"), columns)


def _cine_copy(source: Path, target: Path, uid: str) -> None:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(target, enforce_file_format=True)


def test_dicom_ultrasound_cine_loops_carry_frame_index_and_their_own_loop(tmp_path: Path) -> None:
    path = shipped("examples_ybr_color.dcm")  # real ultrasound cine: 30 frames
    (tmp_path / "us").mkdir()
    _cine_copy(path, tmp_path / "us" / "loop_a", "1.2.3.4.1")
    _cine_copy(path, tmp_path / "us" / "loop_b", "1.2.3.4.2")  # same series, another loop
    store = _medical(tmp_path, {"kind": "dicom", "root": str(tmp_path / "us")})
    columns = _columns(store)
    assert len(store) == 60 and len(set(columns.series.tolist())) == 1
    assert sorted(columns.frame_index.tolist()) == sorted(list(range(30)) * 2)
    assert columns.slice_index.tolist() == [-1] * 60
    assert columns.loop is not None and len(set(columns.loop.tolist())) == 2
    rows, partners = _partners(store, kind="frame", max_offset=2)
    loop, frame = columns.loop.numpy(), columns.frame_index.numpy()
    assert np.all(loop[partners] == loop[rows]), "frames pair within their own loop, never across files"
    assert set(np.abs(frame[partners] - frame[rows]).tolist()) == {1, 2}
    with pytest.raises(ConfigError, match="'slice_index'"):
        build_pairing(PairingParams(kind="slice"), columns)


def test_dicom_enhanced_multiframe_frames_at_positions_are_slices(tmp_path: Path) -> None:
    base = pydicom.dcmread(shipped("CT_small.dcm"))
    stored = base.pixel_array.astype(np.int16)
    ds = copy.deepcopy(base)
    z = [10.0, 0.0, 5.0]  # frames stored out of spatial order
    ds.NumberOfFrames = 3
    ds.PixelData = np.stack([stored + 100 * f for f in range(3)]).astype("<i2").tobytes()
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, keyword)
    measures, orientation, shared = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 5.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    groups = []
    for f in range(3):
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, z[f]]
        group.PlanePositionSequence = Sequence([position])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    (tmp_path / "enh").mkdir()
    ds.save_as(tmp_path / "enh" / "enhanced.dcm", enforce_file_format=True)
    store = _medical(tmp_path, {"kind": "dicom", "root": str(tmp_path / "enh")})
    columns = _columns(store)
    assert store.meta["index"].tolist() == [0, 1, 2]  # frame numbers, as before
    assert columns.slice_index.tolist() == [2, 0, 1]  # rank of z = 10, 0, 5 along the normal
    assert columns.frame_index.tolist() == [-1, -1, -1]


# ----------------------------------------------------------------------------------------- NIfTI
def _write_nifti(root: Path, shape: tuple[int, ...], cases: dict[str, str], seed: int = 0) -> None:
    import nibabel as nib

    rng = np.random.default_rng(seed)
    for case, patient in cases.items():
        folder = root / patient
        folder.mkdir(parents=True, exist_ok=True)
        data = rng.integers(10, 200, size=shape).astype(np.int16)
        image = nib.Nifti1Image(data, np.eye(4))
        image.header.set_xyzt_units("mm")
        nib.save(image, str(folder / f"{case}.nii.gz"))
    (root / "labels.csv").write_text("case_id,label\n" + "".join(f"{c},{i % 2}\n" for i, c in enumerate(cases)))


CASES = {"case_a": "p1", "case_b": "p1", "case_c": "p2", "case_d": "p3"}


def test_nifti_axial_slices_carry_slice_index_series_and_patient(tmp_path: Path) -> None:
    _write_nifti(tmp_path / "nii", (8, 8, 5), CASES)
    source = {"kind": "nifti", "root": str(tmp_path / "nii"), "layout": "axial_slices", "modality": "MR",
              "label_csv": "labels.csv"}
    store = _medical(tmp_path, source, preprocess={"target_size": [8, 8]})
    columns = _columns(store)
    assert len(store) == 4 * 5
    for case in CASES:
        rows = np.flatnonzero(store.meta["series_id"] == case)
        assert sorted(columns.slice_index[rows].tolist()) == [0, 1, 2, 3, 4]
        assert len(set(columns.series[rows].tolist())) == 1
        assert set(store.patient_id[rows].tolist()) == {CASES[case]}
    rows, partners = _partners(store, kind="patient", other_series=True)
    assert np.all(store.patient_id[partners] == store.patient_id[rows])
    moved = partners != rows
    assert np.all(store.meta["series_id"][partners[moved]] != store.meta["series_id"][rows[moved]])
    assert set(store.patient_id[rows[moved]].tolist()) == {"p1"}  # only p1 has two cases


def test_nifti_4d_frames_as_slices_pair_frames_at_one_slice_position(tmp_path: Path) -> None:
    _write_nifti(tmp_path / "nii", (8, 8, 3, 4), {"cine_a": "p1", "cine_b": "p2"})
    source = {"kind": "nifti", "root": str(tmp_path / "nii"), "layout": "axial_slices", "modality": "MR"}
    store = _medical(tmp_path, source, preprocess={"target_size": [8, 8]})
    columns = _columns(store)
    assert len(store) == 2 * 4 * 3
    assert sorted(set(columns.frame_index.tolist())) == [0, 1, 2, 3]
    assert sorted(set(columns.slice_index.tolist())) == [0, 1, 2]
    assert set(store.meta["loop_id"].tolist()) == {"cine_a", "cine_b"}
    rows, partners = _partners(store, kind="frame", max_offset=1)
    loop, position, frame = columns.loop.numpy(), columns.slice_index.numpy(), columns.frame_index.numpy()
    assert np.all(loop[partners] == loop[rows]) and np.all(position[partners] == position[rows])
    assert set(np.abs(frame[partners] - frame[rows]).tolist()) == {1}
    # slices pair within one time point: each (case, frame) is its own series
    rows, partners = _partners(store, kind="slice", max_offset=1)
    assert np.all(frame[partners] == frame[rows]) and np.all(loop[partners] == loop[rows])


def test_data_slices_turns_nifti_volumes_into_slice_stacks(tmp_path: Path) -> None:
    _write_nifti(tmp_path / "nii", (8, 8, 5), CASES)
    section = FilesData.model_validate({
        "name": "vols", "cache_dir": str(tmp_path / "cache"), "preprocess": {"target_size": [5, 8, 8]},
        "source": {"kind": "nifti", "root": str(tmp_path / "nii"), "modality": "MR", "label_csv": "labels.csv"},
        "split_fractions": [0.5, 0.25, 0.25], "slices": {"axis": 0, "keep": "all"},
    })
    store = build_store(section)
    volumes = load_medical_store(MedicalDataConfig.model_validate(section.model_dump(exclude={"name", "slices"})),
                                 "vols")
    assert store.images.shape == (4 * 5, 1, 8, 8) and store.spatial_dims == 2
    columns = _columns(store)
    for v in range(4):
        rows = np.flatnonzero(store.meta["volume_row"] == v)
        assert columns.slice_index[rows].tolist() == [0, 1, 2, 3, 4]
        assert len(set(columns.series[rows].tolist())) == 1
        assert set(store.split[rows].tolist()) == {volumes.split[v]}
        assert set(store.patient_id[rows].tolist()) == {volumes.patient_id[v]}
        assert set(store.labels[rows].tolist()) == {int(volumes.labels[v])}
        torch.testing.assert_close(store.images[rows, 0], volumes.images[v, 0])
    assert store.meta["spacing"].shape == (20, 2)


# ----------------------------------------------------------------------------------------- folder CSV
def _csv_folder(root: Path, rows: list[str], header: str = "path,label,patient,study,series,slice,frame") -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for line in rows:
        Image.fromarray(rng.integers(0, 255, (8, 8)).astype(np.uint8)).save(root / line.split(",")[0])
    (root / "index.csv").write_text(header + "\n" + "\n".join(rows) + "\n")


FOLDER_ROWS = [f"{i}.png,{i % 2},p{i // 4},st{i // 4},se{i // 2},{i % 2},{(i * 3) % 5}" for i in range(12)]
FOLDER_SOURCE = {"kind": "folder", "csv": "index.csv", "label_columns": ["label"], "patient_column": "patient",
                 "study_column": "study", "series_column": "series", "slice_column": "slice",
                 "frame_column": "frame"}


def test_folder_csv_columns_reach_the_pairing_columns(tmp_path: Path) -> None:
    _csv_folder(tmp_path / "png", FOLDER_ROWS)
    store = _medical(tmp_path, dict(FOLDER_SOURCE, root=str(tmp_path / "png")), preprocess={"target_size": [8, 8]})
    columns = _columns(store)
    by_path = {Path(p).name: i for i, p in enumerate(store.meta["path"])}
    for i in range(12):
        row = by_path[f"{i}.png"]
        assert store.patient_id[row] == f"p{i // 4}" and store.meta["study_id"][row] == f"st{i // 4}"
        assert store.meta["series_id"][row] == f"se{i // 2}"
        assert int(columns.slice_index[row]) == i % 2 and int(columns.frame_index[row]) == (i * 3) % 5
    rows, partners = _partners(store, kind="patient", same_study=True)
    assert np.all(store.meta["study_id"][partners] == store.meta["study_id"][rows])


def test_folder_csv_position_cells_and_columns_are_checked(tmp_path: Path) -> None:
    bad = FOLDER_ROWS[:3] + ["3.png,1,p0,st0,se1,two,0"]
    _csv_folder(tmp_path / "png", bad)
    with pytest.raises(DataError, match=r"line 5.*column 'slice' holds 'two'"):
        _medical(tmp_path, dict(FOLDER_SOURCE, root=str(tmp_path / "png")), preprocess={"target_size": [8, 8]})
    with pytest.raises(ValueError, match="slice_column needs series_column"):
        FilesData.model_validate({"source": dict(FOLDER_SOURCE, root=str(tmp_path), series_column=None)})
    with pytest.raises(ValueError, match="name CSV columns: set `csv`"):
        FilesData.model_validate({"source": {"kind": "folder", "root": str(tmp_path), "series_column": "s"}})
    _csv_folder(tmp_path / "nocol", FOLDER_ROWS, header="path,label,patient,study,series,position,frame")
    with pytest.raises(DataError, match=r"\['slice'\] not found"):
        _medical(tmp_path, dict(FOLDER_SOURCE, root=str(tmp_path / "nocol")), preprocess={"target_size": [8, 8]})


# ----------------------------------------------------------------------------------------- volumes_to_slices
def _volume_store(n: int = 4, shape: tuple[int, int, int] = (5, 6, 7), multilabel: bool = False) -> ImageStore:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 255, (n, 1, *shape), generator=generator, dtype=torch.uint8)
    images[0, :, 0] = 0  # volume 0: empty first depth slice
    images[1, :, :, :, -1] = 9  # volume 1: a constant last column plane
    labels = (torch.rand(n, 2, generator=generator) > 0.5).float() if multilabel else torch.arange(n) % 2
    task = TaskInfo("multilabel", 2, ("x", "y")) if multilabel else TaskInfo("binary", 2, ("a", "b"))
    return ImageStore(
        name="vols", images=images, labels=labels, split=np.array(["train", "train", "val", "test"][:n]),
        patient_id=np.array(["p0", "p0", "", "p2"][:n]), task=task,
        meta={"series_id": np.array(["s0", "s1", "s1", ""][:n]), "site": np.arange(n),
              "mask": (images[:, 0].numpy() > 128).astype(np.uint8),
              "spacing": np.tile(np.array([[3.0, 1.0, 0.5]], np.float32), (n, 1))},
    )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volumes_to_slices_rows_pixels_and_metadata(axis: int) -> None:
    volumes = _volume_store()
    store = volumes_to_slices(volumes, axis=axis, keep="all")
    depth = volumes.image_shape[axis]
    assert len(store) == 4 * depth and store.spatial_dims == 2
    for row in range(len(store)):
        v, s = int(store.meta["volume_row"][row]), int(store.meta["slice_index"][row])
        expected = np.take(volumes.images[v, 0].numpy(), s, axis=axis)
        np.testing.assert_array_equal(store.images[row, 0].numpy(), expected)
        np.testing.assert_array_equal(store.meta["mask"][row], np.take(volumes.meta["mask"][v], s, axis=axis))
        assert store.split[row] == volumes.split[v] and int(store.labels[row]) == int(volumes.labels[v])
        assert store.meta["site"][row] == v
    assert store.meta["spacing"][0].tolist() == np.delete([3.0, 1.0, 0.5], axis).tolist()
    # patient ids: the volume's, or the volume itself; series: unique per volume (s1 is shared, so it is made so)
    assert store.patient_id[store.meta["volume_row"] == 2][0] == "volume:2"
    assert len({(str(a), int(b)) for a, b in zip(store.meta["series_id"], store.meta["volume_row"])}) == 4
    assert len(set(store.meta["series_id"].tolist())) == 4
    assert any("volume as patient id" in note for note in store.notes)


def test_volumes_to_slices_keeps_nonempty_slices_at_their_positions() -> None:
    volumes = _volume_store()
    store = volumes_to_slices(volumes, axis=0)
    assert len(store) == 4 * 5 - 1
    assert store.meta["slice_index"][store.meta["volume_row"] == 0].tolist() == [1, 2, 3, 4]
    assert len(volumes_to_slices(volumes, axis=2)) == 4 * 7 - 1  # volume 1's constant column plane
    pairing = build_pairing(PairingParams(kind="slice"), _columns(store))
    assert pairing.coverage() == 1.0
    multilabel = volumes_to_slices(_volume_store(multilabel=True), axis=1, keep="all")
    assert multilabel.labels.shape == (4 * 6, 2)


def test_volumes_to_slices_refuses_2d_stores_and_2d_medmnist(tiny_store: ImageStore) -> None:
    with pytest.raises(DataError, match="needs 3D volumes"):
        volumes_to_slices(tiny_store)
    with pytest.raises(ConfigError, match="data.slices needs a 3D MedMNIST set"):
        load_config(None, ["data.name=pneumoniamnist", "data.slices.axis=0"])
    with pytest.raises(ConfigError, match="axis"):
        load_config(None, ["data.name=vesselmnist3d", "data.slices.axis=3"])
    assert MedMNISTData(name="vesselmnist3d", slices={"axis": 1}).slices.axis == 1  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- real data
def test_vesselmnist3d_as_slices_keeps_volumes_together(medmnist_file) -> None:  # noqa: ANN001
    root = medmnist_file("vesselmnist3d.npz").parent
    store = build_store(MedMNISTData(name="vesselmnist3d", root=root, download=False,
                                     slices={"axis": 0}))  # type: ignore[arg-type]
    assert store.spatial_dims == 2 and store.image_shape == (28, 28)
    volume = store.meta["volume_row"]
    for split in ("train", "val", "test"):
        others = set(volume[store.split != split].tolist())
        assert not set(volume[store.split == split].tolist()) & others, "a volume's slices span two splits"
    assert len(set(store.patient_id.tolist())) == len(set(volume.tolist()))
    pairing = build_pairing(PairingParams(kind="slice", max_offset=2), _columns(store))
    assert pairing.coverage() > 0.95


def test_msd_hippocampus_volumes_as_slices(data_dir: Path, tmp_path: Path) -> None:
    folder = data_dir / "msd" / "task04_hippocampus"
    if not (folder / "imagesTr").is_dir():
        pytest.skip("MSD hippocampus not under RADSSL_DATA_DIR")
    section = FilesData.model_validate({
        "name": "hippo", "cache_dir": str(tmp_path / "cache"), "preprocess": {"target_size": [32, 48, 40]},
        "source": {"kind": "nifti", "root": str(folder / "imagesTr"), "pattern": "hippocampus_00*.nii.gz",
                   "modality": "MR", "patient_from": "file"},
        "task": {"kind": "none"}, "slices": {"axis": 0},
    })
    store = build_store(section)
    columns = _columns(store)
    cases = len(set(store.meta["volume_row"].tolist()))
    assert cases >= 5 and len(set(columns.series.tolist())) == cases
    rows, partners = _partners(store, kind="slice", max_offset=1, draws=5)
    moved = partners != rows
    assert moved.mean() > 0.9
    assert np.all(columns.series.numpy()[partners] == columns.series.numpy()[rows])
    assert set(np.abs(columns.slice_index.numpy()[partners[moved]] - columns.slice_index.numpy()[rows[moved]]).tolist()) == {1}
    shutil.rmtree(tmp_path / "cache")
