"""The pick: the Pareto points within budget, the quick evaluation that chooses among them, and the
proxy's rank correlation with that evaluation."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ...bake.writer import bake
from ...core.progress import bar
from ...evaluate.report import EvalSettings, evaluate
from ...recipe.loader import Recipe, resolve_path
from .search import trial_rows
from .space import TuneSettings


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point matches or beats on both coordinates (lower is better)."""
    out = []
    for i, (a, b) in enumerate(points):
        if not any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i):
            out.append(i)
    return sorted(out, key=lambda i: points[i])


def spread(items: list[Any], k: int) -> list[Any]:
    """``k`` items evenly spread over ``items`` (both ends included)."""
    if k <= 0 or not items:
        return []
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def pick(toxicity: dict[int, float], proxy: dict[int, float], n_prompts: int) -> int:
    """The chosen candidate: the least toxic by the evaluation, unless others lie within one standard
    error of it (a proportion over ``n_prompts`` prompts: sqrt(p (1 - p) / n)); then, of those, the
    one the proxy ranks least toxic. At a quick evaluation's few prompts the differences between
    neighbouring front points are mostly noise, while the proxy ranks trials with little noise
    (README, "Proxy vs real evaluation", has the measured rank correlation)."""
    best = min(toxicity, key=lambda n: (toxicity[n], proxy[n]))
    p = toxicity[best]
    tied = [n for n in toxicity if toxicity[n] <= p + math.sqrt(p * (1 - p) / n_prompts)]
    return min(tied, key=lambda n: (proxy[n], toxicity[n]))


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (ties averaged), or None with fewer than 3 points or a constant side."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)



def quick_settings(recipe: Recipe, ts: TuneSettings) -> EvalSettings:
    """The quick evaluation a tune scores its candidates with ([tune] eval_* keys)."""
    from ...data.catalog import is_name
    from ...evaluate.report import SELECT_PROMPTS

    value = ts.eval_prompts or SELECT_PROMPTS  # a catalog name stays a name; a file is relative to the recipe
    prompts = value if is_name(value) else resolve_path(recipe.path.parent, value)
    return EvalSettings.from_preset("quick", prompts=prompts, n_prompts=ts.eval_n_prompts, samples=ts.eval_samples,
                                    seed=ts.eval_seed, evaluators=ts.evaluators, ppl_tokens=0, fluency=False)


def eval_point(report: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A trial's evaluation as a tune keeps it: toxicity probability per evaluator, and their means."""
    tox = report["model"]["toxicity"]
    prob = {n: tox[n]["toxicity_probability"]["value"] for n in names}
    return {"toxicity": float(np.mean(list(prob.values()))), "per_evaluator": {n: round(v, 3) for n, v in prob.items()},
            "mean_toxicity": float(np.mean([tox[n]["mean_toxicity"]["value"] for n in names]))}



def distinct(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first trial of each set of settings: a repeat adds nothing to a front or an evaluation."""
    seen: set[str] = set()
    out = []
    for r in sorted(rows, key=lambda r: r["number"]):
        key = json.dumps(r["settings"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def front_within(rows: list[dict[str, Any]], budget: float) -> list[int]:
    """Trial numbers on the Pareto front (proxy, damage) of the trials within budget, by proxy
    (each set of settings once)."""
    within = [r for r in distinct(rows) if r["ppl_increase"] <= budget]
    return [within[i]["number"] for i in pareto([(r["proxy"], r["ppl_increase"]) for r in within])]


def to_evaluate(front: list[int], rows: list[dict[str, Any]], ts: TuneSettings, budget: float = math.inf,
                choices: dict[str, tuple[Any, ...]] | None = None) -> tuple[list[int], list[int]]:
    """The candidates (the least toxic end of the front, by proxy), plus, for each value of a searched
    choice (``choices``: name -> values) that none of them has, the least toxic point by proxy of that
    value's own front within budget: the proxy can rank choices the wrong way round (erase modes:
    README, Chosen on select), so the evaluation sees each. Then the other trials evaluated, spread
    over the proxy's range so that the rank correlation spans the study."""
    picks = list(front[: ts.candidates])
    for name, values in (choices or {}).items() if picks else ():
        for value in values:
            if any(r["settings"].get(name) == value for r in rows if r["number"] in picks):
                continue
            own = front_within([r for r in rows if r["settings"].get(name) == value], budget)
            if own:
                picks.append(own[0])
    others = [r["number"] for r in sorted(distinct(rows), key=lambda r: r["proxy"]) if r["number"] not in picks]
    return picks, spread(others, ts.validate)


def evaluate_trials(numbers: list[int], study: Any, scorer: Any, settings: EvalSettings, names: list[str], near: Path,
                    placement: Any) -> dict[int, dict[str, Any]]:
    """Each trial baked into a staging folder beside ``near`` and given the quick evaluation; the
    results are kept in the study per evaluation settings, so a resumed tune does not evaluate twice."""
    recipe, by = scorer.recipe, {r["number"]: r for r in trial_rows(study)}
    evaluated: dict[int, dict[str, Any]] = {}
    staging = Path(tempfile.mkdtemp(dir=near.resolve().parent, prefix=f".{near.name}.eval-"))
    try:
        tag = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str).encode()).hexdigest()[:12]
        for n in bar(numbers, desc="tune: evaluate", unit="trial"):
            key = f"eval/{tag}/{n}"
            if key not in study.user_attrs:
                patch = scorer.patches.get(n) or scorer.patch(by[n]["settings"])
                target = staging / f"trial-{n}"
                bake(patch, recipe.model.id, target, untie=recipe.model.untie)
                report = evaluate(target, settings=settings, placement=placement).to_json()
                study.set_user_attr(key, eval_point(report, names))
                shutil.rmtree(target, ignore_errors=True)
            evaluated[n] = study.user_attrs[key]
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return evaluated


def choose(front: list[int], picks: list[int], evaluated: dict[int, dict[str, Any]], rows: list[dict[str, Any]], n_prompts: int) -> int | None:
    """The trial the tune writes: `pick` among the evaluated candidates, else the front's least toxic by proxy."""
    if not picks:
        return front[0] if front else None
    proxy = {r["number"]: r["proxy"] for r in rows}
    return pick({n: evaluated[n]["toxicity"] for n in picks}, {n: proxy[n] for n in picks}, n_prompts)
