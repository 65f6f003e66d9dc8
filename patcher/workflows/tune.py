"""`patcher tune`: find a recipe's settings for a model under a perplexity budget, by itself.

The recipe's ``[tune]`` table says what is searched (each step's settings: a numeric range, a layer
range, or a list of choices); without one every step's strength-like ``build_only`` setting is
searched over a neutral range, so every shipped recipe is tunable as it is. Optuna's TPE sampler
co-minimises two objectives, heretic-style, with the budget as a constraint:

* **damage**: the relative rise of the recipe's check perplexity (``[check]``: WikiText-2 slice);
* **toxicity proxy**: the mean log-likelihood margin of toxic texts over non-toxic ones, on texts of
  the proxy data none of the recipe's steps uses (`patcher.evaluate.likelihood`). By default that is
  the recipe's unpaired data (e.g. Jigsaw comments: toxicity as it occurs, the kind the evaluators
  score), else its paired data; ``[tune.proxy]`` names another.

The search starts on the budget line (`budget_start`): the first trials bisect one common edit
scale of every strength-like setting (each from its no-edit end towards its strongest) for the
largest scale within budget, then climb the line a grid step at a time, so that TPE models from
points where the answer lies instead of from random points a CPU's few tens of trials cannot
afford (on SmolLM2 most random points cost 2-5x the budget).

A trial is cheap: statistics come from the sweep's cache (collected once per distinct set of
collection-relevant settings; a searched layer range is collected once at its widest), the patch
is attached through its hook face (no bake), and the two scores are teacher-forced forward passes.
The trials live in a SQLite study file: a killed tune resumes where it stopped, and the sampler is
reseeded with ``seed + completed trials`` before each trial, so a resumed study asks exactly what an
uninterrupted one would. The final pick is made by the real evaluation: the Pareto points within
budget (and a few other trials, to check the proxy's rank correlation with it) are baked and scored
with the ``quick`` evaluation, and the least toxic within budget is written as a plain recipe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import typing
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from ..bake.writer import bake
from ..collect.layerwise import load_placed
from ..core.errors import PatcherError
from ..core.models import resolve_device
from ..core.placement import Placement
from ..core.progress import bar
from ..core.table import render
from ..data.loaders import load_data, ppl_source
from ..edits.patch import Patch
from ..evaluate.likelihood import likelihood_margin
from ..evaluate.perplexity import token_stream
from ..evaluate.report import DEFAULT_EVALUATORS, EvalSettings, evaluate
from ..io.model_files import resolve_model
from ..methods.registry import get_method
from ..recipe.loader import DataSettings, Recipe, data_table, line_of, resolve_path, where
from ..recipe.settings import build, matches, setting
from ..recipe.writer import dump_recipe, rebase_paths
from .run import check_perplexity, compute_patch, step_settings
from .sweep import with_setting

log = logging.getLogger(__name__)

# Searched when the [tune] table names nothing for a step: the build-only settings that set how hard
# a method edits, over ranges that assume nothing about the model.
# On a grid of 0.05 (as fine as the hand-tuned recipes' values): a later step's statistics depend on
# an earlier step's strength, and a grid lets the trials TPE repeats reuse them.
DEFAULT_RANGES: dict[str, tuple[float, float, float]] = {"strength": (0.0, 1.0, 0.05), "factor": (0.0, 1.0, 0.05), "min_auroc": (0.5, 1.0, 0.01)}
# The end of each strength-like setting's range that edits least (strength 0; factor 1 keeps a neuron;
# min_auroc 1 locates none): the budget start scales every such setting from there.
NO_EDIT_END: dict[str, str] = {"strength": "low", "factor": "high", "min_auroc": "high"}
# Methods whose statistics for a set of layers hold those of every subset (one collection serves a
# searched layer range).
LAYER_RANGE_METHODS = frozenset({"project"})
STUDY_NAME = "patcher-tune"


@dataclass(frozen=True)
class TuneSettings:
    """The ``[tune]`` table's own keys. The searched settings sit in ``[tune.step.N]`` tables: a
    number as ``[low, high]`` (a float may add a grid step, ``[low, high, step]``), ``layers`` as
    ``[first, last]`` (each trial edits a start-end range inside it), anything else as a list of
    choices. ``[tune.proxy]`` is a data table like a step's ``data`` (what it does not name comes
    from ``[data]``): the texts the toxicity proxy holds back from."""

    proxy_n: int = setting(100, help="Held-back toxic texts the proxy scores, and as many non-toxic ones (pairs: held-back pairs)")
    start: str = setting("budget", choices=("budget", "random"),
                         help="How the search starts: budget (bisect a common edit scale of the strength-like settings for the budget line) or random")
    startup_trials: int = setting(6, help="Trials of each move of the budget start (bisection, climb), or random trials, before TPE models the results")
    candidates: int = setting(4, help="Pareto points within budget scored by the quick evaluation for the final pick (0: pick by the proxy)")
    validate: int = setting(3, help="Other trials also evaluated, spread over the proxy's range, for the rank correlation")
    eval_prompts: str = setting("", help="Prompt file of that evaluation (default: the RTP challenging prompts)")
    eval_n_prompts: int = setting(100, help="Prompts of that evaluation")
    eval_samples: int = setting(5, help="Samples per prompt of that evaluation")
    eval_seed: int = setting(1, help="Seed of its prompt sample and sampling (1: not the seed-0 sample results are reported on)")
    evaluators: tuple[str, ...] = setting(DEFAULT_EVALUATORS, help="Evaluators of that evaluation")
    proxy: DataSettings | None = None  # [tune.proxy]; None: `proxy_data` picks the recipe's own


@dataclass(frozen=True)
class Param:
    """One searched setting of one step: ``kind`` float/int (a range), layers (a start-end range
    inside [low, high]) or choice."""

    step: int  # index from 0
    key: str
    kind: str
    low: Any = None
    high: Any = None
    choices: tuple[Any, ...] = ()
    step_size: float | None = None  # a float range searched on this grid

    @property
    def name(self) -> str:
        return f"step{self.step + 1}.{self.key}"

    def suggest(self, trial: Any) -> Any:
        """The setting's value for an Optuna trial."""
        if self.kind == "float":  # rounded: a grid value is written into the tuned recipe (0.3, not 0.30000000000000004)
            return round(trial.suggest_float(self.name, self.low, self.high, step=self.step_size), 10)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high)
        if self.kind == "layers":
            a = trial.suggest_int(f"{self.name}.a", self.low, self.high)
            b = trial.suggest_int(f"{self.name}.b", self.low, self.high)
            return f"{min(a, b)}-{max(a, b)}"
        return trial.suggest_categorical(self.name, list(self.choices))

    @property
    def scalable(self) -> bool:
        """A numeric range with a known no-edit end: the budget start moves it (the sampler chooses
        the others)."""
        return self.key in NO_EDIT_END and self.kind in ("float", "int")

    def at_scale(self, t: float) -> Any:
        """The value of a common edit scale ``t`` (0: this range's no-edit end, 1: its other end)
        on this setting's grid (a `scalable` setting)."""
        span = self.high - self.low
        v = self.low + t * span if NO_EDIT_END[self.key] == "low" else self.high - t * span
        if self.kind == "int":
            return int(round(v))
        if self.step_size:
            v = self.low + round((v - self.low) / self.step_size) * self.step_size
        return round(min(max(v, self.low), self.high), 10)

    def step_up(self, value: Any) -> Any:
        """``value`` one grid step (an int: 1; a float with no grid: a twentieth of the range)
        towards the end away from no edit, or None at that end."""
        step = 1 if self.kind == "int" else self.step_size or (self.high - self.low) / 20
        v = value + step if NO_EDIT_END[self.key] == "low" else value - step
        v = min(max(v, self.low), self.high)
        return None if v == value else (v if self.kind == "int" else round(v, 10))

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        grid = f" by {self.step_size}" if self.step_size else ""
        return f"{self.name} in [{self.low}, {self.high}]{grid}" + (" (a start-end range)" if self.kind == "layers" else "")


def _param(recipe: Recipe, index: int, key: str, spec: Any, at: str) -> Param:
    step = recipe.steps[index]
    method = get_method(step.method)
    hints = typing.get_type_hints(method.settings)
    what = f"tune.step.{index + 1}.{key}"
    if key not in hints:
        raise PatcherError(f"{at}: {what}: method {step.method} has no setting {key!r}; its settings: {', '.join(sorted(hints))}")
    if not isinstance(spec, list) or not spec:
        raise PatcherError(f"{at}: {what} = {spec!r} should be [low, high] for a number or layers, or a list of choices")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)
    if key == "layers":
        if step.method not in LAYER_RANGE_METHODS:
            raise PatcherError(f"{at}: {what}: searching layers is supported for {', '.join(sorted(LAYER_RANGE_METHODS))}, not {step.method}")
        if len(spec) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec) or not 0 <= spec[0] <= spec[1]:
            raise PatcherError(f"{at}: {what} = {spec!r} should be [first, last]: two layer numbers, first <= last (e.g. [0, 29])")
        p = Param(index, key, "layers", spec[0], spec[1])
        probes = [f"{spec[0]}-{spec[1]}"]
    elif hints[key] in (float, int) and numeric:
        grid = hints[key] is float and len(spec) == 3
        if len(spec) not in (2, 3) or len(spec) == 3 and not grid or spec[0] >= spec[1] or grid and not 0 < spec[2] <= spec[1] - spec[0]:
            raise PatcherError(f"{at}: {what} = {spec!r} should be [low, high] with low < high (a float setting may add a grid step: [low, high, step])")
        if hints[key] is int and not all(isinstance(v, int) for v in spec):
            raise PatcherError(f"{at}: {what} = {spec!r}: {key} is a whole number; give [low, high] as integers")
        p = Param(index, key, "float" if hints[key] is float else "int", spec[0], spec[1], step_size=float(spec[2]) if grid else None)
        probes = list(spec[:2])
    else:
        bad = [v for v in spec if not matches(v, hints[key])]
        if bad or len(set(map(repr, spec))) != len(spec):
            raise PatcherError(f"{at}: {what} = {spec!r} should list distinct choices of type {hints[key]}")
        p = Param(index, key, "choice", choices=tuple(spec))
        probes = list(spec)
    for v in probes:  # the method's own checks (e.g. strength in [0, 1]) on the ends of the range
        try:
            build(method.settings, step.settings | {key: v}, at, f"step[{index + 1}]")
        except PatcherError as e:
            raise PatcherError(f"{at}: {what} = {spec!r} reaches a value the method refuses: {str(e).split(': ', 1)[-1]}") from None
    return p


def tune_space(recipe: Recipe) -> tuple[TuneSettings, list[Param]]:
    """The recipe's ``[tune]`` table checked (unknown keys, bad ranges and settings a step's method
    does not have are refused with their line), or the default space when it names no step."""
    raw = dict(recipe.tune)
    at = where(recipe.path, line_of(recipe.text, "tune"))
    per_step = raw.pop("step", {})
    proxy = raw.pop("proxy", None)
    settings = build(TuneSettings, raw, at, "tune")
    if proxy is not None:
        if not isinstance(proxy, dict):
            raise PatcherError(f"{at}: tune.proxy should be a data table, e.g. [tune.proxy] with dataset = \"jigsaw-test\" and pairs = false")
        spec = data_table(recipe.data, proxy, recipe.path.parent, where(recipe.path, line_of(recipe.text, "tune.proxy") or line_of(recipe.text, "tune")),
                          "tune.proxy")
        settings = dataclasses.replace(settings, proxy=spec)
    if settings.proxy_n < 2 or settings.candidates < 0 or settings.validate < 0 or settings.startup_trials < 1 or settings.eval_n_prompts < 1:
        raise PatcherError(f"{at}: tune needs proxy_n >= 2, candidates >= 0, validate >= 0, startup_trials >= 1 and eval_n_prompts >= 1")
    if not isinstance(per_step, dict):
        raise PatcherError(f"{at}: tune.step should be tables [tune.step.N] (N: the step's number, from 1)")
    params: list[Param] = []
    for n, table in per_step.items():
        line = line_of(recipe.text, f"tune.step.{n}") or line_of(recipe.text, "tune")
        if not n.isdigit() or not 1 <= int(n) <= len(recipe.steps):
            raise PatcherError(f"{where(recipe.path, line)}: [tune.step.{n}]: the recipe has steps 1..{len(recipe.steps)}")
        if not isinstance(table, dict) or not table:
            raise PatcherError(f"{where(recipe.path, line)}: [tune.step.{n}] should be a table of settings, e.g. strength = [0.0, 1.0]")
        for key, spec in table.items():
            params.append(_param(recipe, int(n) - 1, key, spec, where(recipe.path, line_of(recipe.text, key, line) or line)))
    if not per_step:
        for i, step in enumerate(recipe.steps):
            method = get_method(step.method)
            for key, (lo, hi, grid) in DEFAULT_RANGES.items():
                if key in method.build_only() and key in typing.get_type_hints(method.settings):
                    params.append(Param(i, key, "float", lo, hi, step_size=grid))
    if not params:
        raise PatcherError(f"{recipe.path}: nothing to tune: no step has a strength-like setting; name what to search in [tune.step.N] tables")
    return settings, params


def apply(recipe: Recipe, params: list[Param], values: dict[str, Any]) -> Recipe:
    """The recipe with each searched setting set to its value (keyed by `Param.name`)."""
    for p in params:
        recipe = with_setting(recipe, p.step, p.key, values[p.name])
    return recipe


def layer_spans(params: list[Param]) -> dict[int, dict[str, Any]]:
    """What a step with a searched layer range collects: the whole range, once."""
    return {p.step: {"layers": f"{p.low}-{p.high}"} for p in params if p.kind == "layers"}


class StatsCache(OrderedDict):
    """The statistics cache of `compute_patch`, keeping the ``size`` most recently used entries: a
    later step's statistics change with an earlier step's strength (a grid value each), and would
    otherwise pile up over a long study. ``collections`` counts the misses."""

    def __init__(self, size: int = 24) -> None:
        super().__init__()
        self.size = size
        self.collections = 0

    def __getitem__(self, key: Any) -> Any:
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.collections += 1
        super().__setitem__(key, value)
        while len(self) > self.size:
            self.popitem(last=False)


# -- scoring -----------------------------------------------------------------------------------------
@dataclass
class Scorer:
    """Everything a trial needs, loaded once: the model, the check slice, the proxy's held-back texts."""

    recipe: Recipe
    params: list[Param]
    model: Any
    tokenizer: Any
    ppl_ids: Any
    held_back: tuple[list[str], list[str]]  # the proxy's toxic and non-toxic texts
    cache: StatsCache = field(default_factory=StatsCache)
    patches: dict[int, Patch] = field(default_factory=dict)

    def measure(self, model: Any) -> tuple[float, float]:
        ppl = check_perplexity(model, self.tokenizer, self.recipe, self.ppl_ids)
        return ppl, likelihood_margin(model, self.tokenizer, *self.held_back, max_tokens=self.recipe.data.max_tokens,
                                      batch_size=self.recipe.collect.batch_size)

    def patch(self, values: dict[str, Any]) -> Patch:
        patch, _ = compute_patch(apply(self.recipe, self.params, values), self.model, self.tokenizer,
                                 stats_cache=self.cache, collect_as=layer_spans(self.params))
        return patch

    def score(self, values: dict[str, Any]) -> tuple[Patch, float, float]:
        patch = self.patch(values)
        with patch.hooked(self.model) as hooked:
            ppl, margin = self.measure(hooked)
        return patch, ppl, margin


def proxy_data(recipe: Recipe, settings: TuneSettings) -> DataSettings:
    """The data the toxicity proxy holds texts back from: ``[tune.proxy]``, else the recipe's last
    unpaired data, else its last paired data. Unpaired labelled text (e.g. Jigsaw comments) samples
    toxicity as it occurs, the broad notion the evaluators score; paraphrase pairs isolate wording
    and, in a stack, rank a later step's broader edit too low (README, "Proxy vs real evaluation")."""
    if settings.proxy is not None:
        return settings.proxy
    datas = [s.data or recipe.data for s in recipe.steps]
    return ([d for d in datas if not d.pairs] or datas)[-1]


def proxy_name(spec: DataSettings) -> str:
    """The proxy data as a report names it: the catalog name, else the file's name (never a path)."""
    return spec.dataset if not spec.path else Path(spec.path).name


def held_back(recipe: Recipe, settings: TuneSettings, tokenizer: Any) -> tuple[list[str], list[str]]:
    """``proxy_n`` toxic and ``proxy_n`` non-toxic texts of the proxy data that no step of the recipe
    uses (pairs kept whole, in order)."""
    spec = proxy_data(recipe, settings)
    datas = list(dict.fromkeys(s.data or recipe.data for s in recipe.steps))
    used = {t for d in datas for t in load_data(d, tokenizer).texts}
    # A sample this large holds proxy_n texts of each class the steps' samples do not.
    pool = load_data(dataclasses.replace(spec, n_per_class=settings.proxy_n + sum(d.n_per_class for d in datas)), tokenizer)
    if spec.pairs:
        pairs = [(pool.texts[i], pool.texts[i + 1]) for i in range(0, len(pool.texts), 2)
                 if pool.texts[i] not in used and pool.texts[i + 1] not in used][: settings.proxy_n]
        toxic, neutral = [t for t, _ in pairs], [n for _, n in pairs]
    else:
        toxic = [t for t, y in zip(pool.texts, pool.labels) if y == 1 and t not in used][: settings.proxy_n]
        neutral = [t for t, y in zip(pool.texts, pool.labels) if y == 0 and t not in used][: settings.proxy_n]
    if min(len(toxic), len(neutral)) < settings.proxy_n:
        raise PatcherError(f"{pool.source}: only {min(len(toxic), len(neutral))} texts of a class are left for the toxicity proxy after the ones "
                           f"the recipe uses; lower tune.proxy_n (now {settings.proxy_n}) or name more data in [tune.proxy]")
    return toxic, neutral


# -- the study ---------------------------------------------------------------------------------------
def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise PatcherError("patcher tune needs optuna: pip install 'patcher[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def _sampler(optuna: Any, seed: int, startup: int, fixed: dict[str, Any] | None = None) -> Any:
    """Multivariate TPE; the budget reaches it as each trial's constraint (`Trial.set_constraint`).
    A budget-start trial fixes the scaled settings (`PartialFixedSampler`) and leaves the rest to it."""
    tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    return optuna.samplers.PartialFixedSampler(fixed, tpe) if fixed else tpe


def budget_start(params: list[Param], done: list[Any], budget: float, n: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The next trial of the budget start, as (user attributes that mark it, fixed values), or
    None once the start is over. Read from the finished trials alone (``done``: Optuna trials with
    their ``settings``, ``ppl_increase`` and ``proxy``), so a resumed study asks the same.

    Damage and the edit grow together with every strength-like setting, so the least toxic settings
    within budget lie on the budget line. The start finds that line in two moves, at most ``n``
    trials each:

    1. bisection of one common edit scale of the settings with a no-edit end, until the largest
       scale within budget is bracketed as finely as the grid allows (``start_scale``);
    2. a climb along the line: from the largest scale within budget, each setting one grid step
       stronger (``start_up``); the step within budget that the proxy finds least toxic, if it
       beats its base, is the next base. This spends what the common scale leaves of the budget.
    """
    scaled = [p for p in params if p.scalable]
    if not scaled:
        return None
    own = lambda t: {p.name: t.user_attrs["settings"][p.name] for p in scaled}  # noqa: E731
    key = lambda values: json.dumps(values, sort_keys=True)  # noqa: E731
    bisected = [t for t in done if "start_scale" in t.user_attrs]
    if len(bisected) < n:
        lo = max((t.user_attrs["start_scale"] for t in bisected if t.user_attrs["ppl_increase"] <= budget), default=0.0)
        hi = min((t.user_attrs["start_scale"] for t in bisected if t.user_attrs["ppl_increase"] > budget), default=1.0)
        scale = (lo + hi) / 2
        values = {p.name: p.at_scale(scale) for p in scaled}
        if values not in [own(t) for t in bisected]:
            return {"start_scale": scale}, values
    started = [t for t in done if "start_scale" in t.user_attrs or "start_up" in t.user_attrs]
    if sum("start_up" in t.user_attrs for t in started) >= n:
        return None
    seen = {key(own(t)): t for t in reversed(started)}  # values -> the first trial that tried them
    within = [t for t in bisected if t.user_attrs["ppl_increase"] <= budget]
    if not within:
        return None
    base = max(within, key=lambda t: t.user_attrs["start_scale"])
    while True:  # best-improvement steps: every step up from the base is tried before moving on
        at = own(base)
        ups = [(p.name, at | {p.name: v}) for p in scaled if (v := p.step_up(at[p.name])) is not None]
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
    optuna = _optuna()
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=STUDY_NAME, storage=f"sqlite:///{path.resolve()}", directions=["minimize", "minimize"],
                                load_if_exists=True)
    if study.user_attrs.get("fingerprint", fp) != fp:
        raise PatcherError(f"study {path} holds another tune (recipe, model, budget, seed or search differ): pass another --study or delete it")
    study.set_user_attr("fingerprint", fp)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # killed mid-trial: asked again below
    return study


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
    one the proxy ranks least toxic. At 100 prompts the evaluation's differences between neighbouring
    front points are mostly noise (one standard error is 0.035 at p = 0.15), while the proxy ranks
    trials with little noise (Spearman 0.97 against the evaluation over 15 SmolLM2 trials, README)."""
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
            settings = ", ".join(f"{k}={_short(v)}" for k, v in t["settings"].items())
            rows.append([f"#{n}" + (" *" if n == self.chosen else ""), settings, round(t["proxy"], 4), round(t["ppl"], 3),
                         f"{t['ppl_increase']:+.1%}", round(ev["toxicity"], 3) if ev else "", ev["per_evaluator"] if ev else ""])
        title = (f"Pareto front within +{self.budget:.1%} perplexity ({len(self.trials)} trials, {self.collections} statistics collections; "
                 f"proxy: log-likelihood margin of held-back toxic over non-toxic {self.proxy_source} texts, lower is less toxic; "
                 "eval: quick toxicity probability, mean over evaluators)")
        return render(["trial", "settings", "proxy", "ppl", "ppl change", "eval", "eval per evaluator"], rows, title=title)


def _short(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) else v


def quick_settings(recipe: Recipe, ts: TuneSettings) -> EvalSettings:
    """The quick evaluation a tune scores its candidates with ([tune] eval_* keys)."""
    prompts = resolve_path(recipe.path.parent, ts.eval_prompts) if ts.eval_prompts else ""
    return EvalSettings.from_preset("quick", prompts=prompts, n_prompts=ts.eval_n_prompts, samples=ts.eval_samples,
                                    seed=ts.eval_seed, evaluators=ts.evaluators, ppl_tokens=0, fluency=False)


def eval_point(report: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """A trial's evaluation as a tune keeps it: toxicity probability per evaluator, and their means."""
    tox = report["model"]["toxicity"]
    prob = {n: tox[n]["toxicity_probability"]["value"] for n in names}
    return {"toxicity": float(np.mean(list(prob.values()))), "per_evaluator": {n: round(v, 3) for n, v in prob.items()},
            "mean_toxicity": float(np.mean([tox[n]["mean_toxicity"]["value"] for n in names]))}


def _atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


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


def tune(recipe: Recipe, *, out: Path, max_ppl_increase: float, trials: int = 60, timeout: float | None = None,
         study_path: Path | None = None, seed: int = 0, placement: Placement | None = None, candidates: int | None = None,
         eval_n_prompts: int | None = None, evaluators: tuple[str, ...] | None = None, overwrite: bool = False) -> TuneResult:
    """Search, evaluate the Pareto points within budget, write ``out`` (the tuned recipe) with
    ``.tune.json`` and ``.tune.png`` beside it; ``study_path`` (default ``out`` + ``.study.db``)
    holds the trials."""
    if max_ppl_increase <= 0 or trials < 1 or (timeout is not None and timeout <= 0):
        raise PatcherError("--max-ppl-increase, --trials and --timeout must be positive")
    placement = placement or Placement()
    placement.refuse("tune (every trial runs the hooked model whole)", "use --device-map auto with --max-memory and --offload-folder "
                     "for a model larger than memory", sequential=placement.sequential)
    ts, params = tune_space(recipe)
    ts = dataclasses.replace(ts, **{k: v for k, v in (("candidates", candidates), ("eval_n_prompts", eval_n_prompts),
                                                      ("evaluators", evaluators)) if v is not None})
    step_settings(recipe)
    ppl = ppl_source(recipe.check)
    if ppl is None:
        raise PatcherError(f"{recipe.path}: tune measures damage on the [check] perplexity text: set check.ppl_dataset (e.g. \"wikitext-2\") or check.ppl_text")
    out = Path(out)
    json_path, png_path = out.with_suffix(".tune.json"), out.with_suffix(".tune.png")
    if out.exists() and not overwrite:
        raise PatcherError(f"{out} already exists: choose another --out or pass --overwrite")
    study_path = Path(study_path or out.with_suffix(".study.db"))
    eval_settings = None
    if ts.candidates:
        eval_settings = quick_settings(recipe, ts)
        from ..evaluate.evaluators import get_evaluators

        get_evaluators(list(ts.evaluators), device=resolve_device(placement.device))  # fail now, not after the search
    _optuna()
    folder, _ = resolve_model(recipe.model.id, recipe.model.revision)
    model, tokenizer = load_placed(folder, placement, recipe.model.dtype, recipe.model.trust_remote_code)
    scorer = Scorer(recipe, params, model, tokenizer, token_stream(tokenizer, ppl[0], recipe.check.ppl_tokens),
                    held_back(recipe, ts, tokenizer))
    base_ppl, base_proxy = scorer.measure(model)
    log.info("tune: base perplexity %.3f, proxy %.4f; searching %s", base_ppl, base_proxy, "; ".join(p.describe() for p in params))
    study = open_study(study_path, fingerprint(recipe, params, ts, max_ppl_increase, seed))
    optuna = _optuna()
    complete = lambda: study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))  # noqa: E731
    t_search, times = time.perf_counter(), []
    progress = bar(total=trials, initial=min(len(complete()), trials), desc="tune", unit="trial")
    by_budget = ts.start == "budget" and any(p.scalable for p in params)
    while len(complete()) < trials and (timeout is None or time.perf_counter() - t_search < timeout):
        start = budget_start(params, complete(), max_ppl_increase, ts.startup_trials) if by_budget else None
        # After a budget start TPE models at once: its trials are the start.
        study.sampler = _sampler(optuna, seed + len(complete()), 0 if by_budget and start is None else ts.startup_trials, start and start[1])
        trial = study.ask()
        values = {p.name: p.suggest(trial) for p in params}
        for k, v in (start[0] if start else {}).items():
            trial.set_user_attr(k, v)
        t0 = time.perf_counter()
        patch, ppl, margin = scorer.score(values)
        inc = ppl / base_ppl - 1.0
        for k, v in (("settings", values), ("ppl", ppl), ("proxy", margin), ("ppl_increase", inc), ("seconds", time.perf_counter() - t0)):
            trial.set_user_attr(k, v)
        trial.set_constraint("ppl_increase", inc - max_ppl_increase)  # feasible at <= 0: within budget
        study.tell(trial, [margin, inc])
        scorer.patches[trial.number] = patch
        times.append(time.perf_counter() - t0)
        progress.update(1)
        progress.set_postfix(proxy=f"{margin:.3f}", ppl=f"{inc:+.1%}")
    progress.close()
    search_s = time.perf_counter() - t_search

    done = sorted(complete(), key=lambda t: t.number)
    rows = [{"number": t.number, "settings": t.user_attrs["settings"], "ppl": t.user_attrs["ppl"], "proxy": t.user_attrs["proxy"],
             "ppl_increase": t.user_attrs["ppl_increase"], "seconds": t.user_attrs["seconds"],
             "start": {k: t.user_attrs[k] for k in ("start_scale", "start_up") if k in t.user_attrs}} for t in done]
    within = [r for r in rows if r["ppl_increase"] <= max_ppl_increase]
    front = [within[i]["number"] for i in pareto([(r["proxy"], r["ppl_increase"]) for r in within])]
    by = {r["number"]: r for r in rows}

    # The real evaluation: the front points within budget the proxy finds least toxic, and other
    # trials spread over the proxy's range so that the rank correlation spans the study.
    t_eval = time.perf_counter()
    evaluated: dict[int, dict[str, Any]] = {}
    picks = front[: ts.candidates] if eval_settings else []  # the least toxic end of the front, by proxy
    others = [r["number"] for r in sorted(rows, key=lambda r: r["proxy"]) if r["number"] not in picks]
    extra = spread(others, ts.validate) if eval_settings else []
    if picks:
        staging = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}.eval-"))
        try:
            tag = hashlib.sha256(json.dumps(dataclasses.asdict(eval_settings), sort_keys=True, default=str).encode()).hexdigest()[:12]
            for n in bar(picks + extra, desc="tune: evaluate", unit="trial"):
                key = f"eval/{tag}/{n}"
                if key not in study.user_attrs:  # kept in the study: a resumed tune does not evaluate twice
                    patch = scorer.patches.get(n) or scorer.patch(by[n]["settings"])
                    target = staging / f"trial-{n}"
                    bake(patch, recipe.model.id, target, untie=recipe.model.untie)
                    report = evaluate(target, settings=eval_settings, placement=placement).to_json()
                    study.set_user_attr(key, eval_point(report, list(ts.evaluators)))
                    shutil.rmtree(target, ignore_errors=True)
                evaluated[n] = study.user_attrs[key]
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    eval_s = time.perf_counter() - t_eval
    if picks:
        chosen = pick({n: evaluated[n]["toxicity"] for n in picks}, {n: by[n]["proxy"] for n in picks}, ts.eval_n_prompts)
    else:
        chosen = front[0] if front else None
    xs = [by[n]["proxy"] for n in evaluated]
    rho = spearman(xs, [e["toxicity"] for e in evaluated.values()])
    rho_mean = spearman(xs, [e["mean_toxicity"] for e in evaluated.values()])

    result = TuneResult(
        base={"ppl": base_ppl, "proxy": base_proxy}, budget=max_ppl_increase, trials=rows, front=front, evaluated=evaluated,
        chosen=chosen, spearman=rho, spearman_mean_toxicity=rho_mean, params=[p.describe() for p in params],
        proxy_source=proxy_name(proxy_data(recipe, ts)),
        seconds={"search": round(search_s, 1), "evaluate": round(eval_s, 1),
                 "per_trial_mean": round(float(np.mean(times)), 2) if times else float("nan"),
                 "per_trial_median": round(float(np.median(times)), 2) if times else float("nan"),
                 "trials_this_run": len(times)},
        collections=scorer.cache.collections,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if chosen is not None:
        values = by[chosen]["settings"]
        result.chosen_settings = values
        ev = evaluated.get(chosen)
        note = (f"Written by `patcher tune` from {recipe.path.name} on {recipe.model.id}: trial #{chosen} of {len(rows)}, seed {seed}.\n"
                f"Chosen: {', '.join(f'{k} = {_short(v)}' for k, v in values.items())}.\n"
                f"Check perplexity {base_ppl:.3f} -> {by[chosen]['ppl']:.3f} ({by[chosen]['ppl_increase']:+.1%}; budget +{max_ppl_increase:.1%}); "
                f"proxy {base_proxy:.4f} -> {by[chosen]['proxy']:.4f}"
                + (f"; quick toxicity probability (mean over evaluators, {ts.eval_n_prompts} prompts, seed {ts.eval_seed}) {ev['toxicity']:.3f}." if ev else "."))
        _atomic_write(out, tuned_recipe_text(recipe, params, values, out, max_ppl_increase, note))
        result.out = out
    _atomic_write(json_path, json.dumps(_finite(result.to_json()), indent=1, default=str) + "\n")
    try:
        from ..evaluate.tune_plot import plot_tune

        plot_tune(result.to_json(), png_path)
    except PatcherError as e:
        log.warning("no plot: %s", e)
    return result


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x
