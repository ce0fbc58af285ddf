"""Pretraining and a study end to end from a PNG+CSV folder and from a DICOM folder, through the same pipeline.

Images are real chest X-rays (PneumoniaMNIST via RADSSL_DATA_DIR, the ``medmnist_file`` fixture) written as files
by the test; without the data these tests are reported as skipped, never run on stand-in images. (The same
pipeline on synthetic images: test_engine_pretrain.py, test_data_folder.py, test_data_dicom.py.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score
from support import chest_xrays, write_dicom_folder, write_png_csv_folder

from radssl.config import load_config
from radssl.data.build import build_store
from radssl.engine.pretrain import backbone_for, pretrain
from radssl.evaluation.quick import evaluate_pretraining
from radssl.study.config import StudyConfig
from radssl.study.results_store import ResultsStore
from radssl.study.runner import run_study

COMMON = [
    "model.backbone=small_cnn",
    "train.accelerator=cpu",
    "train.steps=4",
    "train.batch_size=32",
    "train.progress_bar=false",
    "optim.optimizer=adamw",
    "optim.lr=0.001",
    "optim.lr_scaling=none",
]


def _run(tmp_path: Path, data_overrides: list[str]) -> dict:
    config = load_config(None, [f"output_dir={tmp_path / 'run'}", *COMMON, *data_overrides])
    store = build_store(config.data)
    assert len(store) == 120 and store.task.kind == "binary"
    patients_per_split = {s: set(store.patient_id[store.indices(s)]) for s in ("train", "val", "test")}
    assert not (patients_per_split["train"] & patients_per_split["test"]), "no patient in two splits"
    result = pretrain(config, store=store)
    evaluate_pretraining(result, store, config)  # what `radssl pretrain` does after the engine returns
    checkpoint = torch.load(result.checkpoint, weights_only=True)
    assert checkpoint["data_fingerprint"] == store.fingerprint() and checkpoint["step"] == 4
    torch.manual_seed(config.seed)
    initial = backbone_for(config, store).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in checkpoint["backbone"].items()), "pretraining changed nothing"
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    for arm in ("ssl", "random_init"):
        for protocol in ("knn", "linear_probe"):
            for split in ("val", "test"):
                assert math.isfinite(evaluation[arm][protocol][split]["auc"]), (arm, protocol, split)
        assert "val split" in evaluation[arm]["validation"]  # the store has one: C is chosen on it
    return evaluation


def test_pretrain_from_png_csv_folder_with_patient_ids(tmp_path: Path, medmnist_file) -> None:  # noqa: ANN001
    images, labels = chest_xrays(medmnist_file("pneumoniamnist.npz"), 120)
    csv = write_png_csv_folder(tmp_path / "pngs", images, labels)
    _run(
        tmp_path,
        [
            "data.name=png-folder",
            f"data.source={{kind: folder, root: {tmp_path / 'pngs'}, csv: {csv}, label_columns: [label],"
            " classes: [normal, pneumonia], patient_column: patient_id}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.preprocess={modality: xray}",
        ],
    )


def test_pretrain_from_dicom_folder_with_label_csv(tmp_path: Path, medmnist_file) -> None:  # noqa: ANN001
    images, labels = chest_xrays(medmnist_file("pneumoniamnist.npz"), 120)
    label_csv = write_dicom_folder(tmp_path / "dicom", images, labels)
    _run(
        tmp_path,
        [
            "data.name=dicom-folder",
            f"data.source={{kind: dicom, root: {tmp_path / 'dicom'}, label_csv: {label_csv}, label_key: patient_id}}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.preprocess={modality: xray, target_size: [28, 28]}",
        ],
    )


def _png_source(tmp_path: Path, npz: Path) -> dict:
    images, labels = chest_xrays(npz, 120)
    csv = write_png_csv_folder(tmp_path / "pngs", images, labels)
    return {"kind": "folder", "root": str(tmp_path / "pngs"), "csv": str(csv), "label_columns": ["label"],
            "classes": ["normal", "pneumonia"], "patient_column": "patient_id"}


def _dicom_source(tmp_path: Path, npz: Path) -> dict:
    images, labels = chest_xrays(npz, 120, seed=1)
    label_csv = write_dicom_folder(tmp_path / "dicom", images, labels)
    return {"kind": "dicom", "root": str(tmp_path / "dicom"), "label_csv": str(label_csv), "label_key": "patient_id"}


@pytest.mark.parametrize("make_source", [_png_source, _dicom_source], ids=["png_csv", "dicom"])
def test_study_runs_from_files(tmp_path: Path, make_source, medmnist_file) -> None:  # noqa: ANN001
    data = {"name": "files", "source": make_source(tmp_path, medmnist_file("pneumoniamnist.npz")),
            "cache_dir": str(tmp_path / "cache"),
            "preprocess": {"modality": "xray", "target_size": [28, 28]}}
    config = StudyConfig.model_validate(
        {
            "name": "files",
            "output_dir": str(tmp_path / "study"),
            "data": data,
            "model": {"backbone": "small_cnn"},
            "pretraining": [{"name": "simclr", "optim": {"optimizer": "adamw", "lr": 0.001, "lr_scaling": "none"},
                             "train": {"steps": 3, "batch_size": 32, "accelerator": "cpu", "progress_bar": False}}],
            "initialisations": ["random", "ssl:simclr"],
            "label_fractions": [0.5, 1.0],
            "seeds": [0],
            "protocols": {"linear": {}, "knn": {"k": 5}},
            "bootstrap_samples": 100,
        }
    )
    output = run_study(config, log=lambda _: None)
    with ResultsStore(output / "results.sqlite") as store:
        rows = store.cells("files")
    cells = {row["cell_key"] for row in rows}
    assert len(cells) == 2 * 2 * 2  # inits × fractions × protocols, internal test set
    n_test = len(build_store(config.data).indices("test"))
    with ResultsStore(output / "results.sqlite") as store:
        for row in (r for r in rows if r["metric"] == "auc"):
            # the stored AUC is the AUC of the stored per-case scores on the whole internal test split
            cases = store.predictions("files", row["cell_key"])
            assert cases is not None and len(cases.y_true) == n_test
            assert row["value"] == pytest.approx(roc_auc_score(cases.y_true, cases.y_score), abs=1e-6)
            assert row["ci_low"] <= row["value"] <= row["ci_high"]
    assert (output / "report" / "report.html").is_file()
