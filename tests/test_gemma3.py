"""The real Gemma 3 270M (the second embedded model): the main recipe, project-stack, runs end to end
on a small sample, every estimate is finite, bake = intervene (`patcher verify` compares the baked
checkpoint's logits with the hooked base's), and the card names the Gemma Terms of Use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from patcher import Patch
from patcher.bake.verify import verify
from patcher.cli import main
from patcher.collect.localisation import parse_layers
from patcher.recipe.loader import load_recipe


@pytest.mark.slow
def test_project_stack_on_real_gemma3(gemma3: Path, shared_data: Path, tmp_path: Path) -> None:
    text = (Path(__file__).parents[1] / "recipes/project-stack.toml").read_text()
    text = text.replace("n_per_class = 500", "n_per_class = 24").replace("ppl_tokens = 4096", "ppl_tokens = 256")
    text = text.replace("max_ppl_increase = 0.05", "max_ppl_increase = 10.0")  # 24 pairs give a noisy direction
    text = text.replace("match_lengths = true }", "match_lengths = true, n_per_class = 24 }")
    text = text.replace("../../shared/data", str(shared_data))
    (tmp_path / "stack.toml").write_text(text)
    r = CliRunner().invoke(main, ["run", str(tmp_path / "stack.toml"), "--model", "gemma3-270m", "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    patch = Patch.load(out)
    recipe = load_recipe(tmp_path / "stack.toml")  # each step: one edit per layer and block it names (the layers: a depth share)
    assert len(patch.edits) == sum(len(parse_layers(s.settings["layers"], 18)) * len(s.settings["blocks"]) for s in recipe.steps) > 18
    for e in patch.edits:
        assert all(torch.isfinite(t).all() for t in e.tensors().values()), e.module
    meta = json.loads((out / "patch.json").read_text())
    assert meta["bake"]["base"]["model"] == "gemma3-270m"
    assert meta["check"]["ppl_before"] < 40  # <bos> starts every window: the model reads text as it was trained to
    result = verify(out)
    assert result.ok, (result.bad_files, result.bad_tensors, result.max_abs_diff, result.tolerance)
    card = (out / "README.md").read_text()
    assert "Gemma Terms of Use" in card and (out / "GEMMA_TERMS.html").is_file()
