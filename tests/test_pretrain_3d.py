"""Every registered 3D-capable method pretrains on small synthetic volumes through the engine (falling loss, a
checkpoint transfer rebuilds by spec); methods that cannot do 3D are refused before compute, writing nothing.

New methods are picked up from the registry automatically (by ``requirements(...).spatial_dims``), like
tests/test_methods_train.py does for 2D. Slow tests at the bottom run ``radssl pretrain`` on real volumes
(VesselMNIST3D, the BraTS case as 4 sequences, MSD hippocampus) found through ``RADSSL_DATA_DIR``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from support import SHORT_RUN_METHOD, SHORT_RUN_TRANSIENT_STEPS

from radssl.config import PretrainConfig
from radssl.data.build import build_store
from radssl.data.store import ImageStore
from radssl.engine.pretrain import pretrain
from radssl.errors import ConfigError
from radssl.methods.registry import METHODS, method_class
from radssl.transfer.initialisation import initialise_backbone
from radssl.views.batch import ViewRequirements

STEPS = 20
SIZE = 16


def _requirements(name: str) -> ViewRequirements:
    cls = method_class(name)
    return cls.requirements(cls.Params())


def _methods(dims_3d: bool) -> list[str]:
    """Image-only registered methods that do (or do not) declare 3D support."""
    return [name for name in sorted(METHODS)
            if not _requirements(name).text and (3 in _requirements(name).spatial_dims) == dims_3d]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


DATA = {"source": "synthetic3d", "n_patients": 40, "volumes_per_patient": 2, "volume_size": SIZE}


@pytest.fixture(scope="module")
def volumes() -> ImageStore:
    """The store every run's ``data`` section describes, built once for the module."""
    return build_store(PretrainConfig.model_validate({"data": DATA}).data)


def _config(name: str, output_dir: Path, **sections: Any) -> PretrainConfig:
    raw: dict[str, Any] = {
        "seed": 0,
        "output_dir": str(output_dir),
        "data": DATA,
        "model": {"backbone": "small_cnn_3d", "options": {"width": 8}},
        # SimCLR's preset was chosen on 2D radiographs at batch 256 for ≥ 87 steps (benchmarks/preset_sweep.py); on
        # these volumes at batch 32 over 20 steps the loss rises with its τ 0.2 (4.64 → 5.08 as shipped,
        # 4.49 → 4.64 with LARS),
        # so the smoke test runs SimCLR on the engine defaults (LARS, warm-up + cosine, τ 0.1), which move here.
        "method": {"name": name, **({"preset": False} if name == "simclr" else {}), **SHORT_RUN_METHOD.get(name, {})},
        # channels_last off: a 20-step loss trend is a smoke check, kept independent of the memory-format speed-up
        # (tests/test_engine_pretrain.py checks channels-last 3D runs against their reloaded checkpoint).
        "train": {"steps": STEPS, "batch_size": 32, "log_every": 1, "checkpoint_every": 10, "progress_bar": False,
                  "accelerator": "cpu", "devices": 1, "channels_last": False},
        "eval": {"enabled": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return PretrainConfig.model_validate(raw)


def _metrics(output_dir: Path) -> list[dict[str, str]]:
    with open(output_dir / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("name", _methods(dims_3d=True))
def test_3d_method_pretrains_and_its_checkpoint_transfers(tmp_path: Path, name: str, volumes: ImageStore,
                                                          one_fixed_batch) -> None:  # noqa: ANN001
    config = one_fixed_batch(_config(name, tmp_path / name))
    result = pretrain(config, store=volumes)
    losses = [float(row["loss"]) for row in _metrics(tmp_path / name)]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    skip = SHORT_RUN_TRANSIENT_STEPS.get(name, 0)
    first, last = sum(losses[skip : skip + 5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"{name}: loss did not fall on volumes ({first:.4f} → {last:.4f}; views {config.views.policy})"
    assert result.backbone_spec.spatial_dims == 3 and result.backbone_spec.family == "small_cnn_3d"

    loaded = initialise_backbone(f"ssl:{result.checkpoint}").eval()
    exported = result.backbone.eval()
    x = torch.randn(2, 1, SIZE, SIZE, SIZE)
    # The trained model runs channels-last (NDHWC), the rebuilt one contiguous: same maths, other summation order.
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), exported(x), rtol=1e-4, atol=1e-4)
        for theirs, ours in zip(loaded.forward_features(x), exported.forward_features(x)):
            torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_neighbouring_crops_with_ct_views_pretrain_and_log_their_distance(tmp_path: Path, volumes: ImageStore) -> None:
    views = {"policy": "neighbouring_crops", "region_size": 12, "max_centre_distance": 3, "output_size": 12,
             "modality": "ct"}
    result = pretrain(_config("simclr", tmp_path / "run", views=views), store=volumes)
    rows = _metrics(tmp_path / "run")
    distances = [float(row["crop_centre_distance"]) for row in rows]
    assert all(0.0 < d <= 3.0 for d in distances)
    losses = [float(row["loss"]) for row in rows]
    assert sum(losses[-5:]) < sum(losses[:5])
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["backbone_spec"]["image_size"] == [SIZE] * 3  # the encoder is specified for the stored volumes
    assert result.backbone(torch.randn(2, 1, 12, 12, 12)).shape == (2, 64)


class _TwoDOnly(method_class("simclr")):  # type: ignore[misc]
    """SimCLR declaring 2D only: stands for any method that cannot run on volumes."""

    @classmethod
    def requirements(cls, params: Any) -> ViewRequirements:
        return ViewRequirements(spatial_dims=(2,))


@pytest.mark.parametrize("name", ["simclr_2d_only", *_methods(dims_3d=False)])
def test_a_2d_only_method_is_refused_on_volumes_before_anything_is_written(
        tmp_path: Path, name: str, volumes: ImageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    if name == "simclr_2d_only":
        import radssl.methods.registry as registry

        monkeypatch.setitem(registry.METHODS, name, "radssl.methods.simclr:SimCLR")
        real = registry.method_class
        monkeypatch.setattr(registry, "method_class", lambda n: _TwoDOnly if n == name else real(n))
        import radssl.engine.pretrain as engine

        monkeypatch.setattr(engine, "method_class", registry.method_class)
    config = _config(name, tmp_path / "out")
    with pytest.raises(ConfigError, match="runs on 2D data but the views are 3D"):
        pretrain(config, store=volumes)
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused run"


# ------------------------------------------------------------------------------------------------ real data (slow)
SUBPROCESS_TIMEOUT_S = 840
"""Below pytest's global timeout (900 s, pyproject.toml), so a hung ``radssl pretrain`` fails with its output."""


def _radssl_pretrain(config: dict[str, Any], tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Run the ``radssl pretrain`` command on a YAML config; returns run.json and metrics.csv rows."""
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "radssl.cli", "pretrain", "--config", str(path)],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = Path(config["output_dir"])
    return json.loads((output / "run.json").read_text()), _metrics(output)


def _train(steps: int, batch: int) -> dict[str, Any]:
    return {"steps": steps, "batch_size": batch, "log_every": 1, "checkpoint_every": steps, "progress_bar": False,
            "accelerator": "cpu", "devices": 1, "threads": 1}


@pytest.mark.slow
def test_vesselmnist3d_pretrains_with_the_small_3d_cnn(tmp_path: Path, medmnist_file) -> None:  # noqa: ANN001
    data_dir = medmnist_file("vesselmnist3d.npz").parent
    from radssl.data.medmnist import load_medmnist

    store = load_medmnist("vesselmnist3d", 28, data_dir, allow_download=False)
    assert store.images.shape[1:] == (1, 28, 28, 28) and store.images.dtype == torch.uint8
    config = {"output_dir": str(tmp_path / "vessel"), "data": {"source": "medmnist", "name": "vesselmnist3d",
                                                                  "root": str(data_dir), "download": False},
              "model": {"backbone": "small_cnn_3d", "options": {"width": 8}},
              "method": {"name": "simclr", "preset": False}, "views": {"modality": "mr", "bias_field_p": 0.0},
              "train": _train(12, 32), "eval": {"enabled": True, "compare_random": False}}
    record, rows = _radssl_pretrain(config, tmp_path)
    assert record["backbone_spec"]["family"] == "small_cnn_3d" and record["backbone_spec"]["spatial_dims"] == 3
    assert record["pretrain_images"] == 1335  # the train split only
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4])
    evaluation = json.loads((tmp_path / "vessel" / "eval.json").read_text())  # the quick kNN/probe ran on volumes
    assert evaluation, "eval.json is empty"


def _nifti_config(tmp_path: Path, source: dict[str, Any], preprocess: dict[str, Any], views: dict[str, Any],
                  model: dict[str, Any], steps: int, batch: int) -> dict[str, Any]:
    return {"output_dir": str(tmp_path / "run"),
            "data": {"name": "volumes", "source": source, "preprocess": preprocess,
                     "cache_dir": str(tmp_path / "cache"), "split_fractions": [1.0, 0.0, 0.0], "task": {"kind": "none"}},
            "model": model, "method": {"name": "simclr", "preset": False},  # SimCLR's preset is a 2D choice
            "views": views, "train": _train(steps, batch),
            "eval": {"enabled": False}}


@pytest.mark.slow
def test_brats_case_pretrains_as_four_sequences(tmp_path: Path, data_dir: Path) -> None:
    root = data_dir / "nifti" / "brats20_case001"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    # one case: the pretraining "set" is that one 4-sequence volume; neighbouring crops make pairs inside it
    config = _nifti_config(
        tmp_path, {"kind": "nifti", "root": str(root), "sequences": ["_flair", "_t1", "_t1ce", "_t2"],
                   "modality": "MR"},
        {"modality": "mr", "target_size": [40, 64, 64], "resize": "pad"},
        {"policy": "neighbouring_crops", "modality": "mr", "region_size": [24, 40, 40], "max_centre_distance": 8,
         "output_size": 24},
        {"backbone": "segresnet_encoder_3d"}, steps=3, batch=2)
    parsed = PretrainConfig.model_validate(config)
    store = build_store(parsed.data)  # the NIfTI reader + MR preprocessing + cache, as `radssl pretrain` runs them
    # The smallest batch is 2 and the engine draws rows without replacement, but the BraTS folder holds one case:
    # the store carries that volume twice (neighbouring crops still make a different pair from each copy).
    assert store.images.shape == (1, 4, 40, 64, 64), store.images.shape
    twice = replace(store, images=store.images.repeat(2, 1, 1, 1, 1), labels=store.labels.repeat(2),
                    split=np.repeat(store.split, 2), patient_id=np.repeat(store.patient_id, 2),
                    meta={k: np.repeat(v, 2, axis=0) for k, v in store.meta.items()}, _fingerprint=None)
    result = pretrain(parsed, store=twice)
    assert result.backbone_spec.in_channels == 4 and result.backbone_spec.family == "segresnet_encoder_3d"
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 3 and all(np.isfinite(float(r["loss"])) for r in rows)
    assert all(float(r["crop_centre_distance"]) <= 8.0 for r in rows)
    loaded = initialise_backbone(f"ssl:{result.checkpoint}", in_channels=4)
    assert loaded.spec == result.backbone_spec
    x = torch.randn(1, 4, 24, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), result.backbone.eval()(x))


@pytest.mark.slow
def test_hippocampus_volumes_of_varied_shapes_are_padded_to_one_size_and_pretrain(tmp_path: Path,
                                                                                  data_dir: Path) -> None:
    root = data_dir / "msd" / "task04_hippocampus"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    config = _nifti_config(
        tmp_path, {"kind": "nifti", "root": str(root), "pattern": "imagesTr/*.nii.gz", "modality": "MR",
                   "patient_from": "file"},
        {"modality": "mr", "target_size": [32, 48, 32], "resize": "pad"},
        {"modality": "mr", "output_size": 32}, {"backbone": "small_cnn_3d", "options": {"width": 8}},
        steps=10, batch=16)
    record, rows = _radssl_pretrain(config, tmp_path)
    assert record["data"]["shape"] == [32, 48, 32] and record["pretrain_images"] == 260
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])
