"""The special tokens a tokenizer puts before a text, so that statistics and perplexity see text as
generation does.

Generation encodes prompts with the tokenizer's special tokens (`patcher.generate`), so Gemma's
prompts start with ``<bos>``. Gemma is trained never to see text without it: its first real token
then becomes the attention sink and every later state shifts (README, Gemma 3: its perplexity
without ``<bos>`` is several times higher). SmolLM2's and
GPT-2's tokenizers add nothing, so for them nothing changes.
"""

from __future__ import annotations

from typing import Any

import torch


def leading_specials(tokenizer: Any) -> list[int]:
    """The ids the tokenizer adds in front of a text (``[bos]`` for Gemma, ``[]`` for SmolLM2);
    trailing specials (an appended eos) are never included."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    n = len(full) - len(plain)
    if n > 0 and full[n : n + len(plain)] == plain:
        return full[:n]
    return []


def pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows of unequal length, padded on the right with ``pad``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask
