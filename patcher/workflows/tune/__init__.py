"""`patcher tune`: find a recipe's settings for a model under a perplexity budget, by itself.

The recipe's ``[tune]`` table says what is searched (each step's settings: a numeric range, a layer
range, or a list of choices); without one every step's strength-like settings are searched over the
ranges their fields declare (`space`), so every shipped recipe, and a new method's, is tunable as it is. Optuna's TPE sampler
co-minimises two objectives, heretic-style, with the budget as a constraint:

* **damage**: the relative rise of the recipe's check perplexity (``[check]``: WikiText-2 slice);
* **toxicity proxy**: the mean log-likelihood margin of toxic texts over non-toxic ones, on texts of
  the proxy data none of the recipe's steps uses (`patcher.evaluate.likelihood`). By default that is
  the recipe's unpaired data (e.g. Jigsaw comments: toxicity as it occurs, the kind the evaluators
  score), else its paired data; ``[tune.proxy]`` names another.

The search starts on the budget line (`budget_start`): the first trials bisect one common edit
level of every strength-like setting (each from its no-edit end towards its strongest) for the
largest level within budget, then climb the line a grid step at a time, so that TPE models from
points where the answer lies instead of from random points a CPU's few tens of trials cannot
afford (most random points cost several times the budget).

A trial is cheap: statistics come from the sweep's cache (collected once per distinct set of
collection-relevant settings; a searched layer range is collected once at its widest), the patch
is attached through its hook face (no bake), and the two scores are teacher-forced forward passes.
The trials live in a SQLite study file: a killed tune resumes where it stopped, and the sampler is
reseeded with ``seed + completed trials`` before each trial, so a resumed study asks exactly what an
uninterrupted one would. The final pick is made by the real evaluation: the Pareto points within
budget (and a few other trials, to check the proxy's rank correlation with it) are baked and scored
with the ``quick`` evaluation, and the least toxic within budget is written as a plain recipe.

`tune` below is the outline; each stage is its own module: `space` (what is searched), `proxy` (how a
trial is scored), `search` (the study and its budget start), `pick` (front, evaluation, choice),
`result` (the report and the tuned recipe).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...collect.layerwise import load_placed
from ...core.errors import PatcherError
from ...core.models import resolve_device
from ...core.placement import Placement
from ...evaluate.perplexity import token_stream
from ...io.model_files import resolve_model
from ...recipe.loader import Recipe
from ..capability_gate import CapabilityGate
from ..run_plan import Plan, resolve
from .pick import choose, eval_point, evaluate_trials, front_within, pareto, pick, quick_settings, spearman, to_evaluate
from .proxy import Scorer, StatsCache, held_back, proxy_data, proxy_name
from .result import TuneResult, write_outputs
from .search import TuneOptions, budget_start, fingerprint, open_study, optuna_module, run_search, trial_rows
from .space import Param, TuneSettings, tune_space, with_choice_data

__all__ = ["Param", "Scorer", "StatsCache", "TuneOptions", "TuneResult", "TuneSettings", "budget_start", "eval_point", "held_back", "pareto", "pick",
           "proxy_data", "proxy_name", "quick_settings", "spearman", "tune", "tune_space"]

log = logging.getLogger(__name__)


def tune(plan: Plan | Recipe, *, out: Path, placement: Placement | None = None, overwrite: bool = False, **options: Any) -> TuneResult:
    """Search, evaluate the Pareto points within budget, write ``out`` (the tuned recipe) with
    ``.tune.json`` and ``.tune.png`` beside it. ``options`` are `TuneOptions` (``max_ppl_increase``,
    ``trials``, ``timeout``, ``study_path``: default ``out`` + ``.study.db``, ``seed``, ...). A
    Recipe is resolved first (`resolve`): every trial shares the plan's data and check text."""
    opts, out = TuneOptions(**options), Path(out)
    placement = placement or Placement()
    placement.refuse("tune (every trial runs the hooked model whole)", "use --device-map auto with --max-memory and --offload-folder "
                     "for a model larger than memory", sequential=placement.sequential)
    plan = plan if isinstance(plan, Plan) else resolve(plan, placement=placement)
    recipe = plan.recipe
    ts, params = tune_space(recipe)
    ts = opts.settings(ts)
    plan = with_choice_data(plan, params)  # every searched data set's file, before the model loads
    eval_settings = _check_before_work(plan, ts, out, overwrite, placement.device)
    scorer = _load_scorer(plan, params, ts, placement)
    base_ppl, base_proxy = scorer.measure(scorer.model)
    log.info("tune: base perplexity %.3f, proxy %.4f; searching %s", base_ppl, base_proxy, "; ".join(p.describe() for p in params))
    gate = CapabilityGate(recipe.check, scorer.tokenizer)  # [check] max_blimp_drop / max_kl: damage beside perplexity
    if gate.active:
        gate.measure_base(scorer.model)

    study = open_study(Path(opts.study_path or out.with_suffix(".study.db")), fingerprint(recipe, params, ts, opts.max_ppl_increase, opts.seed))
    t0 = time.perf_counter()
    times = run_search(study, scorer, ts, opts, base_ppl, gate)
    search_s, t1 = time.perf_counter() - t0, time.perf_counter()

    rows = trial_rows(study)
    front = front_within(rows, opts.max_ppl_increase)
    choices = {p.name: p.choices for p in params if p.kind == "choice"}
    picks, extra = to_evaluate(front, rows, ts, opts.max_ppl_increase, choices) if eval_settings else ([], [])
    evaluated = evaluate_trials(picks + extra, study, scorer, eval_settings, list(ts.evaluators), out, placement) if picks else {}
    chosen = choose(front, picks, evaluated, rows, ts.eval_n_prompts)

    proxy = {r["number"]: r["proxy"] for r in rows}
    xs = [proxy[n] for n in evaluated]
    result = TuneResult(
        base={"ppl": base_ppl, "proxy": base_proxy}, budget=opts.max_ppl_increase, trials=rows, front=front, evaluated=evaluated, chosen=chosen,
        spearman=spearman(xs, [e["toxicity"] for e in evaluated.values()]), spearman_mean_toxicity=spearman(xs, [e["mean_toxicity"] for e in evaluated.values()]),
        params=[p.describe() for p in params], proxy_source=proxy_name(proxy_data(recipe, ts)),
        seconds=_seconds(search_s, time.perf_counter() - t1, times), collections=scorer.cache.collections,
        provenance=_provenance(recipe, opts, ts, placement),
    )
    write_outputs(result, recipe, params, out, opts.seed, ts)
    return result


def _provenance(recipe: Recipe, opts: TuneOptions, ts: TuneSettings, placement: Placement) -> dict[str, Any]:
    """How the tune was asked for, beside its results: the same recipe, model, seed and search give the
    same trials (`open_study` reseeds), so this is what a reader needs to redo it."""
    import torch

    from ...evaluate.report import SELECT_PROMPTS
    from ...io.record import library_versions

    return {"recipe": recipe.path.name, "model": recipe.model.id, "seed": opts.seed, "trials": opts.trials, "timeout_s": opts.timeout,
            "max_ppl_increase": opts.max_ppl_increase, "eval_prompts": ts.eval_prompts or SELECT_PROMPTS,
            "eval_n_prompts": ts.eval_n_prompts, "eval_seed": ts.eval_seed, "evaluators": list(ts.evaluators),
            "device": placement.device, "threads": torch.get_num_threads(), "versions": library_versions()}


def _check_before_work(plan: Plan, ts: TuneSettings, out: Path, overwrite: bool, device: str) -> Any:
    """What can fail before the model loads beyond the plan's own checks: the check text, the
    output, the evaluators and optuna. Returns the quick evaluation's settings (None: pick by proxy)."""
    recipe = plan.recipe
    if plan.ppl is None:
        raise PatcherError(f"{recipe.path}: tune measures damage on the [check] perplexity text: set check.ppl_dataset (e.g. \"wikitext-2\") or check.ppl_text")
    if out.exists() and not overwrite:
        raise PatcherError(f"{out} already exists: choose another --out or pass --overwrite")
    eval_settings = None
    if ts.candidates:
        eval_settings = quick_settings(recipe, ts)
        from ...evaluate.evaluators import get_evaluators

        get_evaluators(list(ts.evaluators), device=resolve_device(device))  # fail now, not after the search
    optuna_module()
    return eval_settings


def _load_scorer(plan: Plan, params: list[Param], ts: TuneSettings, placement: Placement) -> Scorer:
    recipe = plan.recipe
    folder, _ = resolve_model(recipe.model.id, recipe.model.revision)
    model, tokenizer = load_placed(folder, placement, recipe.model.dtype, recipe.model.trust_remote_code)
    ids = token_stream(tokenizer, plan.ppl.path, recipe.check.ppl_tokens)  # type: ignore[union-attr]
    return Scorer(plan, params, model, tokenizer, ids, held_back(plan, ts, tokenizer))


def _seconds(search: float, evaluate: float, times: list[float | None]) -> dict[str, float]:
    """Search and evaluation seconds; per trial over the trials computed (a repeat, None, costs nothing)."""
    computed = [t for t in times if t is not None]
    return {"search": round(search, 1), "evaluate": round(evaluate, 1),
            "per_trial_mean": round(float(np.mean(computed)), 2) if computed else float("nan"),
            "per_trial_median": round(float(np.median(computed)), 2) if computed else float("nan"),
            "trials_this_run": len(times), "repeats_this_run": len(times) - len(computed)}
