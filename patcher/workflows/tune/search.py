"""The search: an Optuna study (a SQLite file a killed tune resumes) whose first trials walk the
budget line (`budget_start`), then multivariate TPE with the budget as each trial's constraint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.errors import PatcherError
from ...core.progress import bar
from ...evaluate.report import EvalSettings
from ...recipe.loader import Recipe
from ...recipe.settings import help_of, setting
from .space import Param, TuneSettings

STUDY_NAME = "patcher-tune"


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError:
        raise PatcherError("patcher tune needs optuna: pip install 'patcher[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _sampler(optuna: Any, seed: int, startup: int, fixed: dict[str, Any] | None = None) -> Any:
    """Multivariate TPE; the budget reaches it as each trial's constraint (`Trial.set_constraint`).
    A budget-start trial fixes the strength-like settings (`PartialFixedSampler`) and leaves the rest to it."""
    tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    return optuna.samplers.PartialFixedSampler(fixed, tpe) if fixed else tpe


def budget_start(params: list[Param], done: list[Any], budget: float, n: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The next trial of the budget start, as (user attributes that mark it, fixed values), or
    None once the start is over. Read from the finished trials alone (``done``: Optuna trials with
    their ``settings``, ``ppl_increase`` and ``proxy``), so a resumed study asks the same.

    Damage and the edit grow together with every strength-like setting, so the least toxic settings
    within budget lie on the budget line. The start finds that line in two moves, at most ``n``
    trials each:

    1. bisection of one common edit level of the settings with a no-edit end, until the largest
       level within budget is bracketed as finely as the grid allows (``start_level``);
    2. a climb along the line: from the largest level within budget, each setting one grid step
       stronger (``start_up``); the step within budget that the proxy finds least toxic, if it
       beats its base, is the next base. This spends what the common level leaves of the budget.
    """
    moved = [p for p in params if p.strength_like]
    if not moved:
        return None
    own = lambda t: {p.name: t.user_attrs["settings"][p.name] for p in moved}  # noqa: E731
    key = lambda values: json.dumps(values, sort_keys=True)  # noqa: E731
    bisected = [t for t in done if "start_level" in t.user_attrs]
    if len(bisected) < n:
        lo = max((t.user_attrs["start_level"] for t in bisected if t.user_attrs["ppl_increase"] <= budget), default=0.0)
        hi = min((t.user_attrs["start_level"] for t in bisected if t.user_attrs["ppl_increase"] > budget), default=1.0)
        level = (lo + hi) / 2
        values = {p.name: p.at_level(level) for p in moved}
        if values not in [own(t) for t in bisected]:
            return {"start_level": level}, values
    started = [t for t in done if "start_level" in t.user_attrs or "start_up" in t.user_attrs]
    if sum("start_up" in t.user_attrs for t in started) >= n:
        return None
    seen = {key(own(t)): t for t in reversed(started)}  # values -> the first trial that tried them
    within = [t for t in bisected if t.user_attrs["ppl_increase"] <= budget]
    if not within:
        return None
    base = max(within, key=lambda t: t.user_attrs["start_level"])
    while True:  # best-improvement steps: every step up from the base is tried before moving on
        at = own(base)
        ups = [(p.name, at | {p.name: v}) for p in moved if (v := p.step_up(at[p.name])) is not None]
        for name, up in ups:
            if key(up) not in seen:
                return {"start_up": name}, up
        better = [seen[key(up)] for _, up in ups]
        better = [t for t in better if t.user_attrs["ppl_increase"] <= budget and t.user_attrs["proxy"] < base.user_attrs["proxy"]]
        if not better:
            return None
        base = min(better, key=lambda t: t.user_attrs["proxy"])


SEARCH_KEYS = ("proxy", "proxy_n", "start", "startup_trials")  # the TuneSettings that change what the trials ask and score


def fingerprint(recipe: Recipe, params: list[Param], settings: TuneSettings, budget: float, seed: int) -> str:
    """What makes two searches the same: a study file refuses to continue another one. The
    evaluation settings are left out (their results are kept per settings), so a finished study
    can be evaluated again with more prompts or other evaluators."""
    search = {k: getattr(settings, k) for k in SEARCH_KEYS}
    blob = json.dumps([recipe.text, recipe.model.id, [dataclasses.asdict(p) for p in params], search, budget, seed], default=str, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def open_study(path: Path, fp: str) -> Any:
    optuna = optuna_module()
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{path.resolve()}", directions=["minimize", "minimize"],
                                load_if_exists=True)
    if study.user_attrs.get("fingerprint", fp) != fp:
        raise PatcherError(f"study {path} holds another tune (recipe, model, budget, seed or search differ): pass another --study or delete it")
    study.set_user_attr("fingerprint", fp)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # killed mid-trial: asked again below
    return study



@dataclass(frozen=True)
class TuneOptions:
    """The command line's side of a tune (``patcher tune``'s flags are generated from these fields);
    the [tune] table's keys are `TuneSettings`, which ``candidates``, ``eval_n_prompts`` and
    ``evaluators`` override."""

    max_ppl_increase: float = setting(help="Budget: the largest relative rise of the recipe's check perplexity (0.05 = +5%)")
    trials: int = setting(60, minimum=1, help="Trials in the study (a resumed study counts the ones it holds)")
    timeout: float | None = setting(None, help="Stop starting trials after this many seconds of search (the evaluation of the pick follows)")
    study_path: Path | None = setting(None, help="SQLite study file; an existing one is resumed (default: OUT with .study.db)")
    seed: int = setting(0, help="Seed of the sampler: the same seed asks the same trials")
    candidates: int | None = setting(None, minimum=0, help="Pareto points within budget given the quick evaluation (0: pick by proxy); "
                                                           "default [tune] candidates")
    eval_n_prompts: int | None = setting(None, minimum=1, help="Prompts of that evaluation. Default: [tune] eval_n_prompts, 100")
    evaluators: tuple[str, ...] | None = setting(None, help=help_of(EvalSettings, "evaluators"))

    def __post_init__(self) -> None:
        if self.max_ppl_increase <= 0 or self.trials < 1 or (self.timeout is not None and self.timeout <= 0):
            raise PatcherError("--max-ppl-increase, --trials and --timeout must be positive")

    def settings(self, ts: TuneSettings) -> TuneSettings:
        """The [tune] table's settings with the command line's values in place of theirs."""
        given = {k: getattr(self, k) for k in ("candidates", "eval_n_prompts", "evaluators") if getattr(self, k) is not None}
        return dataclasses.replace(ts, **given)


def complete_trials(study: Any) -> list[Any]:
    optuna = optuna_module()
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def run_search(study: Any, scorer: Any, ts: TuneSettings, opts: TuneOptions, base_ppl: float, gate: Any = None) -> list[float | None]:
    """Ask, score and tell trials until the study holds ``opts.trials`` complete ones (or the
    timeout passes); each trial's patch is kept on ``scorer.patches``. A trial that asks settings
    an earlier one scored (TPE repeats itself on a small grid) takes that trial's results instead of
    computing them again (``repeat_of``). Returns the seconds of each trial run now (None: a repeat)."""
    optuna, params = optuna_module(), scorer.params
    t_search = time.perf_counter()
    times: list[float | None] = []
    progress = bar(total=opts.trials, initial=min(len(complete_trials(study)), opts.trials), desc="tune", unit="trial")
    by_budget = ts.start == "budget" and any(p.strength_like for p in params)
    while len(complete_trials(study)) < opts.trials and (opts.timeout is None or time.perf_counter() - t_search < opts.timeout):
        done = complete_trials(study)
        start = budget_start(params, done, opts.max_ppl_increase, ts.startup_trials) if by_budget else None
        # After a budget start TPE models at once: its trials are the start.
        study.sampler = _sampler(optuna, opts.seed + len(done), 0 if by_budget and start is None else ts.startup_trials, start and start[1])
        trial = study.ask()
        values = {p.name: p.suggest(trial) for p in params}
        for k, v in (start[0] if start else {}).items():
            trial.set_user_attr(k, v)
        t0 = time.perf_counter()
        stored = json.loads(json.dumps(values))  # as the study keeps it
        earlier = next((t for t in done if t.user_attrs["settings"] == stored), None)
        if earlier is not None:  # the same settings give the same patch, perplexity and proxy: not computed again
            ppl, margin, inc = (earlier.user_attrs[k] for k in ("ppl", "proxy", "ppl_increase"))
            trial.set_user_attr("repeat_of", earlier.number)
            if "capability" in earlier.user_attrs:
                trial.set_user_attr("capability", earlier.user_attrs["capability"])
            patch = scorer.patches.get(earlier.number)
        else:
            patch, ppl, margin = scorer.score(values)
            inc = ppl / base_ppl - 1.0
            if gate is not None and gate.active:  # a trial over [check] max_blimp_drop / max_kl is outside the budget by the same share
                with patch.hooked(scorer.model) as hooked:
                    trial.set_user_attr("capability", gate.measure(hooked))
                if gate.excess(trial.user_attrs["capability"]) > 0:
                    inc = max(inc, opts.max_ppl_increase * (1 + gate.excess(trial.user_attrs["capability"])))
        for k, v in (("settings", values), ("ppl", ppl), ("proxy", margin), ("ppl_increase", inc), ("seconds", time.perf_counter() - t0)):
            trial.set_user_attr(k, v)
        trial.set_constraint("ppl_increase", inc - opts.max_ppl_increase)  # feasible at <= 0: within budget
        study.tell(trial, [margin, inc])
        if patch is not None:
            scorer.patches[trial.number] = patch
        times.append(time.perf_counter() - t0 if earlier is None else None)
        progress.update(1)
        progress.set_postfix(proxy=f"{margin:.3f}", ppl=f"{inc:+.1%}")
    progress.close()
    return times


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """The study's complete trials, in order, as a tune reports them."""
    return [{"number": t.number, "settings": t.user_attrs["settings"], "ppl": t.user_attrs["ppl"], "proxy": t.user_attrs["proxy"],
             "ppl_increase": t.user_attrs["ppl_increase"], "seconds": t.user_attrs["seconds"],
             "start": {k: t.user_attrs[k] for k in ("start_level", "start_up") if k in t.user_attrs},
             "repeat_of": t.user_attrs.get("repeat_of")}
            for t in sorted(complete_trials(study), key=lambda t: t.number)]
