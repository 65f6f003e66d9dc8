"""The README's results tables are data: `benchmarks/results.py --check` passes on the repository and
fails when a table cell differs from its results file, or a file or a table is missing its other half."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results as results_module  # noqa: E402  (benchmarks/results.py)


def _row(p: float, ci: tuple[float, float], ppl: float) -> dict:
    tox = {"toxicity_probability": {"value": p, "ci": list(ci)}, "expected_max_toxicity": {"value": p, "ci": list(ci)}}
    return {"metrics": {"toxicity": {"profanity-check": tox, "any": tox}, "wikitext_perplexity": {"value": ppl, "ci": None},
                        "degenerate_share": {"value": 0.01, "ci": None}, "blimp_accuracy": {"value": 0.8, "ci": [0.78, 0.82]},
                        "blimp_drop": {"value": 0.4, "ci": [-0.1, 0.9]}, "kl_from_base": {"value": 0.05, "ci": [0.04, 0.06]}}}


def test_repository_readme_matches_its_results_files() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/results.py"), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    if any((ROOT / "results").glob("*.json")):
        assert "<!-- results:" in (ROOT / "README.md").read_text()


def test_check_fails_on_a_changed_cell(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    data = {"format": "patcher.results/1", "model": "m", "settings": {"samples": 5}, "prompts": {"name": "rtp-challenging:report", "count": 10},
            "rows": {"base": _row(0.453, (0.4, 0.5), 30.36), "project-stack": _row(0.153, (0.12, 0.19), 31.78)}}
    (tmp_path / "results/m.json").write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- results:m -->\nold\n<!-- /results:m -->\n\nafter\n")
    check = ["--readme", str(readme), "--results", str(tmp_path / "results")]
    assert results_module.main(check + ["--check"]) == 1  # not rendered yet
    assert results_module.main(check) == 0
    text = readme.read_text()
    assert "| `project-stack` | 0.153 [0.120, 0.190] | 0.153 [0.120, 0.190] | 31.78 (+4.7%) |" in text and text.endswith("after\n")
    assert results_module.main(check + ["--check"]) == 0
    readme.write_text(text.replace("31.78 (+4.7%)", "31.70 (+4.7%)"))
    assert results_module.main(check + ["--check"]) == 1
    # a results file without a table, and a table without a file
    readme.write_text(text)
    shutil.copy(tmp_path / "results/m.json", tmp_path / "results/n.json")
    assert results_module.main(check + ["--check"]) == 1
    (tmp_path / "results/n.json").unlink()
    readme.write_text(text + "<!-- results:gone -->\n<!-- /results:gone -->\n")
    assert results_module.main(check + ["--check"]) == 1


def test_the_repository_check_fails_on_a_changed_cell(tmp_path: Path) -> None:
    files = sorted((ROOT / "results").glob("*.json"))
    if not files:
        pytest.skip("no results/*.json committed: no rendered table to change (test_check_fails_on_a_changed_cell covers the mechanism)")
    text = (ROOT / "README.md").read_text()
    start = text.index(f"<!-- results:{files[0].stem} -->")
    row = text.index("| base |", start)
    cell_end = text.index(" |", row + len("| base |") + 1)
    changed = text[:cell_end] + "9" + text[cell_end:]
    (tmp_path / "README.md").write_text(changed)
    assert results_module.main(["--check", "--readme", str(tmp_path / "README.md"), "--results", str(ROOT / "results")]) == 1


def test_frontier_file_renders_and_check_fails_on_a_changed_cell(tmp_path: Path) -> None:
    """A results file of kind "frontier": one row per recipe and strength, the paper's claim on the
    recipe's first row, the least toxic point within the budget in bold (a recipe with none says so)."""
    (tmp_path / "results").mkdir()

    def point(v: float, p: float, ppl: float) -> dict:
        return {"value": v, "metrics": _row(p, (p - 0.05, p + 0.05), ppl)["metrics"]}

    sweep = {"setting": "strength", "values": [0.25, 0.5, 1.0]}
    data = {"format": "patcher.results/1", "kind": "frontier", "model": "m", "budget": 0.05, "settings": {"samples": 5, "blimp": 20},
            "prompts": {"name": "rtp-challenging:report", "count": 50}, "base": {"metrics": _row(0.45, (0.4, 0.5), 30.0)["metrics"]},
            "recipes": {"aura": {"sweep": sweep, "claim": "up to 2.2x less toxic at +0.72 PPL",
                                 "points": [point(0.25, 0.40, 30.9), point(0.5, 0.30, 31.2), point(1.0, 0.20, 45.0)]},
                        "circuit": {"sweep": sweep, "claim": None, "points": [point(0.25, 0.3, 33.0)]}}}
    (tmp_path / "results/frontier-m.json").write_text(json.dumps(data))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:frontier-m -->\n<!-- /results:frontier-m -->\n")
    check = ["--readme", str(readme), "--results", str(tmp_path / "results")]
    assert results_module.main(check + ["--check"]) == 1
    assert results_module.main(check) == 0 and results_module.main(check + ["--check"]) == 0
    text = readme.read_text()
    assert "| `aura` | strength=0.25 | 0.400 [0.350, 0.450] | 0.400 [0.350, 0.450] | 30.90 (+3.0%) | 0.800 [0.780, 0.820] | up to 2.2x less toxic at +0.72 PPL |" in text
    assert "| `aura` | **strength=0.5** | 0.300 [0.250, 0.350] | 0.300 [0.250, 0.350] | 31.20 (+4.0%) | 0.800 [0.780, 0.820] |  |" in text
    assert "| `aura` | strength=1.0 |" in text and "| `circuit` | none within +5% |" in text and "| base | - | 0.450 [0.400, 0.500]" in text
    readme.write_text(text.replace("31.20 (+4.0%)", "31.25 (+4.0%)"))
    assert results_module.main(check + ["--check"]) == 1


def test_rows_with_a_claim_get_the_claim_column_and_recipe_comment_reads_tagged_blocks(tmp_path: Path) -> None:
    """A seeds table (`benchmarks/recipes.py --file seeds-M`) shows each method's paper claim beside it;
    tables without claims keep their columns. The claim and split come from the recipe's own comments."""
    from recipes import recipe_comment  # benchmarks/recipes.py

    claimed = _row(0.2, (0.1, 0.3), 31.0) | {"claim": "AURA: up to 2.2x | less toxic"}
    data = {"format": "patcher.results/1", "model": "m", "settings": {"samples": 5}, "prompts": {"name": "rtp-challenging:report", "count": 10},
            "rows": {"base": _row(0.453, (0.4, 0.5), 30.0), "aura": claimed, "other": _row(0.3, (0.2, 0.4), 30.5)}}
    text = results_module.render(data)
    assert "| paper's claim |" in text
    assert text.splitlines()[3].count("---|") == 9  # row, profanity-check, any, ppl, 2 x BLiMP, KL, degenerate, claim
    assert "| AURA: up to 2.2x \\| less toxic |" in text and text.count("| - |") == 2  # base and the row without a claim
    assert "(over 1 point)" not in text  # every drop is 0.4 points
    data["rows"]["other"]["metrics"]["blimp_drop"] = {"value": 1.2, "ci": [0.1, 2.3]}
    assert "| 1.20 [0.10, 2.30] (over 1 point) |" in results_module.render(data)  # issue 25: a row costing > 1 point says so
    data["rows"].pop("aura")
    assert "paper's claim" not in results_module.render(data)
    recipe = tmp_path / "r.toml"
    recipe.write_text("# What it does.\n# Claim: Paper X: up to\n#   20% less toxic.\n# Split: select. Chosen by\n# patcher tune.\n\nname = 'r'\n")
    assert recipe_comment(recipe, "Claim") == "Paper X: up to 20% less toxic."
    assert recipe_comment(recipe, "Split") == "select. Chosen by patcher tune."
    assert recipe_comment(recipe, "Nothing") is None


def test_every_shipped_recipe_says_its_settings_were_not_chosen_on_report_prompts() -> None:
    """Issue 25: no setting in a shipped recipe was chosen by looking at `report` prompts. Each recipe's
    `# Split:` comment says so: `select` (a search on the select part chose them) or `none needed`
    (nothing in it was chosen by a toxicity measurement); a recipe whose settings predate the split fails."""
    from recipes import recipe_comment  # benchmarks/recipes.py

    for path in sorted((ROOT / "recipes").rglob("*.toml")):
        split = recipe_comment(path, "Split")
        name = path.relative_to(ROOT).as_posix()
        assert split, f"{name}: no '# Split:' comment"
        assert split.startswith(("select", "none needed")), f"{name}: # Split: {split[:120]}"


def test_every_committed_measurement_was_made_with_the_recipe_as_it_is_now() -> None:
    """A results row (or frontier point) measured before its recipe's settings changed would not be
    reproduced by its recorded command: each one records the hash of what its recipe computes
    (`recipe_sha256`), and it must equal the shipped file's."""
    from recipes import recipe_sha256  # benchmarks/recipes.py

    stale = []
    for path in sorted((ROOT / "results").glob("*.json")):
        data = json.loads(path.read_text())
        entries = [(f"rows.{n}", r) for n, r in data.get("rows", {}).items()] + [(f"recipes.{n}", r) for n, r in data.get("recipes", {}).items()]
        for name, entry in entries:
            if not entry.get("recipe"):
                continue  # the base model
            assert "recipe_sha256" in entry, f"{path.name}: {name}: no recipe_sha256"
            if entry["recipe_sha256"] != recipe_sha256(ROOT / entry["recipe"]):
                stale.append(f"{path.name}: {name} ({entry['recipe']})")
    assert not stale, "measured with an earlier version of the recipe; measure again (--resume): " + "; ".join(stale)


def test_recipe_sha256_ignores_comments_and_the_model_id_but_not_settings(tmp_path: Path) -> None:
    from recipes import recipe_sha256  # benchmarks/recipes.py

    a = tmp_path / "a.toml"
    a.write_text('name = "x"\n[model]\nid = "m1"\n[[step]]\nmethod = "project"\nstrength = 0.5\n')
    h = recipe_sha256(a)
    a.write_text('# Split: select\nname = "x"\n[model]\nid = "m2"\n[[step]]\nmethod = "project"  # a remark\nstrength = 0.5\n')
    assert recipe_sha256(a) == h
    a.write_text('name = "x"\n[model]\nid = "m1"\ndtype = "bfloat16"\n[[step]]\nmethod = "project"\nstrength = 0.5\n')
    assert recipe_sha256(a) != h, "the model table's other keys change what runs"
    a.write_text('name = "x"\n[model]\nid = "m1"\n[[step]]\nmethod = "project"\nstrength = 0.6\n')
    assert recipe_sha256(a) != h
