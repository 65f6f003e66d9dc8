"""``patcher sae train``: residual-stream SAEs for a model that has none, in the SAELens layout.

Text: WikiText-2 (all but its first ``HOLDOUT`` tokens, which the perplexity checks score), BOLD's
neutral prompts (when the data folder has them) and the non-toxic rows of ParaDetox and the Jigsaw
test set: nothing toxic-only, so no feature is trained to stand for toxicity itself. The texts are
packed into windows of ``context`` tokens (separated by the end-of-text token, the tokenizer's
leading specials in front), shuffled, and run through the model up to the deepest layer asked for;
the residual stream after each layer is kept at every window position but the first (where models
park their attention sink, with norms far above the rest) and the specials; the few other states
whose norm is over ``SINK_RATIO`` times the median (sinks too: separators, some punctuation) are
left out and counted, since they would otherwise hold most of the variance. A tenth of the windows
is held out to score each SAE: explained variance, dead features, L0, and the model's WikiText-2
perplexity with the SAE's reconstruction spliced in at that layer (the same kinds of positions replaced).

Output (atomic): ``OUT/layer-N/{cfg.json, sae_weights.safetensors, quality.json}`` per layer and
``OUT/sae.json`` (what was trained, from what, and the quality of each). A recipe names one with
``sae_path = "../saes/{model}/layer-N"`` (relative to the recipe) (`expand_model_paths`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..collect.sae_fit import TrainSettings, fit_sae, quality, write_sae
from ..core.arch import arch_for, num_layers, residual_module
from ..core.errors import PatcherError
from ..core.hooks import Hooks
from ..core.models import load_model
from ..core.progress import bar
from ..core.tokens import leading_specials
from ..data.catalog import data_dir, resolve
from ..evaluate.perplexity import perplexity
from ..io.folders import atomic_folder, check_output_path
from ..io.model_files import resolve_model
from ..io.record import write_json_file
from ..recipe.settings import setting

log = logging.getLogger(__name__)

HOLDOUT = 16384  # WikiText-2's first tokens: the perplexity checks (recipes 4096, eval up to 8192) score them
BOLD = "neutral_prompts/bold_prompts.jsonl"
PPL_TOKENS, PPL_WINDOW = 4096, 512  # the spliced perplexity: the recipes' check
SINK_RATIO = 10.0  # states with a norm above this many times the median are attention sinks, left out


@dataclass
class LayerResult:
    layer: int
    folder: str
    quality: dict[str, float]
    ppl_base: float
    ppl_spliced: float
    seconds: float

    @property
    def ppl_increase(self) -> float:
        return self.ppl_spliced / self.ppl_base - 1.0


@dataclass
class TrainResult:
    out: Path
    layers: list[LayerResult]
    tokens: int
    seconds: dict[str, float] = field(default_factory=dict)


def model_slug(spec: str) -> str:
    """What ``{model}`` stands for in a recipe's paths: an embedded name or Hub id as written, a
    local folder's own name."""
    path = Path(spec).expanduser()
    return path.name if path.is_dir() or spec.startswith((".", "/", "~")) else spec


def expand_model_paths(settings: dict[str, Any], model: str) -> dict[str, Any]:
    """A step's settings with ``{model}`` in its ``*_path`` values replaced by `model_slug`; a local
    SAE path that does not exist yet is a one-line error naming the `patcher sae train` command that
    writes it (``.../layer-N``)."""
    out = dict(settings)
    for key, value in settings.items():
        if not (key.endswith("_path") and isinstance(value, str) and "{model}" in value):
            continue
        path = value.replace("{model}", model_slug(model))
        out[key] = path
        p = Path(os.path.normpath(path))
        if key == "sae_path" and "://" not in path and not p.exists():
            layer = p.name.removeprefix("layer-") if p.name.startswith("layer-") else "N"
            raise PatcherError(f"SAE {path} not found: train it with `patcher sae train --model {model} --layers {layer} --out {p.parent}`"
                               " (README, SAEs), or point sae_path at another SAE")
    return out


def _jsonl(file: Path, text_field: str, keep: Any) -> list[str]:
    out = []
    with file.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                if keep(rec) and isinstance(rec.get(text_field), str) and rec[text_field].strip():
                    out.append(rec[text_field].strip())
    return out


def training_text(tokenizer: Any) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Token lists of the training text (WikiText-2 after its held-out head as one list, each other
    text on its own) and a record of every source (name, sha256, how many texts)."""
    docs: list[list[int]] = []
    sources: list[dict[str, Any]] = []
    wiki = resolve("wikitext-2")
    ids = tokenizer(wiki.path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) <= HOLDOUT:
        raise PatcherError(f"{wiki.path.name}: WikiText-2 is shorter than its held-out head ({HOLDOUT} tokens); the file is damaged")
    docs.append(list(ids[HOLDOUT:]))
    sources.append(wiki.record | {"texts": 1, "skipped_head_tokens": HOLDOUT})
    folder = data_dir()
    if folder is not None and (folder / BOLD).is_file():
        texts = _jsonl(folder / BOLD, "prompt", lambda r: True)
        docs += tokenizer(texts, add_special_tokens=False)["input_ids"]
        sources.append({"name": "bold-prompts", "from": "data-dir", "file": BOLD, "texts": len(texts)})
    else:
        log.info("sae train: no %s in the data folder; training without BOLD prompts", BOLD)
    for name in ("paradetox", "jigsaw-test"):
        r = resolve(name)
        texts = _jsonl(r.path, "text", lambda rec: rec.get("label") in (0, "0", False))
        docs += tokenizer(texts, add_special_tokens=False)["input_ids"]
        sources.append(r.record | {"texts": len(texts), "rows": "label 0 (non-toxic) only"})
    return docs, sources


def pack(docs: list[list[int]], context: int, sep: int | None, seed: int) -> torch.Tensor:
    """Windows [n, context] of the documents, shuffled as documents first (so windows mix sources),
    joined by ``sep``."""
    rng = random.Random(seed)
    wiki, rest = docs[0], docs[1:]
    pieces = [wiki[i : i + 4 * context] for i in range(0, len(wiki), 4 * context)] + rest
    rng.shuffle(pieces)
    stream: list[int] = []
    for p in pieces:
        stream += p + ([sep] if sep is not None else [])
    n = len(stream) // context
    windows = torch.tensor(stream[: n * context]).view(n, context)
    return windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


class _Done(Exception):
    """Raised by the deepest layer's hook: nothing above it is needed."""


@torch.no_grad()
def collect_residual(model: Any, windows: torch.Tensor, layers: list[int], prefix: list[int], batch: int) -> dict[int, torch.Tensor]:
    """Residual stream after each of ``layers`` at every window position but the first, the
    ``prefix`` specials excluded: {layer: [n * (context - 1), d_model]}."""
    arch = arch_for(model.config)
    device = next(model.parameters()).device
    skip = len(prefix) + 1
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    deepest = max(layers)

    def keep(layer: int):
        def hook(_m: Any, _args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            out[layer].append(h[:, skip:].reshape(-1, h.shape[-1]).float().cpu())
            if layer == deepest:
                raise _Done

        return hook

    pre = torch.tensor(prefix, dtype=torch.long)
    with Hooks() as hooks:
        for layer in layers:
            hooks.output(model.get_submodule(residual_module(arch, layer)), keep(layer))
        for i in bar(range(0, len(windows), batch), desc="activations"):
            ids = torch.cat([pre.expand(len(windows[i : i + batch]), -1), windows[i : i + batch]], dim=1).to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Done:
                pass
    return {layer: torch.cat(v) for layer, v in out.items()}


@torch.no_grad()
def sinks(acts: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(mask of attention-sink states, the norm above which a state is one): a handful of states
    (separators, some punctuation) carry norms hundreds of times the rest and would hold most of the
    variance, so an SAE trained on them reconstructs little else."""
    norms = acts.norm(dim=1)
    limit = SINK_RATIO * norms.median().item()
    return norms > limit, limit


@torch.no_grad()
def spliced_perplexity(model: Any, sae: Any, layer: int, ids: torch.Tensor, prefix: list[int], limit: float) -> float:
    """WikiText-2 perplexity with the residual stream after ``layer`` replaced by the SAE's
    reconstruction at every position of the kind the SAE was trained on (all but the specials, the
    first position and attention sinks, whose norm is above ``limit``)."""
    from ..collect.sae_fit import decode

    skip = len(prefix) + 1

    def splice(_m: Any, _args: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        x = h[:, skip:].float()
        keep = x.norm(dim=-1, keepdim=True) > limit
        h[:, skip:] = torch.where(keep, x, decode(sae, sae.encode(x))).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    with Hooks() as hooks:
        hooks.output(model.get_submodule(residual_module(arch_for(model.config), layer)), splice)
        return perplexity(model, ids, window=PPL_WINDOW, stride=PPL_WINDOW, prefix=prefix)


def parse_layer_list(text: str, n_layers: int) -> list[int]:
    """``"12"``, ``"6,12"`` or ``"4-8"`` -> sorted layer indices, each checked against the model."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            a, _, b = part.strip().partition("-")
            out |= set(range(int(a), int(b) + 1)) if b else {int(a)}
    except ValueError:
        raise PatcherError(f"--layers {text!r}: give layer numbers like 12, 6,12 or 4-8") from None
    bad = sorted(x for x in out if not 0 <= x < n_layers)
    if not out or bad:
        raise PatcherError(f"--layers {text!r}: layer {bad[0] if bad else '?'} is out of range; the model has {n_layers} layers (0-{n_layers - 1})")
    return sorted(out)


@dataclass(frozen=True)
class TextWindows:
    """The training text as the model sees it: ``tokens`` in all, packed into windows of
    ``context`` tokens, run through the model ``batch`` windows at a time (``patcher sae train``'s
    ``--tokens`` and ``--context`` are generated from these fields)."""

    tokens: int = setting(131072, minimum=1024, help="Activation vectors to collect (a tenth is held out to score the SAE)")
    context: int = setting(128, minimum=8, help="Tokens per window")
    batch: int = setting(16, help="Windows per forward pass")


def train(model_spec: str, layers: str, out: Path, *, text: TextWindows | None = None, settings: TrainSettings | None = None,
          device: str = "cpu", overwrite: bool = False, trust_remote_code: bool = False) -> TrainResult:
    """Train one SAE per layer on the model's residual stream and write them under ``out``."""
    settings = settings or TrainSettings()
    text = text or TextWindows()
    tokens, context, batch = text.tokens, text.context, text.batch
    if tokens < 1024 or context < 8:
        raise PatcherError("sae train: --tokens must be at least 1024 and --context at least 8")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    folder, _prov = resolve_model(model_spec, trust_remote_code=trust_remote_code)
    check_output_path(out, folder, overwrite, [data_dir()])  # never into the model or the data folder
    from transformers import AutoConfig

    wanted = parse_layer_list(layers, num_layers(AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)))  # before the weights load
    model, tok = load_model(folder, device=device, trust_remote_code=trust_remote_code)
    docs, sources = training_text(tok)
    prefix = leading_specials(tok)
    windows = pack(docs, context, tok.eos_token_id, settings.seed)
    n_windows = -(-tokens // (context - 1))
    if len(windows) < n_windows:
        log.warning("sae train: the text gives %d windows of %d tokens, fewer than --tokens asks for; using them all", len(windows), context)
    windows = windows[:n_windows]
    n_held = max(1, len(windows) // 10)
    seconds["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    acts = collect_residual(model, windows, wanted, prefix, batch)
    d_model = next(iter(acts.values())).shape[1]
    seconds["activations"] = time.perf_counter() - t0
    per_window = context - 1
    wiki = resolve("wikitext-2")
    ppl_ids = torch.tensor(tok(wiki.path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:PPL_TOKENS])
    t0 = time.perf_counter()
    ppl_base = perplexity(model, ppl_ids, window=PPL_WINDOW, stride=PPL_WINDOW, prefix=prefix)
    seconds["perplexity"] = time.perf_counter() - t0
    results: list[LayerResult] = []
    with atomic_folder(out, overwrite) as tmp:
        for layer in wanted:
            t0 = time.perf_counter()
            a = acts.pop(layer)
            sink, limit = sinks(a)
            train_acts, held = a[: -n_held * per_window], a[-n_held * per_window :]
            train_sink, held_sink = sink[: -n_held * per_window], sink[-n_held * per_window :]
            sae = fit_sae(train_acts[~train_sink], settings, desc=f"sae layer {layer}")
            del train_acts
            sae.layer = layer
            q = quality(sae, held[~held_sink]) | {"sink_states_left_out": int(sink.sum()), "sink_norm_limit": limit}
            ppl = spliced_perplexity(model, sae, layer, ppl_ids, prefix, limit)
            name = f"layer-{layer}"
            r = LayerResult(layer, name, q, ppl_base, ppl, time.perf_counter() - t0)
            qual = {"layer": layer, **q, "held_out_vectors": len(held), "ppl_base": ppl_base, "ppl_spliced": ppl,
                    "ppl_increase": r.ppl_increase, "ppl_text": "wikitext-2", "ppl_tokens": len(ppl_ids), "ppl_window": PPL_WINDOW,
                    "seconds": round(r.seconds, 1)}
            write_sae(sae, tmp / name, {"model_name": model_slug(model_spec), "context_size": context, "patcher_quality": qual})
            write_json_file(tmp / name / "quality.json", qual)
            results.append(r)
        total = len(windows) * per_window
        write_json_file(tmp / "sae.json", {
            "kind": "patcher sae train", "model": model_slug(model_spec), "d_model": d_model, "layers": wanted,
            "architecture": "standard (ReLU, decoder-norm-weighted L1)", "settings": asdict(settings), "context": context,
            "tokens": total, "training_tokens": total - n_held * per_window, "held_out_tokens": n_held * per_window, "data": sources,
            "quality": {f"layer-{r.layer}": json.loads(json.dumps(asdict(r) | {"ppl_increase": r.ppl_increase})) for r in results},
            "seconds": {k: round(v, 1) for k, v in seconds.items()} | {f"layer-{r.layer}": round(r.seconds, 1) for r in results},
        })
    return TrainResult(out, results, total, seconds)
