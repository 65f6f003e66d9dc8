"""Write a recipe back as plain TOML: `patcher tune` hands its pick on as a file `patcher run` reads.

Only what recipes hold is written (strings, numbers, booleans, arrays of those, tables, the
``[[step]]`` array with inline ``data`` tables). Relative paths are rewritten against the new file's
folder, so the written recipe reads the same files from wherever it lands and never carries an
absolute path of this machine when the source recipe did not.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..core.errors import PatcherError

PATH_KEYS = {("data", "path"), ("check", "ppl_text"), ("eval", "prompts"), ("eval", "ppl_text")}


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise PatcherError(f"cannot write {v} into a recipe")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise PatcherError(f"cannot write a {type(v).__name__} into a recipe")


def _rebase(p: str, src: Path, dst: Path) -> str:
    """``p`` (relative to ``src``) made relative to ``dst``; URLs and absolute paths are kept."""
    if not p or "://" in p or Path(p).is_absolute():
        return p
    return os.path.relpath((src / p).resolve(), dst.resolve())


def rebase_paths(raw: dict[str, Any], src: Path, dst: Path) -> dict[str, Any]:
    """A copy of a recipe's TOML table with its relative paths moved from folder ``src`` to ``dst``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for table, key in PATH_KEYS:
        if isinstance(out.get(table), dict) and isinstance(out[table].get(key), str):
            out[table][key] = _rebase(out[table][key], src, dst)
    steps = []
    for step in out.get("step", []):
        step = dict(step)
        if isinstance(step.get("data"), dict) and isinstance(step["data"].get("path"), str):
            step["data"] = dict(step["data"]) | {"path": _rebase(step["data"]["path"], src, dst)}
        for k, v in list(step.items()):
            if k.endswith("_path") and isinstance(v, str):
                step[k] = _rebase(v, src, dst)
        steps.append(step)
    if steps:
        out["step"] = steps
    return out


def dump_recipe(raw: dict[str, Any], header: str = "") -> str:
    """TOML text of a recipe table: top-level values, then each table, then the ``[[step]]`` array."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    for k, v in raw.items():
        if k not in tables and k != "step":
            lines.append(f"{k} = {_value(v)}")
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_value(v)}" for k, v in table.items()]
    for step in raw.get("step", []):
        lines += ["", "[[step]]"] + [f"{k} = {_value(v)}" for k, v in step.items()]
    return "\n".join(lines) + "\n"
