"""Atomic writes: the old file survives a failed write; the new one gets normal permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from radssl.atomic import _write_atomic, write_text_atomic


def test_failed_write_keeps_previous_content_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")

    def explode(stream) -> None:  # noqa: ANN001
        stream.write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        _write_atomic(target, "w", explode)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_written_file_respects_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(previous)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
