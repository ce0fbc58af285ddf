"""Preprocessing cache (build once, memory-map later, rebuild on change, atomic) and the medical-store glue."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from radssl.data.cache import load_or_build_cache
from radssl.data.folder import FolderSourceConfig, list_folder_files, read_folder_source
from radssl.data.records import BadFileLog, Record
from radssl.errors import DataError


def _dataset(root: Path, n_per_class: int = 4, size: int = 8) -> FolderSourceConfig:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["normal", "pneumonia"]):
        for i in range(n_per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size)).astype(np.uint8)).save(root / name / f"{i}.png")
    return FolderSourceConfig(root=root)


def _to_chw(record: Record) -> np.ndarray:
    return np.asarray(record.pixels, dtype=np.uint8)[None]


class Counter:
    """A reader that counts how often it decodes."""

    def __init__(self, config: FolderSourceConfig) -> None:
        self.config, self.calls = config, 0

    def __call__(self, log: BadFileLog) -> list[Record]:
        self.calls += 1
        return read_folder_source(self.config, log)


def _load(cache_dir: Path, config: FolderSourceConfig, reader, preprocess=_to_chw, fingerprint="p1", policy="error"):
    return load_or_build_cache(
        cache_dir, "toy", list_folder_files(config), config, fingerprint, reader, preprocess, on_bad_file=policy
    )


def _mapped_files(pointer: int) -> list[str]:
    with open("/proc/self/maps") as stream:
        for line in stream:
            span, *rest = line.split()
            low, high = (int(x, 16) for x in span.split("-"))
            if low <= pointer < high:
                return rest[4:]
    return []


def test_second_load_memory_maps_without_decoding(tmp_path):
    config = _dataset(tmp_path / "data")
    reader = Counter(config)
    first = _load(tmp_path / "cache", config, reader)
    assert reader.calls == 1
    assert first.images.shape == (8, 1, 8, 8) and first.images.dtype == torch.uint8
    assert first.task.kind == "binary" and first.task.class_names == ("normal", "pneumonia")
    assert first.labels.tolist() == [0] * 4 + [1] * 4
    assert set(first.split.tolist()) == {"unlabelled"}  # the source gave no splits

    def explode(log: BadFileLog) -> list[Record]:
        raise AssertionError("the cache hit must not decode any file")

    second = _load(tmp_path / "cache", config, explode)
    assert torch.equal(first.images, second.images)
    assert second.fingerprint() == first.fingerprint()
    assert list(second.meta["path"]) == list(first.meta["path"])
    assert Path(second.origin).parent == tmp_path / "cache"
    if Path("/proc/self/maps").is_file():  # zero copy: the tensor's memory is the mapped images.npy
        assert any(name.endswith("images.npy") for name in _mapped_files(second.images.data_ptr()))
    # copy-on-write: writing into the tensor never changes the file
    second.images[0].fill_(7)
    third = _load(tmp_path / "cache", config, explode)
    assert torch.equal(third.images[0], first.images[0]) and not bool((third.images[0] == 7).all())


def test_changed_preprocess_config_or_touched_file_rebuilds(tmp_path):
    config = _dataset(tmp_path / "data")
    reader = Counter(config)
    _load(tmp_path / "cache", config, reader)
    _load(tmp_path / "cache", config, reader)
    assert reader.calls == 1
    _load(tmp_path / "cache", config, reader, fingerprint="p2")  # another preprocessing
    assert reader.calls == 2
    target = config.root / "normal" / "0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    _load(tmp_path / "cache", config, reader)
    assert reader.calls == 3
    _load(tmp_path / "cache", config.model_copy(update={"modality": "DX"}), reader)  # source config changed
    assert reader.calls == 4
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(config.root / "normal" / "new.png")  # file added
    store = _load(tmp_path / "cache", config, reader)
    assert reader.calls == 5 and len(store) == 9
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 5 and not [p for p in entries if p.name.startswith(".tmp-")]


def test_csv_source_keys_on_the_csv_and_the_images_it_names(tmp_path):
    outside = tmp_path / "root" / "elsewhere" / "x.png"  # named by absolute path (inside root: outside is refused)
    outside.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(outside)
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "root" / "a.png")
    (tmp_path / "root" / "list.csv").write_text(f"path\na.png\n{outside}\n")
    config = FolderSourceConfig(root=tmp_path / "root", csv=tmp_path / "root" / "list.csv")
    assert set(list_folder_files(config)) == {config.csv, tmp_path / "root" / "a.png", outside}
    reader = Counter(config)
    _load(tmp_path / "cache", config, reader)
    Image.fromarray(np.full((8, 8), 9, np.uint8)).save(outside)
    os.utime(outside, ns=(0, outside.stat().st_mtime_ns + 10**9))
    store = _load(tmp_path / "cache", config, reader)
    assert reader.calls == 2 and int(store.images[1].max()) == 9
    (tmp_path / "root" / "list.csv").write_text("path\na.png\n")  # edited CSV
    assert len(_load(tmp_path / "cache", config, reader)) == 1 and reader.calls == 3


def test_different_shapes_are_an_error_and_write_nothing(tmp_path):
    config = _dataset(tmp_path / "data")
    Image.fromarray(np.zeros((12, 8), np.uint8)).save(config.root / "normal" / "tall.png")
    with pytest.raises(DataError, match=r"differ in shape.*tall\.png.*target_size"):
        _load(tmp_path / "cache", config, Counter(config))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_half_built_and_damaged_entries_are_rebuilt(tmp_path):
    config = _dataset(tmp_path / "data")
    reader = Counter(config)
    good = _load(tmp_path / "cache", config, reader)
    entry = Path(good.origin)
    expected = good.images.clone()
    del good
    # a killed build: a temp folder of a dead process, and a final folder whose sidecar never got written
    stale = tmp_path / "cache" / f".tmp-{entry.name}-{socket.gethostname()}-999999999"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    (entry / "meta.json").unlink()
    store = _load(tmp_path / "cache", config, reader)
    assert reader.calls == 2
    assert torch.equal(store.images, expected)
    assert not stale.exists()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["complete"] and meta["shape"] == [8, 1, 8, 8]
    # a truncated images.npy (sidecar intact) is detected too
    (entry / "images.npy").write_bytes((entry / "images.npy").read_bytes()[:100])
    _load(tmp_path / "cache", config, reader)
    assert reader.calls == 3


def test_skip_policy_lists_preprocessing_failures(tmp_path):
    config = _dataset(tmp_path / "data")

    def picky(record: Record) -> np.ndarray:
        if record.path.endswith("pneumonia/2.png"):
            raise DataError(record.path, "window cannot be applied")
        return _to_chw(record)

    with pytest.raises(DataError, match="window cannot be applied"):
        _load(tmp_path / "cache", config, Counter(config), preprocess=picky)
    store = _load(tmp_path / "cache", config, Counter(config), preprocess=picky, policy="skip")
    assert len(store) == 7
    report = json.loads((Path(store.origin) / "bad_files.json").read_text())
    assert report["skipped"] == 1 and report["files"][0]["path"].endswith("pneumonia/2.png")


def test_float16_volumes_and_multilabel(tmp_path):
    files = []
    for i in range(3):
        path = tmp_path / f"v{i}.bin"
        path.write_bytes(bytes([i]))
        files.append(path)

    def reader(log: BadFileLog) -> list[Record]:
        return [
            Record(
                pixels=np.full((2, 3, 4), i, np.float32),
                path=str(path),
                patient_id=f"p{i}",
                spacing=(2.0, 1.0, 1.0),
                index=i,
                label=[1, 0] if i else [0, -1],
                extra={"class_names": ("effusion", "nodule")},
            )
            for i, path in enumerate(files)
        ]

    store = load_or_build_cache(
        tmp_path / "cache", "vol", files, {"kind": "test"}, "f16", reader,
        lambda r: (r.pixels[None] / 10).astype(np.float16),
    )
    assert store.images.shape == (3, 1, 2, 3, 4) and store.images.dtype == torch.float16
    assert store.task.kind == "multilabel" and store.task.class_names == ("effusion", "nodule")
    assert store.labels[0, 0] == 0 and torch.isnan(store.labels[0, 1]) and store.labels[1].tolist() == [1.0, 0.0]
    assert store.meta["index"].tolist() == [0, 1, 2]
    assert store.meta["spacing"].shape == (3, 3) and store.meta["spacing"][0].tolist() == [2.0, 1.0, 1.0]
    assert float(store.images[2].float().mean()) == pytest.approx(0.2, abs=1e-3)


# ----------------------------------------------------------------------------------------- medical glue
@pytest.fixture
def medical():
    """The medical-store module (a fixture so the tests below read ``medical.load_medical_store``)."""
    from radssl.data import medical as module

    return module


def _medical_config(medical, tmp_path: Path, source: dict, **kwargs):
    return medical.MedicalDataConfig.model_validate(
        {"source": source, "cache_dir": str(tmp_path / "cache"), "preprocess": {"target_size": [8, 8]}, **kwargs}
    )


def test_medical_store_patient_splits_cache_hit_and_inspect(medical, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = ["path,label,patient"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{['normal', 'pneumonia'][i % 2]},pt{i // 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    source = {
        "kind": "folder", "root": str(tmp_path), "csv": str(tmp_path / "labels.csv"), "label_columns": ["label"],
        "classes": ["normal", "pneumonia"], "patient_column": "patient", "modality": "DX",
    }
    config = _medical_config(medical, tmp_path, source, split_seed=3)
    store = medical.load_medical_store(config, "toy")
    assert len(store) == 40 and store.task.class_names == ("normal", "pneumonia")
    assert set(store.split.tolist()) == {"train", "val", "test"}
    for patient in set(store.patient_id.tolist()):  # patient-level: one split per patient
        assert len(set(store.split[store.patient_id == patient].tolist())) == 1
    assert set(store.meta["modality"].tolist()) == {"DX"}
    assert json.loads(medical.bad_files_report(store).read_text())["skipped"] == 0

    monkeypatch.setattr(medical, "plan_folder_units", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    again = medical.load_medical_store(config, "toy")
    assert again.fingerprint() == store.fingerprint()
    external = medical.load_medical_store(_medical_config(medical, tmp_path, source, external=True), "toy")
    assert set(external.split.tolist()) == {"test"}
    with pytest.raises(AssertionError, match="decoded"):  # another preprocessing → rebuild → decode
        smaller = config.preprocess.model_copy(update={"target_size": (4, 4)})
        medical.load_medical_store(config.model_copy(update={"preprocess": smaller}), "toy")

    text = medical.inspect_store(store, tmp_path / "montage.png")
    assert "train" in text and "pneumonia" in text and "patients shared between splits: none" in text
    assert "DX 40" in text
    with Image.open(tmp_path / "montage.png") as montage:
        assert montage.size[0] > 100


def test_medical_config_rejects_unknown_keys(medical, tmp_path):
    with pytest.raises(ValueError):
        _medical_config(medical, tmp_path, {"kind": "folder", "root": str(tmp_path)}, shuffle=True)
    with pytest.raises(ValueError):
        _medical_config(medical, tmp_path, {"kind": "png", "root": str(tmp_path)})


def test_medical_split_rules_and_task_resolution(medical, tmp_path):
    rng = np.random.default_rng(1)
    rows = ["path,label,patient,split"]
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).save(tmp_path / f"{i}.png")
        label = "" if i % 4 == 3 else ["a", "b"][i % 2]
        rows.append(f"{i}.png,{label},pt{i // 2},{['train', 'val', 'test'][i % 3]}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    source = {
        "kind": "folder", "root": str(tmp_path), "csv": str(tmp_path / "labels.csv"), "label_columns": ["label"],
        "patient_column": "patient",
    }
    given = medical.load_medical_store(_medical_config(medical, tmp_path, dict(source, split_column="split")), "s")
    assert given.split.tolist() == [["train", "val", "test"][i % 3] for i in range(12)]  # the source's splits

    store = medical.load_medical_store(_medical_config(medical, tmp_path, source, split_seed=0), "s")
    unlabelled = store.labels < 0
    assert unlabelled.sum() == 3
    # unlabelled images of training patients are pretraining-only; none of them sits in train
    assert not bool(((torch.from_numpy(store.split == "train")) & unlabelled).any())
    assert set(store.split[(~unlabelled).numpy()].tolist()) <= {"train", "val", "test"}

    none = medical.load_medical_store(_medical_config(medical, tmp_path, source, task={"kind": "none"}), "s")
    assert none.task.kind == "none" and bool((none.labels == -1).all())
    with pytest.raises(DataError, match="class_names"):
        medical.load_medical_store(_medical_config(medical, tmp_path, source, task={"class_names": ["b", "a"]}), "s")
    with pytest.raises(DataError, match="multilabel"):
        medical.load_medical_store(_medical_config(medical, tmp_path, source, task={"kind": "multilabel"}), "s")

    partial = "\n".join(r if i != 2 else r.rsplit(",", 1)[0] + "," for i, r in enumerate(rows)) + "\n"
    (tmp_path / "labels.csv").write_text(partial)
    with pytest.raises(DataError, match="splits for only 11 of 12 images"):
        medical.load_medical_store(_medical_config(medical, tmp_path, dict(source, split_column="split")), "s")


def test_medical_nifti_volumes_with_cached_masks(medical, tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(2)
    for i in range(3):
        volume = rng.normal(100, 5, size=(12, 10, 6)).astype(np.float32)  # (x, y, z)
        mask = np.zeros(volume.shape, np.uint8)
        mask[2 + i : 6 + i, 3:7, 1:4] = 1 + i % 2  # labels 1/2 over a bright block
        volume[mask > 0] += 400
        (tmp_path / f"p{i}").mkdir()
        for data, name in ((volume, f"case{i}.nii.gz"), (mask, f"case{i}_seg.nii.gz")):
            nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / f"p{i}" / name))
    source = {"kind": "nifti", "root": str(tmp_path), "mask_suffix": "seg", "modality": "MR"}
    config = medical.MedicalDataConfig.model_validate(
        {"source": source, "cache_dir": str(tmp_path / "cache"), "preprocess": {"target_size": [6, 10, 12]}}
    )
    store = medical.load_medical_store(config, "seg")
    assert store.images.shape == (3, 1, 6, 10, 12) and store.spatial_dims == 3
    masks = store.meta["mask"]
    assert masks.shape == (3, 6, 10, 12) and set(np.unique(masks).tolist()) == {0, 1, 2}
    for i in range(3):  # masks stay on the bright blocks after reorientation and preprocessing
        image = store.images[i, 0].numpy()
        assert image[masks[i] > 0].min() > image[masks[i] == 0].max()
    assert store.meta["spacing"][0].tolist() == [2.0, 1.0, 1.0]
    assert set(store.patient_id.tolist()) == {"p0", "p1", "p2"}
    again = medical.load_medical_store(config, "seg")
    np.testing.assert_array_equal(again.meta["mask"], masks)


def _subfolder_pngs(root: Path, n_patients: int = 12, per_patient: int = 2) -> None:
    rng = np.random.default_rng(4)
    for p in range(n_patients):
        for k in range(per_patient):
            name = ["normal", "pneumonia"][p % 2]
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).save(root / name / f"P{p:03d}_{k}.png")


def test_folder_without_patient_ids_says_splits_are_per_image(medical, tmp_path):
    _subfolder_pngs(tmp_path / "data")
    source = {"kind": "folder", "root": str(tmp_path / "data")}
    config = _medical_config(medical, tmp_path, source, preprocess={"modality": "xray", "target_size": [8, 8]})
    store = medical.load_medical_store(config, "anonymous")
    assert len(store.notes) == 1 and "no image has a patient id" in store.notes[0]
    assert "patient_pattern" in store.notes[0] and "leak" in store.notes[0]
    assert store.describe()["notes"] == list(store.notes)  # run.json records describe()
    text = medical.inspect_store(store, tmp_path / "montage.png")
    assert "patients shared between splits: unknown" in text and "none" not in text.split("shared between splits")[1][:8]
    assert f"note: {store.notes[0]}" in text
    assert "modality (files): (unknown) 24" in text and "preprocessed as: xray 24" in text

    patterned = _medical_config(
        medical, tmp_path, dict(source, patient_pattern=r"^(P\d+)_"), preprocess={"target_size": [8, 8]}
    )
    store = medical.load_medical_store(patterned, "patients")
    assert store.notes == () and len(set(store.patient_id.tolist())) == 12
    for patient in set(store.patient_id.tolist()):
        assert len(set(store.split[store.patient_id == patient].tolist())) == 1
    text = medical.inspect_store(store, tmp_path / "montage.png")
    assert "patients shared between splits: none" in text and "preprocessed as: generic 24" in text


def test_train_test_only_source_gets_validation_carved_from_train_patients(medical, tmp_path):
    _subfolder_pngs(tmp_path / "data", n_patients=40)
    rows = ["path,label,patient,split"]
    for path in sorted((tmp_path / "data").rglob("*.png")):
        patient = path.stem.split("_")[0]
        split = "test" if int(patient[1:]) % 4 == 0 else "train"
        rows.append(f"{path.relative_to(tmp_path / 'data')},{path.parent.name},{patient},{split}")
    (tmp_path / "data" / "labels.csv").write_text("\n".join(rows) + "\n")
    source = {"kind": "folder", "root": str(tmp_path / "data"), "csv": "labels.csv", "label_columns": ["label"],
              "patient_column": "patient", "split_column": "split"}
    store = medical.load_medical_store(_medical_config(medical, tmp_path, source, split_seed=1), "given")
    given = store.meta["source_split"]
    assert np.array_equal(store.split == "test", given == "test")  # the source's test split is kept as is
    val = store.split == "val"
    assert set(given[val].tolist()) == {"train"} and val.any()
    assert not set(store.patient_id[val]) & set(store.patient_id[store.split == "train"])  # patient-level
    assert abs(len(set(store.patient_id[val])) - 0.125 * 30) <= 1  # val / (train + val) of split_fractions
    assert set(store.labels[torch.from_numpy(val)].tolist()) == {0, 1}  # stratified
    assert any("validation was carved from train" in note for note in store.notes)
    again = medical.load_medical_store(_medical_config(medical, tmp_path, source, split_seed=1), "given")
    assert np.array_equal(again.split, store.split)

    unused = medical.load_medical_store(_medical_config(medical, tmp_path, dict(source, split_column=None)), "g")
    assert any("'split' column that is not used" in note and "split_column: split" in note for note in unused.notes)
    assert not np.array_equal(unused.split == "test", given == "test")  # radssl's own patient-level splits


def test_unlabelled_images_of_test_and_carved_val_patients_never_reach_pretraining(medical, tmp_path):
    """The source's own splits: every patient has two labelled images plus one unlabelled one; a test patient's
    unlabelled image, and those of patients carved into val, are left out of pretraining, counted and noted."""
    _subfolder_pngs(tmp_path / "data", n_patients=40, per_patient=3)
    rows = ["path,label,patient,split"]
    for path in sorted((tmp_path / "data").rglob("*.png")):
        patient, k = path.stem.split("_")
        split = "unlabelled" if k == "2" else "test" if int(patient[1:]) % 4 == 0 else "train"
        label = "" if split == "unlabelled" else path.parent.name
        rows.append(f"{path.relative_to(tmp_path / 'data')},{label},{patient},{split}")
    (tmp_path / "data" / "labels.csv").write_text("\n".join(rows) + "\n")
    source = {"kind": "folder", "root": str(tmp_path / "data"), "csv": "labels.csv", "label_columns": ["label"],
              "patient_column": "patient", "split_column": "split"}
    store = medical.load_medical_store(_medical_config(medical, tmp_path, source, split_seed=1), "given")
    held_out = set(store.patient_id[(store.split == "val") | (store.split == "test")].tolist())
    assert len(held_out) > 10 and (store.split == "val").any()  # 10 test patients plus the carved val ones
    assert not held_out & set(store.patient_id[store.pretrain_indices()].tolist())
    dropped = store.held_out_patient_rows()
    assert len(dropped) == len(held_out)  # each held-out patient's one unlabelled image
    assert set(store.split[dropped].tolist()) == {"unlabelled"}
    assert any(note.startswith(f"{len(held_out)} train/unlabelled image(s) of patients who also have val or test")
               for note in store.notes)
    assert store.describe()["pretrain_rows_of_held_out_patients"] == len(held_out)
