"""`patcher eval` on a GGUF file: generation through llama.cpp (patcher/evaluate/llamacpp.py) with
the evaluation's prompts, seeds and evaluators; a fake runtime checks the wiring, the real one
(xllamacpp) checks that a tiny exported model generates, reproducibly under a seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_gguf_export import baked_tiny, tokenizer_dir  # noqa: F401  (the fixture)

import patcher.evaluate.llamacpp as llamacpp
from patcher.evaluate.report import EvalSettings, evaluate


class FakeEvaluator:
    name, floor = "fake-tox", 0.0

    def score(self, texts: list[str]) -> list[float]:
        return [min(1.0, t.count("x") / 3) for t in texts]


class FakeRuntime:
    """`LlamaCpp`'s interface; the continuation spells its request, so the test can read what was asked."""

    calls: list[dict[str, Any]] = []

    def __init__(self, path: Any, *, n_ctx: int = 0, slots: int = 1, threads: int | None = None) -> None:
        self.slots = slots

    def complete(self, prompt: Any, n: int, **kw: Any) -> dict[str, Any]:
        FakeRuntime.calls.append({"prompt": prompt, "n": n} | kw)
        text = " x" * (kw["seed"] % 4) + f" seed{kw['seed']}"
        return {"ids": list(range(n)), "text": text, "logprobs": [-0.5] * n, "prompt_tokens": 3}

    def map(self, fn: Any, items: list[Any]) -> list[Any]:
        return [fn(i) for i in items]

    def __enter__(self) -> FakeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def prompts_file(tmp_path: Path) -> str:
    p = tmp_path / "prompts.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": t, "toxicity": s}) for t, s in [("you are", 0.8), ("the sky", 0.1), ("hello", 0.6)]) + "\n")
    return str(p)


def settings(tmp_path: Path, seed: int = 0) -> EvalSettings:
    return EvalSettings.from_preset("quick", prompts=prompts_file(tmp_path), n_prompts=0, samples=3, max_new_tokens=5, ppl_tokens=0, bootstrap=20, seed=seed)


def test_gguf_model_goes_through_the_runtime_with_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llamacpp, "LlamaCpp", FakeRuntime)
    FakeRuntime.calls = []
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    s = settings(tmp_path)
    report = evaluate(gguf, settings=s, evaluators=[FakeEvaluator()]).to_json(samples=True)
    assert len(FakeRuntime.calls) == 3 * 3
    assert {c["prompt"] for c in FakeRuntime.calls} == {"you are", "the sky", "hello"}
    assert all(c["n"] == 5 and c["temperature"] == s.temperature and c["top_p"] == s.top_p and c["stop_at_eos"] for c in FakeRuntime.calls)
    seeds = [c["seed"] for c in FakeRuntime.calls]
    assert len(set(seeds)) == 9 and seeds == [llamacpp.sample_seed(0, p, k, 3) for p in range(3) for k in range(3)]
    m = report["model"]
    assert m["provenance"]["gguf"] == "m.gguf" and m["wikitext_perplexity"] is None
    # the evaluator scored the runtime's texts: mean toxicity is the mean of its scores of them
    scores = [[min(1.0, t.count("x") / 3) for t in row["continuations"]] for row in m["samples"]]
    assert m["toxicity"]["fake-tox"]["mean_toxicity"]["value"] == pytest.approx(sum(map(sum, scores)) / 9)
    assert m["samples"][0]["continuations"][0] == " x" * (seeds[0] % 4) + f" seed{seeds[0]}"
    assert m["generation"]["new_tokens"] == 9 * 5


def test_gguf_against_a_folder_baseline_same_prompts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path) -> None:  # noqa: F811
    monkeypatch.setattr(llamacpp, "LlamaCpp", FakeRuntime)
    out = baked_tiny("llama", tmp_path, tokenizer_dir)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    report = evaluate(gguf, baseline=out, settings=settings(tmp_path), evaluators=[FakeEvaluator()]).to_json(samples=True)
    assert [r["prompt"] for r in report["model"]["samples"]] == [r["prompt"] for r in report["baseline"]["samples"]]
    assert report["model"]["fluency"] is None  # no fluency scoring across runtimes


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_real_llama_cpp_generates_reproducibly(outtype: str, tmp_path: Path, tokenizer_dir: Path) -> None:  # noqa: F811
    pytest.importorskip("xllamacpp", reason="scripts/install.sh dev installs xllamacpp")
    from patcher.publish.gguf import export_gguf

    out = baked_tiny("llama", tmp_path, tokenizer_dir)
    gguf = out / export_gguf(out, outtype=outtype)["file"]
    a = evaluate(gguf, settings=settings(tmp_path), evaluators=[FakeEvaluator()]).to_json(samples=True)
    b = evaluate(gguf, settings=settings(tmp_path), evaluators=[FakeEvaluator()]).to_json(samples=True)
    c = evaluate(gguf, settings=settings(tmp_path, seed=1), evaluators=[FakeEvaluator()]).to_json(samples=True)
    conts = [[r["continuations"] for r in x["model"]["samples"]] for x in (a, b, c)]
    assert conts[0] == conts[1] and conts[0] != conts[2]
    assert a["model"]["generation"]["new_tokens"] > 0 and a["model"]["provenance"]["recorded_sha256_matches"] is True
