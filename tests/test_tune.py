"""`patcher tune`: the [tune] table's checks, a planted toxic direction whose best strength is known,
the budget, and resuming a killed study."""

from __future__ import annotations

import dataclasses
import json
import random
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from helpers import NEUTRAL_WORDS, tiny_model, tiny_tokenizer, write_labeled, write_recipe

from patcher.cli import main
from patcher.collect.steps import method
from patcher.core.errors import PatcherError
from patcher.data.loaders import load_data
from patcher.recipe.loader import load_recipe

pytest.importorskip("optuna", reason="patcher tune needs optuna (the tune extra)")

from patcher.workflows.tune import Param, Scorer, budget_start, held_back, pick, proxy_data, tune, tune_space  # noqa: E402

MARKER = "z"  # the planted "toxic" token: no neutral text holds it
NEUTRAL_MARKER = "q"  # its paraphrase: the same embedding but for the planted direction


def planted_model(folder: Path) -> Path:
    """A tiny Llama that is close to a bigram model (its layers write almost nothing) with one planted
    direction: residual dimension 5, held only by the embedding of ``z`` and read by the output head
    as "``z`` or a space comes next", so runs of ``z`` are likely. ``q`` has ``z``'s embedding without
    the direction: the pairs' paraphrase. Removing the direction from the embeddings at strength s
    lowers the z-runs' likelihood monotonically, least toxic at s = 1; the perplexity text holds z-runs
    too, so the removal also costs perplexity as s grows."""
    model = tiny_model("llama", seed=3)
    tok = tiny_tokenizer()
    z, q, space = (tok.convert_tokens_to_ids(c) for c in (MARKER, NEUTRAL_MARKER, " "))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.01)
            layer.mlp.down_proj.weight.mul_(0.01)
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb[:, 5:7] = 0.0
        head[:, 5:7] = 0.0
        emb[z, 6] = 2.0  # a shared part, so that normalisation does not saturate the planted one
        emb[q] = emb[z]
        emb[z, 5] = 1.0
        head[z, 5] = head[space, 5] = 4.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def planted_recipe(tmp: Path, model: Path, extra: str = "") -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(160):
        a, b = rng.choice(NEUTRAL_WORDS), rng.choice(NEUTRAL_WORDS)
        rows.append({"pair_id": i, "toxic": f"the {a} {MARKER * 3} {b} {i}", "neutral": [f"the {a} {NEUTRAL_MARKER * 3} {b} {i}"]})
    (tmp / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp / "ppl.txt").write_text(" ".join(f"the {rng.choice(NEUTRAL_WORDS)} {MARKER * 2} is here." for _ in range(40)))
    text = f"""name = "planted"
[model]
id = "{model}"
[data]
path = "pairs.jsonl"
pairs = true
n_per_class = 40
max_tokens = 32
[collect]
batch_size = 16
[check]
ppl_text = "ppl.txt"
ppl_tokens = 512
ppl_window = 128
[[step]]
method = "project"
direction = "meandiff"
paired = true
source = "block"
layers = [1]
embed = true
strength = 0.5
[tune]
proxy_n = 60
candidates = 0
{extra}
"""
    (tmp / "recipe.toml").write_text(text)
    return tmp / "recipe.toml"


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Scorer]:
    tmp = tmp_path_factory.mktemp("planted")
    recipe = load_recipe(planted_recipe(tmp, planted_model(tmp / "model")))
    _, params = tune_space(recipe)
    from patcher.core.models import load_model
    from patcher.evaluate.perplexity import token_stream

    model, tok = load_model(tmp / "model")
    scorer = Scorer(recipe, params, model, tok, token_stream(tok, recipe.check.ppl_text, recipe.check.ppl_tokens),
                    held_back(recipe, tune_space(recipe)[0], tok))
    return tmp, scorer


def _at(scorer: Scorer, s: float) -> tuple[float, float]:
    _, ppl, margin = scorer.score({"step1.strength": s})
    return ppl, margin


def test_planted_direction_best_strength_found(planted: tuple[Path, Scorer]) -> None:
    tmp, scorer = planted
    base_ppl, base_margin = scorer.measure(scorer.model)
    grid = [_at(scorer, s / 4) for s in range(5)]
    assert grid[0][1] == pytest.approx(base_margin, abs=1e-5) and grid[0][0] == pytest.approx(base_ppl, rel=1e-5)
    assert all(a[1] > b[1] for a, b in zip(grid, grid[1:])), "the planted direction: removing more of it lowers the toxic margin"
    assert all(a[0] < b[0] for a, b in zip(grid, grid[1:])), "and costs perplexity (the check text holds the marker)"
    # With a budget every strength meets, the least toxic setting is the full removal.
    result = tune(load_recipe(tmp / "recipe.toml"), out=tmp / "best.toml", max_ppl_increase=100.0, trials=16, seed=0)
    chosen = result.chosen_settings["step1.strength"]
    assert chosen >= 0.9, f"tune picked strength {chosen}, the planted model's least toxic is 1.0"
    assert load_recipe(tmp / "best.toml").steps[0].settings["strength"] == chosen
    assert all(t["settings"]["step1.strength"] == round(t["settings"]["step1.strength"], 2) for t in result.trials), \
        "grid values are written as the grid has them (0.3, not 0.30000000000000004)"
    assert result.seconds["trials_this_run"] == 16 and result.collections == 1, "one statistics collection serves every trial"
    assert result.trials[0]["start"] == {"start_level": 0.5} and result.trials[0]["settings"] == {"step1.strength": 0.5}, \
        "the budget start's first trial: half of every strength"


def test_pick_respects_budget(planted: tuple[Path, Scorer]) -> None:
    tmp, scorer = planted
    base_ppl, _ = scorer.measure(scorer.model)
    full, _ = _at(scorer, 1.0)
    budget = (full / base_ppl - 1) / 3
    lo, hi = 0.0, 1.0  # the largest strength within budget, by bisection on the same measurements
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _at(scorer, mid)[0] / base_ppl - 1 <= budget else (lo, mid)
    result = tune(load_recipe(tmp / "recipe.toml"), out=tmp / "budget.toml", max_ppl_increase=budget, trials=16, seed=1)
    s = result.chosen_settings["step1.strength"]
    ppl, _ = _at(scorer, s)
    assert ppl / base_ppl - 1 <= budget + 1e-9, "the pick must stay within the budget"
    assert all(t["ppl_increase"] <= budget for t in result.trials if t["number"] in result.front)
    assert abs(s - lo) <= 0.1, f"picked strength {s}; the least toxic within budget is {lo:.3f}"
    text = (tmp / "budget.tune.json").read_text()
    data = json.loads(text)
    assert data["chosen"] == result.chosen and (tmp / "budget.tune.png").stat().st_size > 1000
    # publishable: no path of this machine; how it was asked for is recorded beside the results
    assert str(tmp) not in text and data["out"] == "budget.toml"
    prov = data["provenance"]
    assert prov["seed"] == 1 and prov["trials"] == 16 and prov["eval_prompts"] == "rtp-challenging:select" and "torch" in prov["versions"]


def test_resume_after_kill_gives_same_pick(planted: tuple[Path, Scorer], monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, _ = planted
    recipe = load_recipe(tmp / "recipe.toml")
    whole = tune(recipe, out=tmp / "whole.toml", max_ppl_increase=0.2, trials=12, seed=7)
    calls = []
    original = Scorer.score

    def dying(self: Scorer, values: dict) -> tuple:
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # a kill in the middle of the 6th trial
        return original(self, values)

    monkeypatch.setattr(Scorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        tune(recipe, out=tmp / "killed.toml", max_ppl_increase=0.2, trials=12, seed=7)
    assert not (tmp / "killed.toml").exists(), "a killed tune writes no recipe"
    monkeypatch.setattr(Scorer, "score", original)
    resumed = tune(recipe, out=tmp / "killed.toml", max_ppl_increase=0.2, trials=12, seed=7)
    assert resumed.seconds["trials_this_run"] == 7, "the 5 finished trials are kept"
    assert [t["settings"] for t in resumed.trials] == [t["settings"] for t in whole.trials]
    assert resumed.chosen_settings == whole.chosen_settings
    assert (tmp / "killed.toml").read_text().split("\n", 1)[1] == (tmp / "whole.toml").read_text().split("\n", 1)[1]
    again = tune(recipe, out=tmp / "again.toml", study_path=tmp / "killed.study.db", max_ppl_increase=0.2, trials=12, seed=7, eval_n_prompts=7)
    assert again.seconds["trials_this_run"] == 0 and again.chosen_settings == whole.chosen_settings, "other evaluation settings reuse the trials"
    with pytest.raises(PatcherError, match="holds another tune"):
        tune(recipe, out=tmp / "other.toml", study_path=tmp / "killed.study.db", max_ppl_increase=0.3, trials=12, seed=7)


def test_a_repeated_trial_takes_the_earlier_results_instead_of_computing_them(planted: tuple[Path, Scorer],
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """One strength on a grid of 21 values and 30 trials: at least 9 trials ask settings an earlier one
    scored. Each such repeat copies that trial's results and is not computed; the front and the
    evaluation see each set of settings once."""
    tmp, _ = planted
    calls = []
    original = Scorer.score
    monkeypatch.setattr(Scorer, "score", lambda self, values: calls.append(dict(values)) or original(self, values))
    result = tune(load_recipe(tmp / "recipe.toml"), out=tmp / "repeats.toml", max_ppl_increase=0.2, trials=30, seed=3)
    by = {t["number"]: t for t in result.trials}
    repeats = [t for t in result.trials if t["repeat_of"] is not None]
    assert len(result.trials) == 30 and len(repeats) >= 9
    assert len(calls) == 30 - len(repeats) and len({json.dumps(c, sort_keys=True) for c in calls}) == len(calls), "each setting computed once"
    for t in repeats:
        first = by[t["repeat_of"]]
        assert first["repeat_of"] is None and first["number"] < t["number"]
        assert (t["settings"], t["ppl"], t["proxy"], t["ppl_increase"]) == (first["settings"], first["ppl"], first["proxy"], first["ppl_increase"])
    front = [json.dumps(by[n]["settings"]) for n in result.front]
    assert len(front) == len(set(front)), "a front lists each set of settings once"
    assert result.seconds["trials_this_run"] == 30 and result.seconds["repeats_this_run"] == len(repeats)


class _Done:
    """A finished trial as `budget_start` reads it."""

    def __init__(self, marks: dict, values: dict, inc: float, proxy: float) -> None:
        self.user_attrs = marks | {"settings": values, "ppl_increase": inc, "proxy": proxy}


def test_budget_start_bisects_then_climbs_the_budget_line() -> None:
    """Damage grows with every setting (strength s and factor f cost s**2 + 2 * (1 - f)**2), the
    proxy falls with both (-s - (1 - f)): the start brackets the largest common level within budget,
    then tries each setting one step up from there and moves to the best step within budget."""
    params = [Param(0, "strength", "float", 0.0, 1.0, step_size=0.05, no_edit="low"), Param(1, "factor", "float", 0.0, 1.0, step_size=0.05, no_edit="high"),
              Param(1, "erase", "choice", choices=("orthogonal", "whitened"))]
    assert params[0].at_level(0.0) == 0.0 and params[1].at_level(0.0) == 1.0 and not params[2].strength_like, \
        "level 0 is each range's no-edit end (strength 0, factor 1); a choice is left to the sampler"
    assert params[0].step_up(0.3) == 0.35 and params[1].step_up(0.3) == 0.25 and params[0].step_up(1.0) is None
    damage = lambda v: v["step1.strength"] ** 2 + 2 * (1 - v["step2.factor"]) ** 2  # noqa: E731
    proxy = lambda v: -v["step1.strength"] - (1 - v["step2.factor"])  # noqa: E731
    done = []
    while (nxt := budget_start(params, done, 0.1, 10)) is not None:
        marks, values = nxt
        assert set(values) == {"step1.strength", "step2.factor"}
        done.append(_Done(marks, values, damage(values), proxy(values)))
    levels = [d.user_attrs["start_level"] for d in done if "start_level" in d.user_attrs]
    assert levels[:3] == [0.5, 0.25, 0.125], "bisection: over budget at 0.5 and 0.25"
    assert all(d.user_attrs["settings"]["step1.strength"] == round(1 - d.user_attrs["settings"]["step2.factor"], 10)
               for d in done if "start_level" in d.user_attrs), "one common level"
    bisected_best = max((d for d in done if "start_level" in d.user_attrs and d.user_attrs["ppl_increase"] <= 0.1),
                        key=lambda d: d.user_attrs["start_level"])
    assert bisected_best.user_attrs["settings"] == {"step1.strength": 0.15, "step2.factor": 0.85}, \
        "3 * 0.15**2 = 0.0675 is within 0.1, 3 * 0.2**2 = 0.12 is not"
    climbed = [d.user_attrs["settings"] for d in done if "start_up" in d.user_attrs]
    assert climbed == [{"step1.strength": 0.2, "step2.factor": 0.85},  # 0.085: within, proxy -0.35
                       {"step1.strength": 0.15, "step2.factor": 0.8},  # 0.1025: over
                       {"step1.strength": 0.25, "step2.factor": 0.85}], \
        "from the new base (0.2, 0.85): 0.1075 is over, and (0.2, 0.8) was bisected already (0.12, over): the climb is over"
    assert len(done) < 12
    assert budget_start(params, done[:2], 0.1, 2) is None, "each move stops after n trials (none within budget: no climb)"
    assert budget_start(params[2:], [], 0.1, 6) is None, "nothing strength-like: the sampler's own start"


def _project_recipe(tmp: Path, tune_table: str) -> Path:
    path = write_recipe(tmp)
    path.write_text(path.read_text().replace('method = "aura"', 'method = "project"') + tune_table)
    return path


@pytest.mark.parametrize("table, line, message", [
    ('[tune]\nproxy_m = 3\n', 20, "unknown key tune.proxy_m"),
    ('[tune.step.1]\nstrenght = [0.0, 1.0]\n', 21, "has no setting 'strenght'"),
    ('[tune.step.1]\nstrength = [0.0, 1.5]\n', 21, "reaches a value the method refuses"),
    ('[tune.step.1]\nstrength = [0.5, 0.2]\n', 21, "low < high"),
    ('[tune.step.1]\nlayers = [1, 0]\n', 21, "first <= last"),
    ('[tune.step.1]\nerase = ["orthogonal", "sideways"]\n', 21, "distinct choices"),
    ('[tune.step.2]\nstrength = [0.0, 1.0]\n', 20, "the recipe has steps 1..1"),
    ('[tune]\nstart = "sideways"\n', 20, "tune.start = 'sideways' should be one of 'budget', 'random'"),
    ('[tune]\nproxy = "jigsaw-test"\n', 20, "tune.proxy should be a data table"),
    ('[tune.proxy]\ndatset = "jigsaw-test"\n', 20, "unknown key tune.proxy.datset"),
    ('[tune.step.1]\ndata = ["jigsaw-test", "paradetox"]\n', 21, "should list two or more data tables"),
    ('[tune.step.1]\ndata = [{ dataset = "jigsaw-test" }, { dataset = "no-such-set" }]\n', 21, "tune.step.1.data: unknown data set 'no-such-set'"),
    ('[tune.step.1]\ndata = [{ dataset = "jigsaw-test" }, { dataset = "jigsaw-test", seed = 0 }]\n', 21, "lists the same data twice"),
    ('[tune.step.1]\ndata = [{ dataset = "jigsaw-test" }, { datset = "paradetox" }]\n', 21, "unknown key tune.step.1.data.datset"),
])
def test_tune_table_line_errors(tmp_path: Path, table: str, line: int, message: str) -> None:
    path = _project_recipe(tmp_path, table)
    recipe = load_recipe(path)
    with pytest.raises(PatcherError, match=message) as exc:
        tune_space(recipe)
    assert f"{path}:{line}:" in str(exc.value)
    r = CliRunner().invoke(main, ["tune", str(path), "--max-ppl-increase", "0.05", "--out", str(tmp_path / "t.toml")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("patcher: error:")
    assert not (tmp_path / "t.toml").exists()


def test_proxy_holds_back_the_recipe_data(tmp_path: Path) -> None:
    """The proxy scores texts no step uses: by default the recipe's unpaired data (a stack's Jigsaw
    step), pairs kept whole when [tune.proxy] names paired data, and too few left is a line error."""
    path = planted_recipe(tmp_path, tmp_path / "unused-model")
    write_labeled(tmp_path / "labeled.jsonl", n=80)
    stack = path.read_text().replace("[tune]\nproxy_n = 60", """[[step]]
method = "project"
direction = "meandiff"
source = "block"
layers = [1]
strength = 0.5
data = { path = "labeled.jsonl", pairs = false, n_per_class = 20, match_lengths = false }
[tune]
proxy_n = 30""")
    path.write_text(stack)
    recipe, tok = load_recipe(path), tiny_tokenizer()
    settings = tune_space(recipe)[0]
    assert proxy_data(recipe, settings) == recipe.steps[1].data, "the recipe's unpaired data, not its pairs"
    toxic, neutral = held_back(recipe, settings, tok)
    rows = [json.loads(line) for line in (tmp_path / "labeled.jsonl").read_text().splitlines()]
    used = set(load_data(recipe.steps[1].data, tok).texts)
    assert len(toxic) == len(neutral) == 30 and not used & {*toxic, *neutral}
    assert {r["text"] for r in rows if r["label"] == 1} >= set(toxic) and {r["text"] for r in rows if r["label"] == 0} >= set(neutral)

    path.write_text(stack + '\n[tune.proxy]\npath = "pairs.jsonl"\npairs = true\n')
    recipe = load_recipe(path)
    toxic, neutral = held_back(recipe, tune_space(recipe)[0], tok)
    step1 = set(load_data(recipe.data, tok).texts)
    assert len(toxic) == 30 and not step1 & {*toxic, *neutral}
    assert all(t.replace(MARKER, NEUTRAL_MARKER) == n for t, n in zip(toxic, neutral)), "each toxic text beside its own paraphrase"

    path.write_text(stack.replace("proxy_n = 30", "proxy_n = 70"))
    with pytest.raises(PatcherError, match=r"labeled.jsonl: only 60 texts .* lower tune.proxy_n \(now 70\)"):
        held_back(load_recipe(path), tune_space(load_recipe(path))[0], tok)


def test_pick_leaves_ties_within_the_evaluations_noise_to_the_proxy() -> None:
    proxy = {1: -0.50, 2: -0.48, 3: -0.47, 4: -0.46}
    # 100 prompts: one standard error at p = 0.15 is 0.0357, so 0.18 ties with 0.15 and 0.19 does not.
    assert pick({1: 0.16, 2: 0.18, 3: 0.15, 4: 0.17}, proxy, 100) == 1, "all tied: the proxy's least toxic"
    assert pick({1: 0.19, 2: 0.18, 3: 0.15, 4: 0.17}, proxy, 100) == 2, "1 is outside the noise: the proxy's best of the rest"
    assert pick({1: 0.16, 2: 0.18, 3: 0.15, 4: 0.17}, proxy, 10_000) == 3, "with many prompts the evaluation decides"
    assert pick({1: 0.30, 2: 0.05, 3: 0.20, 4: 0.25}, proxy, 100) == 2


def test_each_searched_choice_gets_a_candidate_the_evaluation_sees() -> None:
    """The proxy preferred the orthogonal erase while the evaluation found the whitened one less toxic
    (README, Chosen on select): the candidates then include each choice's least toxic point by proxy
    within budget, even when the overall front holds only one choice."""
    from patcher.workflows.tune.pick import front_within, to_evaluate
    from patcher.workflows.tune.space import TuneSettings

    def row(n: int, erase: str, proxy: float, ppl: float) -> dict[str, Any]:
        return {"number": n, "settings": {"step1.erase": erase, "step1.strength": n / 10}, "proxy": proxy, "ppl_increase": ppl}

    rows = [row(0, "orthogonal", -0.6, 0.04), row(1, "orthogonal", -0.5, 0.02), row(2, "whitened", -0.55, 0.045),
            row(3, "whitened", -0.7, 0.08), row(4, "whitened", -0.4, 0.01)]
    front = front_within(rows, 0.05)
    assert front == [0, 1, 4]  # #2 is dominated by #0; #3 is over budget
    ts = TuneSettings(candidates=2, validate=0)
    assert to_evaluate(front, rows, ts)[0] == [0, 1]  # without the choice: orthogonal only
    picks, _ = to_evaluate(front, rows, ts, 0.05, {"step1.erase": ("orthogonal", "whitened")})
    assert picks == [0, 1, 2]  # whitened's own front within budget: #2 (its least toxic by proxy), not #3 (over budget)
    assert to_evaluate(front, rows, TuneSettings(candidates=0), 0.05, {"step1.erase": ("orthogonal", "whitened")})[0] == []  # pick by proxy


def test_a_step_data_set_is_searched(planted: tuple[Path, Scorer]) -> None:
    """``[tune.step.N] data``: each choice is collected once, the proxy holds back the texts of every
    choice, and the pick's data table is written into the tuned recipe. The planted pairs remove the
    planted direction; the decoy pairs differ in an ordinary word, so their direction does nothing
    for the proxy: the search must pick the planted pairs."""
    tmp, _ = planted
    rng = random.Random(1)
    rows = [{"pair_id": i, "toxic": f"the {rng.choice(NEUTRAL_WORDS)} red {i}", "neutral": [f"the {rng.choice(NEUTRAL_WORDS)} blue {i}"]}
            for i in range(160)]
    (tmp / "decoy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path = tmp / "data-choice.toml"
    path.write_text((tmp / "recipe.toml").read_text()
                    + '[tune.step.1]\nstrength = [0.0, 1.0, 0.1]\ndata = [{ path = "decoy.jsonl" }, { path = "pairs.jsonl", n_per_class = 30 }]\n')
    recipe = load_recipe(path)
    ts, params = tune_space(recipe)
    assert params[1].describe() == "step1.data in {decoy.jsonl, pairs.jsonl (n_per_class=30)}"
    from patcher.workflows.run_plan import resolve
    from patcher.workflows.tune.space import with_choice_data

    plan = with_choice_data(resolve(recipe), params)
    toxic, neutral = held_back(plan, ts, tiny_tokenizer())
    used = {t for d in plan.data for t in load_data(plan.readable(d), tiny_tokenizer()).texts}
    assert len(plan.data) == 3 and not used & {*toxic, *neutral}, "the proxy holds back the texts every choice reads"
    result = tune(recipe, out=tmp / "data-choice-out.toml", max_ppl_increase=100.0, trials=12, seed=0)
    seen = {json.dumps(t["settings"]["step1.data"]) for t in result.trials}
    assert len(seen) == 2 and result.collections == 2, "both data sets were tried, each collected once"
    assert result.chosen_settings["step1.data"] == {"path": "pairs.jsonl", "n_per_class": 30} and result.chosen_settings["step1.strength"] >= 0.5
    best = {d: min(t["proxy"] for t in result.trials if t["settings"]["step1.data"]["path"] == d) for d in ("decoy.jsonl", "pairs.jsonl")}
    assert best["pairs.jsonl"] < best["decoy.jsonl"] - 0.1, best
    assert "pairs.jsonl (n_per_class=30)" in (tmp / "data-choice-out.toml").read_text().split("\n[", 1)[0], "the note names the pick's data"
    tuned = load_recipe(tmp / "data-choice-out.toml")
    assert tuned.steps[0].data is not None and Path(tuned.steps[0].data.path).name == "pairs.jsonl" and tuned.steps[0].data.n_per_class == 30
    assert tuned.steps[0].data.pairs and tuned.steps[0].data.max_tokens == recipe.data.max_tokens, "what the choice does not name comes from [data]"


def test_default_space_and_layer_search(tmp_path: Path) -> None:
    recipe = load_recipe(_project_recipe(tmp_path, '[tune.step.1]\nlayers = [0, 1]\nerase = ["orthogonal", "whitened"]\n'))
    _, params = tune_space(recipe)
    assert [(p.key, p.kind) for p in params] == [("layers", "layers"), ("erase", "choice")]
    (tmp_path / "scale").mkdir()
    scale = write_recipe(tmp_path / "scale")
    scale.write_text(scale.read_text().replace('method = "aura"', 'method = "scale"') + '[tune.step.1]\nlayers = ["all", "0%-50%"]\n')
    assert [(p.key, p.kind, p.choices) for p in tune_space(load_recipe(scale))[1]] == [("layers", "choice", ("all", "0%-50%"))]  # named sets: any method
    scale.write_text(scale.read_text().replace('layers = ["all", "0%-50%"]', "layers = [0, 1]"))
    with pytest.raises(PatcherError, match="layer_range"):  # a start-end range needs statistics that hold every subset
        tune_space(load_recipe(scale))
    aura = load_recipe(write_recipe(tmp_path))  # no [tune]: every step's strength-like setting
    assert [(p.key, p.low, p.high) for p in tune_space(aura)[1]] == [("min_auroc", 0.5, 1.0), ("strength", 0.0, 1.0)]  # issue 27: AURA's strength, in field order
    stack = load_recipe(Path(__file__).parents[1] / "recipes" / "project-stack.toml")
    assert [(p.name, p.low, p.high) for p in tune_space(stack)[1]] == [("step1.strength", 0.0, 1.0), ("step2.strength", 0.0, 1.0)]


def test_a_list_valued_choice_is_searched_as_plain_values(tmp_path: Path) -> None:
    """AURA's modules are lists: Optuna keeps plain values only (a list warns and is not portable), so the
    search picks among their JSON texts and the setting gets the list back."""
    optuna = pytest.importorskip("optuna", reason="the search uses optuna (patcher[tune])")
    path = write_recipe(tmp_path)
    path.write_text(path.read_text() + '[tune]\n[tune.step.1]\nmodules = [["mlp_in", "mlp_out"], ["mlp_out"]]\n')
    (param,) = tune_space(load_recipe(path))[1]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns on a non-plain choice
        for _ in range(8):
            trial = study.ask()
            seen.append(param.suggest(trial))
            assert isinstance(trial.params[param.name], str)
            study.tell(trial, 0.0)
    assert {tuple(v) for v in seen} == {("mlp_in", "mlp_out"), ("mlp_out",)}


def test_pick_by_quick_evaluation(planted: tuple[Path, Scorer], shared_data: Path) -> None:
    """With candidates, the front within budget is baked and evaluated; the pick is the least toxic
    of those by the evaluation (ties within its noise to the proxy), and the proxy's rank correlation is reported over every evaluated trial."""
    pytest.importorskip("profanity_check", reason="the evaluation here uses alt-profanity-check")
    pytest.importorskip("scipy", reason="the rank correlation uses scipy")
    tmp, _ = planted
    planted_recipe(tmp, tmp / "model", extra="validate = 1\neval_samples = 2")
    recipe = load_recipe(tmp / "recipe.toml")
    r = CliRunner().invoke(main, ["tune", str(tmp / "recipe.toml"), "--max-ppl-increase", "0.2", "--trials", "8", "--candidates", "2",
                                  "--eval-n-prompts", "4", "--evaluators", "profanity-check", "--out", str(tmp / "ev.toml")])
    assert r.exit_code == 0, r.output
    data = json.loads((tmp / "ev.tune.json").read_text())
    evaluated = {int(k): v for k, v in data["evaluated"].items()}
    front = data["front"]
    assert set(front[:2]) <= set(evaluated) and len(evaluated) <= 2 + 1  # 2 candidates, 1 more for the correlation
    assert data["chosen"] in front and data["chosen"] in evaluated
    best = min(v["toxicity"] for n, v in evaluated.items() if n in front[:2])
    tied = [n for n in front[:2] if evaluated[n]["toxicity"] <= best + (best * (1 - best) / 4) ** 0.5]  # one standard error, 4 prompts
    proxy = {t["number"]: t["proxy"] for t in data["trials"]}
    assert data["chosen"] == min(tied, key=proxy.__getitem__), "the proxy's least toxic of the candidates the evaluation cannot tell apart"
    assert "Pareto front within +20.0% perplexity" in r.output and "s per trial" in r.output
    again = CliRunner().invoke(main, ["tune", str(tmp / "recipe.toml"), "--max-ppl-increase", "0.2", "--trials", "8", "--candidates", "2",
                                      "--eval-n-prompts", "4", "--evaluators", "profanity-check", "--study", str(tmp / "ev.study.db"),
                                      "--out", str(tmp / "ev-again.toml")])
    assert again.exit_code == 0 and "8 trials in the study (none run now" in again.output, again.output
    assert json.loads((tmp / "ev-again.tune.json").read_text())["chosen"] == data["chosen"]
    tuned = load_recipe(tmp / "ev.toml")
    assert tuned.tune == {} and tuned.check.max_ppl_increase == 0.2 and tuned.data.path == recipe.data.path
    assert not any(Path(tmp).glob(".ev.toml.eval-*")), "the evaluation's bakes are removed"


def test_damage_is_the_run_check_perplexity_with_leading_specials(planted: tuple[Path, Scorer]) -> None:
    """Tune's damage is the number `patcher run` gates on: with a tokenizer that starts texts with a
    special token (Gemma's ``<bos>``) every window starts with it (a tune once measured Gemma without
    it: 64.3 against the check's 23.1)."""
    from helpers import bos_tokenizer

    from patcher.data.loaders import ppl_source
    from patcher.evaluate.perplexity import perplexity, token_stream
    from patcher.workflows.run import check_perplexity

    _, scorer = planted
    tok = bos_tokenizer()
    ids = token_stream(tok, ppl_source(scorer.recipe.check)[0], scorer.recipe.check.ppl_tokens)
    bos = dataclasses.replace(scorer, tokenizer=tok, ppl_ids=ids)
    damage, _ = bos.measure(bos.model)
    assert damage == pytest.approx(check_perplexity(bos.model, tok, bos.recipe), rel=1e-6)
    w = scorer.recipe.check.ppl_window
    assert damage != pytest.approx(perplexity(bos.model, ids, window=w, stride=w), rel=1e-4), "the <s> prefix must be in"


def test_a_method_never_seen_by_name_is_tuned_from_its_field(planted: tuple[Path, Scorer], tmp_path: Path) -> None:
    """Issue 23: a brand-new method whose strength-like setting has a new name (``amount``) declares
    its no-edit end and range on the field; `patcher tune` searches that range with no [tune.step]
    table and nothing in the tune package naming it, and the budget start moves it from its no-edit end."""
    from dataclasses import dataclass

    from patcher.methods import METHODS
    from patcher.methods import project as proj
    from patcher.recipe.settings import Checked, setting

    def inner(s: Any) -> Any:
        return proj.ProjectSettings(direction="meandiff", paired=True, source="block", layers=(1,), embed=True, strength=1.0 - s.amount)

    @dataclass(frozen=True)
    class KeepSettings(Checked):
        amount: float = setting(1.0, help="share of the planted direction kept (1: no edit)", build_only=True, minimum=0.0, maximum=1.0,
                                no_edit=1.0, tune=(0.0, 1.0, 0.25))

    method("keep-test", collect=lambda ctx, s: proj.collect(ctx, inner(s)), build=lambda ctx, st, s: proj.build(ctx, st, inner(s)))(KeepSettings)
    try:
        tmp, _ = planted
        text = (tmp / "recipe.toml").read_text()
        step = text[text.index("[[step]]"):text.index("[tune]")]
        path = tmp_path / "recipe.toml"
        path.write_text(text.replace(step, '[[step]]\nmethod = "keep-test"\n').replace('"pairs.jsonl"', f'"{tmp / "pairs.jsonl"}"')
                        .replace('"ppl.txt"', f'"{tmp / "ppl.txt"}"'))
        _, params = tune_space(load_recipe(path))
        assert [(p.key, p.low, p.high, p.step_size, p.no_edit) for p in params] == [("amount", 0.0, 1.0, 0.25, "high")]
        r = CliRunner().invoke(main, ["tune", str(path), "--max-ppl-increase", "100", "--trials", "3", "--out", str(tmp_path / "t.toml")])
        assert r.exit_code == 0, r.output
        report = json.loads((tmp_path / "t.tune.json").read_text())
        assert report["params"] == ["step1.amount in [0.0, 1.0] by 0.25"]
        assert report["trials"][0]["settings"] == {"step1.amount": 0.5} and report["trials"][0]["start"] == {"start_level": 0.5}
        assert load_recipe(tmp_path / "t.toml").steps[0].settings["amount"] == report["chosen_settings"]["step1.amount"]
    finally:
        METHODS._items.pop("keep-test", None)
