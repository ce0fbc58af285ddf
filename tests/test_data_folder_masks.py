"""2D segmentation from image folders: PNG/JPEG masks by file-name rule or CSV column, union and label maps, the
value rules (0/1, 0/255, anti-aliased JPEG), grid checks naming the file, masks never read as images, the store
and ``radssl data inspect``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radssl.data.folder import FolderSourceConfig, list_folder_files, read_folder_source
from radssl.data.medical import MedicalDataConfig, load_medical_store, mask_statistics
from radssl.data.records import BadFileLog
from radssl.errors import DataError


def _save(path: Path, pixels: np.ndarray, fmt: str = "PNG", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, **options)
    return path


def _image(seed: int, shape: tuple[int, int] = (20, 24)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, size=shape).astype(np.uint8)


def _box(shape: tuple[int, int], rows: slice, cols: slice, value: int = 255) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[rows, cols] = value
    return mask


def busi_like(root: Path, per_class: int = 4, shape: tuple[int, int] = (20, 24)) -> Path:
    """The breast-ultrasound archive's layout: class folders, ``x.png`` + ``x_mask.png`` (+ ``x_mask_1.png``)."""
    for c, name in enumerate(("benign", "malignant", "normal")):
        for i in range(per_class):
            stem = f"{name} ({i + 1})"
            _save(root / name / f"{stem}.png", _image(10 * c + i, shape))
            if name == "normal":
                _save(root / name / f"{stem}_mask.png", np.zeros(shape, np.uint8))
                continue
            _save(root / name / f"{stem}_mask.png", _box(shape, slice(2, 6), slice(3, 8)))
            if i == 0:  # a second lesion in a numbered copy
                _save(root / name / f"{stem}_mask_1.png", _box(shape, slice(10, 14), slice(12, 20)))
    return root


def test_suffix_rule_unions_numbered_copies_and_never_reads_masks_as_images(tmp_path: Path) -> None:
    root = busi_like(tmp_path / "busi")
    records = read_folder_source(FolderSourceConfig(root=root, mask_suffix="_mask"), BadFileLog())
    assert len(records) == 12 and not any("_mask" in Path(r.path).name for r in records)
    first = next(r for r in records if Path(r.path).name == "benign (1).png")
    mask = first.extra["mask"]
    assert mask.dtype == np.uint8 and mask.shape == first.pixels.shape == (20, 24)
    expected = (_box((20, 24), slice(2, 6), slice(3, 8)) | _box((20, 24), slice(10, 14), slice(12, 20))) > 0
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))  # union of _mask and _mask_1, 0/255 → 0/1
    assert first.extra["mask_files"] == 2
    normal = [r for r in records if r.extra["class_name"] == "normal"]
    assert normal and all(not r.extra["mask"].any() for r in normal)
    # Without any mask setting the masks are still not images (the 792 "images" for 391).
    plain = read_folder_source(FolderSourceConfig(root=root), BadFileLog())
    assert len(plain) == 12 and all("mask" not in r.extra for r in plain)
    # The cache notices an edited mask: mask files are among the files the source reads.
    assert root / "benign" / "benign (1)_mask_1.png" in list_folder_files(FolderSourceConfig(root=root,
                                                                                             mask_suffix="_mask"))


def test_csv_mask_column_with_several_files_and_a_two_class_label_map(tmp_path: Path) -> None:
    root = tmp_path / "data"
    shape = (16, 16)
    _save(root / "img" / "a.png", _image(1, shape))
    _save(root / "img" / "b.png", _image(2, shape))
    _save(root / "seg" / "a_benign.png", _box(shape, slice(0, 4), slice(0, 4), 1))
    _save(root / "seg" / "a_malignant.png", _box(shape, slice(2, 8), slice(2, 8), 2))  # overlaps: later class wins
    _save(root / "seg" / "b.png", _box(shape, slice(8, 12), slice(8, 12), 1))
    (root / "labels.csv").write_text("image,mask\nimg/a.png,seg/a_benign.png;seg/a_malignant.png\n"
                                     "img/b.png,seg/b.png\n")
    config = FolderSourceConfig(root=root, csv=Path("labels.csv"), path_column="image", mask_column="mask",
                                mask_values={"benign": 1, "malignant": 2})
    assert config.mask_classes == ["background", "benign", "malignant"]
    a, b = read_folder_source(config, BadFileLog())
    assert a.extra["mask_files"] == 2
    assert set(np.unique(a.extra["mask"])) == {0, 1, 2}
    assert a.extra["mask"][0, 0] == 1 and a.extra["mask"][3, 3] == 2 and a.extra["mask"][7, 7] == 2
    assert int((b.extra["mask"] == 1).sum()) == 16 and not (b.extra["mask"] == 2).any()
    # a value the label map does not declare is a bad file naming the mask and the values
    _save(root / "seg" / "b.png", _box(shape, slice(8, 12), slice(8, 12), 3))
    with pytest.raises(DataError, match=r"seg/b\.png: mask holds values \{3\} besides background 0 and mask_values"):
        read_folder_source(config, BadFileLog())


def test_mask_value_rules_0_1_0_255_jpeg_and_label_maps(tmp_path: Path) -> None:
    shape = (24, 24)
    box = _box(shape, slice(6, 18), slice(6, 18))
    _save(tmp_path / "one.png", _image(1, shape))
    _save(tmp_path / "one_mask.png", (box > 0).astype(np.uint8))  # 0/1
    _save(tmp_path / "two.png", _image(2, shape))
    _save(tmp_path / "two_mask.jpg", box, "JPEG", quality=60)  # anti-aliased, values near 0 and near 255
    noisy = np.asarray(Image.open(tmp_path / "two_mask.jpg"))
    assert len(np.unique(noisy)) > 2, "the JPEG really is lossy"
    records = read_folder_source(FolderSourceConfig(root=tmp_path, mask_suffix="_mask"), BadFileLog())
    for record in records:
        np.testing.assert_array_equal(record.extra["mask"], (box > 0).astype(np.uint8))
    # a 0/1/2 PNG without mask_values is a label map, not a binary mask: refused, naming the file
    _save(tmp_path / "one_mask.png", np.where(box > 0, 2, 0).astype(np.uint8) + (np.eye(24, dtype=np.uint8)))
    with pytest.raises(DataError, match=r"one_mask\.png: mask values \{0, 1, 2, 3\} are neither 0/1 nor reach 128"):
        read_folder_source(FolderSourceConfig(root=tmp_path, mask_suffix="_mask"), BadFileLog())


def test_wrong_size_missing_and_orphan_masks_are_named(tmp_path: Path) -> None:
    root = busi_like(tmp_path / "busi", per_class=2)
    bad = root / "malignant" / "malignant (2)_mask.png"
    _save(bad, np.zeros((20, 23), np.uint8))
    with pytest.raises(DataError, match=r"malignant \(2\)_mask\.png: mask is 23×20 px \(W×H\) but its image .*"
                                        r"malignant \(2\)\.png is 24×20"):
        read_folder_source(FolderSourceConfig(root=root, mask_suffix="_mask"), BadFileLog())
    bad.unlink()
    with pytest.raises(DataError, match=r"malignant \(2\)\.png: image has no segmentation mask"):
        read_folder_source(FolderSourceConfig(root=root, mask_suffix="_mask"), BadFileLog())
    records = read_folder_source(FolderSourceConfig(root=root, mask_suffix="_mask", missing_mask="empty"),
                                 BadFileLog())
    assert not next(r for r in records if r.path.endswith("malignant (2).png")).extra["mask"].any()
    _save(root / "benign" / "typo_mask.png", np.zeros((20, 24), np.uint8))
    with pytest.raises(DataError, match=r"typo_mask\.png: mask file \(mask_suffix '_mask'\) with no image"):
        read_folder_source(FolderSourceConfig(root=root, mask_suffix="_mask", missing_mask="empty"), BadFileLog())


def test_mask_folder_mirrors_the_images_and_is_no_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        _save(root / "images" / f"case_{i}.png", _image(i, (12, 12)))
        _save(tmp_path / "masks" / f"case_{i}.png", _box((12, 12), slice(0, i + 1), slice(0, 4)))
    config = FolderSourceConfig(root=root / "images", mask_folder=Path("../../masks"))
    records = read_folder_source(config, BadFileLog())
    assert [int(r.extra["mask"].sum()) for r in records] == [4, 8, 12]  # case_1 is not a copy of "case"


def test_mask_config_contradictions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask_column names a CSV column"):
        FolderSourceConfig(root=tmp_path, mask_column="mask")
    with pytest.raises(ValueError, match="describe masks but none are read"):
        FolderSourceConfig(root=tmp_path, mask_values={"lesion": 255})
    with pytest.raises(ValueError, match="must not name 'background'"):
        FolderSourceConfig(root=tmp_path, mask_suffix="_mask", mask_values={"background": 0, "lesion": 255})
    with pytest.raises(ValueError, match="mask_threshold is for one-class masks"):
        FolderSourceConfig(root=tmp_path, mask_suffix="_mask", mask_values={"lesion": 255}, mask_threshold=3)


def test_folder_masks_reach_the_store_resized_nearest_and_inspect_shows_them(tmp_path: Path) -> None:
    from radssl.data.medical import inspect_store

    root = busi_like(tmp_path / "busi", per_class=6, shape=(30, 40))
    config = MedicalDataConfig.model_validate({
        "source": {"kind": "folder", "root": str(root), "mask_suffix": "_mask", "mask_values": {"lesion": 255},
                   "modality": "US"},
        "preprocess": {"target_size": [16, 16], "us_crop": False},
        "cache_dir": str(tmp_path / "cache"),
    })
    store = load_medical_store(config, "busi")
    assert store.mask_classes == ("background", "lesion")
    mask = np.asarray(store.meta["mask"])
    assert mask.shape == (18, 16, 16) and set(np.unique(mask)) == {0, 1}  # nearest neighbour: labels stay labels
    stats = mask_statistics(store)
    assert stats["empty"] == 6 and stats["labels"][1]["images"] == 12
    assert 0 < stats["mean_foreground_share"] < stats["mean_foreground_share_non_empty"]
    text = inspect_store(store, tmp_path / "montage.png")
    assert "masks: 18 of 18 images have one; 6 empty (background only)" in text
    assert "1 lesion (in 12 images" in text and "mean foreground share:" in text
    assert "label map lesion = value 255" in text  # the value rule is said, not silent


def test_label_maps_are_resized_nearest_neighbour_never_blending_labels(tmp_path: Path) -> None:
    """A border between label 0 and label 2 must not turn into label 1 when the image is resized (9 → 5 px)."""
    root = tmp_path / "data"
    for i in range(8):  # the border at every column, so some output pixel straddles it
        _save(root / f"{i}.png", _image(i, (9, 9)))
        stripes = np.zeros((9, 9), np.uint8)
        stripes[:, i + 1:] = 200  # label 2 borders the background
        stripes[0, 0] = 100  # label 1 somewhere, so it is declared and used
        _save(root / f"{i}_mask.png", stripes)
    config = MedicalDataConfig.model_validate({
        "source": {"kind": "folder", "root": str(root), "mask_suffix": "_mask", "mask_values": {"a": 100, "b": 200}},
        "preprocess": {"target_size": [5, 5], "resize": "stretch"}, "cache_dir": str(tmp_path / "cache"),
    })
    mask = np.asarray(load_medical_store(config, "stripes").meta["mask"])
    assert mask.shape == (8, 5, 5) and (mask == 2).any()
    for row in mask:
        assert not (row[1:, :] == 1).any(), "no label 1 appears between background and label 2"


def test_a_folder_without_mask_settings_says_which_mask_files_it_left_out(tmp_path: Path) -> None:
    root = busi_like(tmp_path / "busi", per_class=2)
    config = MedicalDataConfig.model_validate({"source": {"kind": "folder", "root": str(root)},
                                               "preprocess": {"target_size": [8, 8]},
                                               "cache_dir": str(tmp_path / "cache")})
    store = load_medical_store(config, "busi")
    assert len(store) == 6 and "mask" not in store.meta
    assert any(note.startswith("8 files named <image>_mask[_n] beside their images were not read as images")
               and "mask_suffix: _mask" in note for note in store.notes)
