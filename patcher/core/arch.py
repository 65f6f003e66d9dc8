"""Architecture map: logical roles -> module paths (which are also checkpoint tensor names).

One `Architecture` entry per family, keyed by ``config.model_type``; the names are the ones the
family's ``modeling_*.py`` in transformers uses, so a reader can hold the two side by side.
Nothing else in patcher branches on the family: methods ask this map where things are.

Roles, per decoder layer ``{layers}.{i}``:

* ``mlp_in``: the MLP's input linears (gate and up projections, or the fused ``gate_up_proj``,
  or ``c_fc`` / ``dense_h_to_4h``). Their output units are AURA units.
* ``mlp_out``: the MLP's down projection. Its output units are AURA units too; its input units
  are the MLP neurons (what neuron pruning zeroes); its output is what the MLP writes into the
  residual stream (what a projection edits).
* ``attn_out``: the attention output projection. Its input is ``num_heads * head_dim`` values laid
  out head by head, so head ``h`` is input units ``[h * head_dim, (h + 1) * head_dim)``.
* ``mlp_out_norm`` / ``attn_out_norm``: a norm applied to the block's output *before* the residual
  add (Gemma 2 and 3). There the block writes ``g * y / rms(y)`` with ``g = 1 + weight``, so removing
  a residual direction ``d`` from what the block writes means projecting ``u = normalise(g * d)``
  out of ``y`` (see `residual_to_output_direction`); scaling a unit of ``y`` is still exact, but the
  norm renormalises the whole vector afterwards.
* Parallel-residual families (GPT-NeoX with ``use_parallel_residual``, Falcon with
  ``parallel_attn``) feed the MLP the layer input rather than the attention output; what each block
  writes to the residual stream is still its output projection's output.

Weight layout: ``linear`` stores ``[out, in]`` (``nn.Linear``); ``conv1d`` stores ``[in, out]``
(GPT-2's ``Conv1D``); ``embedding`` stores ``[vocab, hidden]`` and its output units are columns;
``norm`` is a 1-D norm gain (`edits.AffineOutputs` on Gemma's post-norms).

Bias slots (``bias_switches``): a config key and the layer modules it gives a bias, as the family's
``modeling_*.py`` in transformers 5.24 builds them (``bias=config.<key>``). An edit that needs a
bias where the checkpoint has none (`edits.AffineOutputs`) is baked by turning the key on and
writing zero biases for every module it covers. Llama: ``mlp_bias`` (gate, up, down) and
``attention_bias`` (q, k, v, o); Qwen3, OLMo, Gemma 2/3: ``attention_bias`` (q, k, v, o); GPT-NeoX:
``attention_bias`` (query_key_value, dense; its MLP always has biases); Falcon: ``bias`` (all four
linears); GPT-2 has every bias already. Mistral, Qwen2 (fixed q/k/v biases only) and Phi-3 have no
switch, so their MLP and attention outputs have no bias slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import PatcherError

Layout = Literal["linear", "conv1d", "embedding", "norm"]


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its parts. Module paths relative to a decoder layer unless noted."""

    family: str
    model_types: tuple[str, ...]
    layers: str  # absolute: the ModuleList of decoder layers
    embed: str  # absolute
    lm_head: str  # absolute
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn_out: str
    layout: Layout = "linear"
    mlp_out_norm: str | None = None
    attn_out_norm: str | None = None

    bias_switches: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (config key, layer modules it gives a bias)

    def bias_switch(self, module: str) -> tuple[str, tuple[str, ...]] | None:
        """``(config key, modules it covers)`` of the switch that gives ``module`` (absolute path) a
        bias, or None when the family has none for it."""
        prefix = self.layers + "."
        if not module.startswith(prefix):
            return None
        rel = module[len(prefix):].partition(".")[2]
        return next(((key, mods) for key, mods in self.bias_switches if rel in mods), None)

    def layer(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def module(self, role: str, i: int) -> str:
        """Absolute module path of a role (``mlp_out``, ``attn_out``, ...) in layer ``i``."""
        rel = getattr(self, role)
        if rel is None:
            raise PatcherError(f"{self.family} has no {role} module")
        return f"{self.layers}.{i}.{rel}"

    def mlp_unit_modules(self, i: int, which: tuple[str, ...] = ("mlp_in", "mlp_out")) -> list[str]:
        """The MLP linears whose output units AURA scores, in forward order."""
        out: list[str] = []
        if "mlp_in" in which:
            out += [f"{self.layers}.{i}.{rel}" for rel in self.mlp_in]
        if "mlp_out" in which:
            out.append(f"{self.layers}.{i}.{self.mlp_out}")
        return out


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    lm_head="lm_head",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
)
_ATTN_BIAS = (("attention_bias", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")),)
_LLAMA_BIAS = (("mlp_bias", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),) + _ATTN_BIAS
_GEMMA = dict(_LLAMA_LIKE, mlp_out_norm="post_feedforward_layernorm", attn_out_norm="post_attention_layernorm", bias_switches=_ATTN_BIAS)

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("llama",), **_LLAMA_LIKE, bias_switches=_LLAMA_BIAS),
    Architecture("mistral", ("mistral",), **_LLAMA_LIKE),
    Architecture("qwen2", ("qwen2",), **_LLAMA_LIKE),
    Architecture("qwen3", ("qwen3",), **_LLAMA_LIKE, bias_switches=_ATTN_BIAS),
    Architecture("olmo", ("olmo",), **_LLAMA_LIKE, bias_switches=_ATTN_BIAS),
    Architecture("gemma2", ("gemma2",), **_GEMMA),
    Architecture("gemma3_text", ("gemma3_text",), **_GEMMA),
    Architecture("phi3", ("phi3",), **dict(_LLAMA_LIKE, mlp_in=("mlp.gate_up_proj",))),
    Architecture(
        "gpt2",
        ("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        lm_head="lm_head",
        mlp_in=("mlp.c_fc",),
        mlp_out="mlp.c_proj",
        attn_out="attn.c_proj",
        layout="conv1d",
    ),
    Architecture(
        "gpt_neox",
        ("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        lm_head="embed_out",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        bias_switches=(("attention_bias", ("attention.query_key_value", "attention.dense")),),
    ),
    Architecture(
        "falcon",
        ("falcon",),
        layers="transformer.h",
        embed="transformer.word_embeddings",
        lm_head="lm_head",
        mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h",
        attn_out="self_attention.dense",
        bias_switches=(("bias", ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),),
    ),
)

_BY_MODEL_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def arch_for(config: Any) -> Architecture:
    """The entry for a transformers config (object or dict with ``model_type``)."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise PatcherError(
            f"unsupported architecture {model_type!r}: supported are {', '.join(supported_model_types())}; "
            "adding one is one Architecture entry in patcher/core/arch.py"
        )
    return arch


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def num_layers(config: Any) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = _cfg(config, key)
        if value is not None:
            return int(value)
    raise PatcherError("config.json names no layer count (num_hidden_layers): is it a causal LM config?")


def head_layout(config: Any) -> tuple[int, int]:
    """``(num_heads, head_dim)`` of the attention output projection's input."""
    heads = _cfg(config, "num_attention_heads") or _cfg(config, "n_head")
    hidden = _cfg(config, "hidden_size") or _cfg(config, "n_embd")
    head_dim = _cfg(config, "head_dim") or hidden // heads
    return int(heads), int(head_dim)


def is_tied(config: Any) -> bool:
    return bool(_cfg(config, "tie_word_embeddings", True))


def residual_to_output_direction(norm_weight: torch.Tensor, direction: torch.Tensor, gemma_offset: bool = True) -> torch.Tensor:
    """For a block whose output passes an RMSNorm with gain ``g`` before the residual add, the unit
    vector ``u`` such that removing ``u`` from the block's raw output removes ``direction`` from what
    it writes: ``(g * y) . d = 0  <=>  y . (g * d) = 0``. Gemma stores ``g - 1``."""
    u = norm_gain(norm_weight, gemma_offset) * direction.float()
    return u / u.norm()


def norm_gain(norm_weight: torch.Tensor, gemma_offset: bool = True) -> torch.Tensor:
    """The multiplier an output norm applies per dimension (Gemma stores ``g - 1``)."""
    return norm_weight.float() + (1.0 if gemma_offset else 0.0)


BLOCKS = ("attn_out", "mlp_out")


def writer_module(arch: Architecture, block: str, i: int) -> str:
    """The module whose output is what ``block`` of layer ``i`` adds to the residual stream."""
    if block not in BLOCKS:
        raise PatcherError(f"unknown block {block!r}: use one of {', '.join(BLOCKS)}")
    norm = getattr(arch, f"{block}_norm")
    return arch.module(f"{block}_norm", i) if norm else arch.module(block, i)


def residual_module(arch: Architecture, i: int) -> str:
    """The decoder layer ``i``: its output is the residual stream after the layer."""
    return arch.layer(i)
