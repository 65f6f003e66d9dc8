"""A run is a plan, then its execution (issue 23): following a recipe through `patcher run`, each
step's settings are built once and each data file (catalog sets, the check text) is hashed once;
``patch.json`` records the plan; sweeps and tunes change a step without resolving again."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import save_tiny_with_tokenizer, write_labeled

from patcher.cli import main
from patcher.data import catalog
from patcher.methods import METHODS
from patcher.recipe.loader import load_recipe
from patcher.workflows import run as run_module
from patcher.workflows import run_plan

RECIPE = """name = "two-steps"
[model]
id = "{model}"
[data]
dataset = "paradetox"
n_per_class = 20
max_tokens = 32
match_lengths = false
[collect]
batch_size = 8
[check]
ppl_dataset = "wikitext-2"
ppl_tokens = 256
ppl_window = 64
max_ppl_increase = 100.0
[[step]]
method = "aura"
[[step]]
method = "project"
layers = [1]
strength = 0.5
data = {{ dataset = "jigsaw-test", pairs = false }}
"""


@pytest.fixture()
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    folder = tmp_path / "data"
    for name, seed in (("paradetox", 0), ("jigsaw-test", 1)):
        file = folder / catalog.CATALOG[name].local
        file.parent.mkdir(parents=True, exist_ok=True)
        write_labeled(file, n=30, seed=seed)
    text = folder / catalog.CATALOG["wikitext-2"].local
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text(" = a = \n the river flows past the garden in the morning . \n" * 40)
    model = save_tiny_with_tokenizer("llama", tmp_path / "model")
    (tmp_path / "recipe.toml").write_text(RECIPE.format(model=model))
    monkeypatch.setenv("PATCHER_DATA", str(folder))
    catalog.set_data_dir(None)

    hashed: Counter = Counter()
    real_hash = catalog.sha256_file
    monkeypatch.setattr(catalog, "sha256_file", lambda path: hashed.update([Path(path).name]) or real_hash(path))
    built: Counter = Counter()
    method_settings = {METHODS.get(n).settings for n in METHODS.names()}
    for module in (run_plan, run_module):
        real_build = module.build

        def counting(cls: type, *a: Any, _real: Any = real_build, **kw: Any) -> Any:
            if cls in method_settings:
                built.update([cls.__name__])
            return _real(cls, *a, **kw)

        monkeypatch.setattr(module, "build", counting)
    return {"tmp": tmp_path, "hashed": hashed, "built": built}


def test_run_resolves_each_step_and_hashes_each_file_once(world: dict[str, Any]) -> None:
    tmp = world["tmp"]
    r = CliRunner().invoke(main, ["run", str(tmp / "recipe.toml"), "--out", str(tmp / "out"), "--no-eval"])
    assert r.exit_code == 0, r.output
    assert world["built"] == {"AuraSettings": 1, "ProjectSettings": 1}, "each step's settings built once"
    assert world["hashed"] == {"paradetox_labeled.jsonl": 1, "jigsaw_snlp_detox.jsonl": 1, "wiki.test.raw": 1}, "each data file hashed once"
    plan = json.loads((tmp / "out" / "patch.json").read_text())["plan"]
    assert [s["method"] for s in plan["steps"]] == ["aura", "project"]
    assert [s["data"]["name"] for s in plan["steps"]] == ["paradetox", "jigsaw-test"]
    assert plan["steps"][1]["settings"]["strength"] == 0.5 and plan["check_text"]["name"] == "wikitext-2"
    assert all(len(s["data"]["sha256"]) == 64 for s in plan["steps"])


def test_a_sweep_point_rebuilds_only_its_step(world: dict[str, Any]) -> None:
    plan = run_plan.resolve(load_recipe(world["tmp"] / "recipe.toml"))
    hashed = dict(world["hashed"])
    point = plan.with_setting(1, "strength", 0.25)
    assert point.settings[1].strength == 0.25 and point.settings[0] is plan.settings[0] and point.data is plan.data
    assert dict(world["hashed"]) == hashed, "nothing is resolved again"
    with pytest.raises(Exception, match=r"recipe.toml:\d+: step\[2\]\.strength = 2 should be in \[0, 1\]"):
        plan.with_setting(1, "strength", 2)
