"""Segmentation masks in the data layer: synthetic finding masks, ImageStore.mask_classes, NIfTI masks (MSD
``mask_folder`` layout, grid/spacing/affine and label checks before anything is cached) and the stored grid's voxel
spacing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from radssl.config import PretrainConfig
from radssl.data.build import build_store
from radssl.data.medical import MedicalDataConfig, load_medical_store
from radssl.data.nifti import NiftiSourceConfig, read_nifti_source
from radssl.data.records import BadFileLog
from radssl.data.store import ImageStore
from radssl.data.synthetic import SyntheticSpec, generate_radiographs
from radssl.errors import DataError


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_masks_cover_the_rendered_finding_and_leave_the_images_unchanged() -> None:
    spec = SyntheticSpec(n_patients=16, images_per_patient=2, image_size=48, masks=True, finding_contrast=0.8)
    with_masks = generate_radiographs(spec)
    plain = generate_radiographs(replace(spec, masks=False))
    assert np.array_equal(with_masks["images"], plain["images"]) and "mask" not in plain
    without_finding = generate_radiographs(spec, render_finding=False)
    assert not without_finding["mask"].any()  # nothing rendered, nothing masked
    mask, labels = with_masks["mask"], with_masks["labels"]
    assert mask.dtype == np.uint8 and mask.shape == (32, 48, 48) and set(np.unique(mask)) <= {0, 1}
    assert not mask[labels == 0].any() and mask[labels == 1].reshape(-1, 48 * 48).any(1).all()
    # The finding is what makes the two renderings differ: the difference peaks inside the mask and is far stronger
    # there than outside it (outside: only the detector blur's spill-over at the rim).
    difference = with_masks["images"].astype(np.float32) - without_finding["images"].astype(np.float32)
    for image in np.flatnonzero(labels == 1):
        inside = mask[image].astype(bool)
        peak = np.unravel_index(np.argmax(difference[image]), inside.shape)
        assert inside[peak]
        assert difference[image][inside].mean() > 5 * max(difference[image][~inside].mean(), 1e-3)


def test_synthetic_masks_through_the_config_declare_their_classes() -> None:
    data = {"source": "synthetic", "n_patients": 8, "images_per_patient": 2, "image_size": 32, "masks": True}
    store = build_store(PretrainConfig.model_validate({"data": data}).data)
    assert store.mask_classes == ("background", "finding")
    assert store.meta["mask"].shape == (16, 32, 32)
    plain = build_store(PretrainConfig.model_validate({"data": {**data, "masks": False}}).data)
    assert plain.mask_classes == () and "mask" not in plain.meta
    assert torch.equal(plain.images, store.images)
    three_d = build_store(PretrainConfig.model_validate(
        {"data": {"source": "synthetic3d", "n_patients": 4, "volume_size": 16}}).data)
    assert three_d.mask_classes == ("background", "organ", "finding")


# ------------------------------------------------------------------------------------------------ store
def _masked_store(mask_classes: tuple[str, ...] = ("background", "lesion")) -> ImageStore:
    spec = SyntheticSpec(n_patients=6, images_per_patient=1, image_size=16, masks=True, finding_contrast=0.8)
    from radssl.data.synthetic import make_synthetic_store

    return replace(make_synthetic_store(spec), mask_classes=mask_classes)


def test_store_mask_classes_are_validated_and_fingerprinted() -> None:
    store = _masked_store()
    with pytest.raises(DataError, match=r"mask_classes \['background'\] name fewer than 2 labels"):
        replace(store, mask_classes=("background",))
    with pytest.raises(DataError, match="mask_classes .* are declared but the store has no masks"):
        replace(store, meta={k: v for k, v in store.meta.items() if k != "mask"})
    bad = np.asarray(store.meta["mask"]).copy()
    bad[3, 0, 0] = 2
    with pytest.raises(DataError, match=r"labels span 0\.\.2 but mask_classes declare 2 .*first bad image: row 3"):
        replace(store, meta={**store.meta, "mask": bad})
    # masks are data once declared: another mask is another fingerprint; undeclared stores keep their old digest
    moved = np.roll(np.asarray(store.meta["mask"]), 1, axis=2)
    assert replace(store, meta={**store.meta, "mask": moved}).fingerprint() != store.fingerprint()
    plain = replace(store, mask_classes=())
    assert replace(plain, meta={**plain.meta, "mask": moved}).fingerprint() == plain.fingerprint()
    assert store.describe()["mask_classes"] == ["background", "lesion"]
    assert store.subset(np.array([0, 1])).mask_classes == store.mask_classes


# ------------------------------------------------------------------------------------------------ NIfTI
def _write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))
    return path


AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def _msd_layout(root: Path, cases: int = 3) -> Path:
    """imagesTr/ + labelsTr/ with the same file names (Medical Segmentation Decathlon)."""
    for i in range(cases):
        image = np.full((6, 5, 4), 10 * (i + 1), np.int16)
        image[1:3, 1:3, 1:3] += 50
        _write(root / "imagesTr" / f"hippo_{i:03d}.nii.gz", image, AFFINE)
        mask = np.zeros((6, 5, 4), np.uint8)
        mask[1:3, 1:3, 1:3] = 1
        mask[1, 1, 1] = 2
        _write(root / "labelsTr" / f"hippo_{i:03d}.nii.gz", mask, AFFINE)
    return root


def test_msd_mask_folder_pairs_masks_by_case_and_never_reads_them_as_images(tmp_path: Path) -> None:
    root = _msd_layout(tmp_path)
    config = NiftiSourceConfig(root=root, pattern="**/*.nii.gz", mask_folder=Path("labelsTr"),
                               mask_classes=["background", "head", "body"])
    records = read_nifti_source(config, BadFileLog())
    assert [r.extra["case_id"] for r in records] == ["hippo_000", "hippo_001", "hippo_002"]
    for record in records:
        assert record.extra["mask"].shape == record.pixels.shape == (4, 5, 6)
        assert set(np.unique(record.extra["mask"])) == {0, 1, 2}
        assert (record.pixels[record.extra["mask"] > 0] > record.pixels.min()).all()  # aligned with the image
    (root / "labelsTr" / "hippo_001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"hippo_001\.nii\.gz: no mask 'hippo_001\.nii\[\.gz\]' in .*labelsTr"):
        read_nifti_source(config, BadFileLog())


def test_mask_config_contradictions_are_refused() -> None:
    with pytest.raises(ValueError, match="either `mask_suffix`"):
        NiftiSourceConfig(root=Path("."), mask_suffix="seg", mask_folder=Path("labels"))
    with pytest.raises(ValueError, match="no masks are read"):
        NiftiSourceConfig(root=Path("."), mask_classes=["background", "tumour"])
    with pytest.raises(ValueError, match="at least 2 distinct names"):
        NiftiSourceConfig(root=Path("."), mask_suffix="seg", mask_classes=["background"])


@pytest.mark.parametrize("mask_affine, match", [
    (np.diag([1.0, 1.0, 3.0, 1.0]), r"mask voxel size \(3\.0, 1\.0, 1\.0\) mm \(D, H, W\) differs from its image's "
                                    r"\(2\.0, 1\.0, 1\.0\)"),
    (np.array([[1.0, 0, 0, 4.0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]),
     r"mask affine differs from its image's \(origin off by up to 4 mm"),
])
def test_mask_on_another_grid_is_refused_naming_the_mask_and_nothing_is_cached(
        tmp_path: Path, mask_affine: np.ndarray, match: str) -> None:
    root = _msd_layout(tmp_path / "data")
    bad = root / "labelsTr" / "hippo_002.nii.gz"
    _write(bad, np.asanyarray(nib.load(str(bad)).dataobj), mask_affine)
    config = MedicalDataConfig.model_validate({
        "source": {"kind": "nifti", "root": str(root), "pattern": "imagesTr/*.nii.gz", "mask_folder": "labelsTr",
                   "modality": "MR"},
        "cache_dir": str(tmp_path / "cache"), "task": {"kind": "none"},
    })
    with pytest.raises(DataError, match=rf"hippo_002\.nii\.gz: {match}"):
        load_medical_store(config, "hippo")
    cache = tmp_path / "cache"
    assert not cache.exists() or not any(p.is_file() and not p.name.startswith(".") for p in cache.rglob("*"))


def test_mask_shape_and_labels_outside_mask_classes_are_bad_files(tmp_path: Path) -> None:
    root = _msd_layout(tmp_path)
    config = NiftiSourceConfig(root=root, pattern="imagesTr/*.nii.gz", mask_folder=Path("labelsTr"),
                               mask_classes=["background", "head"])
    with pytest.raises(DataError, match=r"hippo_000\.nii\.gz: mask labels span 0\.\.2 but mask_classes declare 2"):
        read_nifti_source(config, BadFileLog())
    _write(root / "labelsTr" / "hippo_000.nii.gz", np.zeros((6, 5, 3), np.uint8), AFFINE)
    with pytest.raises(DataError, match=r"hippo_000\.nii\.gz: mask grid \(3, 5, 6\) \(D, H, W\) differs from its image"):
        read_nifti_source(config.model_copy(update={"mask_classes": None}), BadFileLog())


def test_medical_store_carries_mask_classes_and_the_stored_grid_spacing(tmp_path: Path) -> None:
    root = _msd_layout(tmp_path / "data", cases=4)
    source = {"kind": "nifti", "root": str(root), "pattern": "imagesTr/*.nii.gz", "mask_folder": "labelsTr",
              "mask_classes": ["background", "head", "body"], "modality": "MR"}

    def load(preprocess: dict) -> ImageStore:
        config = MedicalDataConfig.model_validate({"source": source, "preprocess": {"modality": "mr", **preprocess},
                                                   "cache_dir": str(tmp_path / "cache"), "task": {"kind": "none"}})
        return load_medical_store(config, "hippo")

    kept = load({"target_size": [6, 6, 8], "resize": "crop_or_pad"})
    assert kept.mask_classes == ("background", "head", "body") and kept.meta["mask"].shape == (4, 6, 6, 8)
    np.testing.assert_allclose(kept.meta["voxel_spacing"], [[2.0, 1.0, 1.0]] * 4)  # padding keeps the voxel size
    resampled = load({"target_spacing": [1.0, 0.5, 0.5]})
    np.testing.assert_allclose(resampled.meta["voxel_spacing"], [[1.0, 0.5, 0.5]] * 4)
    assert resampled.image_shape == (8, 10, 12)
    np.testing.assert_allclose(resampled.meta["spacing"], [[2.0, 1.0, 1.0]] * 4)  # the source's, unchanged
    stretched = load({"target_size": [8, 8, 8], "resize": "stretch"})
    assert np.isnan(stretched.meta["voxel_spacing"]).all()  # per-image factor unknown to the cache
