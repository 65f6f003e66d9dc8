"""Loads anywhere, on every CI run: both embedded models, patched and baked, exported by `patcher export`
(llama.cpp's converter) and run by llama.cpp (the prebuilt xllamacpp wheel, installed by
`scripts/install.sh dev`; no skip when it is there): the same token ids into both runtimes, greedy
continuations of 32 tokens on 10 prompts identical for at least 9 at f16 and top-1 agreement at least
0.98; at q8_0 top-1 agreement at least 0.95 (`benchmarks/portability.py` holds the comparison).

The patch is `benchmarks/portability.py`'s cheap real one (every layer's MLP outputs rescaled), not
project-stack: computing the recipe takes minutes, and the file format and the runtime are what this
test checks (`python benchmarks/portability.py --recipe recipes/project-stack.toml` runs the recipe)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_baked_output_runs_the_same_in_llama_cpp(model: str, request: pytest.FixtureRequest, shared_data: Path, tmp_path: Path) -> None:
    request.getfixturevalue("smollm2" if model.startswith("smollm2") else "gemma3")  # converted once into the cache
    import portability
    from transformers import AutoTokenizer

    from patcher.bake.verify import check_files
    from patcher.io.record import read_record

    folder = portability.scaled(model, tmp_path / "out")
    prompts = portability.prompt_ids(AutoTokenizer.from_pretrained(folder), 10)
    f16 = portability.compare(folder, "f16", prompts, new_tokens=32)
    q8 = portability.compare(folder, "q8_0", prompts, new_tokens=32)
    print(model, {k: (r["identical_greedy"], round(r["top1_agreement"], 4), r["seconds"]) for k, r in (("f16", f16), ("q8_0", q8))})
    assert f16["identical_greedy"] >= 9 and f16["top1_agreement"] >= 0.98, f16
    assert q8["top1_agreement"] >= 0.95, q8
    assert all(r["top1_ci"][0] <= r["top1_agreement"] <= r["top1_ci"][1] for r in (f16, q8))
    meta = read_record(folder)
    assert sorted(e["outtype"] for e in meta["gguf"]) == ["f16", "q8_0"] and check_files(folder) == []
    # the embedded model's own GGUF tokenizer went into the export, not the converter's rebuild
    assert all(e["tokenizer"] == "copied from the base model's GGUF file" for e in meta["gguf"])


def test_near_ties_are_the_continuation_positions_whose_top_two_tokens_are_close() -> None:
    """The share `benchmarks/portability.py` reports beside q8_0 agreement: read at the positions that
    predict each continuation token (the prompt's last position onwards), a gap under 0.1 logit."""
    from types import SimpleNamespace

    import portability
    import torch

    class Planted:
        def __call__(self, ids: torch.Tensor) -> SimpleNamespace:  # top-2 gap 0.05 at even positions, 2.0 at odd ones
            logits = torch.zeros(1, ids.shape[1], 5)
            logits[0, :, 0] = 2.0
            logits[0, ::2, 1] = 1.95
            return SimpleNamespace(logits=logits)

    # positions 2..5 (ties at 2 and 4) and 1..3 (a tie at 2): 3 of 7
    assert portability.near_tie_share(Planted(), [[1, 2, 3], [1, 2]], [[4, 4, 4, 4], [3, 3, 3]]) == pytest.approx(3 / 7)
    assert portability.near_tie_share(Planted(), [[1, 2, 3]], [[4, 4, 4, 4]], gap=0.01) == 0.0
