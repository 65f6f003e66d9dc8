"""The search space of `patcher tune`: the ``[tune]`` table's own keys and what it searches.

A searched setting is a `Param`: a numeric range (on a grid for floats), a layer range (for methods
registered with ``layer_range``), or a list of choices. Without ``[tune.step.N]`` tables the space
is every step's strength-like settings over the ranges their fields declare (``no_edit`` and
``tune`` on `patcher.recipe.settings.setting`), so a method is tunable by its fields alone; no method
is named here.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.errors import PatcherError
from ...data.catalog import entry
from ...evaluate.report import DEFAULT_EVALUATORS
from ...methods import METHODS, get_method
from ...recipe.loader import DataSettings, Recipe, data_table, line_of, where
from ...recipe.settings import build, matches, setting, tune_fields
from ..run_plan import Plan


@dataclass(frozen=True)
class TuneSettings:
    """The ``[tune]`` table's own keys. The searched settings sit in ``[tune.step.N]`` tables: a
    number as ``[low, high]`` (a float may add a grid step, ``[low, high, step]``), ``layers`` as
    ``[first, last]`` (each trial edits a start-end range inside it; methods with ``layer_range``) or
    as named layer sets (``["all", "0%-50%"]``: choices, each collected), ``data`` as a list of data
    tables (the data sets the step may read, each like a step's ``data``), anything else as a list of
    choices. ``[tune.proxy]`` is a data table like a step's ``data`` (what it does not name comes
    from ``[data]``): the texts the toxicity proxy holds back from."""

    proxy_n: int = setting(100, help="Held-back toxic texts the proxy scores, and as many non-toxic ones (pairs: held-back pairs)", minimum=2)
    start: str = setting("budget", choices=("budget", "random"),
                         help="How the search starts: budget (bisect a common edit level of the strength-like settings for the budget line) or random")
    startup_trials: int = setting(6, help="Trials of each move of the budget start (bisection, climb), or random trials, before TPE models the results",
                                 minimum=1)
    candidates: int = setting(4, help="Pareto points within budget scored by the quick evaluation for the final pick (0: pick by the proxy)",
                             minimum=0)
    validate: int = setting(3, help="Other trials also evaluated, spread over the proxy's range, for the rank correlation", minimum=0)
    eval_prompts: str = setting("", help="Prompt file or catalog name of that evaluation (default: rtp-challenging:select, the part no reported number uses)")
    eval_n_prompts: int = setting(100, help="Prompts of that evaluation", minimum=1)
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
    no_edit: str | None = None  # a strength-like setting: the end of the range ("low"/"high") that edits least (its field's no_edit)

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
        if all(c is None or isinstance(c, (str, int, float, bool)) for c in self.choices):
            return trial.suggest_categorical(self.name, list(self.choices))
        # a list-valued choice (e.g. modules): Optuna stores plain values only, so it picks among their JSON texts
        texts = [json.dumps(c) for c in self.choices]
        return self.choices[texts.index(trial.suggest_categorical(self.name, texts))]

    @property
    def strength_like(self) -> bool:
        """A numeric range with a known no-edit end: the budget start moves it (the sampler chooses
        the others)."""
        return self.no_edit is not None and self.kind in ("float", "int")

    def at_level(self, t: float) -> Any:
        """The value of a common edit level ``t`` (0: this range's no-edit end, 1: its other end)
        on this setting's grid (a `strength_like` setting)."""
        span = self.high - self.low
        v = self.low + t * span if self.no_edit == "low" else self.high - t * span
        if self.kind == "int":
            return int(round(v))
        if self.step_size:
            v = self.low + round((v - self.low) / self.step_size) * self.step_size
        return round(min(max(v, self.low), self.high), 10)

    def step_up(self, value: Any) -> Any:
        """``value`` one grid step (an int: 1; a float with no grid: a twentieth of the range)
        towards the end away from no edit, or None at that end."""
        step = 1 if self.kind == "int" else self.step_size or (self.high - self.low) / 20
        v = value + step if self.no_edit == "low" else value - step
        v = min(max(v, self.low), self.high)
        return None if v == value else (v if self.kind == "int" else round(v, 10))

    def describe(self) -> str:
        if self.key == "data":  # data tables by what they read
            return f"{self.name} in {{{', '.join(data_label(c) for c in self.choices)}}}"
        if self.kind == "choice":
            return f"{self.name} in {{{', '.join(map(str, self.choices))}}}"
        grid = f" by {self.step_size}" if self.step_size else ""
        return f"{self.name} in [{self.low}, {self.high}]{grid}" + (" (a start-end range)" if self.kind == "layers" else "")


def no_edit_end(field: dataclasses.Field | None, low: float, high: float) -> str | None:
    """Which end of ``[low, high]`` is nearer the field's declared no-edit value (None: not strength-like)."""
    if field is None:
        return None
    v = field.metadata["no_edit"]
    return "low" if abs(v - low) <= abs(v - high) else "high"


def data_label(table: dict[str, Any]) -> str:
    """A data choice as a report names it: its catalog name or file name, then what else it sets."""
    rest = ", ".join(f"{k}={v}" for k, v in table.items() if k not in ("dataset", "path"))
    name = table.get("dataset") or (table.get("path") and Path(str(table["path"])).name) or "[data]"
    return f"{name} ({rest})" if rest else name


def choice_data(recipe: Recipe, index: int, table: dict[str, Any]) -> DataSettings:
    """A data choice of step ``index`` (a table like a step's ``data``: what it does not name comes
    from ``[data]``) as the step's data settings."""
    return data_table(recipe.data, table, recipe.path.parent, where(recipe.path, line_of(recipe.text, f"tune.step.{index + 1}")),
                      f"tune.step.{index + 1}.data")


def _data_param(recipe: Recipe, index: int, spec: Any, at: str) -> Param:
    """``data = [{...}, {...}]``: the data sets a step may read, each a data table like a step's ``data``."""
    what = f"tune.step.{index + 1}.data"
    if not isinstance(spec, list) or len(spec) < 2 or not all(isinstance(t, dict) for t in spec):
        raise PatcherError(f"{at}: {what} should list two or more data tables, e.g. "
                           '[{ dataset = "jigsaw-test", pairs = false }, { dataset = "paradetox", pairs = false }]')
    built = [data_table(recipe.data, t, recipe.path.parent, at, what) for t in spec]
    if len(set(built)) != len(built):
        raise PatcherError(f"{at}: {what} lists the same data twice; each choice should read different data or settings")
    for d in built:
        if d.dataset and not d.path:
            try:
                entry(d.dataset)
            except PatcherError as e:
                raise PatcherError(f"{at}: {what}: {e}") from None
    return Param(index, "data", "choice", choices=tuple(spec))


def with_choice_data(plan: Plan, params: list[Param]) -> Plan:
    """``plan`` holding the file of every searched data choice too: resolved once before the model
    loads, and held back by the proxy like the data the recipe reads."""
    return plan.with_sources([choice_data(plan.recipe, p.step, t) for p in params if p.key == "data" for t in p.choices])


def _param(recipe: Recipe, index: int, key: str, spec: Any, at: str) -> Param:
    if key == "data":
        return _data_param(recipe, index, spec, at)
    step = recipe.steps[index]
    method = get_method(step.method)
    hints = typing.get_type_hints(method.settings)
    what = f"tune.step.{index + 1}.{key}"
    if key not in hints:
        raise PatcherError(f"{at}: {what}: method {step.method} has no setting {key!r}; its settings: {', '.join(sorted(hints))}")
    if not isinstance(spec, list) or not spec:
        raise PatcherError(f"{at}: {what} = {spec!r} should be [low, high] for a number or layers, or a list of choices")
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)
    if key == "layers" and not all(isinstance(v, str) for v in spec):  # named layer sets ("all", "0%-50%") are choices, below
        if not method.layer_range:
            able = [n for n in METHODS.names() if METHODS.get(n).layer_range]
            raise PatcherError(f"{at}: {what}: searching layers is supported for methods registered with layer_range ({', '.join(able)}), not {step.method}")
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
        p = Param(index, key, "float" if hints[key] is float else "int", spec[0], spec[1], step_size=float(spec[2]) if grid else None,
                  no_edit=no_edit_end(tune_fields(method.settings).get(key), spec[0], spec[1]))
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
    does not have are refused with their line), or the default space when it names no step: every
    step's strength-like settings over the ranges their fields declare (`setting`'s ``tune``)."""
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
    if not per_step:  # each step's strength-like settings, over the ranges their fields declare
        for i, step in enumerate(recipe.steps):
            settings_cls = get_method(step.method).settings
            hints = typing.get_type_hints(settings_cls)
            for key, f in tune_fields(settings_cls).items():
                lo, hi, grid = f.metadata["tune"]
                kind = "int" if hints[key] is int else "float"
                params.append(Param(i, key, kind, lo, hi, step_size=grid if kind == "float" else None, no_edit=no_edit_end(f, lo, hi)))
    if not params:
        raise PatcherError(f"{recipe.path}: nothing to tune: no step has a strength-like setting; name what to search in [tune.step.N] tables")
    return settings, params


def apply(plan: Plan, params: list[Param], values: dict[str, Any]) -> Plan:
    """The plan with each searched setting set to its value (keyed by `Param.name`): only the
    changed steps' settings are rebuilt."""
    for p in params:
        if p.key == "data":
            plan = plan.with_data(p.step, choice_data(plan.recipe, p.step, values[p.name]))
        else:
            plan = plan.with_setting(p.step, p.key, values[p.name])
    return plan


def layer_spans(params: list[Param]) -> dict[int, dict[str, Any]]:
    """What a step with a searched layer range collects: the whole range, once."""
    return {p.step: {"layers": f"{p.low}-{p.high}"} for p in params if p.kind == "layers"}

