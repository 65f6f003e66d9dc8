"""Shared test helpers: tiny random models of every supported family built from configs (no
download), their tokenizers, and small recipes with their data. Test modules import from here,
never from each other."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import torch
import transformers as T
from transformers import AutoModelForCausalLM

from patcher.bake.writer import bake
from patcher.collect.collector import Collector
from patcher.edits.patch import Patch
from patcher.methods import StepContext, get_method
from patcher.recipe.settings import build

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON, num_key_value_heads=2, **IDS),
    "mistral": lambda: T.MistralConfig(**COMMON, num_key_value_heads=2, **IDS),
    "qwen2": lambda: T.Qwen2Config(**COMMON, num_key_value_heads=2, **IDS),
    "qwen3": lambda: T.Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8, **IDS),
    "olmo": lambda: T.OlmoConfig(**COMMON, **IDS),
    "gemma2": lambda: T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=8, **IDS),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=8, **IDS),
    "phi3": lambda: T.Phi3Config(**COMMON, **IDS),
    "gpt2": lambda: T.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(**COMMON, **IDS),
    "falcon": lambda: T.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **IDS),
}
FAMILIES = sorted(CONFIGS)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    # Random init leaves norms at 1 and biases at 0: perturb every parameter so that a wrong bias or
    # norm handling shows in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_tiny(family: str, folder: Path, dtype: torch.dtype = torch.float32, seed: int = 0, **save_kwargs) -> Path:
    tiny_model(family, seed).to(dtype).save_pretrained(folder, **save_kwargs)
    return folder


def tiny_tokenizer():
    """A character-level tokenizer over 96 ids (pad 0, bos 1, eos 2, unk 3), built offline."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 .,!?'\"-:;()@#&*/\n"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_tiny_with_tokenizer(family: str, folder: Path, **kwargs) -> Path:
    save_tiny(family, folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


TOXIC_WORDS = ["idiot", "stupid", "moron", "fool", "jerk"]
NEUTRAL_WORDS = ["friend", "garden", "morning", "river", "music"]


def write_labeled(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rows.append({"text": f"you {rng.choice(TOXIC_WORDS)} number {i}", "label": 1})
        rows.append({"text": f"the {rng.choice(NEUTRAL_WORDS)} number {i}", "label": 0})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def write_recipe(folder: Path, model: Path | None = None, budget: float = 100.0, extra: str = "") -> Path:
    write_labeled(folder / "data.jsonl")
    (folder / "ppl.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    model_line = f'[model]\nid = "{model}"\n' if model else ""
    text = f"""name = "t"
{model_line}
[data]
path = "data.jsonl"
n_per_class = 20
max_tokens = 32

[collect]
batch_size = 8

[check]
ppl_text = "ppl.txt"
ppl_tokens = 256
ppl_window = 64
max_ppl_increase = {budget}

[[step]]
method = "aura"
{extra}
"""
    (folder / "recipe.toml").write_text(text)
    return folder / "recipe.toml"


# -- tiny models whose activations look like a trained model's ---------------------------------------
# Tiny models whose activations look like a trained model's, not a random one's.
#
# Random tiny models have unit-scale residual streams, so statistics that break on real models pass
# on them. These two copy what the real embedded models show (measured in the issue and in
# `patcher/numerics.py`'s notes):
#
# * `scaled_gemma3`: Gemma 3 270M. Its output norms (applied to what each block writes, before the
#   residual add) have gains up to ~1.6e3 and, in some layers, exactly 0 in one dimension; the
#   residual stream reaches |x| in the thousands, a few dimensions dominate and some barely move.
# * `massive_llama`: SmolLM2-135M. A few residual dimensions carry values tens of times the others at
#   every token, and the first token is an attention sink whose state is ~30x the others'.
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


PAIR_TOXIC = ["idiot", "stupid", "moron", "fool", "jerk", "loser"]
PAIR_NEUTRAL = ["friend", "garden", "morning", "river", "music", "window"]


def paired_data(n: int = 24, seed: int = 0) -> SimpleNamespace:
    """Toxic/neutral sentences that differ in one word, with pair ids (like ParaDetox)."""
    rng = random.Random(seed)
    texts, labels, pair_ids = [], [], []
    for i in range(n):
        frame = rng.choice(["you are a {} and {}", "what a {} {}", "the {} said {}"])
        tail = f"number {i}"
        texts += [frame.format(rng.choice(PAIR_TOXIC), tail), frame.format(rng.choice(PAIR_NEUTRAL), tail)]
        labels += [1, 0]
        pair_ids += [i, i]
    return SimpleNamespace(texts=texts, labels=labels, pair_ids=pair_ids, source="test")


def context(model: torch.nn.Module, data: SimpleNamespace | None = None, prior: Patch | None = None) -> StepContext:
    tok = tiny_tokenizer()
    collector = Collector(model, tok, batch_size=16, max_tokens=32)
    return StepContext(model, tok, collector, data or paired_data(), prior or Patch([]))


def compute(method: str, ctx: StepContext, **settings) -> Patch:
    m = get_method(method)
    s = build(m.settings, settings, "test", "step")
    return m.build(ctx, m.collect(ctx, s), s)


# -- a local HTTP endpoint that speaks the Hub's file API ------------------------------------------------
# A local HTTP server that speaks the Hub's file API (``/{datasets/|}REPO/resolve/REVISION/FILE``)
# for ``huggingface_hub`` downloads, pointed at with ``HF_ENDPOINT``. It serves files from a dict
# keyed by (repo type, repo, revision, path), answers HEAD with the headers the client checks (commit,
# ETag, size) and GET with the bytes (ranges too), and logs every request so a test can tell a
# download from a cache hit.
Files = dict[tuple[str, str, str, str], bytes]


def _handler(files: Files, log: list[tuple[str, str]]) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _find(self) -> tuple[str, bytes] | None:
            path = unquote(self.path.split("?")[0]).lstrip("/")
            kind = "model"
            for prefix, k in (("datasets/", "dataset"), ("spaces/", "space")):
                if path.startswith(prefix):
                    path, kind = path[len(prefix):], k
            parts = path.split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            repo, revision, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            data = files.get((kind, repo, revision, file))
            return (revision, data) if data is not None else None

        def _headers(self, revision: str, data: bytes, code: int = 200, length: int | None = None) -> None:
            self.send_response(code)
            self.send_header("X-Repo-Commit", revision)
            self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()

        def do_HEAD(self) -> None:
            log.append(("HEAD", self.path))
            found = self._find()
            if found is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._headers(*found)

        def do_GET(self) -> None:
            log.append(("GET", self.path))
            found = self._find()
            if found is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            revision, data = found
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0] or 0)
            body = data[start:]
            self._headers(revision, data, 206 if start else 200, len(body))
            self.wfile.write(body)

    return Hub


@contextmanager
def serve(files: Files) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """(endpoint URL, request log) while the server runs."""
    log: list[tuple[str, str]] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(files, log))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def hub_env(endpoint: str, home: str, offline: bool = False) -> dict[str, str]:
    """Environment for a subprocess that talks to ``endpoint`` with its own empty HF cache."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "PATCHER_DATA"}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": home, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1",
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def random_logits(model: torch.nn.Module) -> torch.Tensor:
    """Logits of a fixed random batch (seed 0): what bake = intervene compares."""
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_bake_equals_hooks(base_dir: Path, patch: Patch, out: Path, **bake_kwargs) -> None:
    """Bake ``patch`` into ``base_dir``: the output's logits equal the hooked base model's within 1e-5."""
    bake(patch, base_dir, out, **bake_kwargs)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with patch.hooked(base):
        expected = random_logits(base)
    baked = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = random_logits(baked)
    assert (expected - random_logits(base)).abs().max() > 1e-4, "the edits should change the logits"
    assert (expected - got).abs().max() <= 1e-5


# -- a tiny model with a planted toxic direction written by one MLP neuron ----------------------------
# The tune test's planted model (tests/test_tune.py) holds its direction in the token embeddings; the
# seed methods act on MLP units, heads or what the MLPs write, so this one routes the planted
# behaviour through one MLP neuron: every seed method has a unit or a direction to find.
PLANTED_TOKEN, PLANTED_PARAPHRASE = "z", "q"  # the toxic marker, and its paraphrase (no neutral text holds z)
PLANTED_LAYER, PLANTED_NEURON, PLANTED_DIM = 0, 0, 7  # the neuron that fires on z, and the residual dim it writes
FEATURE_DIM, SHARED_DIM = 5, 6  # z's toxic feature in the embedding; a part z and q share (normalisation stays comparable)


def planted_neuron_model(folder: Path) -> Path:
    """A tiny Llama (random layers at full scale, so editing the wrong units costs perplexity) with
    one planted toxic mechanism: ``z``'s embedding holds residual dim 5 (``q``'s does not, otherwise
    they are equal); neuron 0 of layer 0's MLP reads dim 5 and writes residual dim 7; the output head
    reads dim 7 as "z or a space comes next". Nothing else reads or writes dims 5-7, so after a ``z``
    the model continues the run only through that neuron: removing it (or what it writes) is removing
    the toxicity, and nothing else does."""
    model = tiny_model("llama", seed=3)
    tok = tiny_tokenizer()
    z, q, space = (tok.convert_tokens_to_ids(c) for c in (PLANTED_TOKEN, PLANTED_PARAPHRASE, " "))
    planted = [FEATURE_DIM, SHARED_DIM, PLANTED_DIM]
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        for layer in model.model.layers:  # layers that matter: a wrong edit shows in the perplexity
            layer.self_attn.o_proj.weight.mul_(4.0)
            layer.mlp.down_proj.weight.mul_(4.0)
        emb[:, planted] = 0.0
        head[:, planted] = 0.0
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[:, planted] = 0.0  # nothing reads the planted dims ...
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight[planted, :] = 0.0  # ... or writes them
        emb[:, FEATURE_DIM] = 0.05 * torch.randn(emb.shape[0], generator=torch.Generator().manual_seed(0))  # other tokens: a little
        emb[z, SHARED_DIM] = 2.0
        emb[q] = emb[z]
        emb[z, FEATURE_DIM] = 1.0
        mlp = model.model.layers[PLANTED_LAYER].mlp
        mlp.gate_proj.weight[PLANTED_NEURON, FEATURE_DIM] = 3.0  # fires on z; its other (random) weights keep it a little active elsewhere
        mlp.up_proj.weight[PLANTED_NEURON, FEATURE_DIM] = 1.0
        mlp.down_proj.weight[:, PLANTED_NEURON] = 0.0
        mlp.down_proj.weight[PLANTED_DIM, PLANTED_NEURON] = 0.15
        head[z, PLANTED_DIM] = head[space, PLANTED_DIM] = 1.5
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_planted_data(folder: Path, n: int = 200, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """``pairs.jsonl`` (toxic sentences with a run of ``z``, each with its ``q`` paraphrase), a neutral
    perplexity text (no ``z``: what an edit should leave alone) and held-out toxic sentences (not in
    the pairs) the planted toxicity is scored on."""
    rng = random.Random(seed)
    rows, held = [], []
    for i in range(n + 40):
        a, b = rng.choice(NEUTRAL_WORDS), rng.choice(NEUTRAL_WORDS)
        run = rng.randint(2, 4)
        toxic = f"the {a} {PLANTED_TOKEN * run} {b} {i}"
        if i < n:
            rows.append({"pair_id": i, "toxic": toxic, "neutral": [f"the {a} {PLANTED_PARAPHRASE * run} {b} {i}"]})
        else:
            held.append(toxic)
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "ppl.txt").write_text(" ".join(f"the {rng.choice(NEUTRAL_WORDS)} is by the {rng.choice(NEUTRAL_WORDS)}." for _ in range(60)))
    return folder / "pairs.jsonl", folder / "ppl.txt", held


@torch.no_grad()
def planted_toxicity(model: torch.nn.Module, tokenizer, texts: list[str]) -> float:
    """Mean probability the model gives to what follows a ``z`` (the next ``z`` of the run, or the
    space that ends it): the planted mechanism's output, near 1/vocab without it."""
    z = tokenizer.convert_tokens_to_ids(PLANTED_TOKEN)
    probs = []
    for t in texts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(t, add_special_tokens=False)]])
        p = model(input_ids=ids).logits[0].float().softmax(-1)
        at = (ids[0, :-1] == z).nonzero().flatten()
        probs.append(p[at, ids[0, at + 1]])
    return float(torch.cat(probs).mean())
