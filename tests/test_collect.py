"""Collection: pooling over real tokens only, padding-side invariance, merging, NaN detection, and
AURA's factors on a toy where the answer is known by construction."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer

from patcher.collect.collector import Collector
from patcher.collect.statistics import Batch, PooledValues
from patcher.core.arch import arch_for
from patcher.core.errors import PatcherError
from patcher.methods.aura import AuraSettings, factors_from_auroc, statistic

TEXTS = ["you are a total idiot!", "hello there", "what a lovely day it is today, friends", "go away, fool", "ok", "thanks a lot"]
LABELS = [1, 0, 0, 1, 0, 1]


def _pooled(family: str, side: str, how: str, batch_size: int = 4) -> dict[str, torch.Tensor]:
    model = tiny_model(family)
    arch = arch_for(model.config)
    mods = arch.mlp_unit_modules(0) + [arch.module("attn_out", 1)]
    stat = PooledValues([(m, "output") for m in mods] + [(arch.module("mlp_out", 1), "input")], how=how)
    Collector(model, tiny_tokenizer(), batch_size=batch_size, padding_side=side).run([stat], TEXTS, LABELS)
    return {m: stat.matrix(m)[0] for m in stat.values}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "gpt_neox"])
@pytest.mark.parametrize("how", ["max", "mean"])
def test_left_and_right_padding_agree(family: str, how: str) -> None:
    left, right = _pooled(family, "left", how), _pooled(family, "right", how)
    unbatched = _pooled(family, "right", how, batch_size=1)
    for m in left:
        assert torch.allclose(left[m], right[m], atol=1e-5), m
        assert torch.allclose(right[m], unbatched[m], atol=1e-5), m


def test_pool_mask_skips_padding_and_first_token() -> None:
    c = Collector(tiny_model("llama"), tiny_tokenizer(), batch_size=8, padding_side="left")
    batch = next(c.batches(["abcd", "ab", "a"], [1, 0, 1]))
    by_index = {int(i): row for i, row in zip(batch.index, batch.pool_mask)}
    assert by_index[0].tolist() == [False, True, True, True]  # the first real token is the sink
    assert by_index[1].tolist() == [False, False, False, True]
    assert by_index[2].tolist() == [False, False, False, True]  # a single token is kept
    assert (batch.attention_mask.sum(1) == torch.tensor([1, 2, 4])).all()


def test_labels_follow_samples_through_sorting() -> None:
    model = tiny_model("llama")
    stat = PooledValues([(arch_for(model.config).module("mlp_out", 0), "output")])
    Collector(model, tiny_tokenizer(), batch_size=2).run([stat], TEXTS, LABELS)
    _, labels = stat.matrix(stat.watches[0][0])
    assert labels.tolist() == LABELS


def test_merge_equals_single_pass() -> None:
    model = tiny_model("qwen2")
    m = arch_for(model.config).module("mlp_out", 0)
    whole = PooledValues([(m, "output")])
    Collector(model, tiny_tokenizer()).run([whole], TEXTS, LABELS)
    a, b = PooledValues([(m, "output")]), PooledValues([(m, "output")])
    c = Collector(model, tiny_tokenizer())
    c.run([a], TEXTS[:3], LABELS[:3])
    c.run([b], TEXTS[3:], LABELS[3:])
    b.index = [i + 3 for i in b.index]
    a.merge(b)
    assert torch.allclose(a.matrix(m)[0], whole.matrix(m)[0], atol=1e-6)
    assert torch.allclose(a.auroc()[m], whole.auroc()[m])


def test_nan_activations_name_the_layer() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    stat = statistic(model.config, AuraSettings())
    with pytest.raises(PatcherError, match=r"model\.layers\.1\.mlp\.(up|down)_proj.*NaN or inf"):
        Collector(model, tiny_tokenizer()).run([stat], TEXTS, LABELS)


def test_aura_factors_known_by_construction() -> None:
    """Unit 0 separates perfectly (AUROC 1 -> alpha 0); unit 1 has AUROC 0.75 -> alpha 0.5;
    unit 2 is anti-correlated (AUROC 0 -> untouched); unit 3 is uninformative (0.5 -> untouched)."""
    labels = torch.tensor([1, 1, 0, 0])
    x = torch.tensor([[5.0, 3.0, 0.0, 1.0], [4.0, 1.0, 0.0, 1.0], [1.0, 2.0, 9.0, 1.0], [0.0, 0.0, 9.0, 1.0]])
    stat = PooledValues([("m", "output")])
    stat.values["m"] = [x]
    stat.labels, stat.index = [labels], [torch.arange(4)]
    a = stat.auroc()["m"]
    assert torch.allclose(a, torch.tensor([1.0, 0.75, 0.0, 0.5], dtype=a.dtype))
    f = factors_from_auroc({"m": a}, AuraSettings())["m"]
    assert torch.allclose(f, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    det0 = factors_from_auroc({"m": a}, AuraSettings(mode="det0", top_k=1))["m"]
    assert det0.tolist() == [0.0, 1.0, 1.0, 1.0]
    damp = factors_from_auroc({"m": a}, AuraSettings(mode="damp", top_k=2, damp_factor=0.3))["m"]
    assert torch.allclose(damp, torch.tensor([0.3, 0.3, 1.0, 1.0]))
    thresholded = factors_from_auroc({"m": a}, AuraSettings(min_auroc=0.8))["m"]
    assert torch.allclose(thresholded, torch.tensor([0.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("bad", [dict(modules=("attn",)), dict(mode="x"), dict(min_auroc=0.2), dict(mode="det0")])
def test_aura_settings_refused(bad: dict) -> None:
    with pytest.raises(PatcherError, match="aura:"):
        AuraSettings(**bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_max_pooling_in_the_activations_dtype_equals_float32_pooling(dtype: torch.dtype) -> None:
    """Max pooling runs in the activations' own dtype (no float32 copy of every activation): a max is
    exact in any dtype, so the pooled values equal those of pooling a float32 copy, bit for bit."""
    g = torch.Generator().manual_seed(0)
    acts = (torch.randn(3, 7, 11, generator=g) * 5).to(dtype)
    pool = torch.rand(3, 7, generator=g) > 0.3
    pool[:, 0] = True
    batch = Batch(torch.zeros(3, 7, dtype=torch.long), torch.ones(3, 7, dtype=torch.long), torch.zeros(3, 7, dtype=torch.long), pool,
                  torch.tensor([0, 1, 0]), torch.arange(3))
    s = PooledValues([("m", "output")], how="max")
    s.observe("m", acts, batch)
    reference = acts.float().masked_fill(~pool.unsqueeze(-1), float("-inf")).amax(dim=1)
    assert s.values["m"][0].dtype == torch.float32 and torch.equal(s.values["m"][0], reference)
