"""Loads anywhere: `benchmarks/portability.py` on real baked SmolLM2 outputs (project-stack with
tied embeddings, and a variant with its own lm_head), converted to GGUF f32 and f16 by llama.cpp's
converter and run by llama-cpp-python: greedy continuations identical to transformers' for at
least 9 of 10 prompts. Runs when the llama-cpp-python wheel built from source is installed
(`PATCHER_BUILD_LLAMA=1 bash scripts/install.sh dev`, or install.sh with the wheel cached)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.mark.slow
def test_baked_outputs_run_in_llama_cpp(smollm2: Path, shared_data: Path, tmp_path: Path) -> None:
    for module, why in (("llama_cpp", "llama-cpp-python is not installed"), ("sentencepiece", "llama.cpp's converter needs sentencepiece")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{why}: PATCHER_BUILD_LLAMA=1 bash scripts/install.sh dev builds and caches it")
    import portability

    if not (portability.wheel_dir() / f"llama_cpp_python-{portability.LLAMA_CPP_VERSION}.tar.gz").is_file():
        pytest.skip("the llama-cpp-python source distribution (llama.cpp's converter) is not cached: run scripts/install.sh")
    tied, untied = portability.build(tmp_path / "outs", n_per_class=64)  # the recipe on a smaller sample: the format is under test
    assert json.loads((tied / "config.json").read_text()).get("tie_word_embeddings", True) is True
    assert json.loads((untied / "config.json").read_text())["tie_word_embeddings"] is False
    for folder in (tied, untied):
        for outtype in ("f32", "f16"):
            r = portability.compare(folder, outtype, n_prompts=10, new_tokens=20, work=tmp_path)
            assert r["identical_greedy"] >= 9, r
            print(folder.name, outtype, r["identical_greedy"], round(r["top1_agreement"], 4), f"{r['max_abs_logit_diff']:.2e}")
