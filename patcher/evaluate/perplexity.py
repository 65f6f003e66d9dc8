"""Perplexity on a plain text file with a sliding window (the GPT-2 / HF "perplexity of
fixed-length models" convention).

The text is read whole as it is on disk (for WikiText-2, the original ``wiki.test.raw``, not HF's
``"\\n\\n".join(rows)``), tokenized once without special tokens, and cut to the first
``max_tokens`` tokens. Windows of ``window`` tokens advance by ``stride``; each window scores only
the tokens the previous one did not, with the rest as context, so every token is scored once with
at least ``window - stride`` tokens of context (except in the first window).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..core.errors import PatcherError
from ..core.models import input_device
from ..core.progress import bar


def token_stream(tokenizer, path: str | Path, max_tokens: int | None) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise PatcherError(f"perplexity text {path} not found: point the recipe's ppl_text at a text file")
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise PatcherError(f"perplexity text {path} has fewer than 2 tokens")
    return torch.tensor(ids[:max_tokens] if max_tokens else ids)


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 1024, stride: int = 512,
               prefix: list[int] | None = None) -> float:
    """exp(mean negative log-likelihood) of ``ids`` under ``model``. ``prefix`` (the tokenizer's
    leading special tokens, `patcher.core.tokens.leading_specials`: Gemma's ``<bos>``) starts every
    window as context and is never scored; the window's text tokens are scored as without it."""
    device = input_device(model)
    pre = torch.tensor(prefix or [], dtype=ids.dtype)
    nll, count, prev_end = 0.0, 0, 0
    starts = range(0, len(ids) - 1, stride)
    for begin in bar(starts, desc="perplexity"):
        end = min(begin + window, len(ids))
        chunk = torch.cat([pre, ids[begin:end]]).to(device)[None]
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        new = end - max(prev_end, begin + 1)  # tokens not scored yet (the first token has no context)
        logp = torch.log_softmax(logits[0, -new - 1 : -1], dim=-1)
        nll -= logp.gather(1, chunk[0, -new:, None]).sum().item()
        count += new
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)
