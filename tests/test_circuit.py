"""Circuit pruning: a planted circuit is found and its baked removal removes the behaviour; the
weights stay frozen; bake = intervene for the learned circuit; budgets and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_model, write_recipe
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from patcher import PatcherError, bake
from patcher.methods.circuit import Circuit, CircuitSettings, learn_circuit, masked, plot_circuit

VOCAB = 96
TRIGGER, TOXIC, K, NEURON, LAYER = 10, 20, 5, 17, 1  # token ids, a residual dimension, the planted unit
FAST = dict(steps=80, lr=0.1, batch_size=8, max_tokens=16, head_budget=0.125, neuron_budget=0.05)


def word(i: int) -> str:
    return f"w{i:02d}"  # fixed width: no word is a prefix of another (the eos token w02 included)



@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One word per token id; no pad token (learn_circuit must fall back to eos)."""
    tok = Tokenizer(models.WordLevel({word(i): i for i in range(VOCAB)}, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=word(2))
    assert tk.pad_token_id is None and tk(word(TOXIC))["input_ids"] == [TOXIC]
    return tk


def planted_model() -> torch.nn.Module:
    """A tiny Llama where MLP neuron NEURON of the last layer fires only on TRIGGER and pushes the
    logit of TOXIC: residual dimension K is set only by TRIGGER's embedding (nothing else writes it),
    the neuron reads K alone and writes along TOXIC's unembedding."""
    model = tiny_model("llama")
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, K] = 0
        embed[TRIGGER, K] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[K, :] = 0
            layer.mlp.down_proj.weight[K, :] = 0
        mlp = model.model.layers[LAYER].mlp
        for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
            w[NEURON] = 0
            w[NEURON, K] = 0.5
        u = model.lm_head.weight[TOXIC].clone()
        u[K] = 0
        u /= u.norm()
        mlp.down_proj.weight[:, NEURON] = 0.15 * u
        model.lm_head.weight[TOXIC] = 1.2 * u
    return model


def texts(seed: int = 0, n: int = 48) -> tuple[list[str], list[str]]:
    """Toxic: random words with TRIGGER TOXIC inside; neutral: random words without either."""
    gen = torch.Generator().manual_seed(seed)
    others = [i for i in range(3, VOCAB) if i not in (TRIGGER, TOXIC)]

    def rand(k: int) -> list[int]:
        return [others[j] for j in torch.randint(len(others), (k,), generator=gen)]

    toxic = []
    for _ in range(n):
        s, p = rand(12), int(torch.randint(0, 10, (1,), generator=gen))
        s[p : p + 2] = [TRIGGER, TOXIC]
        toxic.append(" ".join(map(word, s)))
    neutral = [" ".join(map(word, rand(12))) for _ in range(n)]
    return toxic, neutral


def p_toxic(model: torch.nn.Module) -> float:
    """Probability of TOXIC right after TRIGGER."""
    ids = torch.tensor([[5, 7, 9, TRIGGER], [30, 41, 52, TRIGGER]])
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -1].softmax(-1)[:, TOXIC].mean().item()


@pytest.fixture(scope="module")
def learned(tokenizer: PreTrainedTokenizerFast) -> tuple[torch.nn.Module, Circuit, dict[str, torch.Tensor]]:
    model = planted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    toxic, neutral = texts()
    circuit = learn_circuit(model, tokenizer, toxic, neutral, CircuitSettings(**FAST))
    return model, circuit, before


def test_planted_neuron_found_and_baked_removal_removes_behaviour(learned, tmp_path: Path) -> None:
    model, circuit, _ = learned
    assert NEURON in circuit.neurons.get(LAYER, []), circuit.neurons
    base = tmp_path / "base"
    model.save_pretrained(base)
    bake(circuit.to_patch(model.config, {"test": "planted"}), base, tmp_path / "out")
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    before, after = p_toxic(model), p_toxic(baked)
    assert before > 0.3 and after < before / 5, (before, after)


def test_weights_frozen_and_no_hooks_left(learned) -> None:
    model, circuit, before = learned
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters()), "requires_grad is restored"
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert len(circuit.history) == FAST["steps"]
    assert {"loss", "neutral", "toxic", "sparsity", "heads_zeroed", "neurons_zeroed"} <= set(circuit.history[0])


def test_bake_equals_masked_model(learned, tmp_path: Path) -> None:
    model, circuit, _ = learned
    # Add one head so both edit kinds are exercised whatever was learned.
    circuit = Circuit({**circuit.heads, 0: sorted(set(circuit.heads.get(0, [])) | {2})}, circuit.neurons, circuit.history,
                      circuit.num_layers, circuit.num_heads, circuit.head_dim, circuit.width)
    base = tmp_path / "base"
    model.save_pretrained(base)
    bake(circuit.to_patch(model.config), base, tmp_path / "out")
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), masked(model, *circuit.binary_masks()):
        expected = model(input_ids=ids).logits
    with torch.no_grad():
        got, plain = baked(input_ids=ids).logits, model(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-4
    assert (expected - got).abs().max() <= 1e-5


def test_budget_respected_and_summary(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    """A strong push to remove (large beta, no penalty, fast lr) still ends within the budget, and the
    units kept are the zeroed ones with the lowest logits."""
    model = tiny_model("llama", seed=3)
    toxic, neutral = texts(seed=1, n=16)
    s = CircuitSettings(steps=30, batch_size=8, max_tokens=16, head_budget=0.25, neuron_budget=0.02, beta=5.0, lam=0.0, lr=0.5)
    circuit = learn_circuit(model, tokenizer, toxic, neutral, s)
    assert max(h["neurons_zeroed"] for h in circuit.history) > 1, "the run should overflow the budget"
    assert circuit.n_heads <= int(0.25 * 2 * 4) and circuit.n_neurons <= int(0.02 * 2 * 48) == 1
    rows = circuit.summary_rows()
    assert [r[0] for r in rows] == [0, 1]
    assert sum(r[1] for r in rows) == circuit.n_heads and sum(r[3] for r in rows) == circuit.n_neurons
    plot_circuit(circuit, model.config, tmp_path / "circuit.png")
    assert (tmp_path / "circuit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("field, value", [("head_budget", 0), ("head_budget", 1.5), ("neuron_budget", 0.0), ("neuron_budget", -0.1)])
def test_bad_budget_refused(tokenizer, field: str, value: float) -> None:
    toxic, neutral = texts(n=8)
    with pytest.raises(PatcherError, match=r"\(0, 1\]") as err:
        learn_circuit(tiny_model("llama"), tokenizer, toxic, neutral, CircuitSettings(**{field: value}))
    assert field in str(err.value) and "\n" not in str(err.value)


def test_too_little_data_refused(tokenizer) -> None:
    toxic, neutral = texts(n=8)
    with pytest.raises(PatcherError, match="at least 16 toxic and 16 neutral") as err:
        learn_circuit(tiny_model("llama"), tokenizer, toxic, neutral, CircuitSettings(batch_size=16))
    assert "\n" not in str(err.value)


def test_circuit_recipe_runs_and_inspect_maps_it(tmp_path):
    """`patcher run` with a circuit step on a tiny model, then `inspect --plot` on the output."""
    from click.testing import CliRunner
    from helpers import save_tiny_with_tokenizer

    from patcher.bake.verify import verify
    from patcher.cli import main

    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model, extra="steps = 30\nlr = 0.5\nbatch_size = 4\nneuron_budget = 0.05\nhead_budget = 0.2")
    recipe.write_text(recipe.read_text().replace('method = "aura"', 'method = "circuit"'))
    r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert verify(tmp_path / "out").ok
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), "--plot", str(tmp_path / "map.png")])
    assert r.exit_code == 0, r.output
    assert "circuit:" in r.output and (tmp_path / "map.png").stat().st_size > 1000


def neutral_rise(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, circuit: Circuit, neutral: list[str]) -> float:
    """Mean next-token loss on the neutral texts with the circuit removed, minus without it."""
    ids = torch.tensor([tokenizer(t)["input_ids"] for t in neutral])  # 12 words each: no padding

    def loss() -> float:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()

    base = loss()
    with masked(model, *circuit.binary_masks()):
        return loss() - base


def test_damage_term_keeps_neutral_loss_within_its_bound(tokenizer: PreTrainedTokenizerFast) -> None:
    """The worst case: the "toxic" text is the neutral text itself, so every unit that raises the
    toxic loss raises the neutral one as much. A strong push to prune (large beta and budgets, fast
    lr) then raises the neutral loss past the bound without the damage term; with max_damage set,
    the circuit found stays within it and is not empty."""
    _, neutral = texts(seed=2, n=48)
    model = tiny_model("llama", seed=3)
    strong = dict(steps=40, lr=0.5, batch_size=8, max_tokens=16, head_budget=0.5, neuron_budget=0.5, beta=5.0, lam=0.0)
    bound = 0.01
    free = learn_circuit(model, tokenizer, list(neutral), neutral, CircuitSettings(**strong))
    assert neutral_rise(model, tokenizer, free, neutral) > 2 * bound, "without the damage term the run should overshoot the bound"
    bounded = learn_circuit(model, tokenizer, list(neutral), neutral, CircuitSettings(**strong, max_damage=bound, damage_weight=20.0))
    assert bounded.n_neurons + bounded.n_heads > 0
    assert neutral_rise(model, tokenizer, bounded, neutral) <= bound + 1e-6
    assert "damage" in bounded.history[0]


def test_strength_scales_the_circuit_instead_of_zeroing_it() -> None:
    """strength 1: the zeroing edits; s in (0, 1): the same columns scaled by 1 - s, the others kept;
    0: no edit (a sweep or tune builds every strength from one learned circuit)."""
    config = tiny_model("llama").config
    circuit = Circuit({0: [1]}, {1: [3, 5]}, num_layers=2, num_heads=4, head_dim=8, width=48, settings={"steps": 1})
    full = circuit.to_patch(config)
    assert [e.kind for e in full.edits] == ["zero_heads", "zero_neurons"] and full.provenance["settings"]["strength"] == 1.0
    part = circuit.to_patch(config, strength=0.25)
    assert [e.kind for e in part.edits] == ["scale_inputs", "scale_inputs"] and part.provenance["settings"]["strength"] == 0.25
    heads, neurons = part.edits
    assert heads.module == full.edits[0].module and torch.equal(heads.factors[8:16], torch.full((8,), 0.75))
    assert (heads.factors[:8] == 1).all() and (heads.factors[16:] == 1).all()
    assert neurons.factors[[3, 5]].tolist() == [0.75, 0.75] and (neurons.factors == 1).sum() == 46
    assert circuit.to_patch(config, strength=0.0).edits == []
