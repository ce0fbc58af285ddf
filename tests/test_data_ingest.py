"""Parallel, bounded-memory ingest (radssl.data.ingest): the cache does not depend on the worker count and is
the one the single-process reader built, memory does not grow with the files, and ``kill -9`` leaves nothing
half-written."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radssl.data.cache import IMAGES_FILE, META_FILE, TABLE_EXTRA_KEYS, load_or_build_cache
from radssl.data.ingest import NPY_HEADER_BYTES, ingest_units, records_as_units
from radssl.data.medical import MedicalDataConfig, load_medical_store, read_source, source_files
from radssl.data.preprocess import PreprocessConfig, preprocess_mask, preprocess_record
from radssl.data.records import BadFileLog, Record
from radssl.errors import DataError

from support import load_benchmark_script

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _pngs(root: Path, n: int, size: int = 12, bad: tuple[int, ...] = ()) -> Path:
    """``n`` grey PNGs in two class folders (image ``i`` holds ``i`` in its corner); ``bad`` ones are not PNGs."""
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        folder = root / ("normal" if i % 2 else "pneumonia")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:04d}.png"
        if i in bad:
            path.write_bytes(b"not a png " * 10)
            continue
        image = ((xx * 7 + yy * 3 + i) % 256).astype(np.uint8)
        image[0, 0] = i % 256
        Image.fromarray(image).save(path)
    return root


def _entry(store) -> tuple[bytes, dict, list]:
    """(images.npy pixel bytes, meta columns, skipped files) of the cache entry behind a store."""
    entry = Path(store.origin)
    pixels = np.load(entry / IMAGES_FILE, mmap_mode="r")
    meta = json.loads((entry / META_FILE).read_text())
    skipped = json.loads((entry / "bad_files.json").read_text())["files"]
    return np.ascontiguousarray(pixels).tobytes(), meta["columns"], sorted(f["path"] for f in skipped)


def _legacy(config: MedicalDataConfig, cache: Path):
    """Today's single-process path: the reader decodes every record into one list, then the cache preprocesses."""
    source, pre = config.source, config.preprocess
    return load_or_build_cache(
        cache, "toy", source_files(source), source, pre.config_fingerprint(), lambda log: read_source(source, log),
        partial(preprocess_record, config=pre), on_bad_file=config.on_bad_file,
        preprocess_mask=partial(preprocess_mask, config=pre),
    )


def _sources(tmp_path: Path) -> dict[str, dict]:
    archive = load_benchmark_script("scale_ingest").make_archive
    _pngs(tmp_path / "png", 60, bad=(7, 41))
    archive(tmp_path / "dcm", 45, size=16, per_series=15)
    (tmp_path / "dcm" / "zz_corrupt.dcm").write_bytes(b"\0" * 300)
    return {
        "folder": {"kind": "folder", "root": str(tmp_path / "png")},
        "dicom_images": {"kind": "dicom", "root": str(tmp_path / "dcm")},
        "dicom_series": {"kind": "dicom", "root": str(tmp_path / "dcm"), "assemble": "series"},
    }


def test_worker_count_does_not_change_the_cache_and_matches_the_single_process_reader(tmp_path):
    for name, source in _sources(tmp_path).items():
        built = {}
        for workers in (1, 2):
            config = MedicalDataConfig(source=source, cache_dir=tmp_path / f"cache-{name}-{workers}",
                                       on_bad_file="skip", ingest_workers=workers,
                                       preprocess={"target_size": [15, 8, 8] if "series" in name else [8, 8]})
            store = load_medical_store(config, "toy")
            built[workers] = (store.fingerprint(), _entry(store), Path(store.origin).name)
        legacy = _legacy(config, tmp_path / f"cache-{name}-legacy")
        assert built[1] == built[2], name
        assert _entry(legacy) == built[2][1], name  # same rows, same order, same metadata, same skipped files
        assert Path(legacy.origin).name == built[2][2]  # same cache key
        pixels, columns, skipped = built[2][1]
        assert len(skipped) == (2 if name == "folder" else 1), (name, skipped)
        if name == "dicom_series":
            assert len(columns["path"]) == 3  # 45 slices → 3 series volumes
        else:
            assert len(columns["path"]) == (58 if name == "folder" else 45)
            assert len(set(columns["path"])) == len(columns["path"])


def test_a_bad_file_read_in_a_worker_is_raised_naming_it_and_nothing_is_cached(tmp_path):
    root = _pngs(tmp_path / "png", 80, bad=(37,))
    config = MedicalDataConfig(source={"kind": "folder", "root": str(root)}, cache_dir=tmp_path / "cache",
                               ingest_workers=2)
    with pytest.raises(DataError, match=r"img0037\.png: cannot decode image"):
        load_medical_store(config, "toy")
    assert not (tmp_path / "cache").exists()  # no entry, no .tmp- folder: the cache folder is as it was


def test_masks_widen_to_the_dtype_every_mask_needs(tmp_path):
    masks = [np.full((4, 4), i, np.uint8) for i in range(3)] + [np.full((4, 4), 300, np.int32)]
    records = [Record(pixels=np.full((4, 4), i, np.uint8), path=f"r{i}", extra={"mask": m}) for i, m in enumerate(masks)]
    result = ingest_units(records_as_units(records), lambda r: r.pixels[None], BadFileLog(), tmp_path, "toy",
                          "images.npy", "masks.npy", TABLE_EXTRA_KEYS, lambda r: r.extra["mask"], workers=1)
    stored = np.load(tmp_path / "masks.npy")
    assert result.masks and stored.dtype == np.int32 and stored.shape == (4, 4, 4)
    assert np.array_equal(stored, np.stack(masks).astype(np.int32))
    images = np.load(tmp_path / "images.npy", mmap_mode="r")
    assert images.shape == (4, 1, 4, 4) and images.offset == NPY_HEADER_BYTES
    assert [int(images[i].max()) for i in range(4)] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------- subprocesses
def _run(script: str, *args: str, timeout: float = 240) -> str:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


MEMORY_SCRIPT = """
    import json, resource, sys
    from pathlib import Path
    from radssl.data.medical import MedicalDataConfig, load_medical_store

    def build(root, cache):
        config = MedicalDataConfig(source={"kind": "folder", "root": root}, cache_dir=cache, ingest_workers=1,
                                   task={"kind": "none"})
        return load_medical_store(config, "big")

    build(sys.argv[1], sys.argv[3])  # warm-up on 2 files: every library imported, every code path run once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = build(sys.argv[2], sys.argv[3])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth_bytes": (after - before) * 1024, "images": len(store),
                      "dataset_bytes": store.images.numel() * store.images.element_size()}))
"""


def test_peak_memory_of_an_ingest_stays_far_below_the_dataset(tmp_path):
    """300 files of 320² (30 MB of pixels): the build's peak RSS grows by under a third of that (the
    single-list reader held every decoded image and every preprocessed one at once: > the dataset)."""
    _pngs(tmp_path / "small", 2, size=320)
    _pngs(tmp_path / "big", 300, size=320)
    report = json.loads(_run(MEMORY_SCRIPT, str(tmp_path / "small"), str(tmp_path / "big"), str(tmp_path / "cache")))
    assert report["images"] == 300 and report["dataset_bytes"] == 300 * 320 * 320
    assert report["growth_bytes"] < report["dataset_bytes"] / 3, report


KILL_SCRIPT = """
    import sys, time
    from functools import partial
    from pathlib import Path
    from radssl.data.cache import load_or_build_cache
    from radssl.data.folder import FolderSourceConfig, list_folder_files, plan_folder_units
    from radssl.data.preprocess import PreprocessConfig, preprocess_record

    def slow(record, config):  # forked workers find it in __main__; the cache key does not see the sleep
        time.sleep(0.02)
        return preprocess_record(record, config)

    if __name__ == "__main__":
        source = FolderSourceConfig(root=Path(sys.argv[1]))
        pre = PreprocessConfig()
        load_or_build_cache(Path(sys.argv[2]), "toy", list_folder_files(source), source, pre.config_fingerprint(),
                            None, partial(slow, config=pre), plan_units=partial(plan_folder_units, source), workers=2)
"""


def _build(root: Path, cache: Path):
    from radssl.data.folder import FolderSourceConfig, list_folder_files, plan_folder_units

    source, pre = FolderSourceConfig(root=root), PreprocessConfig()
    return load_or_build_cache(cache, "toy", list_folder_files(source), source, pre.config_fingerprint(), None,
                               partial(preprocess_record, config=pre), plan_units=partial(plan_folder_units, source),
                               workers=2)


def test_kill_9_mid_ingest_leaves_no_entry_and_a_rerun_builds_the_same_cache(tmp_path):
    root = _pngs(tmp_path / "png", 300, size=24)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(root), str(cache)], env=env,
                               start_new_session=True, stderr=subprocess.PIPE)
    try:
        rows_seen, deadline = 0, time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            partial_files = list(cache.glob(".tmp-*/" + IMAGES_FILE)) if cache.is_dir() else []
            rows_seen = max([(f.stat().st_size - NPY_HEADER_BYTES) // (24 * 24) for f in partial_files] + [0])
            if rows_seen >= 20:
                break
            time.sleep(0.01)
        assert process.poll() is None, f"the build ended before it could be killed: {process.stderr.read()[-2000:]}"
        assert 20 <= rows_seen < 300
        os.kill(process.pid, signal.SIGKILL)  # the building process only: its workers must follow it
        process.wait(timeout=30)
        assert [p.name for p in cache.iterdir() if not p.name.startswith(".tmp-")] == []  # no entry visible
        for _ in range(200):  # PR_SET_PDEATHSIG: the orphaned workers are killed too
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("worker processes outlived the killed build")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rerun = _build(root, cache)
    clean = _build(root, tmp_path / "clean")
    assert rerun.fingerprint() == clean.fingerprint() and len(rerun) == 300
    assert Path(rerun.origin).name == Path(clean.origin).name
    assert sorted(p.name for p in cache.iterdir()) == [Path(rerun.origin).name]  # the stale .tmp- folder is gone


VOLUME_SCRIPT = """
    import json, sys
    from pathlib import Path
    import numpy as np
    from radssl.data.cache import load_or_build_cache
    from radssl.data.records import ReadUnit, Record
    from radssl.data.slices import volumes_to_slices
    from radssl.data.store import row_chunks

    def volume(i):  # one 32×128×128 float16 CT volume (1 MB), made when its unit is read
        rng = np.random.default_rng(i)
        return [Record(pixels=rng.random((32, 128, 128), dtype=np.float32).astype(np.float16), path=f"ct{i:03d}")]

    def peak_kb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])

    units = [ReadUnit(f"ct{i:03d}", volume, (i,)) for i in range(int(sys.argv[2]))]
    store = load_or_build_cache(Path(sys.argv[1]), "ct", [], {"volumes": len(units)}, "none", None,
                                lambda record: record.pixels[None], plan_units=lambda log, scratch: units, workers=1)
    for chunk in row_chunks(store.images):  # every page of the mapped file resident once: the baseline holds it
        chunk.numpy().view(np.uint8).max()
    before = peak_kb()
    store.validate()
    digest = store.fingerprint()
    sliced = volumes_to_slices(store, keep="all")  # validated on creation
    sliced.fingerprint()
    print(json.dumps({"growth_bytes": (peak_kb() - before) * 1024, "shape": list(store.images.shape),
                      "dataset_bytes": store.images.numel() * 2, "slices": len(sliced), "digest": digest,
                      "shares_memory": sliced.images.data_ptr() == store.images.data_ptr()}))
"""


def test_a_volume_store_stays_memory_mapped_through_validation_fingerprint_and_slicing(tmp_path):
    """The 3D path with volumes larger than memory: float16 volumes (96 MB here) are checked for NaN, hashed and
    read as slices a chunk at a time, never copied whole (the old code held a full-size mask and a full copy)."""
    report = json.loads(_run(VOLUME_SCRIPT, str(tmp_path / "cache"), "96"))
    assert report["shape"] == [96, 1, 32, 128, 128] and report["slices"] == 96 * 32
    assert report["shares_memory"]  # the slices are a view of the mapped volumes
    assert report["growth_bytes"] < report["dataset_bytes"] / 4, report
    # Hashing by chunks gives the digest the whole array gave before (recorded data fingerprints stay valid).
    from radssl.data.cache import store_from_entry

    store = store_from_entry(next((tmp_path / "cache").iterdir()), "ct")
    whole = hashlib.sha256(str((tuple(store.images.shape), str(store.images.dtype))).encode())
    whole.update(store.images.numpy().tobytes())
    whole.update(store.labels.numpy().tobytes())
    whole.update("\x00".join(store.split.tolist()).encode())
    whole.update("\x00".join(store.patient_id.tolist()).encode())
    assert store.fingerprint() == report["digest"] == whole.hexdigest()


def test_nan_check_goes_a_chunk_at_a_time_and_names_the_first_bad_image(monkeypatch):
    """Validation never asks torch for a mask of the whole store (a full-size bool array for a store larger than
    RAM), and still finds the first image holding NaN across chunk borders."""
    import torch

    from radssl.data import store as store_module
    from radssl.data.store import ImageStore, TaskInfo

    seen: list[int] = []
    original = torch.isfinite

    def spy(tensor):
        seen.append(tensor.numel())
        return original(tensor)

    monkeypatch.setattr(store_module, "CHUNK_BYTES", 3 * 64 * 2)  # 3 images of 8×8 float16 per chunk
    monkeypatch.setattr(torch, "isfinite", spy)
    images = torch.zeros(10, 1, 8, 8, dtype=torch.float16)
    kwargs = dict(labels=torch.zeros(10, dtype=torch.int64), split=np.full(10, "train"), patient_id=np.full(10, ""),
                  task=TaskInfo("none", 0))
    ImageStore("ok", images, **kwargs)
    assert seen and max(seen) == 3 * 64
    images[7, 0, 5, 5] = float("nan")
    images[8, 0, 0, 0] = float("inf")
    with pytest.raises(DataError, match="first at sample index 7"):
        ImageStore("bad", images, **kwargs)
