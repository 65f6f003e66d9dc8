"""Every seed method finds and removes a planted toxic direction within a perplexity budget.

The model (`helpers.planted_neuron_model`): a tiny Llama whose random layers matter to its neutral
perplexity, with one planted mechanism: the toxic marker ``z`` sets residual dim 5, neuron 0 of
layer 0's MLP reads it and writes dim 7, and the head reads dim 7 as "another z or a space comes
next". The data are pairs (a sentence with a run of ``z``, its paraphrase with ``q``); the toxicity
is the probability the model gives to what follows a ``z`` on held-out sentences
(`helpers.planted_toxicity`), the damage the perplexity of a neutral text with no ``z``.

Each case is a shipped recipe's step, run as shipped except for what the tiny model needs (said in
the case's comment):

* sizes: the shipped ``top_n`` and budgets are fractions of a model with tens of thousands of MLP
  neurons; this one has 96 (``scale``: one neuron; ``circuit``: a neuron budget of 2%, one neuron,
  where the shipped 1% is floor(0.96) = 0 units);
* strengths: a strength chosen on SmolLM2 for its +5% budget (``project-meandiff`` 0.45,
  ``transport-linear`` 0.5) is set to 1, each paper's own value;
* the SAE, on layer 0's residual stream in the SAELens layout: one written here whose decoder holds
  the planted direction (feature 0) among 15 random ones orthogonal to it, and one trained by
  `patcher.collect.sae_fit` on the states of both sides of the pairs (an SAE trained on neutral text
  alone has no feature for a marker only toxic text holds). The trained one has no feature equal to
  the planted direction: its features mix dims 5-7, as the states do.

Not covered: Mean-AcT (``transport-mean``). Its map is a constant shift per unit, the same at every
token, so it cannot remove what one token writes: on this model it lowers the toxicity by a few
percent while the shift, applied to every token, costs perplexity. Linear-AcT (a scale per unit) can.

Each case must lower the toxicity by ``FACTOR`` at a perplexity rise of at most ``MAX_PPL_INCREASE``,
and at each strength-like setting's no-edit value (declared on its field) change nothing, so a
method that edits nothing, or edits the wrong units, fails.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import PLANTED_DIM, PLANTED_LAYER, PLANTED_NEURON, planted_neuron_model, planted_toxicity, write_planted_data

from patcher.collect.sae_fit import TrainSettings, fit_sae, write_sae
from patcher.core.models import load_model
from patcher.edits.edit import ScaleInputs
from patcher.io.sae_files import SAE
from patcher.methods import get_method
from patcher.recipe.loader import load_recipe
from patcher.recipe.settings import tune_fields
from patcher.recipe.writer import dump_recipe
from patcher.workflows.run import check_perplexity, compute_patch

RECIPES = Path(__file__).parents[1] / "recipes"
FACTOR = 10.0  # the planted toxicity falls at least tenfold (removing the neuron by hand: about fortyfold)
MAX_PPL_INCREASE = 0.05  # the budget: +5% perplexity on the neutral text

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "scale-neurons": ("scale-neurons.toml", {"top_n": 1}),  # one neuron of 96 (shipped: 100 of SmolLM2's 46,080)
    "aura": ("aura.toml", {}),
    "project-meandiff": ("project-meandiff.toml", {"strength": 1.0}),  # shipped 0.45: SmolLM2's +5% point
    "project-probe-weights": ("project-probe.toml", {}),
    "project-probe-pattern": ("project-probe.toml", {"probe_erase": "pattern"}),
    "project-sae": ("project-sae.toml", {"layers": "0-1"}),  # sae_path: the SAE written here; shipped layers 8-12
    "project-sae-trained": ("project-sae.toml", {"layers": "0-1"}),  # sae_path: the SAE trained here
    "circuit": ("circuit.toml", {"neuron_budget": 0.02}),  # one neuron of 96 (shipped 1%: none of 96)
    "transport-linear": ("transport-linear.toml", {"strength": 1.0}),  # shipped 0.5: chosen on SmolLM2
}


@dataclasses.dataclass
class Planted:
    folder: Path
    model: Any
    tokenizer: Any
    held: list[str]
    sae: Path
    sae_trained: Path
    toxicity: float
    ppl: float


def planted_sae(folder: Path, width: int = 16) -> Path:
    """A standard ReLU SAE on layer 0's residual stream: feature 0 is the planted direction, the
    others random unit vectors with no part along dims 5-7."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(width, 32, generator=g)
    w[:, 5:8] = 0.0
    w[0] = 0.0
    w[0, PLANTED_DIM] = 1.0
    w = w / w.norm(dim=1, keepdim=True)
    write_sae(SAE(w.T.contiguous(), w.contiguous(), torch.zeros(width), torch.zeros(32), layer=PLANTED_LAYER), folder, {"model_name": "planted"})
    return folder


def trained_sae(folder: Path, model: Any, tokenizer: Any, texts: list[str]) -> Path:
    """An SAE trained by the tiny trainer on layer 0's residual states of ``texts``."""
    states = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]])
            states.append(model(input_ids=ids, output_hidden_states=True).hidden_states[PLANTED_LAYER + 1][0, 1:])
    sae = fit_sae(torch.cat(states), TrainSettings(width=64, steps=300, batch=512, l1=2.0))
    sae.layer = PLANTED_LAYER
    write_sae(sae, folder, {"model_name": "planted"})
    return folder


def recipe_for(p: Planted, case: str, **more: Any) -> Any:
    """The shipped recipe's step with the case's changes, on the planted model and data."""
    shipped, changes = CASES[case]
    step = tomllib.loads((RECIPES / shipped).read_text())["step"][0] | changes | more
    if step.get("direction") == "sae":
        step["sae_path"] = str(p.sae_trained if case.endswith("-trained") else p.sae)
    raw = {"name": case, "model": {"id": str(p.folder / "model")},
           "data": {"path": "pairs.jsonl", "pairs": True, "n_per_class": 160, "max_tokens": 32},
           "collect": {"batch_size": 32}, "check": {"ppl_text": "ppl.txt", "ppl_tokens": 1024, "ppl_window": 128}, "step": [step]}
    path = p.folder / f"{case}.toml"
    path.write_text(dump_recipe(raw))
    return load_recipe(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    folder = tmp_path_factory.mktemp("planted-neuron")
    planted_neuron_model(folder / "model")
    pairs, _, held = write_planted_data(folder)
    model, tok = load_model(folder / "model")
    texts = [t for line in pairs.read_text().splitlines() for r in [json.loads(line)] for t in (r["toxic"], *r["neutral"])]
    p = Planted(folder, model, tok, held, planted_sae(folder / "sae"), trained_sae(folder / "sae-trained", model, tok, texts),
                planted_toxicity(model, tok, held), 0.0)
    p.ppl = check_perplexity(model, tok, recipe_for(p, "aura"))
    with torch.no_grad():  # the planted neuron removed by hand: the mechanism is that neuron and nothing else
        mlp = model.model.layers[PLANTED_LAYER].mlp
        column = mlp.down_proj.weight[:, PLANTED_NEURON].clone()
        mlp.down_proj.weight[:, PLANTED_NEURON] = 0.0
        assert planted_toxicity(model, tok, held) < p.toxicity / 20
        mlp.down_proj.weight[:, PLANTED_NEURON] = column
    assert p.toxicity > 0.3, "the planted model continues a z-run with probability above 0.3"
    return p


def _measure(p: Planted, patch: Any) -> tuple[float, float]:
    with patch.hooked(p.model) as m:
        return planted_toxicity(m, p.tokenizer, p.held), check_perplexity(m, p.tokenizer, recipe_for(p, "aura"))


@pytest.mark.parametrize("case", list(CASES))
def test_seed_method_removes_the_planted_direction(planted: Planted, case: str) -> None:
    recipe = recipe_for(planted, case)
    cache: dict = {}
    patch, _ = compute_patch(recipe, planted.model, planted.tokenizer, stats_cache=cache)
    toxicity, ppl = _measure(planted, patch)
    assert toxicity <= planted.toxicity / FACTOR, f"{case}: planted toxicity {planted.toxicity:.4f} -> {toxicity:.4f}, not {FACTOR:g}x lower"
    assert ppl <= planted.ppl * (1 + MAX_PPL_INCREASE), f"{case}: neutral perplexity {planted.ppl:.2f} -> {ppl:.2f}, over +{MAX_PPL_INCREASE:.0%}"
    prov = patch.provenance
    if case == "project-sae":
        assert 0 in prov["sae"]["features"], "the planted SAE feature is among those picked"
    if case in ("scale-neurons", "circuit"):
        (edit,) = [e for e in patch.edits if isinstance(e, ScaleInputs)]
        assert f"layers.{PLANTED_LAYER}.mlp.down_proj" in edit.module and edit.factors[PLANTED_NEURON] == 0 and (edit.factors == 0).sum() == 1, \
            "exactly the planted neuron is removed"
    # Each strength-like setting at its declared no-edit value edits nothing (statistics reused: build-only).
    step = recipe.steps[0]
    fields = tune_fields(get_method(step.method).settings)
    assert fields, f"{case}: a strength-like setting to budget the method with"
    for key, f in fields.items():
        still, _ = compute_patch(recipe_for(planted, case, **{key: f.metadata["no_edit"]}), planted.model, planted.tokenizer, stats_cache=cache)
        assert _measure(planted, still)[0] == pytest.approx(planted.toxicity, rel=1e-4), f"{case}: {key} = {f.metadata['no_edit']} still edits"
    assert len(cache) == 1, "the no-edit builds reuse the one collection"
