"""Output folders that appear whole or not at all, never on top of what the user gave patcher.

Everything patcher writes (a baked model, a patch, a sweep, a report) goes through one guard,
`check_output_path`: the output may not be, contain, or sit inside the source model or any input
(recipe, data files, patch folder, baseline), whatever ``--overwrite`` says, with symlinks resolved;
``--overwrite`` replaces only a folder patcher itself wrote (one holding ``patch.json``, patch
tensors or ``sweep.json``).

A folder output is built in a temporary sibling ``.OUT.partial-PID-*`` (PID: the writer's process
id) and renamed into place in one step, so a crash, a kill or a full disk never leaves a half-written
output. The final rename never replaces a folder that appeared meanwhile (another process writing
the same output) unless ``--overwrite`` was given: Linux's ``renameat2(RENAME_NOREPLACE)``, with an
exclusive lock on the parent folder as the fallback where the filesystem lacks it. Leftovers of a
process that died (its pid gone) are removed by the next run on the same output, which says so.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import PatcherError

log = logging.getLogger(__name__)

# Files that mark a folder as written by patcher: only such a folder may be replaced by --overwrite.
PATCHER_MARKERS = ("patch.json", "patch.safetensors", "sweep.json", "sae.json")
# patcher adds ".NAME.partial-PID-XXXXXXXX" around an output's name; file names are limited to 255 bytes.
MAX_NAME_BYTES = 200
RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def written_by_patcher(folder: Path) -> bool:
    """Whether ``folder`` is an output patcher wrote (a patch, a baked model, a sweep)."""
    return any((folder / m).is_file() for m in PATCHER_MARKERS)


def _relation(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "sits inside"
    if out in inp.parents:
        return "contains"
    return None


def check_output_path(out: Path, source: Path | None, overwrite: bool, inputs: Iterable[Path | str | None] = (), *, kind: str = "folder") -> None:
    """Refuse an output that would clobber an input or something patcher did not write.

    ``source`` is the model folder; ``inputs`` every other file or folder the command reads (paths
    that do not exist locally, such as Hub ids, are skipped). ``kind`` is ``folder`` or ``file``."""
    out = Path(out)
    name = out.resolve().name
    if len(name.encode()) > MAX_NAME_BYTES:
        raise PatcherError(f"output name {name[:40]}... is {len(name.encode())} bytes long; patcher allows {MAX_NAME_BYTES} "
                           "(file names stop at 255 and patcher adds a temporary prefix): choose a shorter --out")
    resolved = out.resolve()
    for inp in [source, *inputs]:
        if inp is None or str(inp) == "" or "://" in str(inp):
            continue
        p = Path(inp).expanduser()
        if not p.exists():
            continue
        rel = _relation(resolved, p.resolve())
        if rel is not None:
            what = "the source model" if inp is source else "the input"
            raise PatcherError(f"output {out} {rel} {what} {p} (symlinks resolved): patcher never writes over its inputs; choose an --out outside it")
    if not (out.exists() or out.is_symlink()):
        return
    if kind == "file":
        if resolved.is_dir():
            raise PatcherError(f"output file {out} is an existing folder: name a file")
        return
    if not resolved.is_dir():
        raise PatcherError(f"output {out} exists and is not a folder: choose another --out")
    if not overwrite:
        raise PatcherError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    if not written_by_patcher(resolved):
        raise PatcherError(f"--overwrite replaces only a folder patcher wrote (with {PATCHER_MARKERS[0]}); {out} is not one: move it away or choose another --out")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def leftover_pid(name: str, prefix: str) -> int | None:
    """The writer pid in a leftover's name ``PREFIX-PID-...``, or None when it has none."""
    rest = name[len(prefix):].lstrip("-")
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` (``.OUT.partial-PID-*``, ``.OUT.old-PID-*``) whose
    writer process is gone, saying so; returns what was removed. A live writer's folders are kept."""
    out = Path(out).resolve()
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        prefix = f".{out.name}.{kind}"
        for p in out.parent.glob(f"{glob_escape(prefix)}-*"):
            pid = leftover_pid(p.name, prefix)
            if pid is None or pid == os.getpid() or pid_alive(pid):
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            log.warning("removed %s, left by process %d (no longer running)", p, pid)
            removed.append(p)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


@contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success rename it into place in one step (an
    existing ``out`` is replaced only with ``overwrite`` and only if patcher wrote it). On any
    failure the temporary folder is removed and ``out`` is untouched."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any folder
    try:
        yield tmp
        move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _renameat2(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError when ``dst`` exists; raises OSError(ENOSYS) or
    OSError(EINVAL) where the kernel, libc or filesystem lacks RENAME_NOREPLACE."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 not available")
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


@contextmanager
def _parent_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (flock on the directory itself: no lock file to leave behind)
    held by patcher processes while they publish into it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the rename below still refuses a non-empty target
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), atomically."""
    try:
        _renameat2(src, dst)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
            raise
    with _parent_lock(dst.parent):
        if dst.exists() or dst.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        os.rename(src, dst)


def move_into_place(ready: Path, out: Path, overwrite: bool = False) -> None:
    """Rename a complete folder to ``out``. Without ``overwrite`` a folder that appeared at ``out``
    meanwhile is never replaced (PatcherError); with it, the old ``out`` (which patcher must have
    written) is moved aside first and deleted only after the new one is in place."""
    out = Path(out).resolve()
    try:
        rename_noreplace(ready, out)
        return
    except FileExistsError:
        if not overwrite:
            raise PatcherError(f"{out} appeared while this run was writing it (another process?): it was left as it is and this "
                               "run's result discarded; pass --overwrite to replace it or choose another --out") from None
    with _parent_lock(out.parent):
        if not written_by_patcher(out):
            raise PatcherError(f"--overwrite replaces only a folder patcher wrote; {out} appeared meanwhile and is not one: nothing was replaced")
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
        os.rename(out, trash / "old")
        try:
            os.rename(ready, out)
        except OSError:
            os.rename(trash / "old", out)  # put the previous output back
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
