"""Pretraining end to end from a PNG+CSV folder and from a DICOM folder, through the same pipeline.

Images are real chest X-rays (PneumoniaMNIST via RADSSL_DATA_DIR) written as files by the test; without the data
the same test runs on synthetic images, so the pipeline is checked everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import real_or_synthetic_images, write_dicom_folder, write_png_csv_folder

from radssl.config import load_config
from radssl.data.build import build_store
from radssl.engine.pretrain import pretrain

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
    assert result.checkpoint.is_file()
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0.0 <= evaluation["ssl"]["linear_probe"]["test"]["auc"] <= 1.0
    return evaluation


def test_pretrain_from_png_csv_folder_with_patient_ids(tmp_path: Path) -> None:
    images, labels, _ = real_or_synthetic_images(120)
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


def test_pretrain_from_dicom_folder_with_label_csv(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    images, labels, _ = real_or_synthetic_images(120)
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
