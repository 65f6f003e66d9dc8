"""`patcher plan`: how a model fits, from its config alone (no weights are read or downloaded).

The model is built on the meta device from ``config.json`` (shapes only), so parameter counts are
exact: per layer, embeddings and head, total. From them and the calibration set's size:

* weights: ``params x bytes`` per dtype;
* one decoder layer (what ``--sequential`` holds at a time);
* hidden states of the calibration set: ``n_texts x max_tokens x hidden x bytes`` (what
  ``--sequential`` keeps between layers; above ``--hidden-max-gib`` they go to a temp file);
* AURA's pooled values: ``n_texts x units x 4 B`` (float32; units = the output units of every MLP
  linear, gate + up + down), held by every process after a data-parallel gather.

`scenarios` turns these into a recommendation for 1 and 2 GPUs, CPU only, and many GPUs.

With a placement (the commands' option group), `footprint` predicts the peak resident memory of each
command and method on the machine that holds the model (CPU memory for ``--device cpu``; the GPU's
for ``--device cuda``), as the sum of what that path holds at its peak:

* every process: the Python runtime with torch and transformers (``RUNTIME``);
* the model: whole (``weights``; under ``--device-map`` what the budget keeps in memory), or under
  ``--sequential`` the embeddings and head plus one decoder layer (each layer is freed before the next
  is read; a command that runs two models, run's perplexity check and verify, frees the first before
  the second loads, so their embeddings are never resident twice);
* collection: the calibration set's hidden states between layers (``--sequential``) or one batch's
  activations (whole model); AURA's pooled values (``texts x units x 4 B``); the projection's pooled
  residuals (``texts x hidden x layers x 4 B``); transport's two hidden-state buffers (inputs and
  targets); the circuit's backward pass (every layer's activations of a batch in float32, kept for
  the gradient) and Adam's two moments of the masks;
* perplexity: one window's logits in float32, with their log-softmax;
* eval: the KV cache of one generation batch (prompt + new tokens) and its logits;
* verify: one model at a time (layer by layer under ``--sequential``) and the prompts' logits;
* run's bake: a projection (``project``) mixes a weight's rows, so each projected tensor is edited
  whole (per bake thread: the stored tensor, its float32 copy and the float32 result) while the
  collected model is still held; the scalings and affine maps stream in row blocks;
* bake: streaming, so no model: the runtime without model code (torch and patcher: ``BAKE_RUNTIME``),
  one set of copy buffers and edited blocks in float32 per thread (one thread per shard, at most one
  per core) and the patch's tensors (one float32 factor per MLP unit, AURA's size);
* export (GGUF): the runtime with llama.cpp's converter, and the largest tensor (the embeddings or
  head) as read, in float32 and in the output type at once: the converter converts tensor by tensor.

`benchmarks/scale.py` and `tests/test_plan.py` set these predictions beside measured peaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.arch import arch_for, num_layers
from ..core.embedded import EMBEDDED, embedded_model_path
from ..core.errors import PatcherError
from ..core.models import parse_max_memory
from ..core.placement import Placement, kv_cache_bytes
from ..core.threads import available_cpus

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9  # share of a GPU's memory given to weights; the rest: activations, CUDA context

# Configs of the models docs/scaling.md works through (public config.json values), usable as --model.
EXAMPLES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "falcon-40b": dict(model_type="falcon", hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8,
                       new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False, vocab_size=65024,
                       tie_word_embeddings=True),
    "llama-2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
}


def load_config(spec: str) -> dict[str, Any]:
    """``spec``: an EXAMPLES name, the embedded default, a folder or config.json, or a Hub id
    (config.json only)."""
    if spec in EXAMPLES:
        return dict(EXAMPLES[spec])
    if spec in EMBEDDED:
        spec = str(embedded_model_path(name=spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise PatcherError(f"no config for {spec!r}: pass a model folder, a config.json, a Hub id, or one of {', '.join(EXAMPLES)}, or smollm2-135m")
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(spec, "config.json")).read_text())
    except Exception as exc:  # noqa: BLE001 - the hub client raises many network and auth error types
        raise PatcherError(f"cannot fetch config.json of {spec!r} from the Hub ({type(exc).__name__}): check the id or pass a local folder") from None


@dataclass
class Sizes:
    model_type: str
    n_layers: int
    hidden: int
    params: int
    layer_params: int  # the largest decoder layer
    outside_params: int  # embeddings, head, final norm
    units: int  # AURA units: output units of every MLP linear, all layers
    vocab: int = 0
    intermediate: int = 0
    largest: int = 0  # parameters of the largest tensor (the embeddings or head, usually)
    config: dict[str, Any] = field(default_factory=dict)

    def weights(self, dtype: str) -> int:
        return self.params * BYTES[dtype]

    def layer(self, dtype: str) -> int:
        return self.layer_params * BYTES[dtype]

    def hidden_states(self, n_texts: int, max_tokens: int, dtype: str) -> int:
        return n_texts * max_tokens * self.hidden * BYTES[dtype]

    def pooled(self, n_texts: int) -> int:
        return n_texts * self.units * 4


def sizes(config: dict[str, Any]) -> Sizes:
    """Exact parameter counts from a meta-device model built from ``config``."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise PatcherError("config.json has no model_type: is it a transformers causal LM config?")
    arch = arch_for({"model_type": model_type})
    conf = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if not k.startswith("_")})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16)
    n = num_layers(conf)
    layers = model.get_submodule(arch.layers)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in model.parameters())
    units = 0
    for i in range(n):
        for name in arch.mlp_unit_modules(i):
            w = model.get_submodule(name).weight
            units += w.shape[1] if arch.layout == "conv1d" else w.shape[0]
    hidden = getattr(conf, "hidden_size", None) or conf.n_embd
    inter = getattr(conf, "intermediate_size", None) or getattr(conf, "ffn_hidden_size", None) or 4 * int(hidden)
    largest = max(p.numel() for p in model.parameters())
    return Sizes(model_type, n, int(hidden), total, max(per_layer), total - sum(per_layer), units, int(conf.vocab_size), int(inter), largest,
                 {**config, "model_type": model_type})


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**29 else f"{n / 2**20:.1f} MiB"


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def scenarios(s: Sizes, dtype: str, n_texts: int, max_tokens: int, gpu_gib: float, n_gpus: int) -> list[list[str]]:
    """Rows: setup, flags, GPU memory per GPU, CPU memory."""
    w, layer = s.weights(dtype), s.layer(dtype)
    hs, pooled = s.hidden_states(n_texts, max_tokens, dtype), s.pooled(n_texts)
    outside = s.outside_params * BYTES[dtype]
    gpu = gpu_gib * 2**30 * HEADROOM
    budget = int(gpu_gib * HEADROOM)
    rows = []
    # --sequential on a GPU: one layer and the embeddings (the head, for perplexity) on the GPU;
    # hidden states and pooled values in CPU memory
    seq_gpu = f"{gib(layer + outside)} (layer {gib(layer)} + embeddings/head {gib(outside)}) + one batch"
    seq_cpu = f"{gib(hs + pooled)} (hidden states {gib(hs)} + pooled {gib(pooled)})"
    if w <= gpu:
        rows.append([f"1 x {gpu_gib:g} GB GPU", "--device cuda", gib(w), gib(pooled)])
    else:
        rows.append([f"1 x {gpu_gib:g} GB GPU", f"--sequential --device cuda  (whole model {gib(w)} > {gib(gpu)})", seq_gpu, seq_cpu])
    if w <= gpu:
        rows.append([f"2 x {gpu_gib:g} GB GPUs", "torchrun --nproc_per_node 2 ... --device cuda  (data-parallel)", gib(w), f"{gib(pooled)} per process"])
    elif w <= 2 * gpu:
        rows.append([f"2 x {gpu_gib:g} GB GPUs", f"--device-map auto --max-memory 0={budget}GiB,1={budget}GiB", gib(w / 2), gib(pooled)])
    else:
        rows.append([f"2 x {gpu_gib:g} GB GPUs", f"torchrun --nproc_per_node 2 ... --sequential --device cuda  (whole model {gib(w)} > 2 GPUs)",
                     seq_gpu, f"{seq_cpu} per process"])
    rows.append(["CPU only, whole model", "--device cpu", "-", gib(w + pooled)])
    rows.append(["CPU only, layer by layer", "--sequential", "-", f"{gib(layer + outside + hs + pooled)} (layer, embeddings/head, hidden states, pooled)"])
    if w <= gpu:
        rows.append([f"{n_gpus} GPUs, data-parallel", f"torchrun --nproc_per_node {n_gpus} -m patcher.cli run ... --device cuda", gib(w),
                     f"{gib(pooled)} per process after the gather ({gib(pooled / n_gpus)} collected each)"])
    else:
        rows.append([f"{n_gpus} GPUs, data-parallel", f"torchrun --nproc_per_node {n_gpus} -m patcher.cli run ... --sequential --device cuda",
                     seq_gpu, f"{gib(hs / n_gpus + pooled)} per process"])
    return rows


RUNTIME = 450 << 20  # the Python runtime with torch, transformers, tokenizers and patcher imported
BAKE_RUNTIME = 235 << 20  # bake's runtime: torch and patcher, no model classes (it never builds a model)
BAKE_BLOCKS = 8 << 20  # bake, per thread: the copy buffer, an edited block as stored and in float32, the edit's temporaries
EXPORT_RUNTIME = 300 << 20  # export's runtime: torch, transformers' config and tokenizer code, llama.cpp's converter and gguf
# bytes per weight of the converter's output array (q8_0 via float16 blocks; the 4- and 5-bit types:
# the f16 array, then the quantized one, about one byte)
GGUF_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 2, "q4_0": 3, "q4_1": 3, "q5_0": 3, "q5_1": 3}
METHODS = ("aura", "project", "transport", "circuit")


@dataclass
class Workload:
    """What the predicted commands run: the calibration set, the perplexity window, generation."""

    n_texts: int = 1000
    max_tokens: int = 64
    batch_size: int = 8
    ppl_window: int = 512
    prompt_tokens: int = 32
    new_tokens: int = 20
    verify_tokens: int = 3 * 16
    outtype: str = "f16"  # export's GGUF type


def _model_bytes(s: Sizes, placement: Placement, dtype: str) -> int:
    """What the whole model keeps resident: its weights, or what a device map's budget keeps of them
    on the device the prediction is for (the rest on other devices or disk)."""
    w = s.weights(dtype)
    budget = parse_max_memory(placement.max_memory) if placement.device_map else None
    if budget:
        key = "cpu" if placement.device == "cpu" else next((k for k in budget if k != "cpu"), "cpu")
        return min(w, budget.get(key, w))
    return w


def footprint(s: Sizes, placement: Placement, dtype: str, work: Workload) -> dict[str, dict[str, int]]:
    """Predicted peak bytes, part by part, of each command (``run METHOD``, ``verify``, ``eval``,
    ``bake``, ``export``) under ``placement``; see the module docstring for what each part is."""
    b = BYTES[dtype]
    layer, outside = s.layer(dtype), s.outside_params * b
    hs = s.hidden_states(work.n_texts, work.max_tokens, dtype)
    logits = work.ppl_window * s.vocab * 4 * 2
    if placement.sequential:
        model = {"embeddings + head": outside, "one decoder layer": layer}
        between = {"hidden states of the calibration set": hs}
    else:
        model = {"weights": _model_bytes(s, placement, dtype)}
        between = {"one batch's activations": work.batch_size * work.max_tokens * (4 * s.hidden + 2 * s.intermediate) * 4}
    threads = placement.threads or available_cpus()
    # A projection mixes a weight's rows, so run's bake edits each projected tensor whole: per thread the
    # stored copy, its float32 copy and the float32 result (an MLP output projection, the largest edited).
    whole_edit = threads * s.hidden * s.intermediate * (b + 8)
    method_parts = {
        "aura": {"pooled values": s.pooled(work.n_texts)},
        "project": {"pooled residuals": work.n_texts * s.hidden * s.n_layers * 4,
                    f"bake: edited tensors whole, stored and in float32 ({threads} threads)": whole_edit},
        "transport": {"two hidden-state buffers": 2 * hs} if placement.sequential else {"pooled activations": 2 * work.n_texts * s.hidden * 4},
        "circuit": {"backward: activations of a batch, every layer": 2 * work.batch_size * work.max_tokens * s.n_layers * (8 * s.hidden + 3 * s.intermediate) * 4,
                    "masks, gradients and Adam moments": 4 * s.n_layers * (s.intermediate + 64) * 4},
    }
    out: dict[str, dict[str, int]] = {}
    for m in METHODS:
        if m == "circuit" and placement.sequential:
            continue  # refused: its backward pass needs the whole model
        extra = {} if m == "transport" and placement.sequential else between
        out[f"run {m}"] = {"runtime": RUNTIME, **model, **extra, **method_parts[m], "perplexity window logits": logits}
    verify_logits = work.verify_tokens * s.vocab * 4 * 3
    out["verify"] = {"runtime": RUNTIME, **model, "prompt logits": verify_logits}
    if not placement.sequential:
        kv = kv_cache_bytes(s.config, work.batch_size, work.prompt_tokens + work.new_tokens, dtype)
        out["eval"] = {"runtime": RUNTIME, **model, "KV cache of a batch": kv, "generation logits": work.batch_size * s.vocab * 4 * 2,
                       "perplexity window logits": logits}
    out["bake"] = {"runtime": BAKE_RUNTIME, f"blocks in flight ({threads} threads)": threads * BAKE_BLOCKS, "the patch": s.units * 4}
    out["export"] = {"runtime": EXPORT_RUNTIME, "the largest tensor, as read, in float32 and converted": s.largest * (b + 4 + GGUF_BYTES[work.outtype])}
    return out


def predicted_peaks(spec: str, placement: Placement, work: Workload) -> dict[str, int]:
    s = sizes(load_config(spec))
    return {k: sum(v.values()) for k, v in footprint(s, placement, placement.dtype or "bfloat16", work).items()}


def report(spec: str, dtype: str = "bfloat16", work: Workload | None = None, gpu_gib: float = 80.0, n_gpus: int = 8,
           placement: Placement | None = None, json_path: Path | None = None) -> str:
    """`patcher plan`'s tables: weights, collection, how it runs, and each command's predicted peak."""
    from ..core.table import render

    work = work or Workload()
    n_texts, max_tokens = work.n_texts, work.max_tokens

    if dtype not in BYTES:
        raise PatcherError(f"unknown dtype {dtype!r}: use one of {', '.join(BYTES)}")
    s = sizes(load_config(spec))
    lines = [f"{spec}: {s.model_type}, {s.params / 1e9:.2f} B parameters, {s.n_layers} layers, hidden {s.hidden}, {s.units:,} AURA units", ""]
    rows = [[d, human(s.weights(d)), human(s.layer(d)), human(s.outside_params * BYTES[d])] for d in BYTES]
    lines.append(render(["dtype", "weights", "per layer", "embeddings + head"], rows, title="weights"))
    lines.append("")
    calib = [
        [f"hidden states ({n_texts} texts x {max_tokens} tokens x {s.hidden} x {BYTES[dtype]} B, {dtype})", human(s.hidden_states(n_texts, max_tokens, dtype))],
        [f"AURA pooled values ({n_texts} texts x {s.units:,} units x 4 B)", human(s.pooled(n_texts))],
    ]
    lines.append(render(["calibration set", "memory"], calib, title="collection"))
    lines.append("")
    lines.append(render(["setup", "flags", "per GPU", "CPU memory"], scenarios(s, dtype, n_texts, max_tokens, gpu_gib, n_gpus),
                        title=f"how it runs ({dtype}, {gpu_gib:g} GB GPUs, {int(HEADROOM * 100)}% for weights)"))
    placement = placement or Placement()
    parts = footprint(s, placement, dtype, work)
    where = "CPU memory" if placement.device == "cpu" else f"{placement.device} memory"
    flags = " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
                     for k, v in placement.describe().items()) or "(defaults)"
    rows = [[cmd, human(sum(p.values())), "; ".join(f"{k} {human(v)}" for k, v in p.items() if k != "runtime")] for cmd, p in parts.items()]
    lines.append("")
    lines.append(render(["command", "predicted peak", "of which (besides the runtime)"], rows, title=f"predicted peak {where} with {flags}"))
    if json_path is not None:
        from ..io.record import write_json_file

        write_json_file(Path(json_path), {"model": spec, "dtype": dtype, "placement": placement.describe(), "workload": work.__dict__,
                                     "commands": {k: sum(v.values()) for k, v in parts.items()}, "parts": parts})
    return "\n".join(lines)
