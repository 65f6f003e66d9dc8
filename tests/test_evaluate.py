"""`patcher eval`: metric arithmetic, degenerate output, the likelihood of generations, seeded and
batched generation on tiny models, the before/after report end to end, and input errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import save_tiny_with_tokenizer, tiny_tokenizer

from patcher.cli import main
from patcher.core.errors import PatcherError
from patcher.data.loaders import load_prompts
from patcher.evaluate.generate import continuation_nll, generate
from patcher.evaluate.metrics import (
    bootstrap_ci,
    degenerate_kind,
    degenerate_summary,
    distinct,
    split_by_prompt_toxicity,
    toxicity_metrics,
)
from patcher.evaluate.report import EvalSettings, eval_prompts, evaluate

PROMPTS = ["the cat sat on", "hello, my name is", "a", "why is the sky so blue today? because", "we went to the river and"]
SCORES = np.array([[0.1, 0.6, 0.2], [0.0, 0.1, 0.3], [0.9, 0.8, 0.7], [0.4, 0.5, 0.1]])


class FakeEvaluator:
    """Toxicity = share of the letters x, y, z (so tiny random models produce a spread)."""

    def __init__(self, name: str = "fake-xyz", letters: str = "xyz") -> None:
        self.name, self.letters = name, letters
        self.floor = self.score([""])[0]

    def score(self, texts: list[str]) -> list[float]:
        return [min(1.0, 4 * sum(c in self.letters for c in t) / max(len(t), 1)) for t in texts]



@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_with_tokenizer("llama", tmp_path_factory.mktemp("tiny") / "llama-b", seed=7)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval(), tiny_tokenizer()


# -- metrics -------------------------------------------------------------------------------------
def test_metric_arithmetic() -> None:
    m = toxicity_metrics(SCORES, n_resamples=500, seed=3)
    assert m["prompts"] == 4 and m["samples"] == 3
    assert m["expected_max_toxicity"]["value"] == pytest.approx((0.6 + 0.3 + 0.9 + 0.5) / 4)
    assert m["toxicity_probability"]["value"] == pytest.approx(3 / 4)  # 0.5 counts as toxic
    assert m["mean_toxicity"]["value"] == pytest.approx(SCORES.sum() / 12)
    for name in ("expected_max_toxicity", "toxicity_probability", "mean_toxicity"):
        lo, hi = m[name]["ci"]
        assert 0 <= lo <= m[name]["value"] <= hi <= 1
    assert toxicity_metrics(SCORES, n_resamples=500, seed=3) == m  # seeded
    assert m["toxicity_probability"]["ci"][0] < m["toxicity_probability"]["ci"][1]


def test_bootstrap_ci_contains_mean_and_narrows() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.random(20), rng.random(2000)
    for values in (small, large):
        lo, hi = bootstrap_ci(values, 1000, seed=0)
        assert lo <= values.mean() <= hi
    assert np.diff(bootstrap_ci(large, 1000)) < np.diff(bootstrap_ci(small, 1000))
    assert bootstrap_ci(np.full(10, 0.3), 200) == pytest.approx((0.3, 0.3))


def test_split_by_prompt_toxicity() -> None:
    split = split_by_prompt_toxicity(SCORES, [0.9, 0.1, 0.5, None], n_resamples=100)
    assert split["toxic_prompts"]["prompts"] == 2 and split["nontoxic_prompts"]["prompts"] == 1
    assert split["toxic_prompts"]["expected_max_toxicity"]["value"] == pytest.approx((0.6 + 0.9) / 2)
    assert split["nontoxic_prompts"]["toxicity_probability"]["value"] == 0.0
    assert "nontoxic_prompts" not in split_by_prompt_toxicity(SCORES, [0.9, 0.8, 0.7, 0.6], n_resamples=10)


@pytest.mark.parametrize(
    "text, kind",
    [
        ("", "empty"),
        ("  \n\t ", "empty"),
        ("!!! ??? 123 ... 456", "non_letters"),
        ("ok 1234567890", "non_letters"),
        ("the the the the the the", "repetitive"),
        ("I am I am I am I am", "repetitive"),
        ("no no no no no, said the man", "repetitive"),
        ("she walked to the market and bought fresh bread for the family", None),
        ("Hello there!", None),
    ],
)
def test_degenerate_kind(text: str, kind: str | None) -> None:
    assert degenerate_kind(text) == kind


def test_degenerate_summary_and_distinct() -> None:
    s = degenerate_summary(["", "fine words here", "the the the the", "???"])
    assert s == {"share": 0.75, "empty": 0.25, "non_letters": 0.25, "repetitive": 0.25}
    d = distinct([["a b c", "a b d"], ["x", ""]])
    # prompt 1: unigrams a b c a b d -> 4/6; prompt 2: 1/1. bigrams: prompt 1 only: 3/4
    assert d["distinct-1"] == pytest.approx((4 / 6 + 1) / 2)
    assert d["distinct-2"] == pytest.approx(3 / 4)
    assert math.isnan(d["distinct-3"]) is False and d["distinct-3"] == pytest.approx(1.0)


# -- generation ------------------------------------------------------------------------------------
def _direct_nll(model, prompt_ids: list[int], cont: list[int]) -> float:
    """Sum of -log p(continuation | prompt) from one unpadded forward pass."""
    ids = torch.tensor([prompt_ids + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return -sum(logp[n - 1 + i, t].item() for i, t in enumerate(cont))


def test_generation_likelihood_matches_direct_computation(tiny: Path, tiny_other: Path) -> None:
    model, tok = _load(tiny)
    other, _ = _load(tiny_other)
    g = generate(model, tok, PROMPTS, samples=3, max_new_tokens=6, seed=1, batch_size=4)
    under_other = continuation_nll(other, g.prompt_ids, g.token_ids, pad_id=tok.pad_token_id, batch_size=5)
    for p in range(len(PROMPTS)):
        for k in range(3):
            cont = g.token_ids[p][k]
            assert g.nll[p][k] == pytest.approx(_direct_nll(model, g.prompt_ids[p], cont), abs=1e-3)  # recorded while sampling
            assert under_other[p][k] == pytest.approx(_direct_nll(other, g.prompt_ids[p], cont), abs=1e-3)  # teacher forced
    assert g.new_tokens == sum(len(t) for row in g.token_ids for t in row) > 0


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny: Path) -> None:
    model, tok = _load(tiny)
    kw = dict(samples=4, max_new_tokens=8, top_p=0.9, temperature=1.0)
    a = generate(model, tok, PROMPTS, seed=5, batch_size=7, **kw)
    assert generate(model, tok, PROMPTS, seed=5, batch_size=7, **kw).token_ids == a.token_ids
    assert generate(model, tok, PROMPTS, seed=5, batch_size=1, share_prompt_pass=False, **kw).token_ids == a.token_ids
    assert generate(model, tok, PROMPTS, seed=6, batch_size=7, **kw).token_ids != a.token_ids
    flat = [t for row in a.token_ids for t in row]
    assert len({tuple(t) for t in flat}) > len(flat) // 2  # samples differ from each other


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3"])
def test_left_padded_batched_greedy_equals_one_by_one(family: str, tmp_path: Path) -> None:
    model, tok = _load(save_tiny_with_tokenizer(family, tmp_path / family))
    batched = generate(model, tok, PROMPTS, samples=2, max_new_tokens=8, temperature=0, batch_size=10)
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for p, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1] :].tolist()
        out = out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        assert batched.token_ids[p][0] == out, prompt
        assert batched.token_ids[p][1] == out


def test_nucleus_keeps_top_p_mass() -> None:
    from patcher.evaluate.generate import nucleus_pick

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4000, 1))
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks, logp = nucleus_pick(logits, u, 1.0, 0.8, 0)
    counts = torch.bincount(picks, minlength=4).float() / 4000
    assert counts[2:].sum() == 0  # 0.5 + 0.3 reaches 0.8: tokens 2 and 3 are cut
    assert counts[0] == pytest.approx(0.5 / 0.8, abs=0.03)
    assert torch.allclose(logp, logits[0][picks])


# -- the report ------------------------------------------------------------------------------------
def _write_prompts(path: Path, rows: list[tuple[str, float | None]]) -> Path:
    path.write_text("\n".join(json.dumps({"prompt": p, "toxicity": t}) for p, t in rows) + "\n")
    return path


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for shared/data with a small prompt set and perplexity text."""
    root = tmp_path / "data"
    (root / "rtp").mkdir(parents=True)
    (root / "wikitext2").mkdir()
    _write_prompts(root / "rtp/rtp_challenging.jsonl", [(p, t) for p, t in zip(PROMPTS, [0.9, 0.2, 0.7, 0.1, 0.6])])
    (root / "wikitext2/wiki.test.raw").write_text(" = river = \n the river flows to the sea . it is long and wide .\n" * 20)
    monkeypatch.setenv("PATCHER_DATA", str(root))
    return root


def test_evaluate_api_with_baseline(tiny: Path, tiny_other: Path, data_dir: Path) -> None:
    settings = EvalSettings.from_preset("quick", n_prompts=0, samples=3, max_new_tokens=6, ppl_tokens=300, ppl_window=128, ppl_stride=64, bootstrap=200)
    evs = [FakeEvaluator(), FakeEvaluator("fake-aeiou", "aeiou")]
    r = evaluate(tiny, baseline=tiny_other, settings=settings, evaluators=evs, batch_size=4)
    d = r.to_json(samples=True)
    assert d["settings"]["samples"] == 3 and d["settings"]["top_p"] == 0.9 and d["settings"]["preset"] == "quick"
    assert [e["name"] for e in d["evaluators"]] == ["fake-xyz", "fake-aeiou"] and d["evaluators"][0]["floor"] == 0.0
    model, base = d["model"], d["baseline"]
    assert set(model["toxicity"]) == {"fake-xyz", "fake-aeiou", "any"}
    assert set(model["toxicity_by_prompt"]) == {"toxic_prompts", "nontoxic_prompts"}
    assert model["toxicity_by_prompt"]["toxic_prompts"]["any"]["prompts"] == 3
    any_scores = np.array([s["scores"]["any"] for s in model["samples"]])
    parts = np.array([[s["scores"][e] for e in ("fake-xyz", "fake-aeiou")] for s in model["samples"]])
    assert np.allclose(any_scores, parts.max(axis=1), atol=1e-5)  # "any" = max over evaluators
    assert model["fluency"]["scored_by"] == "baseline" and base["fluency"]["scored_by"] == "baseline"
    assert model["wikitext_perplexity"] > 1 and base["wikitext_perplexity"] != model["wikitext_perplexity"]
    assert d["perplexity_text"]["window"] == 128 and d["perplexity_text"]["stride"] == 64 and d["perplexity_text"]["tokens"] == 300
    # the fluency of the patched samples is their likelihood under the baseline
    other, tok = _load(tiny_other)
    g = r.model.generations
    nll = continuation_nll(other, g.prompt_ids, g.token_ids, pad_id=tok.pad_token_id)
    assert model["fluency"]["perplexity"] == pytest.approx(math.exp(sum(map(sum, nll)) / g.new_tokens), rel=1e-4)
    table = r.table()
    for word in ("base", "patched", "change", "expected max toxicity", "fake-aeiou", "degenerate share", "WikiText-2 perplexity", "distinct-2", "floors"):
        assert word in table
    json.dumps(d, allow_nan=False)  # strict JSON once NaN is mapped (none here)


def test_cli_eval_with_baseline_writes_json_and_png(tiny: Path, tiny_other: Path, data_dir: Path, tmp_path: Path) -> None:
    cls = tmp_path / "classifier"
    _tiny_classifier(cls)
    r = CliRunner().invoke(main, ["eval", str(tiny), "--baseline", str(tiny_other), "--preset", "quick", "--n-prompts", "4", "--samples", "2",
                                  "--max-new-tokens", "5", "--evaluators", f"hf:{cls}", "--ppl-tokens", "200", "--batch-size", "3",
                                  "--json", str(tmp_path / "r/eval.json"), "--plot", str(tmp_path / "r/eval.png")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "r/eval.json").read_text())
    assert d["prompts"]["count"] == 4 and d["settings"]["samples"] == 2 and d["settings"]["max_new_tokens"] == 5
    # local paths are recorded relative to the report's folder, never absolute
    assert (tmp_path / "r" / d["baseline"]["model"]).resolve() == tiny_other.resolve() and len(d["model"]["samples"]) == 4
    assert str(tmp_path) not in (tmp_path / "r/eval.json").read_text()
    assert (tmp_path / "r/eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"hf:{cls}" in r.output and "patched" in r.output


def _tiny_classifier(folder: Path) -> Path:
    import transformers as T
    from tokenizers import processors

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           pad_token_id=0, num_labels=2, id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1})
    T.LlamaForSequenceClassification(config).save_pretrained(folder)
    tok = tiny_tokenizer()
    # like real classifiers, add a start token, so that empty text (the floor) has one token
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save_pretrained(folder)
    return folder


# -- errors ------------------------------------------------------------------------------------------
def _cli_error(args: list[str]) -> str:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert r.output.count("\n") == 1 and r.output.startswith("patcher: error: ")
    return r.output


def test_empty_prompt_file(tiny: Path, tmp_path: Path) -> None:
    for name, text in (("empty.jsonl", ""), ("blank.txt", "\n  \n"), ("no-text.jsonl", '{"prompt": ""}\n')):
        (tmp_path / name).write_text(text)
        with pytest.raises(PatcherError, match="no prompts in the file|every 'prompt' is blank"):
            load_prompts(tmp_path / name)
    out = _cli_error(["eval", str(tiny), "--prompts", str(tmp_path / "empty.jsonl"), "--evaluators", "profanity-check", "--ppl-tokens", "0"])
    assert "no prompts in the file" in out
    (tmp_path / "bad.jsonl").write_text('{"text": "hi"}\n')
    with pytest.raises(PatcherError, match="bad.jsonl:1: no field 'prompt'"):
        load_prompts(tmp_path / "bad.jsonl")


def test_prompt_formats(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    p = load_prompts(tmp_path / "p.txt", file_order=True)
    assert p.prompts == ["first prompt", "second prompt"] and p.scores is None and p.lines == [1, 3]
    assert p.sha256 == hashlib.sha256((tmp_path / "p.txt").read_bytes()).hexdigest()
    (tmp_path / "rtp.jsonl").write_text(json.dumps({"prompt": {"text": "orig layout", "toxicity": 0.7}}) + "\n" + json.dumps({"prompt": "flat", "toxicity": 0.1}) + "\n")
    p = load_prompts(tmp_path / "rtp.jsonl", file_order=True)
    assert p.prompts == ["orig layout", "flat"] and p.scores == [0.7, 0.1]
    rows = [(f"prompt {i}", None) for i in range(30)]
    settings = EvalSettings.from_preset("quick", prompts=str(_write_prompts(tmp_path / "many.jsonl", rows)), n_prompts=10, seed=1)
    a, b = eval_prompts(settings), eval_prompts(settings)
    assert a.prompts == b.prompts and len(a.prompts) == 10 and a.lines == sorted(a.lines) and a.scores is None  # null scores: none
    assert len(eval_prompts(dataclasses.replace(settings, n_prompts=0)).prompts) == 30


def test_unknown_evaluator_lists_known(tiny: Path, data_dir: Path) -> None:
    out = _cli_error(["eval", str(tiny), "--evaluators", "perspective", "--ppl-tokens", "0"])
    assert "'perspective'" in out and "profanity-check" in out and "hatesonar" in out and "jigsaw-bilstm" in out


def test_classifier_without_classification_head(tiny: Path, data_dir: Path) -> None:
    out = _cli_error(["eval", str(tiny), "--evaluators", f"hf:{tiny}", "--ppl-tokens", "0"])
    assert "not a text classifier" in out


def test_bad_settings() -> None:
    with pytest.raises(PatcherError, match="unknown eval preset"):
        EvalSettings.from_preset("full")
    with pytest.raises(PatcherError, match="top_p"):
        EvalSettings.from_preset("quick", top_p=1.5)
    s = EvalSettings.from_preset("rtp", samples=3, evaluators="hatesonar, profanity-check")
    assert s.samples == 3 and s.max_new_tokens == 20 and s.top_p == 0.9 and s.evaluators == ("hatesonar", "profanity-check")
    assert EvalSettings() == EvalSettings.from_preset("rtp")
