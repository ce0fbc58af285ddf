"""MedMNIST source: real files through RADSSL_DATA_DIR, offline error for a missing file, bad-file checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from radssl.data import medmnist
from radssl.data.medmnist import load_medmnist, load_npz_store
from radssl.errors import DataError


def test_pneumoniamnist_loads_with_official_counts(medmnist_file) -> None:  # noqa: ANN001
    root = medmnist_file("pneumoniamnist.npz").parent
    store = load_medmnist("pneumoniamnist", root=root, allow_download=False)
    assert store.images.shape == (5856, 1, 28, 28) and store.task.kind == "binary"
    assert [len(store.indices(s)) for s in ("train", "val", "test")] == [4708, 524, 624]
    assert store.task.class_names == ("normal", "pneumonia")


def test_3d_and_64px_files_load(medmnist_file) -> None:  # noqa: ANN001
    root = medmnist_file("vesselmnist3d.npz").parent
    volumes = load_medmnist("vesselmnist3d", root=root, allow_download=False)
    assert volumes.images.shape[1:] == (1, 28, 28, 28) and volumes.spatial_dims == 3
    root = medmnist_file("breastmnist_64.npz").parent
    breast = load_medmnist("breastmnist", size=64, root=root, allow_download=False)
    assert breast.image_shape == (64, 64)


def test_missing_file_offline_says_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise medmnist.urllib.error.URLError("no network")

    monkeypatch.setattr(medmnist.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        load_medmnist("breastmnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "breastmnist.npz") in message and "download" in message and "zenodo" in message
    assert not list(tmp_path.iterdir()), "a failed download leaves no partial file"


def test_download_verifies_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    monkeypatch.setattr(medmnist.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"tampered bytes"))
    with pytest.raises(DataError, match="MD5 mismatch"):
        load_medmnist("breastmnist", root=tmp_path)
    assert not (tmp_path / "breastmnist.npz").exists()


def test_unknown_name_and_size_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown MedMNIST dataset name"):
        load_medmnist("pneumonia", root=tmp_path)
    with pytest.raises(DataError, match="size 100 is not published"):
        load_medmnist("pneumoniamnist", size=100, root=tmp_path)


def _write_npz(path: Path, **overrides: np.ndarray) -> Path:
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = np.zeros((n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    arrays.update(overrides)
    np.savez(path, **arrays)
    return path


def test_bad_npz_files_name_file_and_field(tmp_path: Path) -> None:
    mismatch = _write_npz(tmp_path / "m.npz", train_labels=np.zeros((5, 1), np.uint8))
    with pytest.raises(DataError, match="m.npz: image/label count mismatch in split 'train'"):
        load_npz_store(mismatch, "breastmnist")
    shape = _write_npz(tmp_path / "s.npz", val_images=np.zeros((2, 8), np.uint8))
    with pytest.raises(DataError, match="s.npz: 'val_images' has shape \\(2, 8\\)"):
        load_npz_store(shape, "breastmnist")
    nan = _write_npz(tmp_path / "n.npz", test_images=np.full((2, 8, 8), np.nan, np.float32))
    with pytest.raises(DataError, match="n.npz: 'test_images' contains NaN"):
        load_npz_store(nan, "breastmnist")
    missing = tmp_path / "k.npz"
    np.savez(missing, train_images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="missing array 'train_labels'"):
        load_npz_store(missing, "breastmnist")
    garbage = tmp_path / "g.npz"
    garbage.write_bytes(b"garbage")
    with pytest.raises(DataError, match="g.npz: cannot read as .npz"):
        load_npz_store(garbage, "breastmnist")
