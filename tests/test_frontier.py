"""`benchmarks/frontier.py` end to end on the planted tiny model: each recipe's strength-like setting
swept on its declared grid with one statistics collection, every point evaluated and recorded with
its provenance, ``--resume`` measuring only what is missing, the plot, and the README table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import planted_neuron_model, write_planted_data

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import frontier  # noqa: E402  (benchmarks/frontier.py)

import results as results_module  # noqa: E402  (benchmarks/results.py)
from patcher.core.errors import PatcherError  # noqa: E402
from patcher.recipe.loader import load_recipe  # noqa: E402

STEPS = {
    "aura": 'method = "aura"\nmodules = ["mlp_in", "mlp_out"]\n',
    "circuit": 'method = "circuit"\nneuron_budget = 0.02\n',
}


def _recipe(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(f"""# Claim: the {name} paper's claim, as the recipe states it
# (two lines).
# Split: none.
name = "{name}"
[model]
id = "{tmp / 'model'}"
[data]
path = "pairs.jsonl"
pairs = true
n_per_class = 60
max_tokens = 32
[collect]
batch_size = 32
[check]
ppl_text = "ppl.txt"
ppl_tokens = 256
ppl_window = 128
[[step]]
{STEPS[name]}""")
    return path


def test_sweep_plan_from_the_declared_fields(tmp_path: Path) -> None:
    planted_neuron_model(tmp_path / "model")
    write_planted_data(tmp_path)
    aura, circuit = (load_recipe(_recipe(tmp_path, n)) for n in STEPS)
    s = frontier.plan_sweep(aura, 5)
    assert (s.key, s.values, s.declared, s.no_edit) == ("strength", [0.05, 0.1, 0.25, 0.5, 1.0], (0.0, 1.0, 0.05), 0.0), \
        "AURA has two strength-like settings: strength is swept; geometric levels 1/16..1 on its 0.05 grid"
    assert frontier.plan_sweep(aura, 5, "linear").values == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert frontier.plan_sweep(aura, 3, key="min_auroc").values == [0.88, 0.75, 0.5], "a no-edit value at the top: levels count down from it"
    assert frontier.plan_sweep(circuit, 5).key == "strength"
    with pytest.raises(PatcherError, match="no step has a strength-like setting named top_n"):
        frontier.plan_sweep(aura, 5, key="top_n")


def test_frontier_end_to_end_resume_and_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("profanity_check", reason="the evaluation here uses alt-profanity-check")
    planted_neuron_model(tmp_path / "model")
    write_planted_data(tmp_path)
    (tmp_path / "prompts.txt").write_text("you are a\nthe garden is\nwhat a zz\n")
    recipes = [str(_recipe(tmp_path, n)) for n in STEPS]
    args = [*recipes, "--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.txt"), "--n-prompts", "3", "--samples", "2",
            "--ppl-tokens", "256", "--ppl-text", str(tmp_path / "ppl.txt"), "--evaluators", "profanity-check", "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"), "--plot"]
    calls = []
    original = frontier.evaluate
    monkeypatch.setattr(frontier, "evaluate", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    path = frontier.main(args)
    assert path == tmp_path / "results/frontier-model.json" and len(calls) == 1 + 2 * 5, "the base once, then 5 points per recipe"
    data = json.loads(path.read_text())
    assert data["kind"] == "frontier" and data["settings"]["n_prompts"] == 3 and data["prompts"]["name"] == "prompts.txt"
    for name, entry in data["recipes"].items():
        assert entry["sweep"]["setting"] == "strength" and entry["sweep"]["values"] == [0.05, 0.1, 0.25, 0.5, 1.0]
        assert entry["sweep"]["declared_range"] == [0.0, 1.0, 0.05] and entry["collections"] == 1, f"{name}: one statistics collection"
        assert entry["claim"] == f"the {name} paper's claim, as the recipe states it (two lines)."
        assert [p["value"] for p in entry["points"]] == entry["sweep"]["values"]
        prov = entry["points"][0]["provenance"]
        assert {"git_commit", "command", "versions", "data_sha256", "seeds", "wall_seconds", "machine", "measured_at"} <= set(prov)
        assert {"collect", "compute", "bake", "eval"} <= set(prov["wall_seconds"]) and prov["wall_seconds"] and "pairs.jsonl" in prov["data_sha256"]
        assert entry["points"][1]["provenance"]["wall_seconds"]["collect"] <= prov["wall_seconds"]["collect"], "later points reuse the statistics"
        assert sorted(f.name for f in (tmp_path / "runs" / name / "strength=0.5").iterdir()) == ["eval.json", "patch.json"]
    text = path.read_text()
    assert str(tmp_path) not in text, "no local absolute path is published"
    # the circuit at strength 1 removes the planted neuron: its perplexity moves; at 0.05 barely
    circuit = data["recipes"]["circuit"]["points"]
    assert circuit[-1]["metrics"]["wikitext_perplexity"]["value"] != pytest.approx(data["base"]["metrics"]["wikitext_perplexity"]["value"], rel=1e-6)
    assert (tmp_path / "results/frontier-model.png").stat().st_size > 1000
    # --resume: only what the file does not hold is measured again
    data["recipes"]["aura"]["points"].pop(2)
    path.write_text(json.dumps(data))
    calls.clear()
    frontier.main([*args, "--resume"])
    again = json.loads(path.read_text())
    assert len(calls) == 1 and calls[0].name == "strength=0.25", "one missing point, nothing else"
    assert [p["value"] for p in again["recipes"]["aura"]["points"]] == [0.05, 0.1, 0.25, 0.5, 1.0]
    assert again["recipes"]["circuit"] == data["recipes"]["circuit"] and again["base"] == data["base"]
    # a recipe whose settings changed is measured again; a comment-only change is not a change
    aura_path = tmp_path / "aura.toml"
    aura_path.write_text("# a new comment line\n" + aura_path.read_text())
    calls.clear()
    frontier.main([*args, "--resume"])
    assert calls == [], "comments do not change what a recipe computes"
    aura_path.write_text(aura_path.read_text().replace("[[step]]", "[[step]]\nmin_auroc = 0.6", 1))
    frontier.main([*args, "--resume"])
    assert [c.parent.name for c in calls] == ["aura"] * 5, "the changed recipe's five points, nothing else"
    assert json.loads(path.read_text())["recipes"]["aura"]["recipe_sha256"] != again["recipes"]["aura"]["recipe_sha256"]
    calls.clear()
    frontier.main([*args[:-1], "--resume", "--samples", "3"])
    assert len(calls) == 11, "other evaluation settings measure everything again"
    # the README table renders from the file, and --check catches a changed cell
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:frontier-model -->\n<!-- /results:frontier-model -->\n")
    check = ["--readme", str(readme), "--results", str(tmp_path / "results")]
    assert results_module.main(check) == 0 and results_module.main([*check, "--check"]) == 0
    table = readme.read_text()
    assert "| `aura` | strength=0.1 |" in table and "| `aura` | **strength=0.05** |" in table and "the aura paper's claim" in table and "| base | - |" in table
