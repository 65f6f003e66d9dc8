"""The record of how an output was made: ``patch.json``, written and read only here.

A standalone patch (`patcher compute`) holds the edits and their provenance. A baked output folder
holds the same plus ``bake`` (base model, patch hash, library versions, sha256 of every file) and
what the workflow adds (the recipe and its effective settings, the data, the perplexity check).
One reader and one writer keep every producer and every checker (`verify`, `push`, the model
card) agreeing on the format, and writes are atomic so a crash never leaves half a record.
"""

from __future__ import annotations

import json
import os
import platform
import re
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..core.errors import PatcherError
from .atomic import write_text

PATCH_JSON = "patch.json"


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries whose behaviour a patch or a bake depends on."""
    names = ("patcher", "torch", "transformers", "safetensors", "accelerate", "huggingface-hub")
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object, or a one-line error naming the file, the fault and ``fix``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PatcherError(f"{path} is not valid JSON ({exc}): {fix}") from None
    if not isinstance(data, dict):
        raise PatcherError(f"{path} should hold a JSON object, not {type(data).__name__}: {fix}")
    return data


def read_json(path: Path) -> dict[str, Any]:
    """A ``patch.json`` file as a dict, or a one-line error saying what is wrong with it."""
    if not path.is_file():
        raise PatcherError(f"{path.parent} holds no {PATCH_JSON}: pass a folder written by `patcher compute`, `patcher bake` or `patcher run`")
    return read_json_object(path, "recompute the patch or re-bake the output")


def plain_name(name: Any, where: str | Path) -> str:
    """A file name recorded inside a patch or a model folder: a relative path below that folder
    (``patch.safetensors``, ``patcher/patch.safetensors``), never absolute, never with ``..``: a
    patch that names ``/etc/passwd`` or ``../x`` is refused, not read."""
    ok = isinstance(name, str) and name and "\\" not in name and "\x00" not in name and not PurePosixPath(name).is_absolute()
    if ok:
        parts = PurePosixPath(name).parts
        ok = all(p not in ("", ".", "..") for p in parts) and not name.startswith("/")
    if not ok:
        raise PatcherError(f"{where} names the file {name!r}, which is not a plain name inside its folder: recompute the patch or re-bake the output")
    return name


def file_inside(folder: Path, name: Any, where: str | Path) -> Path:
    """``folder / name`` for a `plain_name`, refused when a symlink leads it out of ``folder``."""
    path = Path(folder) / plain_name(name, where)
    root = Path(folder).resolve()
    if root not in path.resolve().parents:
        raise PatcherError(f"{where}: {name} leads outside {folder} (a symlink): recompute the patch or re-bake the output")
    return path


_EMBEDDED = re.compile(r"(?<![\w.~/:-])/(?:[\w.+-]+/)+[\w.+-]*")  # "/a/b..." starting a word, two parts at least
_PREFIXED = re.compile(r"^([A-Za-z][\w.+-]*:)(/(?!/).*)$")  # "hf:/abs/path", not a URL "x://..."


def _absolute(s: str) -> bool:
    return "\n" not in s and len(s) < 4096 and (s.startswith(("/", "~")) or PureWindowsPath(s).is_absolute())


def relative_paths(data: Any, folder: Path) -> Any:
    """``data`` (JSON-ready) with every absolute local path rewritten relative to ``folder`` (the
    folder the file is written into), also where such a path occurs inside a longer string or a
    key (a recipe's text, "score hf:/models/clf"): files patcher writes are published, and a user's local paths are not
    patcher's to publish. Staging folders are siblings of the output, so a path relative to the
    staging folder is the same relative to the output."""
    root = Path(folder).resolve()
    found: dict[str, str] = {}

    def rel(s: str) -> str:
        if s not in found:
            found[s] = Path(os.path.relpath(Path(s).expanduser(), root)).as_posix()
        return found[s]

    def walk(x: Any) -> Any:
        if isinstance(x, dict):  # keys too: evaluators are keyed by name, and "hf:/models/clf" is one
            return {walk(k) if isinstance(k, str) else k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, str) and _absolute(x):
            return rel(x)
        m = _PREFIXED.match(x) if isinstance(x, str) else None
        if m and _absolute(m.group(2)):  # an absolute path behind a scheme-like prefix: hf:/models/clf
            return m.group(1) + rel(m.group(2))
        for e in _EMBEDDED.finditer(x) if isinstance(x, str) else ():  # a path only ever inside a sentence (an error
            path = e.group(0).rstrip(".")  # message): noted when its top folder exists here, rewritten by `texts` below
            if Path("/" + path.split("/")[1]).is_dir():
                rel(path)
        return x

    out = walk(data)
    if not found:
        return out

    def texts(x: Any) -> Any:  # the same paths inside longer strings and keys ("score hf:/models/clf", a recipe's text)
        if isinstance(x, dict):
            return {texts(k) if isinstance(k, str) else k: texts(v) for k, v in x.items()}
        if isinstance(x, list):
            return [texts(v) for v in x]
        if isinstance(x, str) and "/" in x:
            # a path starts a word: not the tail of a longer path (a relative path already written,
            # "../../root/x", holds the absolute "/root/x" and must not be rewritten twice)
            pattern = "|".join(re.escape(a) for a in sorted(found, key=len, reverse=True))
            x = re.sub(rf"(?<![\w.~/-])(?:{pattern})", lambda m: found[m.group(0)], x)
        return x

    return texts(out)


def write_json(folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``folder/patch.json`` atomically (a temporary file renamed over it), local absolute
    paths made relative to the folder (`relative_paths`)."""
    path = Path(folder) / PATCH_JSON
    return write_text(path, json.dumps(relative_paths(meta, Path(folder)), indent=2) + "\n")


def write_json_file(path: Path, data: Any) -> Path:
    """Any JSON file patcher publishes (``sweep.json``): atomic, local absolute paths made relative."""
    path = Path(path)
    return write_text(path, json.dumps(relative_paths(data, path.parent), indent=1, default=str) + "\n")


HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_record(meta: dict[str, Any], where: Path) -> dict[str, Any]:
    """The bake record's own consistency: the types `verify`, `push` and the card rely on, and file
    names that stay inside the folder. Returns ``meta["bake"]``."""
    bake = meta.get("bake")

    def bad(what: str) -> PatcherError:
        return PatcherError(f"{where}: the bake record is damaged ({what}): re-bake the output")

    if not isinstance(bake, dict):
        raise bad("bake is not an object")
    files = bake.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("bake.files is not a table of file names to sha256")
    for name, digest in files.items():
        plain_name(name, where)
        if not isinstance(digest, str) or not HEX64.match(digest):
            raise bad(f"the sha256 of {name} is {digest!r}")
    if not isinstance(bake.get("patch_sha256"), str) or not HEX64.match(bake["patch_sha256"]):
        raise bad("bake.patch_sha256 is not a sha256")
    base = bake.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise bad("bake.base has no fingerprint")
    if not any(isinstance(base.get(k), str) and base.get(k) for k in ("model", "local_path")):
        raise bad("bake.base names no model (model or local_path)")
    if base.get("revision") is not None and not isinstance(base.get("revision"), str):
        raise bad("bake.base.revision is not a string")
    if not isinstance(bake.get("untied_embeddings"), bool):
        raise bad("bake.untied_embeddings is not true or false")
    changed = bake.get("changed_tensors")
    if not isinstance(changed, list) or not all(isinstance(t, str) for t in changed):
        raise bad("bake.changed_tensors is not a list of names")
    exports = meta.get("gguf", [])  # GGUF files exported into the folder (patcher.publish.gguf)
    if not isinstance(exports, list) or not all(isinstance(e, dict) for e in exports):
        raise bad("gguf is not a list of exports")
    for e in exports:
        if files.get(plain_name(e.get("file"), where)) != e.get("sha256"):
            raise bad(f"the GGUF {e.get('file')} is not in bake.files with the sha256 its export recorded")
    return bake


def read_record(out: str | Path) -> dict[str, Any]:
    """The ``patch.json`` of a baked output folder (a patch with a ``bake`` record)."""
    meta = read_json(Path(out) / PATCH_JSON)
    if "bake" not in meta:
        raise PatcherError(f"{Path(out) / PATCH_JSON} is a patch, not a baked output: bake it with `patcher bake`")
    check_record(meta, Path(out) / PATCH_JSON)
    return meta


def update_record(folder: str | Path, changes: dict[str, Any], files: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge top-level ``changes`` into a baked folder's record, and ``files`` (name -> sha256) into
    ``bake.files``, which `patcher verify` rechecks."""
    meta = read_record(folder) | changes
    if files:
        meta["bake"]["files"] = dict(sorted((meta["bake"]["files"] | files).items()))
    write_json(Path(folder), meta)
    return meta
