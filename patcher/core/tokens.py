"""The special tokens a tokenizer puts before a text, so that statistics and perplexity see text as
generation does.

Generation encodes prompts with the tokenizer's special tokens (`patcher.generate`), so Gemma's
prompts start with ``<bos>``. Gemma is trained never to see text without it: its first real token
then becomes the attention sink and every later state shifts (Gemma 3 270M's WikiText-2 perplexity,
windows of 512, was 14.8 with ``<bos>`` against 64 without, on the first window). SmolLM2's and
GPT-2's tokenizers add nothing, so for them nothing changes.
"""

from __future__ import annotations

from typing import Any


def leading_specials(tokenizer: Any) -> list[int]:
    """The ids the tokenizer adds in front of a text (``[bos]`` for Gemma, ``[]`` for SmolLM2);
    trailing specials (an appended eos) are never included."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    n = len(full) - len(plain)
    if n > 0 and full[n : n + len(plain)] == plain:
        return full[:n]
    return []
