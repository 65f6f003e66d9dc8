"""`atomic_file`: the one single-file writer (issue 23): the old file or the new one, never half,
no temporary left behind, and the only `os.replace` in the package."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import patcher
from patcher.io.atomic import atomic_file, write_text


def test_writes_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual mode, not a private temp file's


def test_error_keeps_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "card.md"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["card.md"]


def test_temporary_keeps_suffix(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".plot.png.partial-")
        tmp.write_bytes(b"x")


def test_os_replace_only_in_io() -> None:
    root = Path(patcher.__file__).parent
    found = subprocess.run(["grep", "-rln", "os.replace", str(root), "--include=*.py"], capture_output=True, text=True).stdout.split()
    assert found and all(Path(f).parent.name == "io" for f in found), found
