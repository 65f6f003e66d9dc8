"""Batched, seeded sampling for evaluation, and the log-likelihood of continuations.

Generation runs through ``model.generate`` with left padding and the KV cache. Three choices make
it fast and reproducible on a CPU:

* **One prompt pass for K samples.** Each batch's distinct prompts are run once (all but their last
  token); the cache is then copied to the batch's rows and ``generate`` continues from it, so a
  prompt's 25 samples share one prefill instead of repeating it 25 times.
* **Sampling by inverse CDF with stored uniforms.** The random number for prompt p, sample k and
  step t is ``U[p, k, t]``, drawn once from the seed. A logits processor turns the model's logits
  into the nucleus distribution (temperature, top-k, top-p) and picks the token where ``U`` falls
  in its cumulative sum; ``generate`` then runs greedily on the result. A sample therefore depends
  on the seed and the model only: not on the batch size, the batch's other prompts or padding, and
  two models evaluated with the same seed draw with the same random numbers.
* **Free self-likelihood.** The same processor records each chosen token's log-probability under
  the model's raw logits (before temperature and nucleus), which is the model's own fluency score
  of its samples at no extra cost.

`continuation_nll` scores given continuations under any model (the base model's fluency score of a
patched model's samples), again with one prompt pass per prompt.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import PatcherError
from ..core.models import input_device
from ..core.progress import bar

NUCLEUS_TIERS = (64, 1024, 8192)  # topk sizes tried before a full sort of a row whose nucleus is larger
LOGITS_BUDGET = 50_000_000  # floats of logits held at once when scoring continuations


@dataclass
class Generations:
    """K continuations per prompt. ``token_ids`` stop before the first end-of-sequence token;
    ``nll`` is the summed negative log-likelihood of those tokens under the generating model."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    nll: list[list[float]]
    seconds: float = 0.0
    model_calls: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for row in self.token_ids for t in row)

    def flat_texts(self) -> list[str]:
        return [t for row in self.texts for t in row]


def _cache_name(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; use what the model takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _takes(model: Any, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _output_cache(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def nucleus_pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from the temperature / top-k / top-p distribution of ``logits`` (rows x
    vocab), chosen where ``u`` (one uniform in [0, 1) per row) falls in the cumulative probability
    of the kept tokens, taken in descending order; ``temperature <= 0`` is greedy. Returns the
    tokens and their log-probabilities under the raw logits.

    Sorting the whole vocabulary is slow on a CPU (a few ms per row), so candidates are taken with
    `topk` in growing tiers and only rows whose nucleus reaches past a tier go on to the next."""
    logits = logits.float()
    if temperature <= 0:
        choice = logits.argmax(-1)
        return choice, logits.gather(1, choice[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    vocab = probs.shape[-1]
    k_max = vocab if top_k <= 0 else min(top_k, vocab)
    choice = torch.empty(len(u), dtype=torch.long, device=logits.device)
    todo = torch.arange(len(u), device=logits.device)
    for k in NUCLEUS_TIERS + (k_max,):
        k = min(k, k_max)
        vals, idx = (probs if len(todo) == len(u) else probs[todo]).topk(k, dim=-1)
        done = (vals.sum(-1) >= top_p) | (k == k_max)
        rows = todo[done]
        choice[rows] = _pick_sorted(vals[done], idx[done], u[rows], top_p)
        todo = todo[~done]
        if not len(todo):
            break
    if temperature == 1:
        logp = probs.gather(1, choice[:, None])[:, 0].log()
    else:
        logp = logits.gather(1, choice[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
    return choice, logp


def _pick_sorted(vals: torch.Tensor, idx: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    mass_before = vals.cumsum(-1) - vals
    keep = mass_before < top_p  # the smallest prefix whose mass reaches top_p (HF's TopP rule)
    keep[:, 0] = True
    csum = (vals * keep).cumsum(-1)
    target = (u.to(csum.dtype) * csum[:, -1])[:, None]
    pos = torch.searchsorted(csum, target, right=True).clamp(max=vals.shape[-1] - 1)
    n_keep = keep.sum(-1, keepdim=True)
    pos = torch.minimum(pos, n_keep - 1)  # guards against float ties at the end of the nucleus
    return idx.gather(1, pos)[:, 0]


class SeededSampler:
    """A logits processor (the only one): picks each row's token with `nucleus_pick` from its
    stored uniforms, records the token's log-probability under the raw logits, and returns scores
    on which greedy decoding selects that token."""

    def __init__(self, uniforms: torch.Tensor, prompt_len: int, temperature: float, top_p: float, top_k: int) -> None:
        self.u = uniforms  # rows x max_new_tokens
        self.prompt_len = prompt_len
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.logp = torch.zeros_like(uniforms, dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t = input_ids.shape[1] - self.prompt_len
        raw = scores.float()
        step = min(t, self.u.shape[1] - 1)  # generate may run one deferred step past the end
        choice, logp = nucleus_pick(raw, self.u[:, step].to(raw.device), self.temperature, self.top_p, self.top_k)
        if t < self.u.shape[1]:
            self.logp[:, t] = logp.cpu()
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice[:, None], 0.0)
        return out


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _trim(ids: list[int], stops: set[int]) -> int:
    for i, t in enumerate(ids):
        if t in stops:
            return i
    return len(ids)


def tokenize_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise PatcherError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) has no tokens: remove empty prompts from the prompt file")
    return ids


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids, mask


def _batches(prompt_ids: list[list[int]], samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Rows (prompt, sample) grouped into batches of at most ``batch_size`` rows (but at least one
    prompt's samples when they fit in no batch), prompts sorted by length so that a batch pads
    little. A prompt's samples are never split across batches unless ``samples > batch_size``."""
    order = sorted(range(len(prompt_ids)), key=lambda p: (len(prompt_ids[p]), p))
    if samples > batch_size:
        return [[(p, k) for k in range(s, min(s + batch_size, samples))] for p in order for s in range(0, samples, batch_size)]
    per = batch_size // samples
    return [[(p, k) for p in order[i : i + per] for k in range(samples)] for i in range(0, len(order), per)]


def _prefill(model: Any, ids: torch.Tensor, mask: torch.Tensor, cache_kw: str, keep_logits: bool) -> tuple[Any, torch.Tensor | None]:
    """Run the prompts once; return the cache and (if asked) the logits of the last position."""
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": True}
    if _takes(model, "position_ids"):
        kwargs["position_ids"] = _positions(mask)
    if _takes(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    return _output_cache(out), (out.logits[:, -1].float() if keep_logits else None)


@dataclass(frozen=True)
class GenerateOptions:
    """`generate`'s sampling and batching options."""

    samples: int = 25
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    batch_size: int = 128
    share_prompt_pass: bool = True


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, prompts: list[str], **options: Any) -> Generations:
    """``samples`` continuations of every prompt (see the module docstring for how); ``options``
    are `GenerateOptions`."""
    o = GenerateOptions(**options)
    samples, max_new_tokens, temperature, top_p, top_k = o.samples, o.max_new_tokens, o.temperature, o.top_p, o.top_k
    seed, batch_size, share_prompt_pass = o.seed, o.batch_size, o.share_prompt_pass
    if samples < 1 or max_new_tokens < 1:
        raise PatcherError("samples and max_new_tokens must be at least 1")
    from transformers import GenerationConfig

    device = input_device(model)
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = _stop_ids(model, tokenizer)
    stop_set = set(stops)
    uniforms = torch.rand((len(prompts), samples, max_new_tokens), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,  # the SeededSampler does the sampling
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=stops or None,
        use_cache=True,
    )
    cache_kw = _cache_name(model)
    texts: list[list[str]] = [[""] * samples for _ in prompts]
    conts: list[list[list[int]]] = [[[] for _ in range(samples)] for _ in prompts]
    nll: list[list[float]] = [[0.0] * samples for _ in prompts]
    batches = _batches(prompt_ids, samples, batch_size)
    t0 = time.perf_counter()
    calls = 0
    for batch in bar(batches, desc="generate", unit="batch"):
        row_prompts = [p for p, _ in batch]
        ids, mask = _left_pad([prompt_ids[p] for p in row_prompts], pad_id)
        width = ids.shape[1]
        sampler = SeededSampler(uniforms[row_prompts, [k for _, k in batch]], width, temperature, top_p, top_k)
        kwargs: dict[str, Any] = {}
        if share_prompt_pass and width > 1:
            unique = list(dict.fromkeys(row_prompts))
            u_ids, u_mask = _left_pad([prompt_ids[p] for p in unique], pad_id)
            cache, _ = _prefill(model, u_ids[:, :-1].to(device), u_mask[:, :-1].to(device), cache_kw, False)
            where = {p: i for i, p in enumerate(unique)}
            cache.batch_select_indices(torch.tensor([where[p] for p in row_prompts], device=device))
            kwargs[cache_kw] = cache
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=[sampler],
            **kwargs,
        )
        calls += 1
        new = out[:, width:].cpu().tolist()
        for r, (p, k) in enumerate(batch):
            n = _trim(new[r], stop_set)
            conts[p][k] = new[r][:n]
            nll[p][k] = -float(sampler.logp[r, :n].sum())
    for p in range(len(prompts)):
        texts[p] = tokenizer.batch_decode(conts[p], skip_special_tokens=True)
    settings = {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}
    return Generations(prompts, prompt_ids, texts, conts, nll, time.perf_counter() - t0, calls, settings)


@torch.inference_mode()
def continuation_nll(
    model: Any,
    prompt_ids: list[list[int]],
    continuations: list[list[list[int]]],
    *,
    pad_id: int,
    batch_size: int = 128,
) -> list[list[float]]:
    """Summed negative log-likelihood of each continuation given its prompt under ``model``
    (teacher forcing; only the continuation's tokens are scored). ``continuations[p][k]`` are
    token ids of prompt ``p``'s sample ``k``."""
    device = input_device(model)
    cache_kw = _cache_name(model)
    longest = max((len(t) for row in continuations for t in row), default=0)
    out = [[0.0] * len(row) for row in continuations]
    if longest == 0:
        return out
    vocab = model.get_output_embeddings().weight.shape[0]
    rows_cap = max(1, min(batch_size, LOGITS_BUDGET // (longest * vocab)))
    rows = [(p, k) for p in sorted(range(len(prompt_ids)), key=lambda p: (len(prompt_ids[p]), p)) for k in range(len(continuations[p]))]
    batches = [rows[i : i + rows_cap] for i in range(0, len(rows), rows_cap)]
    for batch in bar(batches, desc="score", unit="batch"):
        unique = list(dict.fromkeys(p for p, _ in batch))
        where = {p: i for i, p in enumerate(unique)}
        u_ids, u_mask = _left_pad([prompt_ids[p] for p in unique], pad_id)
        cache, last = _prefill(model, u_ids.to(device), u_mask.to(device), cache_kw, True)
        select = torch.tensor([where[p] for p, _ in batch], device=device)
        cache.batch_select_indices(select)
        conts = [continuations[p][k] for p, k in batch]
        width = max(len(c) for c in conts)
        if width == 0:
            continue
        c_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        c_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, c in enumerate(conts):
            if c:
                c_ids[r, : len(c)] = torch.tensor(c)
                c_mask[r, : len(c)] = 1
        full_mask = torch.cat([u_mask[select.cpu()], c_mask], dim=1).to(device)
        first_logp = torch.log_softmax(last[select], dim=-1).gather(1, c_ids[:, :1].to(device))[:, 0]
        kwargs: dict[str, Any] = {"input_ids": c_ids.to(device), "attention_mask": full_mask, cache_kw: cache, "use_cache": True}
        if _takes(model, "position_ids"):
            kwargs["position_ids"] = _positions(full_mask)[:, -width:]
        logits = model(**kwargs).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, c_ids[:, 1:, None].to(device))[..., 0]
        logp = torch.cat([first_logp[:, None], logp], dim=1).cpu() * c_mask
        for r, (p, k) in enumerate(batch):
            out[p][k] = -float(logp[r].sum())
    return out
