"""Capability measures (`patcher.evaluate.capability`): BLiMP scored by total log-probability, and
the KL divergence from the base model on neutral prompts, on tiny models with a planted preference;
and both through `patcher eval`'s API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_with_tokenizer, tiny_model, tiny_tokenizer

from patcher.core.errors import PatcherError
from patcher.evaluate.capability import blimp_correct, blimp_drop, blimp_summary, kl_from_base, load_blimp
from patcher.evaluate.report import EvalSettings, evaluate


class PlantedLM(torch.nn.Module):
    """Every next token's logits are one fixed vector: the model likes the characters in ``liked``."""

    def __init__(self, tok, liked: str, vocab: int = 96) -> None:
        super().__init__()
        bias = torch.zeros(vocab)
        for c in liked:
            bias[tok.convert_tokens_to_ids(c)] = 5.0
        self.bias = torch.nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None, use_cache=False):  # noqa: ARG002 - the HF call signature
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def write_blimp(path: Path, paradigms: int = 3, per: int = 4) -> Path:
    rows = []
    for p in range(paradigms):
        for i in range(per):
            rows.append({"UID": f"paradigm_{p}", "pairID": str(i), "field": "syntax", "linguistics_term": f"term_{p % 2}",
                         "sentence_good": "a" * (4 + i), "sentence_bad": "z" * (4 + i)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_blimp_scores_the_preferred_sentence(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    pairs = load_blimp(write_blimp(tmp_path / "b.jsonl"))
    assert len(pairs.good) == 12
    bad_lover = blimp_summary(blimp_correct(PlantedLM(tok, "z"), tok, pairs), pairs)
    good_lover = blimp_summary(blimp_correct(PlantedLM(tok, "a"), tok, pairs), pairs)
    assert bad_lover["accuracy"]["value"] < 0.5 and bad_lover["accuracy"]["value"] == 0.0  # below chance: it prefers the bad sentence
    assert good_lover["accuracy"]["value"] == 1.0
    assert set(good_lover["per_phenomenon"]) == {"term_0", "term_1"} and good_lover["per_phenomenon"]["term_0"]["pairs"] == 8
    lo, hi = good_lover["accuracy"]["ci"]
    assert lo <= 1.0 <= hi
    drop = blimp_drop(good_lover, bad_lover)
    assert drop["value"] == pytest.approx(100.0)  # points
    # the fixed subset: the first N pairs of every paradigm, in file order
    sub = load_blimp(tmp_path / "b.jsonl", per_paradigm=2)
    assert sub.paradigm == ["paradigm_0"] * 2 + ["paradigm_1"] * 2 + ["paradigm_2"] * 2 and sub.good[:2] == ["aaaa", "aaaaa"]
    with pytest.raises(PatcherError, match="per paradigm"):
        load_blimp(tmp_path / "b.jsonl", per_paradigm=0)
    (tmp_path / "bad.jsonl").write_text('{"UID": "x"}\n')
    with pytest.raises(PatcherError, match="not a BLiMP row"):
        load_blimp(tmp_path / "bad.jsonl")


def test_kl_of_a_model_with_itself_is_zero() -> None:
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    prompts = ["the cat sat on", "a b c d e f", "hello"]
    same = kl_from_base(model, model, tok, prompts)
    assert same["value"] == pytest.approx(0.0, abs=1e-6) and same["tokens"] == sum(len(tok(p)["input_ids"]) for p in prompts)
    other = tiny_model("llama", seed=1)
    moved = kl_from_base(other, model, tok, prompts)
    assert moved["value"] > 1e-3
    assert moved["ci"][0] <= moved["value"] <= moved["ci"][1]
    # padding does not change a prompt's KL: alone or in a batch with longer ones
    alone = kl_from_base(other, model, tok, prompts[2:])
    per_batch = kl_from_base(other, model, tok, prompts, batch_size=1)
    assert per_batch["value"] == pytest.approx(moved["value"], rel=1e-4) and alone["value"] > 0


class Evaluator:
    name, floor = "count-z", 0.0

    def score(self, texts):
        return np.array([min(1.0, t.count("z") / 5) for t in texts])


def test_eval_reports_blimp_and_kl(tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "m")
    other = save_tiny_with_tokenizer("llama", tmp_path / "o", seed=1)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(4)))
    settings = EvalSettings.from_preset("quick", prompts=str(tmp_path / "p.jsonl"), n_prompts=0, samples=1, max_new_tokens=3, ppl_tokens=0,
                                        fluency=False, blimp=2, blimp_data=str(write_blimp(tmp_path / "b.jsonl")), kl_prompts=3,
                                        kl_data=str(tmp_path / "p.jsonl"), bootstrap=50)
    same = evaluate(model, baseline=model, settings=settings, evaluators=[Evaluator()]).to_json()["model"]
    assert same["blimp"]["pairs"] == 6 and same["blimp_drop"]["value"] == 0.0
    assert same["kl_from_baseline"]["value"] == pytest.approx(0.0, abs=1e-6)
    moved = evaluate(other, baseline=model, settings=settings, evaluators=[Evaluator()])
    assert moved.to_json()["model"]["kl_from_baseline"]["value"] > 1e-3
    assert "KL from base" in moved.table() and "BLiMP accuracy" in moved.table()
    with pytest.raises(PatcherError, match="needs? --baseline|give --baseline"):
        evaluate(model, settings=settings, evaluators=[Evaluator()])


def test_run_gates_on_blimp_and_kl(tmp_path: Path, shared_data: Path) -> None:
    """[check] max_kl / max_blimp_drop: `patcher run` measures them like perplexity and refuses to
    publish a patch over either budget (nothing written); within budget the record holds them."""
    from helpers import write_recipe

    from patcher.io.record import read_record
    from patcher.recipe.loader import load_recipe
    from patcher.workflows.run import run

    model = save_tiny_with_tokenizer("llama", tmp_path / "m")
    path = write_recipe(tmp_path, model)
    text = path.read_text()
    path.write_text(text.replace("max_ppl_increase = 100.0", "max_ppl_increase = 100.0\nmax_kl = 1e-9\nkl_prompts = 3\nmax_blimp_drop = 100\nblimp_pairs = 1"))
    with pytest.raises(PatcherError, match="KL from base .* over the recipe's \\[check\\] budget"):
        run(load_recipe(path), out=tmp_path / "refused", run_eval=False)
    assert not (tmp_path / "refused").exists()
    path.write_text(text.replace("max_ppl_increase = 100.0", "max_ppl_increase = 100.0\nmax_kl = 100\nkl_prompts = 3\nmax_blimp_drop = 100\nblimp_pairs = 1"))
    run(load_recipe(path), out=tmp_path / "ok", run_eval=False)
    check = read_record(tmp_path / "ok")["check"]
    assert check["kl"] > 1e-9 and -100 <= check["blimp_drop"] <= 100 and check["max_kl"] == 100
