"""Image-folder reader: 8/16-bit and RGB decoding, class sub-folders, CSV labels/patients/splits, CSV errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radssl.data.folder import FolderSourceConfig, list_folder_files, read_folder_source, read_image
from radssl.data.records import BadFileLog
from radssl.errors import DataError


def _save(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _gray(seed: int, size: int = 8, dtype=np.uint8, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(size, size)).astype(dtype)


def test_bit_depths_and_rgb_luma(tmp_path):
    eight = _save(tmp_path / "a.png", _gray(0))
    sixteen = _gray(1, dtype=np.uint16, high=4096) + 1000  # 12-bit data stored in a 16-bit PNG
    png16 = _save(tmp_path / "b.png", sixteen)
    tif16 = _save(tmp_path / "c.tif", sixteen, "TIFF")
    rgb = np.random.default_rng(2).integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    rgb_path = _save(tmp_path / "d.png", rgb)

    pixels, depth = read_image(eight)
    assert pixels.dtype == np.uint8 and depth == 8
    np.testing.assert_array_equal(pixels, _gray(0))
    for path in (png16, tif16):
        pixels, depth = read_image(path)
        assert pixels.dtype == np.uint16 and depth == 16
        np.testing.assert_array_equal(pixels, sixteen)  # full range kept, not cut to 8 bits
        assert pixels.max() > 255
    pixels, depth = read_image(rgb_path)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert pixels.shape == (8, 8) and depth == 8
    np.testing.assert_allclose(pixels, expected, atol=1e-3)


def test_rgba_and_palette_and_jpeg(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10  # alpha must not leak into the grey value
    pixels, _ = read_image(_save(tmp_path / "a.png", rgba))
    np.testing.assert_allclose(pixels, 0.299 * 200, atol=1e-3)
    palette = Image.fromarray(_gray(3)).convert("P")
    palette.save(tmp_path / "p.png")
    pixels, _ = read_image(tmp_path / "p.png")
    np.testing.assert_allclose(pixels, np.asarray(palette.convert("L")), atol=1)
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    pixels, depth = read_image(_save(tmp_path / "j.jpg", smooth, "JPEG"))
    assert depth == 8 and np.abs(pixels.astype(int) - smooth).max() < 12  # lossy but close


def test_corrupt_and_multipage_files_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(DataError, match=r"broken\.png: cannot decode image"):
        read_image(tmp_path / "broken.png")
    pages = [Image.fromarray(_gray(i)) for i in range(2)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(DataError, match=r"stack\.tif: multi-page image \(2 pages\)"):
        read_image(tmp_path / "stack.tif")


def test_class_subfolders_with_split_level(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c, name in enumerate(["normal", "pneumonia"]):
            for i in range(n):
                _save(tmp_path / split / name / f"{i}.png", _gray(10 * c + i))
    records = read_folder_source(FolderSourceConfig(root=tmp_path, modality="DX"), BadFileLog())
    assert len(records) == 10
    assert {r.split for r in records} == {"train", "test"}
    assert sum(r.label == 1 for r in records) == 5
    assert all(r.extra["class_names"] == ("normal", "pneumonia") for r in records)
    for record in records:
        assert Path(record.path).parent.name == record.extra["class_name"]
        assert record.modality == "DX" and record.pixels.shape == (8, 8)

    # declared classes fix the order; a folder outside them is a bad file
    (tmp_path / "train" / "covid").mkdir()
    _save(tmp_path / "train" / "covid" / "x.png", _gray(99))
    declared = FolderSourceConfig(root=tmp_path, classes=["pneumonia", "normal"])
    with pytest.raises(DataError, match=r"covid/x\.png: label 'covid'.*declared classes"):
        read_folder_source(declared, BadFileLog())
    log = BadFileLog("skip")
    records = read_folder_source(declared, log)
    assert len(records) == 10 and len(log.skipped) == 1
    assert all(r.label == (0 if r.extra["class_name"] == "pneumonia" else 1) for r in records)


def test_flat_folder_is_unlabelled_and_empty_folder_errors(tmp_path):
    _save(tmp_path / "flat" / "a.png", _gray(0))
    (record,) = read_folder_source(FolderSourceConfig(root=tmp_path / "flat"), BadFileLog())
    assert record.label is None and record.split is None
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty: no images"):
        read_folder_source(FolderSourceConfig(root=tmp_path / "empty"), BadFileLog())


def test_csv_labels_patients_splits_multilabel(tmp_path):
    for name in "abc":
        _save(tmp_path / "img" / f"{name}.png", _gray(ord(name)))
    (tmp_path / "data.csv").write_text(
        "file,finding,effusion,nodule,patient,set\n"
        "img/a.png,1,1,0,p1,train\n"
        "img/b.png,0,0,,p1,valid\n"
        f"{tmp_path / 'img' / 'c.png'},1,1,1,p2,Test\n"
    )
    single = FolderSourceConfig(
        root=tmp_path, csv=tmp_path / "data.csv", path_column="file", label_columns=["finding"],
        patient_column="patient", split_column="set",
    )
    records = read_folder_source(single, BadFileLog())
    assert [r.label for r in records] == [1, 0, 1]  # derived classes ["0", "1"] in numeric order
    assert [r.patient_id for r in records] == ["p1", "p1", "p2"]
    assert [r.split for r in records] == ["train", "val", "test"]
    assert [r.extra["csv_line"] for r in records] == [2, 3, 4]

    multi = single.model_copy(update={"label_columns": ["effusion", "nodule"]})
    records = read_folder_source(multi, BadFileLog())
    assert [r.label for r in records] == [[1, 0], [0, -1], [1, 1]]  # empty cell = unknown (-1)
    assert records[0].extra["class_names"] == ("effusion", "nodule")

    with pytest.raises(DataError, match=r"columns \['diagnosis'\] not found"):
        read_folder_source(single.model_copy(update={"label_columns": ["diagnosis"]}), BadFileLog())
    (tmp_path / "bad_split.csv").write_text("file,set\nimg/a.png,holdout\n")
    with pytest.raises(DataError, match=r"bad_split\.csv: line 2: split column 'set' holds 'holdout'"):
        read_folder_source(
            FolderSourceConfig(root=tmp_path, csv=tmp_path / "bad_split.csv", path_column="file", split_column="set"),
            BadFileLog(),
        )


def test_pneumoniamnist_pngs_round_trip(tmp_path, medmnist_file):
    npz = medmnist_file("pneumoniamnist.npz")
    with np.load(npz) as data:
        images, labels = data["test_images"][:40], data["test_labels"][:40, 0]
    rows = ["path,label,patient"]
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"x{i:03d}.png"
        if i % 2:  # odd images as 16-bit, scaled to use the full range
            _save(tmp_path / name, image.astype(np.uint16) * 257)
        else:
            _save(tmp_path / name, image)
        rows.append(f"{name},{['normal', 'pneumonia'][label]},pt{i // 4}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    config = FolderSourceConfig(
        root=tmp_path, csv=tmp_path / "labels.csv", label_columns=["label"], classes=["normal", "pneumonia"],
        patient_column="patient",
    )
    records = read_folder_source(config, BadFileLog())
    assert [r.label for r in records] == labels.tolist()
    for i, record in enumerate(records):
        expected = images[i].astype(np.uint16) * 257 if i % 2 else images[i]
        np.testing.assert_array_equal(record.pixels, expected)
        assert record.extra["bit_depth"] == (16 if i % 2 else 8)
    assert len({r.patient_id for r in records}) == 10


# ----------------------------------------------------------------------------------------- new-user bumps
def test_patient_pattern_takes_patient_ids_from_file_names(tmp_path):
    for name, label in (("P001_a.png", "normal"), ("P001_b.png", "normal"), ("P002_a.png", "pneumonia")):
        _save(tmp_path / label / name, _gray(len(name)))
    config = FolderSourceConfig(root=tmp_path, patient_pattern=r"^(P\d+)_")
    records = read_folder_source(config, BadFileLog())
    assert {Path(r.path).name: r.patient_id for r in records} == {
        "P001_a.png": "P001", "P001_b.png": "P001", "P002_a.png": "P002"
    }
    whole_match = read_folder_source(FolderSourceConfig(root=tmp_path, patient_pattern=r"P\d+"), BadFileLog())
    assert [r.patient_id for r in whole_match] == ["P001", "P001", "P002"]

    _save(tmp_path / "normal" / "scan7.png", _gray(7))
    with pytest.raises(DataError, match=r"scan7\.png: patient_pattern '\^\(P\\d\+\)_' finds no patient id"):
        read_folder_source(config, BadFileLog())
    log = BadFileLog("skip")
    assert len(read_folder_source(config, log)) == 3 and "scan7.png" in log.skipped[0][0]

    (tmp_path / "list.csv").write_text("path,patient\nnormal/P001_a.png,x\npneumonia/P002_a.png,y\n")
    from_csv = read_folder_source(
        FolderSourceConfig(root=tmp_path, csv=tmp_path / "list.csv", patient_pattern=r"^(P\d+)_"), BadFileLog()
    )
    assert [r.patient_id for r in from_csv] == ["P001", "P002"]


def test_patient_options_are_validated(tmp_path):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        FolderSourceConfig(root=tmp_path, patient_pattern="(P\\d+")
    with pytest.raises(ValueError, match="either patient_column or patient_pattern"):
        FolderSourceConfig(root=tmp_path, csv=tmp_path / "x.csv", patient_column="p", patient_pattern="P")


def test_csv_path_outside_the_root_is_refused_naming_the_row(tmp_path):
    root = tmp_path / "data"
    _save(root / "a.png", _gray(0))
    _save(tmp_path / "outside.png", _gray(1))
    (root / "labels.csv").write_text("path,label\na.png,normal\n../outside.png,pneumonia\n")
    config = FolderSourceConfig(root=root, csv=root / "labels.csv", label_columns=["label"])
    for policy in ("error", "skip"):  # refused even when bad files are skipped: the CSV is wrong, not the image
        with pytest.raises(DataError, match=r"labels\.csv: line 3: path '\.\./outside\.png' lies outside the data root"):
            read_folder_source(config, BadFileLog(policy))
    (root / "labels.csv").write_text(f"path,label\na.png,normal\n{tmp_path / 'outside.png'},pneumonia\n")
    with pytest.raises(DataError, match=r"line 3: path '.*outside\.png' lies outside the data root"):
        read_folder_source(config, BadFileLog())
    (root / "sub").mkdir()
    (root / "labels.csv").write_text("path,label\na.png,normal\nsub/../a.png,normal\n")  # stays inside: a duplicate
    with pytest.raises(DataError, match=r"duplicate path 'sub/\.\./a\.png'"):
        read_folder_source(config, BadFileLog())


def test_relative_csv_is_read_inside_the_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _save(root / "a.png", _gray(0))
    (root / "labels.csv").write_text("path,label\na.png,normal\n")
    monkeypatch.chdir(tmp_path)  # the CSV is not in the working directory
    config = FolderSourceConfig(root=root, csv=Path("labels.csv"), label_columns=["label"])
    assert config.csv == root / "labels.csv"
    (record,) = read_folder_source(config, BadFileLog())
    assert record.extra["class_name"] == "normal"


def test_exclude_folders_leaves_a_class_out(tmp_path):
    for c, name in enumerate(["covid", "normal", "pneumonia"]):
        for i in range(2):
            _save(tmp_path / "train" / name / f"{i}.png", _gray(10 * c + i))
            _save(tmp_path / "test" / name / f"{i}.png", _gray(10 * c + i + 5))
    config = FolderSourceConfig(root=tmp_path, exclude_folders=["covid"])
    records = read_folder_source(config, BadFileLog())
    assert len(records) == 8 and {r.extra["class_name"] for r in records} == {"normal", "pneumonia"}
    assert records[0].extra["class_names"] == ("normal", "pneumonia")
    assert not any("covid" in str(path) for path in list_folder_files(config))  # nor in the cache key
