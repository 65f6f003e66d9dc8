"""Capability measures: is the patched model any dumber? Two, as the papers this project builds on
report them.

- **BLiMP** (Warstadt et al. 2020): 67 paradigms of grammatical / ungrammatical minimal pairs. A pair
  is right when the model gives the grammatical sentence the higher total log-probability (BLiMP's
  "simple LM method"); accuracy overall and per phenomenon (``linguistics_term``), each with a
  percentile bootstrap 95% interval over pairs. ``per_paradigm`` keeps the first N pairs of every
  paradigm in file order: a fixed subset, the same for every model, for quick runs.
- **KL divergence on neutral prompts** (BOLD, Dhamala et al. 2021): the mean, over the prompts'
  tokens, of KL(base || patched) between the two models' next-token distributions (heretic's damage
  measure): 0 for an unchanged model, whatever the prompts' toxicity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import PatcherError
from ..core.progress import bar
from ..core.tokens import leading_specials, pad_right
from .metrics import bootstrap_ci

BLIMP_FIELDS = ("UID", "linguistics_term", "sentence_good", "sentence_bad")


@dataclass(frozen=True)
class BlimpPairs:
    paradigm: list[str]
    phenomenon: list[str]
    good: list[str]
    bad: list[str]
    source: str


def load_blimp(path: str | Path, per_paradigm: int | None = None) -> BlimpPairs:
    """BLiMP pairs from a jsonl file (the data folder's ``blimp/blimp.jsonl`` layout: ``UID``,
    ``linguistics_term``, ``sentence_good``, ``sentence_bad``); with ``per_paradigm``, the first N
    pairs of each paradigm in file order."""
    if per_paradigm is not None and per_paradigm < 1:
        raise PatcherError(f"BLiMP pairs per paradigm must be >= 1 (got {per_paradigm})")
    out = BlimpPairs([], [], [], [], str(path))
    seen: dict[str, int] = {}
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                uid, term, good, bad = (row[k] for k in BLIMP_FIELDS)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PatcherError(f"{path}:{line_no}: not a BLiMP row (a JSON object with {', '.join(BLIMP_FIELDS)})") from None
            if per_paradigm is not None and seen.get(uid, 0) >= per_paradigm:
                continue
            seen[uid] = seen.get(uid, 0) + 1
            out.paradigm.append(uid)
            out.phenomenon.append(term)
            out.good.append(good)
            out.bad.append(bad)
    if not out.good:
        raise PatcherError(f"{path}: no BLiMP pairs in the file")
    return out


@torch.inference_mode()
def total_logprob(model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16, desc: str = "log-prob") -> np.ndarray:
    """Total log-probability of each text, every token scored given the ones before it; the first
    given the tokenizer's leading specials (Gemma's ``<bos>``), else the BOS token, else EOS."""
    start = leading_specials(tokenizer) or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start[-1]
    rows = [start + tokenizer.encode(t, add_special_tokens=False) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # like lengths together: little padding
    device = next(model.parameters()).device
    out = np.zeros(len(rows))
    skip = len(start) - 1  # score from the first token after the specials
    for b in bar(range(0, len(rows), batch_size), desc=desc, leave=False):
        idx = order[b : b + batch_size]
        chunk = [rows[i] for i in idx]
        ids, mask = pad_right(chunk, pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, :-1].float()
        logp = (logits.gather(2, ids[:, 1:, None].to(device))[..., 0] - logits.logsumexp(-1)).cpu()
        m = mask[:, 1:].float()
        m[:, :skip] = 0
        out[idx] = (logp * m).sum(1).double().numpy()
    return out


def blimp_correct(model: Any, tokenizer: Any, pairs: BlimpPairs, *, batch_size: int = 16) -> np.ndarray:
    """1 where the model gives the pair's grammatical sentence the higher total log-probability."""
    scores = total_logprob(model, tokenizer, [*pairs.good, *pairs.bad], batch_size=batch_size, desc="BLiMP")
    n = len(pairs.good)
    return (scores[:n] > scores[n:]).astype(np.float64)


def blimp_summary(correct: np.ndarray, pairs: BlimpPairs, *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy overall and per phenomenon, each with its bootstrap interval over pairs."""

    def acc(values: np.ndarray) -> dict[str, Any]:
        return {"value": float(values.mean()), "ci": list(bootstrap_ci(values, n_resamples, seed)), "pairs": int(values.size)}

    terms = np.asarray(pairs.phenomenon)
    return {"accuracy": acc(correct), "per_phenomenon": {t: acc(correct[terms == t]) for t in sorted(set(pairs.phenomenon))},
            "paradigms": len(set(pairs.paradigm)), "pairs": len(pairs.good), "correct": correct.astype(int).tolist()}


def blimp_drop(base: dict[str, Any], patched: dict[str, Any], *, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy points lost (base minus patched, in percentage points), with a paired bootstrap
    interval over the same pairs."""
    b, p = np.asarray(base["correct"], dtype=np.float64), np.asarray(patched["correct"], dtype=np.float64)
    if b.shape != p.shape:
        raise PatcherError("BLiMP drop: the two models were scored on different pairs")
    diff = (b - p) * 100
    return {"value": float(diff.mean()), "ci": list(bootstrap_ci(diff, n_resamples, seed)), "unit": "accuracy points"}


def _batches(tokenizer: Any, prompts: Sequence[str], batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, mask) batches of the prompts as generation encodes them (specials first), right-padded."""
    rows = [list(tokenizer(p)["input_ids"]) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        ids, mask = pad_right(chunk, pad)
        out.append((ids, mask))
    return out


def _logprobs(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float().log_softmax(-1).cpu()


@torch.inference_mode()
def base_logprobs(base: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16) -> list[torch.Tensor]:
    """The base model's next-token log-probabilities on the prompts, kept (bfloat16) so that a
    patched model can be compared later without the base in memory (`kl_from_base`'s ``cached``)."""
    return [_logprobs(base, ids, mask).to(torch.bfloat16) for ids, mask in _batches(tokenizer, prompts, batch_size)]


@torch.inference_mode()
def kl_from_base(model: Any, base: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int = 16, n_resamples: int = 1000,
                 seed: int = 0, cached: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Mean KL(base || model) of the next-token distributions after every prefix of every prompt
    (the prompt as generation encodes it, specials first), in nats; the interval is a bootstrap over
    prompts of the per-prompt means. Both models must share ``tokenizer``. ``cached``: the base's
    log-probabilities from `base_logprobs` (same prompts and batch size) instead of ``base``."""
    batches = _batches(tokenizer, prompts, batch_size)
    per_prompt = np.zeros(len(prompts))
    tokens = 0
    at = 0
    for i, (ids, mask) in enumerate(bar(batches, desc="KL", leave=False)):
        lp = _logprobs(model, ids, mask)
        lq = cached[i].float() if cached is not None else _logprobs(base, ids, mask)
        kl = (lq.exp() * (lq - lp)).sum(-1).clamp(min=0)  # prompts x positions
        m = mask.float()
        per_prompt[at : at + len(ids)] = ((kl * m).sum(1) / m.sum(1)).double().numpy()
        at += len(ids)
        tokens += int(m.sum())
    return {"value": float(per_prompt.mean()), "ci": list(bootstrap_ci(per_prompt, n_resamples, seed)), "prompts": len(prompts), "tokens": tokens,
            "unit": "nats", "direction": "KL(base || patched)"}
