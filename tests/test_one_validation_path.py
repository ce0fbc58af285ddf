"""One validation path: ``radssl data inspect`` runs the checks ``radssl study`` / ``radssl pretrain`` run before
compute; the README's image–report snippet validates inside a study's ``pretraining`` entry; each validation problem
is printed once, names its list entry and points a views key at the policy that owns it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from radssl.cli import main

REPORTS = {"normal": "The lungs are clear. No effusion.", "finding": "Focal opacity in the right lower lobe."}


def caption_folder(root: Path, n: int = 24) -> Path:
    """PNGs + a CSV with image, patient, label and a free-text report column (the README's image–report layout)."""
    rng = np.random.default_rng(0)
    rows = ["image,patient_id,finding,report"]
    for i in range(n):
        label = ("normal", "finding")[i % 2]
        path = root / "images" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.uint8)).save(path)
        rows.append(f"images/{i:03d}.png,P{i // 2:02d},{label},\"{REPORTS[label]} Case {i}.\"")
    (root / "reports.csv").write_text("\n".join(rows) + "\n")
    return root


def _source(root: Path) -> dict:
    return {"kind": "folder", "root": str(root), "csv": "reports.csv", "path_column": "image",
            "patient_column": "patient_id", "label_columns": ["finding"], "classes": ["normal", "finding"],
            "report_column": "report"}


def _study(tmp_path: Path, **changes) -> dict:
    raw = {
        "name": "captions", "output_dir": str(tmp_path / "study"),
        "data": {"source": _source(caption_folder(tmp_path / "data")), "cache_dir": str(tmp_path / "cache"),
                 "preprocess": {"target_size": [16, 16]}},
        "model": {"backbone": "small_cnn", "options": {"width": 8}},
        # the README's image–report snippet, as a study's pretraining entry
        "pretraining": [{"name": "convirt", "method": {"name": "convirt", "text_width": 16, "text_depth": 1},
                         "views": {"tokenizer": "fit"}, "train": {"steps": 2, "batch_size": 4}}],
        "initialisations": ["random", "ssl:convirt"], "label_fractions": [1.0],
        "protocols": {"linear": {"Cs": [1.0]}},
    }
    raw.update(changes)
    return raw


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _inspect(config: Path, tmp_path: Path) -> int:
    return main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png")])


def test_the_image_report_snippet_validates_in_a_study_pretraining_entry_and_in_pretrain(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _write(tmp_path / "study.yaml", _study(tmp_path))
    assert _inspect(config, tmp_path) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "valid study config (every check `radssl study` runs before compute passed)" in out
    assert "reports: 24 images with one, 0 without" in out
    from radssl.study.config import load_study_config

    entry = load_study_config(config).pretraining[0]
    assert entry.views.policy == "image_text" and entry.views.policy_params()["tokenizer"] == "fit"
    pretrain = {"data": _study(tmp_path)["data"], "model": {"backbone": "small_cnn"}, "method": {"name": "convirt"},
                "views": {"tokenizer": "fit"}, "train": {"steps": 2, "batch_size": 4}}
    assert _inspect(_write(tmp_path / "pretrain.yaml", pretrain), tmp_path) == 0
    assert "valid pretrain config" in capsys.readouterr().out


def test_each_problem_is_printed_once_naming_its_entry_and_the_policy_that_owns_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = _study(tmp_path)
    simclr = {"name": "simclr", "method": {"name": "simclr"}, "views": {"tokenizer": "fit"}}
    raw["pretraining"] = [simclr, {**simclr, "name": "simclr2"}]
    raw["initialisations"] = ["random", "ssl:simclr", "ssl:simclr2"]
    assert _inspect(_write(tmp_path / "study.yaml", raw), tmp_path) == 2
    err = capsys.readouterr().err
    assert err.count("radssl: error") == 1
    lines = [line for line in err.splitlines() if "unknown key" in line]
    assert len(lines) == 2 and len(set(lines)) == 2
    assert "[pretraining entry 'simclr']" in lines[0] and "[pretraining entry 'simclr2']" in lines[1]
    assert all("'tokenizer' is a key of view policy image_text: set policy: image_text" in line and "convirt" in line
               for line in lines)
    raw["pretraining"] = [simclr]
    raw["initialisations"] = ["random", "ssl:simclr"]
    assert _inspect(_write(tmp_path / "study.yaml", raw), tmp_path) == 2
    assert capsys.readouterr().err.count("unknown key 'pretraining.views.tokenizer'") == 1


@pytest.mark.parametrize("changes, message", [
    ({"protocols": {"segmentation_frozen": {"epochs": 1}}}, "protocol 'segmentation_frozen' needs segmentation masks"),
    ({"protocols": {"zero_shot": {"prompts": {"healthy": ["x"], "sick": ["y"]}}}},
     r"zero_shot.prompts: .*missing: \['normal', 'finding'\]"),
    ({"task": {"kind": "none"}}, "protocol 'linear' reads out binary, multiclass.* tasks; the data's task is 'none'"),
    ({"pretraining": [{"name": "convirt", "method": {"name": "convirt"}, "views": {"tokenizer": "fit"},
                       "train": {"steps": 2, "batch_size": 64}}]}, "cannot fill one global batch of 64"),
])
def test_inspect_runs_the_studys_own_checks_before_compute(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          changes: dict, message: str) -> None:
    raw = _study(tmp_path)
    if "task" in changes:
        raw["data"]["task"] = changes.pop("task")
    raw.update(changes)
    assert _inspect(_write(tmp_path / "study.yaml", raw), tmp_path) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "study").exists(), "nothing written"
