"""`patcher sae train` (`patcher.collect.sae_fit`, `patcher.workflows.sae`): the trainer recovers
planted sparse features; what it writes is a SAELens folder `patcher.io.sae_files` reads back with
its layer; the workflow trains on non-toxic text only and records its quality; a recipe names a
trained SAE with ``{model}`` and a missing one is a one-line error naming the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_with_tokenizer, write_recipe

from patcher.collect.sae_fit import TrainSettings, fit_sae, quality, write_sae
from patcher.core.errors import PatcherError
from patcher.data.catalog import set_data_dir
from patcher.io.sae_files import read_sae
from patcher.recipe.loader import load_recipe
from patcher.workflows.run import compute_patch, step_settings
from patcher.workflows.sae import HOLDOUT, TextWindows, expand_model_paths, train, training_text


def planted(d: int = 32, n_features: int = 64, n: int = 20000, p: float = 0.04, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit feature directions and activations that are sparse non-negative sums of them, plus an
    offset (a residual stream's mean) and a little noise."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=g)
    feats = feats / feats.norm(dim=1, keepdim=True)
    on = torch.rand(n, n_features, generator=g) < p
    x = (on * (torch.rand(n, n_features, generator=g) + 0.5)) @ feats + 0.01 * torch.randn(n, d, generator=g) + 3.0
    return feats, x


def test_trainer_recovers_planted_features() -> None:
    feats, x = planted()
    sae = fit_sae(x, TrainSettings(width=128, l1=3.0, steps=1500, batch=512))
    dirs = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (feats @ dirs.T).max(dim=1).values  # each planted feature's closest decoder direction
    assert best.min() >= 0.9, f"planted features not recovered: worst cosine {best.min():.3f}"
    q = quality(sae, x[-4000:])
    assert q["explained_variance"] > 0.5 and q["l0"] < 16  # sparse: about 2.6 features are on per vector
    # the folded scale: the SAE works on the activations as given, not the scaled ones
    assert sae.encode(x[:10]).gt(0).any()


def test_untrained_sae_explains_nothing() -> None:
    """The quality measure can fail: a random SAE has no explained variance to speak of."""
    _, x = planted(n=2000)
    sae = fit_sae(x, TrainSettings(width=16, steps=1, l1=0.0))
    assert quality(sae, x)["explained_variance"] < 0.5


def test_written_sae_reads_back_with_its_layer(tmp_path: Path) -> None:
    _, x = planted(n=2000)
    sae = fit_sae(x, TrainSettings(width=48, steps=50, batch=256))
    sae.layer = 1
    write_sae(sae, tmp_path / "layer-1", {"model_name": "tiny"})
    back = read_sae(tmp_path / "layer-1", 32, 2)
    cfg = json.loads((tmp_path / "layer-1" / "cfg.json").read_text())
    assert back.layer == 1 and cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["architecture"] == "standard"
    assert torch.allclose(back.encode(x[:20]), sae.encode(x[:20]), atol=1e-5)


WORDS = ["river", "garden", "morning", "music", "window", "friend", "table", "light", "stone", "paper"]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data folder in the local layout: WikiText-2 longer than its held-out head (the tiny
    tokenizer is one token a character), BOLD prompts, and labelled sets whose toxic rows hold a
    marker that must never reach the training text."""
    g = torch.Generator().manual_seed(0)
    words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (HOLDOUT // 3,), generator=g)]
    root = tmp_path / "data"
    (root / "wikitext2").mkdir(parents=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(" ".join(words))
    (root / "neutral_prompts").mkdir()
    (root / "neutral_prompts" / "bold_prompts.jsonl").write_text("".join(json.dumps({"prompt": f"the {w} is "}) + "\n" for w in WORDS))
    (root / "toxicity_labeled").mkdir()
    rows = [{"text": f"a {w} here", "label": 0} for w in WORDS] + [{"text": "zzqq toxic marker", "label": 1}]
    for name in ("paradetox_labeled.jsonl", "jigsaw_snlp_detox.jsonl"):
        (root / "toxicity_labeled" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_data_dir(root)
    yield root
    set_data_dir(None)


def test_training_text_leaves_out_toxic_rows_and_the_perplexity_head(data_dir: Path, tmp_path: Path) -> None:
    from helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    docs, sources = training_text(tok)
    text = "|".join(tok.decode(d).replace(" ", "") for d in docs)  # the character tokenizer decodes with spaces between
    assert "zzqq" not in text and "theriveris" in text and "agardenhere" in text
    assert len(docs[0]) == len((data_dir / "wikitext2" / "wiki.test.raw").read_text()) - HOLDOUT
    assert {s["name"] for s in sources} == {"wikitext-2", "bold-prompts", "paradetox", "jigsaw-test"}


def test_train_writes_saelens_folders_a_recipe_runs_on(data_dir: Path, tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "tiny")
    out = tmp_path / "saes" / "tiny"
    r = train(str(model), "0-1", out, text=TextWindows(tokens=4096, context=32), settings=TrainSettings(expansion=2, steps=60, batch=256))
    assert [x.layer for x in r.layers] == [0, 1]
    record = json.loads((out / "sae.json").read_text())
    assert record["model"] == "tiny" and record["layers"] == [0, 1] and str(tmp_path) not in (out / "sae.json").read_text()
    for layer in (0, 1):
        q = json.loads((out / f"layer-{layer}" / "quality.json").read_text())
        assert {"explained_variance", "dead_features", "l0", "ppl_base", "ppl_spliced"} <= set(q)
        assert read_sae(out / f"layer-{layer}", 32, 2).layer == layer
    assert not list(out.parent.glob(".*partial*"))  # written atomically: no staging folder left
    # a recipe names it with {model} (here the local folder's name); the project step runs on it
    recipe_dir = tmp_path / "recipe"
    recipe_dir.mkdir()
    write_recipe(recipe_dir)  # its data and perplexity text
    sae_path = (tmp_path / "saes" / "{model}" / "layer-1").as_posix()
    (recipe_dir / "sae.toml").write_text(f"""name = "s"
[model]
id = "{model.as_posix()}"
[data]
path = "data.jsonl"
n_per_class = 20
max_tokens = 32
[check]
ppl_text = "ppl.txt"
[[step]]
method = "project"
direction = "sae"
sae_path = "{sae_path}"
sae_top = 2
layers = "0-1"
""")
    recipe = load_recipe(recipe_dir / "sae.toml")
    assert step_settings(recipe)[0].sae_path == str(out / "layer-1")
    # the plan's inputs name the expanded SAE folder (outputs may not touch it; provenance hashes it file by file)
    from patcher.io.checkpoint import sha256_inputs
    from patcher.workflows.run_plan import resolve

    inputs = resolve(recipe).inputs
    assert out / "layer-1" in inputs and not any("{model}" in str(p) for p in inputs)
    hashes = sha256_inputs([out / "layer-1"])
    assert {"layer-1/cfg.json", "layer-1/sae_weights.safetensors"} <= set(hashes) and all(len(h) == 64 for h in hashes.values())
    # an output inside the SAE the recipe reads is refused in one line, nothing written, the SAE untouched
    from click.testing import CliRunner

    from patcher.cli import main

    before = {f: f.read_bytes() for f in (out / "layer-1").iterdir()}
    r = CliRunner().invoke(main, ["compute", str(recipe_dir / "sae.toml"), "--out", str(out / "layer-1" / "p")])
    assert r.exit_code != 0 and "sits inside the input" in r.output, r.output
    assert {f: f.read_bytes() for f in (out / "layer-1").iterdir()} == before
    from patcher.core.models import load_model

    m, tok = load_model(model)
    patch, _ = compute_patch(recipe, m, tok)
    assert patch.edits and patch.provenance["sae"]["sae_layer"] == 1


def test_missing_sae_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(PatcherError, match=r"patcher sae train --model gemma3-270m --layers 12 --out saes/gemma3-270m"):
        expand_model_paths({"sae_path": "saes/{model}/layer-12"}, "gemma3-270m")
    assert expand_model_paths({"sae_path": "hf://a/b/x", "layers": "1"}, "m") == {"sae_path": "hf://a/b/x", "layers": "1"}
