"""The "bring your own data" example configs under configs/ pass every check their command runs before compute
(``radssl data inspect``), on tiny data written here (and on the real chest images with notes when available)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_folder_masks import busi_like

from radssl.cli import main
from radssl.study.preflight import preflight

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _inspect(config: Path, tmp_path: Path, *overrides: str) -> int:
    return main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png"), *overrides])


def test_folder_masks_example_inspects_with_mask_statistics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = busi_like(tmp_path / "busi", per_class=8, shape=(30, 40))
    code = _inspect(CONFIGS / "folder_masks_example.yaml", tmp_path, f"data.source.root={root}",
                    f"data.cache_dir={tmp_path / 'cache'}", "model.backbone=small_cnn",
                    "pretraining.simclr.train.batch_size=8", f"output_dir={tmp_path / 'study'}")
    out = capsys.readouterr().out
    assert code == 0 and "valid study config" in out
    assert "masks: 24 of 24 images have one; 8 empty (background only)" in out
    assert "mask labels: 0 background (in 24 images" in out and "1 foreground (in 16 images" in out
    assert "masks from files <image>_mask[_n] beside the images: one class 'foreground'" in out
    assert not (tmp_path / "study").exists()


def test_folder_reports_example_inspects_on_a_caption_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "notes"
    rng = np.random.default_rng(0)
    rows = ["image,patient_id,text"]
    for i in range(40):
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 16)).astype(np.uint8)).save(root / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{i // 2},\"{'Clear lungs.' if i % 2 else 'Right basal opacity.'} Image {i}\"")
    (root / "reports.csv").write_text("\n".join(rows) + "\n")
    code = _inspect(CONFIGS / "folder_reports_example.yaml", tmp_path, f"data.source.root={root}",
                    f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=8")
    out = capsys.readouterr().out
    assert code == 0 and "valid pretrain config" in out and "reports: 40 images with one, 0 without" in out


@pytest.mark.slow
def test_folder_reports_example_on_the_real_chest_images_with_notes(data_dir: Path, tmp_path: Path) -> None:
    root = data_dir / "covid_chestxray_notes"
    if not (root / "reports.csv").is_file():
        pytest.skip(f"{root} not found")
    kind, [(_, store)] = preflight(CONFIGS / "folder_reports_example.yaml",
                                   [f"data.source.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert kind == "pretrain" and len(store) == 343 and store.task.kind == "none"
    assert (np.char.strip(store.meta["report"].astype(str)) != "").all()


def test_dicom_example_inspects_on_a_folder_of_dicom_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file("CT_small.dcm", download=False)
    if source is None:
        pytest.skip("pydicom's CT_small.dcm test file is not installed")
    root = tmp_path / "export"
    root.mkdir()
    for i in range(12):  # one slice per patient: distinct patients, studies and series
        dataset = pydicom.dcmread(source)
        dataset.PatientID = f"P{i:02d}"
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (generate_uid() for _ in "abc")
        dataset.save_as(root / f"IM{i:04d}")  # PACS exports often have no suffix
    (root / "notes.txt").write_text("not DICOM")  # other files in the export are ignored
    code = _inspect(CONFIGS / "dicom_example.yaml", tmp_path, f"data.source.root={root}",
                    f"data.cache_dir={tmp_path / 'cache'}", "data.preprocess.target_size=[32, 32]",
                    "model.backbone=small_cnn", "train.batch_size=4")
    out = capsys.readouterr().out
    assert code == 0, capsys.readouterr().err
    assert "valid pretrain config" in out and "dataset ct: 12 images, shape [32, 32] x 2 channel(s)" in out


def test_bakeoff_example_inspects_through_every_group_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data inspect` on a bake-off config runs the bake-off's selection and each backbone group's study checks."""
    small = ["data.n_patients=60", f"output_dir={tmp_path / 'bakeoff'}"]
    assert main(["data", "inspect", "configs/bakeoff_example.yaml", *small, "--out", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "valid bakeoff config" in out and "convirt left out" in out
    assert not (tmp_path / "bakeoff").exists()  # nothing trained or written
    # The group studies' own checks run: a segmentation protocol on data without masks is refused before compute.
    with pytest.raises(Exception, match="mask"):
        preflight(Path("configs/bakeoff_example.yaml"), [*small, "protocols={segmentation_frozen: {}}"], log=print)
