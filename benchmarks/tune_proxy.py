"""Which data should `patcher tune`'s toxicity proxy hold back from? Both candidate margins against the
tune's own quick evaluation, over more trials of a finished study than the tune evaluates (the
README's "Proxy vs real evaluation" table).

    python benchmarks/tune_proxy.py RECIPE OUT/stack-tuned.tune.json [--model gemma3-270m] [--json proxy.json]

RECIPE is the recipe the study tuned (its [tune] table gives the space and the evaluation settings).
For every trial the tune evaluated and every other point of its Pareto front within budget, the
trial's patch is rebuilt (hooks, no bake) and scored by two margins: held-back texts of the recipe's
unpaired data (the default proxy: Jigsaw comments in `project-stack`) and held-back pairs of its
paired data (ParaDetox); a trial the tune did not evaluate is baked into a temporary folder and given
the same quick evaluation (same prompts, samples and seed), so every row is measured alike. Printed:
Spearman of each margin against the evaluation's toxicity (mean over evaluators) over all rows and
over those within budget, and against each evaluator. The JSON is rewritten after every trial;
``--json`` with an existing file resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from patcher.bake.writer import bake
from patcher.core.models import load_model
from patcher.core.table import render
from patcher.evaluate.likelihood import likelihood_margin
from patcher.evaluate.report import evaluate
from patcher.io.model_files import resolve_model
from patcher.recipe.loader import load_recipe
from patcher.workflows.tune import Scorer, eval_point, held_back, proxy_data, proxy_name, quick_settings, spearman, tune_space


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("tune_json", type=Path, help="the .tune.json a finished `patcher tune` wrote")
    ap.add_argument("--model", help="the model the tune ran on, when not the recipe's")
    ap.add_argument("--json", type=Path, default=Path("tune-proxy.json"))
    args = ap.parse_args()

    recipe = load_recipe(args.recipe).override("model", id=args.model)
    ts, params = tune_space(recipe)
    paired = [d for d in (s.data or recipe.data for s in recipe.steps) if d.pairs]
    proxies = {proxy_name(proxy_data(recipe, ts)): ts}
    if paired:
        proxies.setdefault(proxy_name(paired[-1]), dataclasses.replace(ts, proxy=paired[-1]))
    folder, _ = resolve_model(recipe.model.id, recipe.model.revision)
    model, tok = load_model(folder, recipe.model.dtype, "cpu", recipe.model.trust_remote_code)
    texts = {name: held_back(recipe, settings, tok) for name, settings in proxies.items()}
    scorer = Scorer(recipe, params, model, tok, None, next(iter(texts.values())))
    study = json.loads(args.tune_json.read_text())
    trials = {t["number"]: t for t in study["trials"]}
    numbers = sorted({int(n) for n in study["evaluated"]} | set(study["front"]))
    settings = quick_settings(recipe, ts)
    rows: dict[str, dict] = json.loads(args.json.read_text()) if args.json.exists() else {}

    def margins(m: object) -> dict[str, float]:
        return {name: likelihood_margin(m, tok, *pair, max_tokens=recipe.data.max_tokens,
                                        batch_size=recipe.collect.batch_size) for name, pair in texts.items()}

    for n in numbers:
        if str(n) in rows:
            continue
        t = trials[n]
        patch = scorer.patch(t["settings"])
        with patch.hooked(model) as hooked:
            row = {"settings": t["settings"], "ppl_increase": t["ppl_increase"], "margins": margins(hooked)}
        row["eval"] = study["evaluated"].get(str(n))
        if row["eval"] is None:
            with tempfile.TemporaryDirectory(dir=args.json.resolve().parent) as tmp:
                bake(patch, recipe.model.id, Path(tmp) / "model", untie=recipe.model.untie)
                row["eval"] = eval_point(evaluate(Path(tmp) / "model", settings=settings).to_json(), list(ts.evaluators))
        rows[str(n)] = row
        args.json.write_text(json.dumps(rows, indent=1) + "\n")

    def rho(name: str, subset: list[dict], key: str | None = None) -> str:
        ys = [r["eval"]["per_evaluator"][key] if key else r["eval"]["toxicity"] for r in subset]
        value = spearman([r["margins"][name] for r in subset], ys)
        return "-" if value is None else f"{value:.2f}"

    every = list(rows.values())
    within = [r for r in every if r["ppl_increase"] <= study["budget"]]
    table = [[name, rho(name, every), rho(name, within), *(rho(name, every, ev) for ev in ts.evaluators)] for name in texts]
    print(render(["proxy data", f"Spearman, {len(every)} trials", f"{len(within)} within budget", *ts.evaluators], table,
                 title=f"held-back margins vs the quick evaluation ({settings.n_prompts} prompts, seed {settings.seed})"))


if __name__ == "__main__":
    main()
