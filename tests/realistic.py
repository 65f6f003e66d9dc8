"""Tiny models whose activations look like a trained model's, not a random one's.

Random tiny models have unit-scale residual streams, so statistics that break on real models pass
on them. These two copy what the real embedded models show (measured in the issue and in
`patcher/numerics.py`'s notes):

* `scaled_gemma3`: Gemma 3 270M. Its output norms (applied to what each block writes, before the
  residual add) have gains up to ~1.6e3 and, in some layers, exactly 0 in one dimension; the
  residual stream reaches |x| in the thousands, a few dimensions dominate and some barely move.
* `massive_llama`: SmolLM2-135M. A few residual dimensions carry values tens of times the others at
  every token, and the first token is an attention sink whose state is ~30x the others'.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import tiny_model, tiny_tokenizer

DOMINANT = (0, 1, 2)  # residual dims with huge, nearly constant values
CONSTANT = (3, 4)  # residual dims no block writes (output-norm gain exactly 0): constant per token
ZERO_GAIN_MLP = (3, 4, 9)  # dims where the MLP's output norm gain is 0 (dim 9 varies: attention writes it)


def scaled_gemma3(seed: int = 0) -> torch.nn.Module:
    """A tiny Gemma 3 scaled to the real model's range: embeddings put ~3e3 in the dominant dims (the
    same for every token, up to a 0.1% spread) and ~1e3 in the constant ones; every block's output
    norm has log-spread gains from 0.3 to 600 and gain 0 (weight -1) in the dims it never writes."""
    model = tiny_model("gemma3_text", seed)
    g = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    scale = hidden**0.5  # Gemma multiplies the embeddings by sqrt(hidden)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.mul_(20.0)
        for j in DOMINANT:
            emb[:, j] = 3000.0 / scale * (1 + 1e-3 * torch.randn(emb.shape[0], generator=g))
        for j in CONSTANT:
            emb[:, j] = 1000.0 / scale
        for layer in model.model.layers:
            for norm, zero in ((layer.post_feedforward_layernorm, ZERO_GAIN_MLP), (layer.post_attention_layernorm, CONSTANT)):
                gain = torch.exp(torch.empty(hidden).uniform_(-1.2, 6.4, generator=g))  # 0.3 .. 600
                gain[list(zero)] = 0.0
                norm.weight.copy_(gain - 1.0)  # Gemma stores gain - 1
    return model


def bos_tokenizer():
    """`tiny_tokenizer` that puts ``<s>`` (id 1) before every text, as Llama's and Gemma's do."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def massive_llama(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama with SmolLM2's pattern: the massive dims carry ~100 at every token (the same for
    every token up to a 1% spread; the attention and MLP output projections never write them, so
    they stay huge and nearly constant through the layers), and the first token, ``<s>`` from
    `bos_tokenizer`, has a state ~30x the others' norm (the attention sink, ~3e3 in the massive dims)."""
    model = tiny_model("llama", seed)
    g = torch.Generator().manual_seed(seed)
    massive = list(DOMINANT)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, massive] = 100.0 * (1 + 1e-2 * torch.randn(emb.shape[0], len(massive), generator=g))
        emb[1] *= 30.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[massive] = 0.0
            layer.mlp.down_proj.weight[massive] = 0.0
    return model


def save_realistic(model: torch.nn.Module, folder: Path, tokenizer=None) -> Path:
    model.save_pretrained(folder)
    (tokenizer or tiny_tokenizer()).save_pretrained(folder)
    return folder
