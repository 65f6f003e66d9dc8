"""`patcher sweep`: one statistics collection for n values, one bake and evaluation per value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import save_tiny_with_tokenizer, write_recipe

from patcher.cli import main
from patcher.collect.collector import Collector
from patcher.core.errors import PatcherError
from patcher.recipe.loader import load_recipe
from patcher.workflows.sweep import parse_set


def test_sweep_collects_once(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("profanity_check", reason="the sweep's evaluation here uses alt-profanity-check")
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    runs = []
    original = Collector.run
    monkeypatch.setattr(Collector, "run", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    r = CliRunner().invoke(main, ["sweep", str(recipe), "--set", "min_auroc=0.5,0.6,0.7", "--out", str(tmp_path / "sw"),
                                  "--n-prompts", "3", "--samples", "2", "--evaluators", "profanity-check", "--max-ppl-increase", "10"])
    assert r.exit_code == 0, r.output
    assert len(runs) == 1, "the statistics must be collected once for the whole sweep"
    result = json.loads((tmp_path / "sw/sweep.json").read_text())
    assert result["collections"] == 1 and [p["value"] for p in result["points"]] == [0.5, 0.6, 0.7]
    # sweep.json names each point's folder relative to the sweep folder (no local absolute path)
    assert all((tmp_path / "sw" / p["folder"] / "model.safetensors").exists() for p in result["points"])
    assert result["chosen"] is not None and "least toxic" in r.output
    assert (tmp_path / "sw/sweep.png").stat().st_size > 1000


def test_sweep_setting_that_changes_collection_recollects(tmp_path: Path) -> None:
    """`modules` changes what AURA collects, so each value gets its own statistics."""

    from patcher.core.models import load_model
    from patcher.workflows.run import compute_patch
    from patcher.workflows.sweep import with_setting

    model_dir = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = load_recipe(write_recipe(tmp_path, model_dir))
    model, tok = load_model(model_dir)
    cache: dict = {}
    for v in (0.5, 0.6):
        compute_patch(with_setting(recipe, 0, "min_auroc", v), model, tok, stats_cache=cache)
    assert len(cache) == 1
    for v in (["mlp_in"], ["mlp_out"]):
        compute_patch(with_setting(recipe, 0, "modules", v), model, tok, stats_cache=cache)
    assert len(cache) == 3


def test_bad_set_expressions(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path))
    assert parse_set("strength=0.25,0.5", recipe) == (0, "strength", [0.25, 0.5])
    assert parse_set('step.1.layers="15-29"', recipe) == (0, "layers", ["15-29"])
    with pytest.raises(PatcherError, match="KEY=V1,V2"):
        parse_set("strength", recipe)
    with pytest.raises(PatcherError, match="steps 1..1"):
        parse_set("step.3.k=1", recipe)
