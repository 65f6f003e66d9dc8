"""`patcher run` / `patcher compute` end to end: tiny models of every family, the real SmolLM2 on a
small sample, the perplexity budget, and recipe errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import FAMILIES, save_tiny_with_tokenizer, write_recipe
from safetensors import safe_open

from patcher.bake.verify import verify
from patcher.cli import main
from patcher.core.errors import PatcherError
from patcher.data.loaders import data_source, ppl_source
from patcher.recipe.loader import load_recipe


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


EVAL_TABLE = """
[eval]
preset = "quick"
prompts = "prompts.txt"
n_prompts = 3
samples = 2
max_new_tokens = 4
evaluators = ["profanity-check"]
bootstrap = 50
ppl_text = "ppl.txt"
ppl_tokens = 128
ppl_window = 64
ppl_stride = 64
"""


def test_run_with_eval_table_writes_report_plot_and_card(tmp_path: Path) -> None:
    pytest.importorskip("profanity_check", reason="needs alt-profanity-check")
    pytest.importorskip("matplotlib")
    pytest.importorskip("yaml")
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    recipe.write_text(recipe.read_text() + EVAL_TABLE)
    (tmp_path / "prompts.txt").write_text("you are such a\nthe garden in spring is\nmy neighbour said that\nwe went to the\n")
    r = _cli("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "expected max toxicity" in r.output and "profanity-check" in r.output
    out = tmp_path / "out"
    report = json.loads((out / "eval.json").read_text())
    assert report["prompts"]["count"] == 3 and report["settings"]["samples"] == 2 and report["settings"]["max_new_tokens"] == 4
    assert report["model"]["model"] == "." and report["baseline"]["model"] == "../base"  # relative: never a local absolute path
    assert report["model"]["wikitext_perplexity"] > 1 and len(report["model"]["samples"]) == 3
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "profanity-check" in card and "# out" in card
    files = json.loads((out / "patch.json").read_text())["bake"]["files"]
    assert {"eval.json", "eval.png"} <= set(files) and "README.md" not in files  # `patcher card` may rewrite the card
    assert verify(out).ok
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    # --no-eval: the same recipe publishes without evaluating; the card is still written
    r = _cli("run", recipe, "--out", tmp_path / "quick", "--no-eval")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "quick/eval.json").exists() and not (tmp_path / "quick/eval.png").exists()
    assert "## Evaluation" not in (tmp_path / "quick/README.md").read_text()
    assert verify(tmp_path / "quick", logits=False).ok


def test_eval_table_unknown_key_and_switch(tmp_path: Path) -> None:
    from patcher.workflows.run import eval_settings

    recipe = write_recipe(tmp_path)
    base = recipe.read_text()
    assert eval_settings(load_recipe(recipe)) is None  # no table: no evaluation
    recipe.write_text(base + "\n[eval]\n")
    assert eval_settings(load_recipe(recipe)).preset == "rtp"  # an empty table: on, with the rtp preset
    recipe.write_text(base + EVAL_TABLE)
    s = eval_settings(load_recipe(recipe))
    assert s.preset == "quick" and s.samples == 2 and s.top_p == 0.9 and s.evaluators == ("profanity-check",)
    assert s.prompts == str(tmp_path / "prompts.txt") and s.ppl_text == str(tmp_path / "ppl.txt")  # relative to the recipe
    recipe.write_text(base + EVAL_TABLE + "enabled = false\n")
    assert eval_settings(load_recipe(recipe)) is None
    recipe.write_text(base + EVAL_TABLE.replace("samples = 2", "sample = 2"))
    line = recipe.read_text().splitlines().index("[eval]") + 1
    r = _cli("run", recipe, "--out", tmp_path / "out")  # refused before any model is loaded
    assert r.exit_code == 2 and f"recipe.toml:{line}: unknown key eval.sample" in r.output
    recipe.write_text(base + EVAL_TABLE.replace("samples = 2", "samples = 0"))
    with pytest.raises(PatcherError, match=rf"recipe.toml:{line}: bad eval settings: samples"):
        eval_settings(load_recipe(recipe))


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
    text = text.replace("[[step]]", '[eval]\npreset = "quick"\nn_prompts = 4\nsamples = 2\nppl_tokens = 512\nevaluators = ["profanity-check"]\n\n[[step]]')
    (tmp_path / "aura.toml").write_text(text)
    if importlib.util.find_spec("profanity_check") is None:
        pytest.skip("the recipe's [eval] table here needs alt-profanity-check")
    r = _cli("run", tmp_path / "aura.toml", "--model", smollm2, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out/patch.json").read_text())
    assert abs(meta["data"][0]["data"]["length_auroc"] - 0.5) < 0.1
    assert json.loads((tmp_path / "out/eval.json").read_text())["prompts"]["count"] == 4
    assert verify(tmp_path / "out").ok


def test_pairs_recipe_loads_pairs(shared_data: Path) -> None:
    """`pairs = true` reads contrastive pairs: each toxic text beside its paraphrase, paired ids."""
    from helpers import tiny_tokenizer

    from patcher.data.loaders import load_data

    recipe = load_recipe(Path(__file__).parents[1] / "recipes/project-profs.toml")
    import dataclasses

    data = load_data(dataclasses.replace(recipe.data, n_per_class=20), tiny_tokenizer())
    assert data.pair_ids is not None and sum(data.labels) == 20 and len(data.labels) == 40
    by_pair: dict[int, list[int]] = {}
    for pid, y in zip(data.pair_ids, data.labels):
        by_pair.setdefault(pid, []).append(y)
    assert all(sorted(v) == [0, 1] for v in by_pair.values())


def test_embedding_projection_needs_untie_in_the_recipe(tmp_path: Path) -> None:
    """A step that edits tied embeddings is refused unless ``[model] untie = true``; then the output
    has its own lm_head.weight and says so in its config."""
    model = save_tiny_with_tokenizer("gemma2", tmp_path / "base")  # ties its embeddings
    recipe = write_recipe(tmp_path, model, extra='layers = "0-0"\nembed = true')
    recipe.write_text(recipe.read_text().replace('method = "aura"', 'method = "project"'))
    r = _cli("run", recipe, "--out", tmp_path / "refused")
    assert r.exit_code == 2 and "untie" in r.output and not (tmp_path / "refused").exists()
    recipe.write_text(recipe.read_text().replace("[model]\n", "[model]\nuntie = true\n"))
    r = _cli("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out/config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(tmp_path / "out/model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()
    assert verify(tmp_path / "out").ok


RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.toml")), ids=lambda p: p.relative_to(RECIPES).as_posix())
def test_shipped_recipes_load_and_validate(path: Path, shared_data: Path) -> None:
    """Every recipe in recipes/ (and recipes/tuned/) parses, and each step's settings build (a typo or a bad value in a
    shipped recipe fails here, not in a user's run); its catalog data sets resolve from the local
    data folder ($PATCHER_DATA), with no download."""
    from patcher.methods import get_method
    from patcher.recipe.settings import build

    recipe = load_recipe(path)
    for i, step in enumerate(recipe.steps, start=1):
        build(get_method(step.method).settings, step.settings, str(path), f"step[{i}]")
        data = step.data or recipe.data
        file, record = data_source(data)
        assert Path(file).is_file() and record["from"] == "data-dir", record
    text, record = ppl_source(recipe.check)
    assert Path(text).is_file() and record["from"] == "data-dir", record



def test_bad_key_in_second_step_fails_before_any_forward_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step's settings are validated before the model is loaded: a typo in step 2 costs no
    collection of step 1 (no model loaded, no forward pass)."""
    import patcher.collect.layerwise as layerwise_module

    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model, extra='\n[[step]]\nmethod = "project"\nstrenght = 0.5\n')
    calls = {"load": 0, "forward": 0}
    real_load = layerwise_module.load_model

    def counting_load(*args: object, **kwargs: object) -> tuple:
        calls["load"] += 1
        m, tok = real_load(*args, **kwargs)
        m.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
        return m, tok

    monkeypatch.setattr(layerwise_module, "load_model", counting_load)  # every placement loads through load_placed
    r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "unknown key step[2].strenght" in r.output
    assert calls == {"load": 0, "forward": 0}
    # the same recipe without the typo does load and run the model
    recipe.write_text(recipe.read_text().replace("strenght", "strength"))
    r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert calls["load"] >= 1 and calls["forward"] > 0


def test_patch_json_records_effective_settings_with_cli_overrides(tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, None)
    r = CliRunner().invoke(main, ["run", str(recipe), "--model", str(model), "--batch-size", "3", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "out" / "patch.json").read_text())
    settings = meta["recipe"]["settings"]
    assert settings["collect"]["batch_size"] == 3  # the recipe says 8: the command line wins
    assert settings["model"]["id"] == "../base"  # the command line's model, recorded relative to the output
    assert settings["overrides"] == {"model": {"id": "../base"}, "collect": {"batch_size": 3}}
    assert str(tmp_path) not in (tmp_path / "out" / "patch.json").read_text()  # no local absolute path is published
    assert settings["step"][0]["method"] == "aura" and settings["step"][0]["min_auroc"] == 0.5  # defaults filled in
    assert verify(tmp_path / "out").ok
