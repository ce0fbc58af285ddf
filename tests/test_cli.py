"""The radssl command: --help on every subcommand, clear errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from radssl.cli import build_parser, main, parse_arguments


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: radssl " + command in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    result = subprocess.run([sys.executable, "-m", "radssl.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout and "demo" in result.stdout


def test_unknown_config_key_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pretrain", "train.stepz=3"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown key 'train.stepz'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------- overrides anywhere
@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["pretrain", "--output-dir", "out", "train.steps=3"], ["train.steps=3"]),
        (["pretrain", "train.steps=3", "--seed", "1", "model.backbone=small_cnn"], ["train.steps=3", "model.backbone=small_cnn"]),
        (["study", "s.yaml", "--output-dir", "out", "seeds=[0]", "label_fractions=[1.0]"], ["seeds=[0]", "label_fractions=[1.0]"]),
        (["data", "inspect", "c.yaml", "--out", "m.png", "data.n_patients=4"], ["data.n_patients=4"]),
        (["demo", "seed=2", "--output-dir", "out", "name=x"], ["seed=2", "name=x"]),
    ],
)
def test_overrides_may_follow_options(argv: list[str], overrides: list[str]) -> None:
    args = parse_arguments(build_parser(), argv)
    assert args.overrides == overrides
    assert getattr(args, "output_dir", None) in (None, "out")


def test_unknown_options_and_stray_words_are_still_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["pretrain", "--output-dir", "out", "--bogus"], ["pretrain", "a.b=1", "--seed", "1", "stray"],
                 ["report", "runs", "x=1"]):
        with pytest.raises(SystemExit) as info:
            parse_arguments(build_parser(), argv)
        assert info.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- data inspect
SYNTHETIC = "data: {source: synthetic, n_patients: 12, images_per_patient: 2, image_size: 32}\n"


def test_data_inspect_validates_the_whole_pretrain_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pretrain.yaml"
    config.write_text(SYNTHETIC + "model: {backbone: small_cnn}\ntrain: {stepz: 3}\n")
    assert main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png")]) == 2
    assert "unknown key 'train.stepz'" in capsys.readouterr().err
    config.write_text(SYNTHETIC + "model: {backbone: small_cnn}\ntrain: {steps: 3}\n")
    # `radssl pretrain` would refuse it before compute (12 images, batch 256), so inspect does too
    assert main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png"), "data.n_patients=6"]) == 2
    assert "pretraining images cannot fill one global batch of 256" in capsys.readouterr().err
    config.write_text(SYNTHETIC + "model: {backbone: small_cnn}\ntrain: {steps: 3, batch_size: 8}\n")
    # an override after --out is applied (and validated) like the file
    assert main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png"), "data.n_patients=10"]) == 0
    out = capsys.readouterr().out
    assert "valid pretrain config" in out and "dataset synthetic" in out and ": 20 images" in out
    assert (tmp_path / "m.png").is_file()
    assert main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png"), "method.temperatur=0.1"]) == 2
    assert "method.temperatur" in capsys.readouterr().err


def test_data_inspect_validates_the_whole_study_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "study.yaml"
    study = (SYNTHETIC + "model: {backbone: small_cnn}\ninitialisations: [random]\nlabel_fractions: [1.0]\n"
             "external_test_sets: [{name: site2, data: {source: synthetic, n_patients: 6, image_size: 32, site: 1}}]\n")
    config.write_text(study + "protocols: {linaer: {}}\n")
    assert main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png")]) == 2
    assert "unknown key 'protocols.linaer'" in capsys.readouterr().err
    config.write_text(study + "protocols: {linear: {}}\n")
    assert main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "valid study config" in out and "[external_test_sets.site2]" in out
    assert (tmp_path / "m.png").is_file() and (tmp_path / "m.site2.png").is_file()


def test_data_inspect_shows_the_configured_modality_of_a_folder_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        name = ["normal", "pneumonia"][i % 2]
        (tmp_path / "pngs" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8)).astype(np.uint8)).save(tmp_path / "pngs" / name / f"{i}.png")
    config = tmp_path / "folder.yaml"
    config.write_text(
        f"data:\n  source: {{kind: folder, root: {tmp_path / 'pngs'}}}\n  cache_dir: {tmp_path / 'cache'}\n"
        "  preprocess: {modality: xray}\n"
    )
    assert main(["data", "inspect", str(config), "--out", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr().out
    assert "preprocessed as: xray 8" in out
    assert "patients shared between splits: unknown" in out and "note: no image has a patient id" in out
