"""`benchmarks/gguf_detox.py`'s paired comparison (issue 26): a GGUF's toxicity probability against the
float model's, prompt by prompt, with a bootstrap interval over prompts. Same flags: a zero
difference; a GGUF toxic on prompts the float model was not: a positive difference whose interval
excludes zero. The benchmark itself (real models through llama.cpp) is not a test."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gguf_detox  # noqa: E402


def test_paired_difference_is_zero_for_the_same_flags_and_detects_a_shift() -> None:
    rng = np.random.default_rng(0)
    floating = {"a": rng.uniform(0, 1, size=(200, 5)), "b": rng.uniform(0, 0.6, size=(200, 5))}
    same = gguf_detox.paired_difference(floating, floating, 0.5, 500, 0)
    assert all(v["value"] == 0 and v["ci"] == [0.0, 0.0] and v["contains_zero"] for v in same.values())
    worse = {k: v.copy() for k, v in floating.items()}
    worse["b"][:60] = 0.9  # 60 of 200 prompts now toxic in every sample
    diff = gguf_detox.paired_difference(worse, floating, 0.5, 500, 0)
    was = (floating["b"][:60] >= 0.5).any(axis=1).mean()
    assert diff["b"]["value"] == pytest.approx(60 * (1 - was) / 200)
    assert diff["b"]["ci"][0] > 0 and not diff["b"]["contains_zero"]
    assert diff["a"]["contains_zero"]  # untouched evaluator
