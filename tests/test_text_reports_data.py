"""Reports as data: the synthetic generator's reports, report columns and report CSVs of file sources (joins,
counts, encodings, missing columns), and image–report pretraining of a user's own folder from a config alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from radssl.config import load_config
from radssl.data.build import build_store
from radssl.data.medical import inspect_store
from radssl.data.synthetic import (
    _NEGATIVE_TEMPLATES,
    SyntheticSpec,
    _sample_patients,
    finding_place,
    generate_radiographs,
    make_synthetic_store,
)
from radssl.errors import DataError


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_reports_describe_each_images_truth_and_leave_the_images_alone() -> None:
    spec = SyntheticSpec(n_patients=40, images_per_patient=3, image_size=32, reports=True, site=2)
    data = generate_radiographs(spec)
    plain = generate_radiographs(SyntheticSpec(n_patients=40, images_per_patient=3, image_size=32, site=2))
    assert np.array_equal(data["images"], plain["images"]) and "report" not in plain
    side, zone = finding_place(spec, _sample_patients(spec))
    rows_by_zone: dict[str, list[float]] = {"upper": [], "middle": [], "lower": []}
    for image, report in enumerate(data["report"]):
        patient, text = image // 3, report.lower()
        assert "site 2" in text
        if data["labels"][image] == 1:
            words = set(text.replace(",", " ").replace(".", " ").split())
            assert "nodul" in text and side[patient] in words and zone[patient] in words
            assert ({"left", "right"} - {side[patient]}).isdisjoint(words)
            # Independent of the generator's own bookkeeping: on a PA image the patient's left is the image's right.
            row, col = data["finding_center"][image]
            if abs(col - 16) > 3:
                assert side[patient] == ("left" if col > 16 else "right"), (report, col)
            rows_by_zone[str(zone[patient])].append(float(row))
        else:
            assert any(template in report for template in _NEGATIVE_TEMPLATES) and "left" not in text
    upper, middle, lower = (np.mean(rows_by_zone[z]) for z in ("upper", "middle", "lower"))
    assert upper < middle < lower, "upper-zone findings lie higher in the image than lower-zone ones"
    assert len(set(data["report"])) > 20, "phrasing varies"
    assert np.array_equal(generate_radiographs(spec)["report"], data["report"]), "seeded"


def test_synthetic_store_carries_and_counts_reports_only_when_asked() -> None:
    store = make_synthetic_store(SyntheticSpec(n_patients=10, images_per_patient=2, image_size=24, reports=True))
    assert store.describe()["reports"] == {"with_report": 20, "without_report": 0}
    plain = make_synthetic_store(SyntheticSpec(n_patients=10, images_per_patient=2, image_size=24))
    assert "report" not in plain.meta and "reports" not in plain.describe()
    config = load_config(None, ["data.source=synthetic", "data.reports=true", "data.n_patients=10",
                                "data.images_per_patient=2", "data.image_size=24"])
    assert np.array_equal(build_store(config.data).meta["report"], store.meta["report"])


# --------------------------------------------------------------------------------------------- folders
REPORTS = [
    "Left upper zone nodule, small.",
    "The lungs are clear.",
    "",  # no report for this image
    "Right lower zone opacity. Patient slightly rotated.",
]


def _folder(root: Path, n: int = 24, report_column: str = "findings", encoding: str = "utf-8",
            text: list[str] | None = None) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texts = text or [REPORTS[i % len(REPORTS)] + (f" Follow-up {i // 4}." if REPORTS[i % 4] else "") for i in range(n)]
    lines = [f"path,label,patient_id,{report_column}"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(root / f"img{i:03d}.png")
        report = texts[i].replace('"', '""')
        lines.append(f'img{i:03d}.png,{"normal" if i % 2 else "finding"},p{i // 2:03d},"{report}"')
    (root / "images.csv").write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return root / "images.csv"


def _folder_data(tmp_path: Path, csv: Path, **source) -> dict:
    return {"source": {"kind": "folder", "root": str(csv.parent), "csv": csv.name, "label_columns": ["label"],
                       "patient_column": "patient_id", "report_column": "findings", **source},
            "cache_dir": str(tmp_path / "cache"), "preprocess": {"modality": "xray"}}


def _data_config(data: dict):  # noqa: ANN202
    from pydantic import TypeAdapter

    from radssl.config import DataSection

    return TypeAdapter(DataSection).validate_python(data)


def test_folder_report_column_is_joined_per_image_and_missing_ones_are_counted(tmp_path: Path) -> None:
    csv = _folder(tmp_path / "images")
    store = build_store(_data_config(_folder_data(tmp_path, csv)))
    by_path = {Path(p).name: r for p, r in zip(store.meta["path"], store.meta["report"])}
    assert by_path["img000.png"] == "Left upper zone nodule, small. Follow-up 0."
    assert by_path["img002.png"] == "" and by_path["img006.png"] == ""
    assert store.describe()["reports"] == {"with_report": 18, "without_report": 6}
    assert any("6 of 24 images have no report" in note for note in store.notes)
    assert "reports: 18 images with one, 6 without" in inspect_store(store, tmp_path / "montage.png")


def test_missing_report_column_and_bad_encoding_are_errors_naming_the_file(tmp_path: Path) -> None:
    csv = _folder(tmp_path / "images", report_column="notes")
    with pytest.raises(DataError, match=r"images.csv: columns \['findings'\] not found; the CSV has \[.*'notes'\]"):
        build_store(_data_config(_folder_data(tmp_path, csv)))
    latin = _folder(tmp_path / "latin", encoding="latin-1", text=["Opacité gauche."] * 24)
    with pytest.raises(DataError, match=r"latin/images.csv: line 2: byte b'\\xe9' is not valid utf-8.*re-save"):
        build_store(_data_config(_folder_data(tmp_path, latin)))


def test_dicom_reports_from_a_csv_keyed_by_patient_in_another_encoding(tmp_path: Path) -> None:
    from support import write_dicom_folder

    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 255, (8, 16, 16), dtype=np.uint8), np.arange(8) % 2
    label_csv = write_dicom_folder(tmp_path / "dicom", images, labels)
    reports = tmp_path / "dicom" / "reports.csv"
    reports.write_bytes("PatientID;text\nP0000;Opacité lobe supérieur droit.\nP0001;Poumons clairs.\n"
                        .replace(";", ",").encode("latin-1"))
    source = {"kind": "dicom", "root": str(tmp_path / "dicom"), "label_csv": str(label_csv),
              "report_csv": "reports.csv", "report_key": "patient_id", "report_key_column": "PatientID",
              "report_column": "text"}
    data = {"source": source, "cache_dir": str(tmp_path / "cache"), "preprocess": {"modality": "xray"}}
    with pytest.raises(DataError, match="line 2: .* not valid utf-8 .*report_encoding"):
        build_store(_data_config(data))
    store = build_store(_data_config({**data, "source": {**source, "report_encoding": "latin-1"}}))
    by_patient = dict(zip(store.patient_id, store.meta["report"]))
    assert by_patient["P0000"] == "Opacité lobe supérieur droit." and by_patient["P0001"] == "Poumons clairs."
    assert by_patient["P0002"] == "" and store.describe()["reports"] == {"with_report": 4, "without_report": 4}


def test_nifti_slices_share_their_cases_report(tmp_path: Path) -> None:
    import nibabel as nib

    root = tmp_path / "nifti"
    for case in ("case1", "case2"):
        (root / case).mkdir(parents=True)
        volume = np.random.default_rng(0).integers(0, 100, (12, 12, 3)).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(root / case / f"{case}.nii.gz"))
    (root / "reports.csv").write_text("case_id,report\ncase1,Small hypodense lesion.\ncase1,Small hypodense lesion.\n")
    data = {"source": {"kind": "nifti", "root": str(root), "layout": "axial_slices", "report_csv": "reports.csv"},
            "cache_dir": str(tmp_path / "cache"), "preprocess": {"modality": "mr"}, "task": {"kind": "none"}}
    store = build_store(_data_config(data))
    cases = np.asarray(store.meta["study_id"])
    assert (store.meta["report"][cases == "case1"] == "Small hypodense lesion.").all() and (cases == "case1").sum() == 3
    assert (store.meta["report"][cases == "case2"] == "").all()
    (root / "reports.csv").write_text("case_id,report\ncase1,Lesion.\ncase1,No lesion.\n")
    with pytest.raises(DataError, match="line 3: 'case1' has a different report on line 2"):
        build_store(_data_config(data))


# --------------------------------------------------------------------------------------------- from a config
def test_own_folder_with_a_report_column_pretrains_from_a_config_alone(tmp_path: Path) -> None:
    from radssl.cli import main

    torch.set_num_threads(1)
    csv = _folder(tmp_path / "images", n=40)
    config = {
        "output_dir": str(tmp_path / "run"),
        "data": {"name": "own-reports", **_folder_data(tmp_path, csv)},
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        "method": {"name": "convirt", "text_width": 32, "text_depth": 1, "image_loss": "simclr"},
        "views": {"missing_report": "image_only", "image_views": 2, "max_length": 16},
        "train": {"steps": 3, "batch_size": 8, "progress_bar": False, "accelerator": "cpu", "log_every": 1},
        "eval": {"enabled": False},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pretrain", "--config", str(path)]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["reports"]["without_report"] == 10 and run["reports_missing"] > 0
    assert run["report_coverage"] == pytest.approx(1 - run["reports_missing"] / run["pretrain_images"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert checkpoint["method"]["text_encoder._extra_state"]["tokenizer"]
