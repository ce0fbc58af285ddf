"""Weights and embeddings out: every export loads in its own library in a process where radssl cannot be imported
and gives radssl's features to 1e-5; unsupported combinations fail clearly; ``radssl embed`` writes one row per image."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from radssl.cli import main
from radssl.data.store import normalise_for_backbone
from radssl.errors import ConfigError
from radssl.models.registry import build_backbone
from radssl.transfer.export import export_backbone, supported_targets
from radssl.transfer.initialisation import initialise_backbone

# Runs with `python -I` (no PYTHONPATH, no user site) and an import hook that refuses radssl, so the editable
# install in the venv cannot leak in: only torch / timm / transformers / MONAI / onnxruntime are there to load with.
LOADER = r'''
import importlib.abc, json, os, sys
class _NoRadssl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "radssl" or name.startswith("radssl."):
            raise ModuleNotFoundError("radssl is blocked in this export check")
        return None
sys.meta_path.insert(0, _NoRadssl())
try:
    import radssl  # noqa: F401
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("radssl is importable")
import numpy as np
for folder, pixels_file, out_file in json.loads(sys.argv[1]):
    spec = json.load(open(os.path.join(folder, "radssl_export.json")))
    convention, target = spec["input"], spec["target"]
    x = np.load(pixels_file).astype(np.float32)
    os.chdir(folder)
    scope = {}
    exec(spec["load"].split("; features =")[0], scope)  # the documented loading snippet, as a user would run it
    if target == "onnx":
        shape = (1, -1) + (1,) * (x.ndim - 2)
        x = (x - np.array(convention["mean"], np.float32).reshape(shape)) / np.array(convention["std"], np.float32).reshape(shape)
        features = scope["s"].run(None, {"images": x})[0]
    else:
        import torch
        import torch.nn.functional as F
        t = torch.from_numpy(x)
        if convention["size"] and list(t.shape[2:]) != list(convention["size"]) and not convention["resize"].startswith("none"):
            t = F.interpolate(t, size=convention["size"], mode="bilinear" if t.ndim == 4 else "trilinear", align_corners=False)
        if convention["grey_to_channels"] == "replicate":
            t = t.expand(-1, convention["channels"], *t.shape[2:])
        shape = (1, -1) + (1,) * (t.ndim - 2)
        t = (t - torch.tensor(convention["mean"]).view(shape)) / torch.tensor(convention["std"]).view(shape)
        with torch.no_grad():
            if target == "hf":  # the documented read-out (class token or pooler output)
                features = eval(spec["load"].split("; features = ")[1], {"m": scope["m"], "x": t})
            else:
                features = scope["m"](t)
        features = features.numpy()
    np.save(out_file, features)
print("loaded without radssl:", sorted(sys.modules).count("radssl"))
'''


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _run_in_library(jobs: list[tuple[Path, torch.Tensor, torch.Tensor]], tmp_path: Path) -> dict[str, np.ndarray]:
    """Run LOADER once on (export folder, [0, 1] pixels, radssl features) triples: folder name → library features.

    One process for every export: importing torch, timm, transformers, MONAI and onnxruntime costs most of the time.
    """
    args = []
    for i, (folder, pixels, _) in enumerate(jobs):
        np.save(tmp_path / f"pixels{i}.npy", pixels.numpy())
        args.append([str(folder), str(tmp_path / f"pixels{i}.npy"), str(tmp_path / f"features{i}.npy")])
    done = subprocess.run([sys.executable, "-I", "-c", LOADER, json.dumps(args)], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded without radssl: 0" in done.stdout
    return {folder.name: np.load(tmp_path / f"features{i}.npy") for i, (folder, _, _) in enumerate(jobs)}


def _features(backbone: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(normalise_for_backbone(pixels))


NATIVE = {
    "resnet18": (dict(in_channels=1, image_size=32, small_input=False), (32, 32)),
    "vit_tiny": (dict(in_channels=1, image_size=32, options={"depth": 2}), (32, 32)),
    "resnet18_3d": (dict(in_channels=1, image_size=(12, 16, 16), options={"widen_factor": 0.125}), (12, 16, 16)),
}


def _native_jobs(root: Path) -> list[tuple[Path, torch.Tensor, torch.Tensor]]:
    jobs = []
    for family, (knobs, size) in NATIVE.items():
        torch.manual_seed(1)
        backbone = build_backbone(family, **knobs).eval()
        with torch.no_grad():  # non-trivial BatchNorm statistics, so eval-mode BN is part of what must match
            for module in backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
        pixels = torch.rand(3, 1, *size)
        ours = _features(backbone, pixels)
        for target in supported_targets(backbone):
            jobs.append((export_backbone(backbone, target, root / f"native-{family}-{target}"), pixels, ours))
    return jobs


def _foundation_jobs(root: Path) -> list[tuple[Path, torch.Tensor, torch.Tensor]]:
    import torchvision
    from monai.networks.nets import resnet10

    from test_transfer_foundation import _tiny_hf, _tiny_timm_vit

    torch.manual_seed(2)
    _tiny_hf(root / "dino", "dinov2")
    _tiny_timm_vit(root / "tvit")
    torch.save(torchvision.models.resnet18().state_dict(), root / "r18.pth")
    torch.save(resnet10(spatial_dims=3, n_input_channels=1, widen_factor=0.25, feed_forward=False).state_dict(),
               root / "med.pt")
    (root / "med.pt.json").write_text(json.dumps({"model_kwargs": {"widen_factor": 0.25}}))
    jobs = []
    for text, size in ((f"hf:{root / 'dino'}", (28, 28)), (f"timm:{root / 'tvit'}", (28, 28)),
                       (f"torchvision:resnet18:{root / 'r18.pth'}", (40, 40)),
                       (f"monai:resnet10:{root / 'med.pt'}", (8, 16, 16))):
        backbone = initialise_backbone(text, in_channels=1, image_size=size)
        pixels = torch.rand(2, 1, *size)
        target = text.partition(":")[0]
        out = export_backbone(backbone, target, root / f"foundation-{target}", backbone.provenance)
        assert json.loads((out / "radssl_export.json").read_text())["sha256"] == backbone.provenance["sha256"]
        jobs.append((out, pixels, _features(backbone, pixels)))
    return jobs


@pytest.fixture(scope="module")
def in_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
    """(export folder name → features computed by the target library without radssl, → radssl's features)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("exports")
    jobs = _native_jobs(root) + _foundation_jobs(root)
    return _run_in_library(jobs, root), {folder.name: ours for folder, _, ours in jobs}


@pytest.mark.slow  # one subprocess importing torch, timm, transformers, MONAI and onnxruntime: a minute on a busy CPU
def test_radssl_backbones_load_in_every_library_that_fits_them(in_library) -> None:  # noqa: ANN001
    theirs, ours = in_library
    native = sorted(name for name in ours if name.startswith("native-"))
    assert native == sorted(f"native-{family}-{target}" for family, targets in (
        ("resnet18", ("torchvision", "timm", "torchscript", "onnx")), ("vit_tiny", ("timm", "hf", "torchscript", "onnx")),
        ("resnet18_3d", ("monai", "torchscript", "onnx"))) for target in targets)
    for name in native:
        np.testing.assert_allclose(theirs[name], ours[name].numpy(), atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.slow  # shares the subprocess above
def test_foundation_backbones_export_back_to_their_library(in_library) -> None:  # noqa: ANN001
    theirs, ours = in_library
    names = sorted(name for name in ours if name.startswith("foundation-"))
    assert names == ["foundation-hf", "foundation-monai", "foundation-timm", "foundation-torchvision"]
    for name in names:
        np.testing.assert_allclose(theirs[name], ours[name].numpy(), atol=1e-5, rtol=0, err_msg=name)


def test_unsupported_targets_fail_before_writing(tmp_path: Path) -> None:
    small = build_backbone("small_cnn", in_channels=1, image_size=16)
    with pytest.raises(ConfigError, match="no timm equivalent — targets that fit it: torchscript, onnx"):
        export_backbone(small, "timm", tmp_path / "x")
    cifar_stem = build_backbone("resnet18", in_channels=1, image_size=28, small_input=True)
    with pytest.raises(ConfigError, match="no torchvision equivalent"):
        export_backbone(cifar_stem, "torchvision", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config.yaml, final checkpoint) of a 2-step SimCLR run on small synthetic data, through the CLI."""
    root = tmp_path_factory.mktemp("run")
    config = root / "config.yaml"
    config.write_text(
        "data: {source: synthetic, n_patients: 12, images_per_patient: 2, image_size: 16}\n"
        "model: {backbone: small_cnn, options: {width: 4}}\n"
        f"output_dir: {root / 'out'}\n"
        "train: {steps: 2, batch_size: 8, accelerator: cpu, devices: 1, progress_bar: false}\n"
        "eval: {enabled: false}\n")
    assert main(["pretrain", "--config", str(config)]) == 0
    return config, root / "out" / "checkpoints" / "final.pt"


def test_export_command_records_method_and_data(pretrained_run, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    _, checkpoint = pretrained_run
    assert main(["export", str(checkpoint), "--to", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    spec = json.loads((tmp_path / "ts" / "radssl_export.json").read_text())
    state = torch.load(checkpoint, weights_only=False)
    assert spec["method"] == "simclr" and spec["data_fingerprint"] == state["data_fingerprint"]
    assert spec["input"]["channels"] == 1 and spec["input"]["size"] == [16, 16]
    assert "torch.jit.load" in (tmp_path / "ts" / "README.md").read_text()
    assert main(["export", str(checkpoint), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "targets that fit it: torchscript, onnx" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".parquet", ".npz", ".csv"])
def test_embed_writes_one_row_per_image(pretrained_run, tmp_path: Path, suffix: str) -> None:  # noqa: ANN001
    from radssl.config import load_config
    from radssl.data.build import build_store
    from radssl.transfer.features import extract_features

    config, checkpoint = pretrained_run
    out = tmp_path / f"emb{suffix}"
    assert main(["embed", str(config), "--checkpoint", str(checkpoint), "--out", str(out), "--batch-size", "5"]) == 0
    store = build_store(load_config(config).data)
    expected = extract_features(initialise_backbone(f"ssl:{checkpoint}"), store.images).numpy()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out)
        embedding = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        columns = {name: np.asarray(table.column(name).to_pylist()) for name in ("row", "patient_id", "split", "label")}
        assert b"data_fingerprint" in table.schema.metadata[b"radssl"]
    elif suffix == ".npz":
        data = np.load(out)
        embedding, columns = data["embedding"], {k: data[k] for k in ("row", "patient_id", "split", "label")}
    else:
        import csv

        rows = list(csv.DictReader(out.open()))
        embedding = np.array([[float(r[f"e{i}"]) for i in range(expected.shape[1])] for r in rows])
        columns = {k: np.array([r[k] for r in rows]) for k in ("row", "patient_id", "split", "label")}
        columns["row"], columns["label"] = columns["row"].astype(int), columns["label"].astype(int)
    np.testing.assert_allclose(embedding, expected, atol=1e-6)
    np.testing.assert_array_equal(columns["row"], np.arange(len(store)))
    np.testing.assert_array_equal(columns["patient_id"], store.patient_id)
    np.testing.assert_array_equal(columns["split"], store.split)
    np.testing.assert_array_equal(columns["label"], store.labels.numpy())
