"""A run is a plan, then its execution (as mergekit plans a merge, then executes it).

`resolve` reads everything a recipe's run depends on once, before the model loads: every step's
settings (built and checked by its method, errors at the recipe's lines), every data table's file
(a catalog name resolved to its local copy and hashed once), the check text, the ``[eval]`` table's
settings and inputs, and every local file the outputs may not touch. `compute_patch`, the bake and
check, `sweep` and `tune` take the resulting `Plan`; ``patch.json`` records it (`Plan.record`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..collect.steps import settings_record
from ..core.errors import PatcherError
from ..core.models import resolve_device
from ..core.placement import Placement
from ..data.catalog import entry
from ..data.loaders import data_source, ppl_source
from ..evaluate.evaluators import get_evaluators
from ..evaluate.report import EvalSettings, eval_prompts
from ..methods import get_method
from ..recipe.loader import DataSettings, Recipe, line_of, resolve_path, where
from ..recipe.settings import build
from .sae import expand_model_paths

EVAL_PLOT = "eval.png"


@dataclass(frozen=True)
class Source:
    """A file a run reads: its local path and what the record says of it (a catalog set's sha256)."""

    path: str
    record: dict[str, Any]

    @property
    def name(self) -> str:
        """The record's name for it: the catalog name, else the file's name (never a local path)."""
        return self.record.get("name") or self.record["file"]


@dataclass
class Plan:
    """Everything a run of ``recipe`` uses, resolved once."""

    recipe: Recipe
    settings: list[Any]  # each step's settings, built by its method
    data: dict[DataSettings, Source]  # every data table the steps use -> its file
    ppl: Source | None  # the [check] text; None without one
    eval: EvalSettings | None = None  # the [eval] table's settings; None without one or when skipped
    inputs: list[Path] = field(default_factory=list)  # every local file the run reads
    placement: Placement = field(default_factory=Placement)  # devices, dtype, device map, layer by layer (the command line's group)

    def step_data(self, index: int) -> DataSettings:
        """The data table of step ``index`` (from 0): its own, else the recipe's."""
        return self.recipe.steps[index].data or self.recipe.data

    def readable(self, data: DataSettings) -> DataSettings:
        """``data`` pointing at its resolved file: what `load_data` reads without resolving again."""
        return dataclasses.replace(data, path=self.data[data].path)

    def with_setting(self, index: int, key: str, value: Any) -> Plan:
        """This plan with step ``index``'s ``key`` set to ``value`` (a sweep's point, a tune's trial):
        that step's settings are rebuilt, nothing is resolved again."""
        recipe = with_setting(self.recipe, index, key, value)
        settings = list(self.settings)
        settings[index] = step_settings_of(recipe, index)
        return dataclasses.replace(self, recipe=recipe, settings=settings)

    def with_data(self, index: int, data: DataSettings) -> Plan:
        """This plan with step ``index`` reading ``data`` (a tune's data choice); its file resolved
        now when the plan does not hold it yet (`with_sources`)."""
        steps = list(self.recipe.steps)
        steps[index] = dataclasses.replace(steps[index], data=data)
        recipe = dataclasses.replace(self.recipe, steps=tuple(steps), name=f"{self.recipe.name}-data={data.dataset or Path(data.path).name}")
        return dataclasses.replace(self.with_sources([data]), recipe=recipe)

    def with_sources(self, datas: list[DataSettings]) -> Plan:
        """This plan also holding the files of ``datas`` (resolved and hashed once; a missing data set
        fails here, before the model loads): what a tune's data choices read."""
        new = [d for d in dict.fromkeys(datas) if d not in self.data]
        if not new:
            return self
        plan = dataclasses.replace(self, data=self.data | {d: Source(*data_source(d)) for d in new})
        plan.inputs = _inputs(plan)
        return plan

    def effective_settings(self) -> dict[str, Any]:
        return self.recipe.effective_settings(self.settings)

    def record(self) -> dict[str, Any]:
        """What ``patch.json`` keeps of the plan: each step's method, settings and data source, the
        check text's source, and the evaluation's settings."""
        steps = [{"step": i + 1, "method": step.method, "settings": settings_record(s), "data": self.data[self.step_data(i)].record}
                 for i, (step, s) in enumerate(zip(self.recipe.steps, self.settings))]
        return {"steps": steps, "check_text": self.ppl.record if self.ppl else None,
                "eval": dataclasses.asdict(self.eval) if self.eval is not None else None}


def with_setting(recipe: Recipe, index: int, key: str, value: Any) -> Recipe:
    """``recipe`` with step ``index``'s ``key`` set to ``value``, named for it."""
    step = recipe.steps[index]
    steps = list(recipe.steps)
    steps[index] = dataclasses.replace(step, settings=step.settings | {key: value})
    return dataclasses.replace(recipe, steps=tuple(steps), name=f"{recipe.name}-{key}={value}")


def step_settings_of(recipe: Recipe, index: int) -> Any:
    """Step ``index``'s settings built by its method; a bad value is refused at its key's line."""
    step = recipe.steps[index]
    table = expand_model_paths(step.settings, recipe.model.id)  # sae_path = "saes/{model}/..."
    return build(get_method(step.method).settings, table, f"{recipe.path}:{step.line}", f"step[{index + 1}]",
                 key_at=lambda key: where(recipe.path, line_of(recipe.text, key, step.line) or step.line))


def step_settings(recipe: Recipe) -> list[Any]:
    """Every step's settings, built and validated by its method, and every catalog name the recipe
    uses, checked before anything runs: a typo in step 2 fails before step 1 collects."""
    for key, name in [("dataset", recipe.data.dataset), ("ppl_dataset", recipe.check.ppl_dataset)] + [
            ("dataset", step.data.dataset) for step in recipe.steps if step.data is not None]:
        if name:
            try:
                entry(name)
            except PatcherError as e:
                raise PatcherError(f"{where(recipe.path, line_of(recipe.text, key))}: {e}") from None
    return [step_settings_of(recipe, i) for i in range(len(recipe.steps))]


def eval_settings(recipe: Recipe) -> Any:
    """The recipe's ``[eval]`` table as `patcher.evaluate.EvalSettings`, or None without one (or
    with ``enabled = false``). Its keys are EvalSettings' fields, a ``preset`` supplying the ones
    left out; unknown keys and wrong types are refused with the table's line; relative ``prompts``
    and ``ppl_text`` paths are read from the recipe's folder."""
    line = line_of(recipe.text, "eval")
    if not recipe.eval and not line:
        return None
    at = where(recipe.path, line)
    if not isinstance(recipe.eval, dict):
        raise PatcherError(f"{at}: eval should be a table ([eval]) of evaluation settings")
    table = dict(recipe.eval)
    enabled = table.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise PatcherError(f"{at}: eval.enabled = {enabled!r} should be true or false")
    build(EvalSettings, table, at, "eval")  # names unknown keys and wrong types
    if not enabled:
        return None
    for key in ("prompts", "ppl_text"):
        if table.get(key):
            table[key] = resolve_path(recipe.path.parent, table[key])
    try:
        return EvalSettings.from_preset(table.pop("preset", "rtp"), **table)
    except PatcherError as e:
        raise PatcherError(f"{at}: {e}") from None


def check_eval(settings: Any, device: str) -> None:
    """Fail before the work, not after the bake: the prompt file, the evaluators (loaded once per
    process, so this costs nothing later) and matplotlib for the plot."""
    eval_prompts(settings)
    try:
        get_evaluators(list(settings.evaluators), device=resolve_device(device))
    except PatcherError as e:
        raise PatcherError(f"{e} (or run with --no-eval, or name other evaluators in the recipe's [eval] table)") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise PatcherError(f"the recipe's [eval] table writes {EVAL_PLOT}, which needs matplotlib: pip install 'patcher[eval]', or run with --no-eval")


def refuse_placement(recipe: Recipe, placement: Placement) -> None:
    """Steps whose method cannot run under ``placement`` are refused before the model loads."""
    for i, step in enumerate(recipe.steps, start=1):
        if get_method(step.method).whole_model:
            placement.refuse(f"step {i} ({step.method}: its backward pass needs the whole model)",
                             "run without --sequential; for a model larger than memory use --device-map auto with --max-memory and --offload-folder",
                             sequential=placement.sequential)


def resolve(recipe: Recipe, overrides: dict[str, dict[str, Any]] | None = None, placement: Placement | None = None, *,
            run_eval: bool = False) -> Plan:
    """The plan of a run of ``recipe`` with the command line's ``overrides`` (table -> values, recorded
    as such) and ``placement`` (a step whose method cannot run under it is refused here). ``run_eval``:
    the ``[eval]`` table is checked either way (a bad one is refused even when skipped) and with it
    the plan evaluates on the placement's device."""
    placement = placement or Placement()
    for table, values in (overrides or {}).items():
        recipe = recipe.override(table, **values)
    settings = step_settings(recipe)
    refuse_placement(recipe, placement)
    evaluation = eval_settings(recipe)
    if not run_eval:
        evaluation = None
    if evaluation is not None:
        check_eval(evaluation, placement.device)
    data: dict[DataSettings, Source] = {}
    for step in recipe.steps:  # a missing data set stops the run here, before the model loads
        d = step.data or recipe.data
        if d not in data:
            data[d] = Source(*data_source(d))
    ppl = ppl_source(recipe.check)
    plan = Plan(recipe, settings, data, Source(*ppl) if ppl else None, evaluation, placement=placement)
    plan.inputs = _inputs(plan)
    return plan


def _inputs(plan: Plan) -> list[Path]:
    """Every local file a run reads: the recipe, its data, its check text, files its steps name
    (``*_path``) and its ``[eval]`` table's files. No output may touch any of them."""
    recipe = plan.recipe
    paths: list[Any] = [recipe.path, plan.ppl.path if plan.ppl else ""]
    paths += [s.path for s in plan.data.values()]  # a catalog name's local file (data folder or cache)
    for step in recipe.steps:  # with {model} expanded: the SAE folder this model's run reads
        settings = expand_model_paths(step.settings, recipe.model.id)
        paths += [v for k, v in settings.items() if k.endswith("_path") and isinstance(v, str)]
    if isinstance(recipe.eval, dict):
        paths += [resolve_path(recipe.path.parent, recipe.eval[k]) for k in ("prompts", "ppl_text") if isinstance(recipe.eval.get(k), str)]
    return [Path(p) for p in paths if p and "://" not in str(p)]
