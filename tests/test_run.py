"""`patcher run` / `patcher compute` end to end: tiny models of every family, the real SmolLM2 on a
small sample, the perplexity budget, and recipe errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import FAMILIES, save_tiny_with_tokenizer

from patcher.cli import main
from patcher.errors import PatcherError
from patcher.recipe import load_recipe
from patcher.verify import verify

TOXIC_WORDS = ["idiot", "stupid", "moron", "fool", "jerk"]
NEUTRAL_WORDS = ["friend", "garden", "morning", "river", "music"]


def write_labeled(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({"text": f"you {rng.choice(TOXIC_WORDS)} number {i}", "label": 1})
        rows.append({"text": f"the {rng.choice(NEUTRAL_WORDS)} number {i}", "label": 0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_recipe(folder: Path, model: Path | None = None, budget: float = 100.0, extra: str = "") -> Path:
    write_labeled(folder / "data.jsonl")
    (folder / "ppl.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    model_line = f'[model]\nid = "{model}"\n' if model else ""
    text = f"""name = "t"
{model_line}
[data]
path = "data.jsonl"
n_per_class = 20
max_tokens = 32

[collect]
batch_size = 8

[check]
ppl_text = "ppl.txt"
ppl_tokens = 256
ppl_window = 64
max_ppl_increase = {budget}

[[step]]
method = "aura"
{extra}
"""
    (folder / "recipe.toml").write_text(text)
    return folder / "recipe.toml"


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("family", FAMILIES)
def test_run_then_verify_every_family(family: str, tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer(family, tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    r = _cli("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "units changed" in r.output
    meta = json.loads((tmp_path / "out/patch.json").read_text())
    assert meta["provenance"]["method"] == "aura" and meta["check"]["ppl_before"] > 0
    assert meta["data"][0]["data"]
    assert verify(tmp_path / "out").ok


def test_compute_then_bake_equals_run(tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    assert _cli("compute", recipe, "--out", tmp_path / "patch").exit_code == 0
    assert _cli("bake", tmp_path / "patch", "--model", model, "--out", tmp_path / "baked").exit_code == 0
    assert _cli("run", recipe, "--out", tmp_path / "run").exit_code == 0
    a = (tmp_path / "baked/model.safetensors").read_bytes()
    b = (tmp_path / "run/model.safetensors").read_bytes()
    assert a == b


def test_budget_exceeded_writes_nothing(tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model, budget=-0.5, extra='mode = "det0"\ntop_k = 40')
    r = _cli("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "over the recipe's budget" in r.output and "--force" in r.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    r = _cli("run", recipe, "--out", tmp_path / "out", "--force")
    assert r.exit_code == 0 and (tmp_path / "out/model.safetensors").exists()


def test_recipe_unknown_key_names_key_and_line(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, extra="")
    text = recipe.read_text().replace("n_per_class = 20", "n_per_clas = 20")
    recipe.write_text(text)
    line = text.splitlines().index("[data]") + 1
    with pytest.raises(PatcherError, match=rf"recipe.toml:{line}: unknown key data.n_per_clas"):
        load_recipe(recipe)


def test_recipe_bad_type_and_bad_step_setting(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, extra="")
    recipe.write_text(recipe.read_text().replace("n_per_class = 20", 'n_per_class = "many"'))
    with pytest.raises(PatcherError, match="data.n_per_class = 'many' should be of type"):
        load_recipe(recipe)
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model, extra="modulez = 1")
    r = _cli("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "unknown key step[1].modulez" in r.output


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    (tmp_path / "data.jsonl").unlink()
    r = _cli("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "data.jsonl" in r.output and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_smollm2_small_sample(smollm2: Path, shared_data: Path, tmp_path: Path) -> None:
    """The shipped recipe on the real model with a small sample; the output verifies."""
    text = (Path(__file__).parents[1] / "recipes/aura.toml").read_text()
    text = text.replace("n_per_class = 500", "n_per_class = 40").replace("ppl_tokens = 4096", "ppl_tokens = 512")
    text = text.replace("max_ppl_increase = 1.0", "max_ppl_increase = 10.0")  # 40 texts per class give noisy AUROCs
    text = text.replace("../../shared/data", str(shared_data))
    (tmp_path / "aura.toml").write_text(text)
    r = _cli("run", tmp_path / "aura.toml", "--model", smollm2, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out/patch.json").read_text())
    assert abs(meta["data"][0]["data"]["length_auroc"] - 0.5) < 0.1
    assert verify(tmp_path / "out").ok
