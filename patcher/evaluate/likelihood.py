"""A fast toxicity proxy: how much more likely a model finds toxic texts than non-toxic ones (per
token, so length counts less): toxic comments against normal ones from the same source, or toxic
sentences against their own paraphrases (ParaDetox pairs share content, so there the margin isolates
the toxic wording).

One teacher-forced forward pass per batch, no sampling and no classifier, so a tune can score a
trial in seconds; `patcher tune` checks it against the sampled evaluation by rank correlation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core.models import input_device
from ..core.progress import bar
from ..core.tokens import pad_right


@torch.inference_mode()
def mean_logprob(model: Any, tokenizer: Any, texts: Sequence[str], *, max_tokens: int = 64, batch_size: int = 32) -> np.ndarray:
    """Mean log-probability per token of each text, every token scored given the ones before it
    (the first given the BOS token, else the EOS token, which decoder-only models read as a start)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    rows = [[start] + tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # batches of like lengths: little padding
    device = input_device(model)
    out = np.zeros(len(rows))
    for b in bar(range(0, len(rows), batch_size), desc="likelihood", leave=False):
        chunk = [rows[i] for i in order[b : b + batch_size]]
        ids, mask = pad_right(chunk, pad)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logits = logits[:, :-1]
        logp = (logits.gather(2, ids[:, 1:, None].to(device))[..., 0] - logits.logsumexp(-1)).cpu()
        m = mask[:, 1:].float()
        out[order[b : b + batch_size]] = ((logp * m).sum(1) / m.sum(1).clamp(min=1)).numpy()
    return out


def likelihood_margin(model: Any, tokenizer: Any, toxic: Sequence[str], neutral: Sequence[str], *, max_tokens: int = 64,
                      batch_size: int = 32) -> float:
    """Mean token log-probability of the toxic texts minus that of the non-toxic ones (for pairs, the
    mean of each pair's difference): positive when the model prefers toxic text; lower is less toxic."""
    scores = mean_logprob(model, tokenizer, [*toxic, *neutral], max_tokens=max_tokens, batch_size=batch_size)
    return float(scores[: len(toxic)].mean() - scores[len(toxic) :].mean())
