"""Output folders that appear whole or not at all.

Everything patcher writes (a baked model, a patch, a sweep point) is built in a temporary sibling
of its final path and renamed into place in one step, so a crash, a kill or a full disk never leaves
a half-written output, and the source model is never inside, above or equal to the output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import PatcherError


def check_output_path(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that would clobber something or land inside the source model."""
    out, source = out.resolve(), source.resolve()
    if out == source or source in out.parents:
        raise PatcherError(f"output {out} is inside the source model folder {source}: choose a folder outside it")
    if out in source.parents:
        raise PatcherError(f"output {out} contains the source model {source}: choose another folder")
    if out.exists() and not overwrite:
        raise PatcherError(f"output folder {out} already exists: choose another --out or pass --overwrite")


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success rename it into place in one step (replacing an
    existing ``out`` only then). On any failure the temporary folder is removed and ``out`` is untouched."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any folder
    try:
        yield tmp
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(ready: Path, out: Path) -> None:
    """Rename a complete folder to ``out``; an existing ``out`` is moved aside first and deleted
    only after the new one is in place."""
    out = out.resolve()
    if out.exists():
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rename(out, trash / "old")
        os.rename(ready, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(ready, out)
