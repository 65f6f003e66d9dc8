"""The one way patcher writes a single file: beside the target, flushed to disk, renamed over it.

A reader (or a crash, a kill, a full disk) sees the old file or the new one, never half of one; a
failed write leaves no temporary behind. Folders have `patcher.io.folders.atomic_folder`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the body to write; on success it is fsynced and
    renamed over ``path`` (``os.replace``), on any error removed. The temporary keeps the target's
    suffix, so writers that pick a format from it (matplotlib) write the same format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: its file is private (0600); the writer creates this one with the usual mode
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) written to ``path`` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` written to ``path`` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
