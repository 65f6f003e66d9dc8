"""A setting declares everything about itself on its field (issue 23): bounds checked with the
recipe's file:line, strength-like ranges inside those bounds, and no method's facts kept elsewhere."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from helpers import write_recipe

import patcher
from patcher.core.errors import PatcherError
from patcher.methods import METHODS
from patcher.methods.project import ProjectSettings
from patcher.recipe.loader import load_recipe
from patcher.recipe.settings import check_value, tune_fields
from patcher.workflows.run import step_settings


@pytest.mark.parametrize("name", METHODS.names())
def test_tune_ranges_lie_within_bounds(name: str) -> None:
    """Every declared tuning range is a range the setting accepts, with its no-edit value at an end."""
    for key, f in tune_fields(METHODS.get(name).settings).items():
        low, high, grid = f.metadata["tune"]
        assert low < high and 0 < grid <= high - low, key
        for v in (low, high):
            check_value(f, v, name, "step")
        assert f.metadata["no_edit"] in (low, high), f"{name}.{key}: the no-edit value is one end of the range"
    assert METHODS.names() == ["aura", "circuit", "project", "scale", "transport"]
    assert {n for n in METHODS.names() if tune_fields(METHODS.get(n).settings)} == {"aura", "circuit", "project", "scale", "transport"}


@pytest.mark.parametrize("setting, value, message", [
    ("strength = 1.5", 1.5, r"step\[1\]\.strength = 1\.5 should be in \[0, 1\]"),
    ("holdout = 1.0", 1.0, r"step\[1\]\.holdout = 1\.0 should be in \(0, 1\)"),
    ('blocks = ["mlp_out", "mlp_sideways"]', None, r"step\[1\]\.blocks = \['mlp_out', 'mlp_sideways'\] should be a non-empty list of"),
    ('outliers = "drop"', None, r"step\[1\]\.outliers = 'drop' should be"),
    ("k = 0", 0, r"step\[1\]\.k = 0 should be at least 1"),
])
def test_bounds_refused_with_the_keys_line(tmp_path: Path, setting: str, value: float | None, message: str) -> None:
    path = write_recipe(tmp_path, extra="direction = \"probe\"\nlayers = [0]\n" + setting)
    path.write_text(path.read_text().replace('method = "aura"', 'method = "project"'))
    line = path.read_text().splitlines().index(setting) + 1
    with pytest.raises(PatcherError, match=message) as e:
        step_settings(load_recipe(path))
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_rules_between_fields_keep_the_step_line(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, extra="k = 2")
    path.write_text(path.read_text().replace('method = "aura"', 'method = "project"'))
    line = path.read_text().splitlines().index("[[step]]") + 1
    with pytest.raises(PatcherError, match="meandiff gives one direction per layer") as e:
        step_settings(load_recipe(path))
    assert str(e.value).startswith(f"{path}:{line}: step[1]: ")


def test_bounds_hold_in_code_too() -> None:
    with pytest.raises(PatcherError, match=r"strength = 2 should be in \[0, 1\]"):
        ProjectSettings(strength=2)
    assert dataclasses.replace(ProjectSettings(), strength=0.5).strength == 0.5


def test_method_facts_live_on_the_registration() -> None:
    """No name tables in the tune package, no hand-written range checks in the methods, no wrapper
    class per method: a method is its settings class and two functions."""
    root = Path(patcher.__file__).parent
    for path in (root / "workflows" / "tune").glob("*.py"):
        text = path.read_text()
        for name in METHODS.names():
            assert not re.search(rf"[\"']{name}[\"']", text), f"{path.name} names method {name!r}"
        assert "DEFAULT_RANGES" not in text and "NO_EDIT_END" not in text and "LAYER_RANGE_METHODS" not in text
    for path in (root / "methods").glob("*.py"):
        assert "__post_init__" not in path.read_text() and "(Method)" not in path.read_text(), path.name
    assert [n for n in METHODS.names() if METHODS.get(n).layer_range] == ["project"]
