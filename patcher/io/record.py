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
from importlib import metadata
from pathlib import Path
from typing import Any

from ..core.errors import PatcherError

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


def read_json(path: Path) -> dict[str, Any]:
    """A ``patch.json`` file as a dict, or a one-line error saying what is wrong with it."""
    if not path.is_file():
        raise PatcherError(f"{path.parent} holds no {PATCH_JSON}: pass a folder written by `patcher compute`, `patcher bake` or `patcher run`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PatcherError(f"{path} is not valid JSON ({exc}); recompute the patch or re-bake the output") from None
    if not isinstance(meta, dict):
        raise PatcherError(f"{path} should hold a JSON object; recompute the patch or re-bake the output")
    return meta


def write_json(folder: Path, meta: dict[str, Any]) -> Path:
    """Write ``folder/patch.json`` atomically (a temporary file renamed over it)."""
    path = Path(folder) / PATCH_JSON
    tmp = path.with_name(f".{PATCH_JSON}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_record(out: str | Path) -> dict[str, Any]:
    """The ``patch.json`` of a baked output folder (a patch with a ``bake`` record)."""
    meta = read_json(Path(out) / PATCH_JSON)
    if "bake" not in meta:
        raise PatcherError(f"{Path(out) / PATCH_JSON} is a patch, not a baked output: bake it with `patcher bake`")
    return meta


def update_record(folder: str | Path, changes: dict[str, Any], files: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge top-level ``changes`` into a baked folder's record, and ``files`` (name -> sha256) into
    ``bake.files``, which `patcher verify` rechecks."""
    meta = read_record(folder) | changes
    if files:
        meta["bake"]["files"] = dict(sorted((meta["bake"]["files"] | files).items()))
    write_json(Path(folder), meta)
    return meta
