"""Every method on tiny models scaled like real ones (`realistic`): the estimates stay finite, the
patch changes the model without breaking it, and bake = intervene. Before the numerics fixes the
scaled Gemma 3 reproduced the real Gemma 3 270M's failures: the whitened erase divided its write
direction by a zero norm gain (``write holds NaN or inf``), and a stacked second step, collecting
with that edit attached, stopped on NaN activations blamed on fp16."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import (
    CONSTANT,
    DOMINANT,
    ZERO_GAIN_MLP,
    bos_tokenizer,
    massive_llama,
    paired_data,
    save_realistic,
    scaled_gemma3,
)
from transformers import AutoModelForCausalLM

from patcher import Patch, PatcherError, bake
from patcher.collect.collector import Collector
from patcher.collect.statistics import PooledValues
from patcher.core.arch import arch_for, residual_module
from patcher.methods import StepContext, get_method
from patcher.recipe.settings import build

BUILDERS = {"gemma3": scaled_gemma3, "llama": massive_llama}
# The shipped recipes' steps, at their settings (layers "all" on two layers; top_n scaled down).
STEPS = {
    "project-meandiff": ("project", dict(direction="meandiff", paired=True, source="residual", layers="all", blocks=["mlp_out"],
                                         strength=0.45, outliers="whiten", erase="whitened")),
    "project-profs": ("project", dict(direction="profs", paired=True, layers="all", blocks=["mlp_out"], k=2, outliers="whiten")),
    "project-probe": ("project", dict(direction="probe", layers="all", top_n=1, blocks=["mlp_out"], outliers="whiten")),
    "aura": ("aura", {}),
    "scale-neurons": ("scale", dict(layers="all", top_n=5)),
}


def context(model: torch.nn.Module, data: SimpleNamespace | None = None, prior: Patch | None = None) -> StepContext:
    tok = bos_tokenizer()
    collector = Collector(model, tok, batch_size=16, max_tokens=32)
    return StepContext(model, tok, collector, data or paired_data(), prior or Patch([]))


def compute(ctx: StepContext, step: str) -> Patch:
    method_name, settings = STEPS[step]
    m = get_method(method_name)
    s = build(m.settings, settings, "test", "step")
    return m.build(ctx, m.collect(ctx, s), s)


def logits(model: torch.nn.Module) -> torch.Tensor:
    tok = bos_tokenizer()
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0] for t in ["you are a stupid idiot", "the garden is lovely"]])


def residual(model: torch.nn.Module, data: SimpleNamespace) -> torch.Tensor:
    """Mean-pooled residual stream after layer 0 (sink skipped), neutral samples."""
    stat = PooledValues([(residual_module(arch_for(model.config), 0), "output")])
    context(model, data).collector.run([stat], data.texts, data.labels)
    x, y = stat.matrix("model.layers.0")
    return x[y == 0]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_scaled_models_look_like_the_real_ones(family: str) -> None:
    """|x| in the thousands, a few dominant dims, nearly constant dims; Gemma's zero gains; Llama's sink."""
    model = BUILDERS[family]()
    tok = bos_tokenizer()
    ids = torch.tensor([tok("you are a stupid idiot")["input_ids"]])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # after layer 0
    assert torch.isfinite(hidden).all()
    norms = hidden[0].norm(dim=-1)
    x = residual(model, paired_data())
    std, mean = x.double().std(0), x.double().mean(0).abs()
    assert mean[list(DOMINANT)].min() > 20 * mean.median()  # a few dims dominate
    assert (std[list(DOMINANT)] / mean[list(DOMINANT)]).max() < 0.05  # ... and barely move
    if family == "gemma3":
        assert hidden.abs().max() > 1e3
        assert (std[list(CONSTANT)] < 1e-6 * std.max()).all()  # no block writes them
        gain = 1 + model.model.layers[1].post_feedforward_layernorm.weight
        assert (gain[list(ZERO_GAIN_MLP)] == 0).all() and gain.max() > 100
    else:
        assert norms[0] > 20 * norms[1:].max()  # the first token is the sink


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_every_step_is_finite_and_bakes(family: str, step: str, tmp_path: Path) -> None:
    model = BUILDERS[family]()
    patch = compute(context(model), step)
    assert patch.edits
    for e in patch.edits:
        for name, t in e.tensors().items():
            assert torch.isfinite(t).all(), f"{e.module} {name}"
    base_dir = save_realistic(model, tmp_path / "base", bos_tokenizer())
    bake(patch, base_dir, tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    before = logits(base)
    with patch.hooked(base):
        expected = logits(base)
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval())
    assert torch.isfinite(expected).all()
    bake_error, effect = float((expected - got).abs().max()), float((expected - before).abs().max())
    assert bake_error <= 1e-5 * max(1.0, float(expected.abs().max()))
    assert effect > 1e-5 and effect > 20 * bake_error  # the edit does something, well above the bake's rounding


def test_whitened_erase_never_writes_where_the_gemma_norm_cannot() -> None:
    """The real failure: Gemma 3 270M's layer-1 MLP output norm has gain 0 in one dimension, and the
    whitened erase's write direction was divided by it. Now it is finite, 0 there, and still removes
    what the basis reads (U^T V = I)."""
    model = scaled_gemma3()
    patch = compute(context(model), "project-meandiff")
    for e in patch.edits:
        assert torch.isfinite(e.write).all()
        assert e.write[list(ZERO_GAIN_MLP)].abs().max() == 0
        assert torch.allclose(e.basis.T @ e.write, torch.eye(1), atol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_stacked_second_step_collects_on_the_edited_model(family: str) -> None:
    """project-stack's shape: a second step (unpaired data) collecting with the first step's edits
    attached stays finite (on Gemma it used to stop with NaN activations "(fp16 overflow?)")."""
    model = BUILDERS[family]()
    data = paired_data()
    first = compute(context(model, data), "project-meandiff")
    unpaired = SimpleNamespace(texts=data.texts, labels=data.labels, pair_ids=None, source="test")
    m = get_method("project")
    s = build(m.settings, dict(STEPS["project-meandiff"][1], paired=False, strength=0.4), "test", "step")
    ctx = context(model, unpaired, prior=first)
    second = m.build(ctx, m.collect(ctx, s), s)
    assert all(torch.isfinite(t).all() for e in second.edits for t in e.tensors().values())


def test_nonfinite_activations_name_module_unit_and_cause() -> None:
    """float32: the message says where (module and unit) and blames the forward pass, not fp16;
    float16 that overflows: the fp16 hint."""
    data = paired_data(8)
    model = massive_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[7, :] = float("inf")
    stat = PooledValues([("model.layers.1.mlp.down_proj", "output")])
    with pytest.raises(PatcherError, match=r"model\.layers\.1\.mlp\.down_proj hold NaN or inf at unit 7") as err:
        context(model).collector.run([stat], data.texts, data.labels)
    assert "fp16" not in str(err.value)
    half = massive_llama().half()
    with torch.no_grad():
        half.model.layers[1].mlp.up_proj.weight.mul_(100.0)
        half.model.layers[1].mlp.down_proj.weight.fill_(65504.0)  # float16's largest value: the sum overflows
    stat = PooledValues([("model.layers.1.mlp.down_proj", "output")])
    with pytest.raises(PatcherError, match="fp16 overflow"):
        context(half).collector.run([stat], data.texts, data.labels)


def test_bos_is_read_as_generation_reads_it() -> None:
    """A tokenizer that puts <s> before text (Gemma's, Llama's): statistics see it first (and skip
    it as the sink), perplexity starts every window with it and scores the same text tokens."""
    from helpers import tiny_tokenizer

    from patcher.core.tokens import leading_specials
    from patcher.evaluate.perplexity import perplexity

    assert leading_specials(bos_tokenizer()) == [1] and leading_specials(tiny_tokenizer()) == []
    data = paired_data(4)
    batch = next(context(massive_llama(), data).collector.batches(data.texts, data.labels))
    first = batch.attention_mask.argmax(1)
    assert (batch.input_ids[torch.arange(len(first)), first] == 1).all()
    assert not batch.pool_mask[torch.arange(len(first)), first].any()  # the sink is never pooled
    model = massive_llama()
    ids = torch.tensor(bos_tokenizer()("you are a stupid idiot and a fool", add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.cat([torch.tensor([1]), ids])[None]).logits[0].double(), -1)
    nll = -sum(float(logp[t, ids[t]]) for t in range(1, len(ids)))  # token t predicted from <s> and tokens < t
    assert abs(perplexity(model, ids, window=64, stride=64, prefix=[1]) - float(torch.exp(torch.tensor(nll / (len(ids) - 1))))) < 1e-3
