"""The declared Python floor holds (issue 23): pyproject's ``requires-python`` and ruff's target
agree, and no module of the package imports a standard-library module newer than the floor (the
recipe loader's ``tomllib`` is 3.11+: under a 3.10 floor patcher would not import)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import patcher

ROOT = Path(__file__).parents[1]
# standard-library modules added after 3.8, with the version that added them
ADDED = {"zoneinfo": (3, 9), "graphlib": (3, 9), "tomllib": (3, 11), "wsgiref.types": (3, 11)}


def floor() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    m = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert m, f"requires-python {spec!r}: expected >=3.N"
    return 3, int(m.group(1))


def test_ruff_target_matches_floor() -> None:
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    assert target == f"py3{floor()[1]}"


def test_no_import_newer_than_floor() -> None:
    low = floor()
    assert sys.version_info[:2] >= low
    seen = set()
    for path in Path(patcher.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for name in names:
                seen.add(name)
                assert ADDED.get(name, low) <= low, f"{path.name} imports {name} (Python {ADDED[name]}), above requires-python {low}"
    assert "tomllib" in seen  # the check looks at what the loader really imports
