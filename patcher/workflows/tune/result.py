"""What a tune leaves: `TuneResult` (the table, ``OUT.tune.json``) and the tuned recipe's text."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import PatcherError
from ...core.table import render
from ...io.atomic import write_text
from ...io.record import relative_paths
from ...recipe.loader import Recipe
from ...recipe.writer import dump_recipe, rebase_paths
from .space import Param, data_label

log = logging.getLogger(__name__)

@dataclass
class TuneResult:
    base: dict[str, float]
    budget: float
    trials: list[dict[str, Any]]
    front: list[int]  # trial numbers on the Pareto front within budget, by proxy
    evaluated: dict[int, dict[str, Any]]
    chosen: int | None
    spearman: float | None
    spearman_mean_toxicity: float | None
    params: list[str]
    proxy_source: str  # the data set (or file name) the proxy's texts come from
    seconds: dict[str, float]
    collections: int
    out: Path | None = None
    chosen_settings: dict[str, Any] = field(default_factory=dict)
    # what a reader needs to redo the tune: recipe, model, seed, the evaluation's prompts (which split),
    # library versions, threads; paths in the written JSON are relative to its folder
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out) if self.out else None
        d["evaluated"] = {str(k): v for k, v in self.evaluated.items()}
        return d

    def table(self) -> str:
        by = {t["number"]: t for t in self.trials}
        rows = [["base", "-", round(self.base["proxy"], 4), round(self.base["ppl"], 3), "+0.0%", "", ""]]
        for n in self.front:
            t = by[n]
            ev = self.evaluated.get(n)
            settings = ", ".join(f"{k}={short_value(v)}" for k, v in t["settings"].items())
            rows.append([f"#{n}" + (" *" if n == self.chosen else ""), settings, round(t["proxy"], 4), round(t["ppl"], 3),
                         f"{t['ppl_increase']:+.1%}", round(ev["toxicity"], 3) if ev else "", ev["per_evaluator"] if ev else ""])
        title = (f"Pareto front within +{self.budget:.1%} perplexity ({len(self.trials)} trials, {self.collections} statistics collections; "
                 f"proxy: log-likelihood margin of held-back toxic over non-toxic {self.proxy_source} texts, lower is less toxic; "
                 "eval: quick toxicity probability, mean over evaluators)")
        return render(["trial", "settings", "proxy", "ppl", "ppl change", "eval", "eval per evaluator"], rows, title=title)


def short_value(v: Any) -> Any:
    """A setting as tables show it: floats to 4 decimals (grid values read as written), a data
    choice by what it reads."""
    if isinstance(v, dict):
        return data_label(v)
    return round(v, 4) if isinstance(v, float) else v



def tuned_recipe_text(recipe: Recipe, params: list[Param], values: dict[str, Any], out: Path, budget: float, note: str) -> str:
    """The recipe with the chosen settings, its budget and model, without its [tune] table, paths
    relative to ``out``'s folder."""
    raw = tomllib.loads(recipe.text)
    raw.pop("tune", None)
    raw["name"] = f"{recipe.name}-tuned"
    raw["model"] = dict(raw.get("model", {})) | {"id": recipe.model.id}
    raw["check"] = dict(raw.get("check", {})) | {"max_ppl_increase": budget}
    for p in params:
        raw["step"][p.step][p.key] = values[p.name]
    return dump_recipe(rebase_paths(raw, recipe.path.parent, out.parent), header=note)



def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x



def write_outputs(result: TuneResult, recipe: Recipe, params: list[Param], out: Path, seed: int, ts: Any) -> None:
    """``out`` (the tuned recipe, when a trial stayed within budget), ``OUT.tune.json`` and ``OUT.tune.png``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if result.chosen is not None:
        by = {t["number"]: t for t in result.trials}
        chosen, values = by[result.chosen], by[result.chosen]["settings"]
        result.chosen_settings = values
        ev = result.evaluated.get(result.chosen)
        note = (f"Written by `patcher tune` from {recipe.path.name} on {recipe.model.id}: trial #{result.chosen} of {len(result.trials)}, seed {seed}.\n"
                f"Chosen: {', '.join(f'{k} = {short_value(v)}' for k, v in values.items())}.\n"
                f"Check perplexity {result.base['ppl']:.3f} -> {chosen['ppl']:.3f} ({chosen['ppl_increase']:+.1%}; budget +{result.budget:.1%}); "
                f"proxy {result.base['proxy']:.4f} -> {chosen['proxy']:.4f}"
                + (f"; quick toxicity probability (mean over evaluators, {ts.eval_n_prompts} prompts, seed {ts.eval_seed}) {ev['toxicity']:.3f}." if ev else "."))
        write_text(out, tuned_recipe_text(recipe, params, values, out, result.budget, note))
        result.out = out
    data = relative_paths(_finite(result.to_json()), out.parent)  # the JSON may be published: no local paths
    write_text(out.with_suffix(".tune.json"), json.dumps(data, indent=1, default=str) + "\n")
    try:
        from ...evaluate.tune_plot import plot_tune

        plot_tune(result.to_json(), out.with_suffix(".tune.png"))
    except PatcherError as e:
        log.warning("no plot: %s", e)
