"""The ``[check]`` table's capability budgets (``max_blimp_drop``, ``max_kl``): what `patcher run`
gates on beside perplexity and what `patcher tune` counts as damage. The base model is measured once
(BLiMP correctness, next-token log-probabilities on BOLD prompts), so a patched model is compared
without the base in memory.
"""

from __future__ import annotations

from typing import Any

from ..data.catalog import resolve
from ..data.loaders import load_prompts
from ..evaluate.capability import base_logprobs, blimp_correct, kl_from_base, load_blimp
from ..recipe.loader import CheckSettings

BATCH = 16


class CapabilityGate:
    """Measures the base once (`measure_base`), then each patched model (`measure`); `excess` is
    positive when a budget is broken."""

    def __init__(self, check: CheckSettings, tokenizer: Any) -> None:
        self.check = check
        self.tokenizer = tokenizer
        self.pairs = load_blimp(resolve("blimp").path, check.blimp_pairs) if check.max_blimp_drop > 0 else None
        self.prompts = (load_prompts(resolve("bold").path, score_field=None, n=check.kl_prompts, seed=0, file_order=True).prompts
                        if check.max_kl > 0 else None)
        self.base_correct: Any = None
        self.base_lp: list[Any] | None = None

    @property
    def active(self) -> bool:
        return self.pairs is not None or self.prompts is not None

    def measure_base(self, model: Any) -> None:
        if self.pairs is not None:
            self.base_correct = blimp_correct(model, self.tokenizer, self.pairs, batch_size=BATCH)
        if self.prompts is not None:
            self.base_lp = base_logprobs(model, self.tokenizer, self.prompts, batch_size=BATCH)

    def measure(self, model: Any) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.pairs is not None:
            out["blimp_drop"] = float((self.base_correct - blimp_correct(model, self.tokenizer, self.pairs, batch_size=BATCH)).mean() * 100)
        if self.prompts is not None:
            out["kl"] = kl_from_base(model, None, self.tokenizer, self.prompts, batch_size=BATCH, n_resamples=1, cached=self.base_lp)["value"]
        return out

    def excess(self, measured: dict[str, float]) -> float:
        """How far over its budget the worst measure is (<= 0: every budget kept), relative to the budget."""
        over = [measured["blimp_drop"] / self.check.max_blimp_drop - 1] if "blimp_drop" in measured else []
        over += [measured["kl"] / self.check.max_kl - 1] if "kl" in measured else []
        return max(over, default=-1.0)

    def describe(self, measured: dict[str, float]) -> str:
        parts = []
        if "blimp_drop" in measured:
            parts.append(f"BLiMP drop {measured['blimp_drop']:.2f} points (budget {self.check.max_blimp_drop:g})")
        if "kl" in measured:
            parts.append(f"KL from base {measured['kl']:.4f} nats (budget {self.check.max_kl:g})")
        return ", ".join(parts)
