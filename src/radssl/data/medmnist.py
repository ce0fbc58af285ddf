"""MedMNIST source: any MedMNIST ``.npz`` (2D at 28–224 px, 3D at 28/64) by dataset name.

Files are looked up in the data root (``--data-root``, env ``RADSSL_DATA_DIR``, default a user cache folder),
either directly or in a ``medmnist/`` sub-folder. A missing file is downloaded through the ``medmnist`` package's
catalogue (URL + MD5) and the MD5 is verified before the file is kept; offline, the error says where to put it.
Dataset: Yang et al., "MedMNIST v2", Scientific Data 2023 (CC BY 4.0).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from radssl.data.store import SPLITS, ImageStore, TaskInfo
from radssl.errors import DataError

DATA_DIR_ENV = "RADSSL_DATA_DIR"
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)


def default_data_root() -> Path:
    """``$RADSSL_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/radssl`` (``~/.cache/radssl``)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "radssl"


def _catalogue() -> dict[str, dict]:
    from medmnist.info import INFO

    return INFO


def dataset_info(name: str) -> dict:
    """The catalogue entry of a MedMNIST dataset; a clear error for an unknown name."""
    info = _catalogue()
    if name not in info:
        raise DataError(
            f"medmnist:{name}",
            "unknown MedMNIST dataset name",
            f"choose one of {sorted(info)}",
        )
    return info[name]


def file_name(name: str, size: int) -> str:
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _check_size(name: str, size: int) -> None:
    sizes = SIZES_3D if name.endswith("3d") else SIZES_2D
    if size not in sizes:
        raise DataError(f"medmnist:{name}", f"size {size} is not published", f"choose one of {list(sizes)}")


def locate(name: str, size: int, root: Path) -> Path | None:
    """An existing file for (name, size) under ``root`` or ``root/medmnist``, else None."""
    for folder in (root, root / "medmnist"):
        candidate = folder / file_name(name, size)
        if candidate.is_file():
            return candidate
    return None


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name: str, size: int, root: Path, timeout_s: float = 60.0) -> Path:
    """Download the catalogue file to ``root`` and verify its MD5; the file appears only when verified."""
    info = dataset_info(name)
    suffix = "" if size == 28 else f"_{size}"
    url, expected_md5 = info.get(f"url{suffix}"), info.get(f"MD5{suffix}")
    target = root / file_name(name, size)
    if not url or not expected_md5:
        raise DataError(str(target), f"the MedMNIST catalogue has no URL for size {size}")
    root.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".npz.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(partial, "wb") as stream:
            while chunk := response.read(1 << 20):
                stream.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        partial.unlink(missing_ok=True)
        raise DataError(
            str(target),
            f"file not found and the download failed ({error.__class__.__name__}: {error})",
            f"offline? download {url} on a networked machine and put it at {target} "
            f"(or point --data-root / ${DATA_DIR_ENV} at the folder that holds {file_name(name, size)})",
        ) from error
    actual = md5_of(partial)
    if actual != expected_md5:
        partial.unlink(missing_ok=True)
        raise DataError(str(target), f"MD5 mismatch after download: {actual} != catalogue {expected_md5}", "retry")
    os.replace(partial, target)
    return target


def resolve_file(name: str, size: int, root: Path | None, allow_download: bool = True) -> Path:
    """Find the file, downloading it when missing (and allowed)."""
    dataset_info(name)
    _check_size(name, size)
    root = Path(root) if root is not None else default_data_root()
    found = locate(name, size, root)
    if found is not None:
        return found
    if not allow_download:
        raise DataError(
            str(root / file_name(name, size)),
            "file not found and downloads are disabled",
            f"put {file_name(name, size)} in {root} or enable download",
        )
    return download(name, size, root)


def _task_info(info: dict, labels: np.ndarray) -> TaskInfo:
    names = tuple(info["label"][k] for k in sorted(info["label"], key=int))
    kind = info["task"]
    if kind == "multi-label, binary-class":
        return TaskInfo("multilabel", len(names), names)
    if kind == "binary-class":
        return TaskInfo("binary", 2, names)
    return TaskInfo("multiclass", len(names), names)  # multi-class and ordinal-regression


def load_npz_store(path: Path, name: str, info: dict | None = None) -> ImageStore:
    """Read a MedMNIST-format npz into an ImageStore, checking every key, shape and count."""
    where = str(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - any reader failure is a bad file
        raise DataError(where, f"cannot read as .npz ({error})", "re-download the file") from error
    images_parts, label_parts, split_parts = [], [], []
    spatial_ndim: int | None = None
    with archive:
        for split in SPLITS:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in archive.files:
                    raise DataError(where, f"missing array '{key}' (found {sorted(archive.files)})")
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"]
            if images.ndim not in (3, 4, 5):
                raise DataError(where, f"'{split}_images' has shape {images.shape}; expected (N, H, W[, 3]) or (N, D, H, W)")
            if labels.ndim == 1:
                labels = labels[:, None]
            if images.shape[0] != labels.shape[0]:
                raise DataError(
                    where,
                    f"image/label count mismatch in split '{split}': "
                    f"'{split}_images' has {images.shape[0]}, '{split}_labels' has {labels.shape[0]}",
                )
            if images.dtype != np.uint8:
                if not np.all(np.isfinite(images)):
                    raise DataError(where, f"'{split}_images' contains NaN or inf pixels")
                raise DataError(where, f"'{split}_images' has dtype {images.dtype}; MedMNIST images are uint8")
            images_parts.append(images)
            label_parts.append(labels)
            split_parts.append(np.full(images.shape[0], split, dtype="<U10"))
            shape = images.shape[1:]
            if spatial_ndim is None:
                spatial_ndim = len(shape)
            elif len(shape) != spatial_ndim:
                raise DataError(where, f"'{split}_images' has shape {images.shape}, unlike the other splits")
    images = np.concatenate(images_parts)
    labels = np.concatenate(label_parts)
    if info is None:
        info = dataset_info(name)
    is_3d = name.endswith("3d")
    if is_3d:
        tensor = torch.from_numpy(images).unsqueeze(1)  # (N, 1, D, H, W)
    elif images.ndim == 4 and images.shape[-1] == 3:
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # RGB pathology/dermatology sets
    else:
        tensor = torch.from_numpy(images).unsqueeze(1)
    task = _task_info(info, labels)
    if task.kind == "multilabel":
        label_tensor = torch.from_numpy(labels.astype(np.float32))
    else:
        label_tensor = torch.from_numpy(labels[:, 0].astype(np.int64))
    split = np.concatenate(split_parts)
    # MedMNIST carries no patient ids; each image is its own group (documented limitation of the format).
    patient_id = np.full(len(split), "", dtype="<U1")
    return ImageStore(
        name=name,
        images=tensor,
        labels=label_tensor,
        split=split,
        patient_id=patient_id,
        task=task,
        origin=where,
    )


def load_medmnist(name: str, size: int = 28, root: Path | None = None, allow_download: bool = True) -> ImageStore:
    """Load a MedMNIST dataset by name and size into an ImageStore (downloading once if needed)."""
    path = resolve_file(name, size, root, allow_download=allow_download)
    return load_npz_store(path, name=name if size == 28 else f"{name}_{size}", info=dataset_info(name))
