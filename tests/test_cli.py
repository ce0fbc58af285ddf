"""The radssl command: --help on every subcommand, clear errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from radssl.cli import build_parser, main


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
