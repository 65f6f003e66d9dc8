"""The main job: recipe -> statistics -> Patch -> baked checkpoint, with a perplexity budget.

`compute_patch` runs a recipe's steps on a loaded model (each later step collects with the earlier
steps' edits attached as hooks) and returns the composed Patch. `run` bakes it into a staging folder
beside the output, measures perplexity before and after on a held-back text slice, and publishes the
folder with one rename only when the rise is within the recipe's budget (or ``force``). Before that
rename, a recipe with an ``[eval]`` table has the staging folder evaluated against the base model
(``eval.json``, ``eval.png``; their sha256 join ``bake.files`` in ``patch.json``), and the model card
(``README.md``) is written, with the evaluation when there is one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bake.writer import prepare_bake, write_bake
from ..collect.collector import Collector
from ..collect.layerwise import layerwise_perplexity
from ..collect.parallel import ParallelCollect
from ..core.errors import PatcherError
from ..core.models import resolve_device
from ..core.placement import Placement
from ..core.tokens import leading_specials
from ..data.catalog import entry
from ..data.loaders import LabeledSet, data_source, load_data, ppl_source
from ..edits.patch import Patch
from ..evaluate.evaluators import get_evaluators
from ..evaluate.perplexity import perplexity, token_stream
from ..evaluate.plots import plot_report
from ..evaluate.report import EvalSettings, eval_prompts, evaluate
from ..io.checkpoint import sha256_file
from ..io.folders import atomic_folder, check_output_path
from ..io.model_files import resolve_model
from ..io.record import update_record
from ..methods.registry import StepContext, get_method
from ..publish.card import EVAL_NAME, write_card
from ..recipe.loader import DataSettings, Recipe, line_of, resolve_path, where
from ..recipe.settings import build

log = logging.getLogger(__name__)

EVAL_PLOT = "eval.png"


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


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
    return [build(get_method(step.method).settings, step.settings, f"{recipe.path}:{step.line}", f"step[{i}]")
            for i, step in enumerate(recipe.steps, start=1)]


def compute_patch(recipe: Recipe, model: Any, tokenizer: Any, *, timings: Timings | None = None,
                  pipeline: Any = None, stats_cache: dict | None = None,
                  collect_as: dict[int, dict[str, Any]] | None = None) -> tuple[Patch, list[dict]]:
    """Run the recipe's steps; returns the composed Patch and a summary of each step's data.

    ``stats_cache`` (a sweep passes the same dict for every value) reuses a step's statistics when
    its data, its settings other than the method's ``build_only`` ones, and the patch of the
    earlier steps are all unchanged. ``collect_as`` (step index from 0 -> settings) collects a step
    with those settings in place of its own and builds with its own: a tune searching a layer range
    collects every layer of the range once and builds each trial's sub-range from it."""
    timings = timings or Timings()
    all_settings = step_settings(recipe)
    c = recipe.collect
    collector = Collector(model, tokenizer, batch_size=c.batch_size, max_tokens=recipe.data.max_tokens,
                          padding_side=c.padding_side, skip_first=c.skip_first, options=pipeline)
    patch = Patch([])
    summaries: list[dict] = []
    cache: dict[DataSettings, LabeledSet] = {}
    for i, (step, settings) in enumerate(zip(recipe.steps, all_settings), start=1):
        method = get_method(step.method)
        data_settings = step.data or recipe.data
        with timings.stage("data"):
            if data_settings not in cache:
                cache[data_settings] = load_data(data_settings, tokenizer)
        data = cache[data_settings]
        source = data_source(data_settings)[1]  # no absolute local path goes into patch.json
        summaries.append({"step": i, "method": step.method, "data": data.summary() | {"source": source.get("name") or source["file"]}, "dataset": source})
        ctx = StepContext(model, tokenizer, collector, data, patch)
        wider = (collect_as or {}).get(i - 1)
        collect_table = step.settings | wider if wider else step.settings
        collect_settings = {k: v for k, v in sorted(collect_table.items()) if k not in method.build_only()}
        key = (i, step.method, data_settings, repr(collect_settings), patch.hash())
        with timings.stage("collect"):
            if stats_cache is not None and key in stats_cache:
                stats = stats_cache[key]
            else:
                stats = method.collect(ctx, build(method.settings, collect_table, f"{recipe.path}:{step.line}", f"step[{i}]") if wider else settings)
                if stats_cache is not None:
                    stats_cache[key] = stats
        with timings.stage("compute"):
            step_patch = method.build(ctx, stats, settings)
        patch = patch.compose(step_patch) if patch.edits else step_patch
    patch.provenance = patch.provenance | {"recipe": recipe.name}
    return patch, summaries


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """Every local file a recipe reads: the recipe itself, its data (a missing data set stops the run
    here, before the model loads), its perplexity text, files its steps name (``*_path``) and its
    ``[eval]`` table's files. No output may touch any of them."""
    ppl = ppl_source(recipe.check)
    paths: list[Any] = [recipe.path, ppl[0] if ppl else ""]
    for data in dict.fromkeys(step.data or recipe.data for step in recipe.steps):
        paths.append(data_source(data)[0])  # a catalog name resolves to its local file (data folder or cache)
    for step in recipe.steps:
        paths += [v for k, v in step.settings.items() if k.endswith("_path") and isinstance(v, str)]
    if isinstance(recipe.eval, dict):
        paths += [resolve_path(recipe.path.parent, recipe.eval[k]) for k in ("prompts", "ppl_text") if isinstance(recipe.eval.get(k), str)]
    return [Path(p) for p in paths if p and "://" not in str(p)]


@contextmanager
def _collect_state(pipeline: ParallelCollect) -> Iterator[None]:
    """On a failure, the collection checkpoints are kept only when ``--resume`` can continue from
    them (the collection itself was interrupted after a checkpoint); otherwise they are removed.
    Either way the log says which."""
    try:
        yield
    except BaseException:
        pipeline.abandon()
        raise


def refuse_placement(recipe: Recipe, placement: Placement) -> None:
    """Steps whose method cannot run under ``placement`` are refused before the model loads."""
    for i, step in enumerate(recipe.steps, start=1):
        if getattr(get_method(step.method), "whole_model", False):
            placement.refuse(f"step {i} ({step.method}: its backward pass needs the whole model)",
                             "run without --sequential; for a model larger than memory use --device-map auto with --max-memory and --offload-folder",
                             sequential=placement.sequential)


def compute(recipe: Recipe, out: Path, *, placement: Placement | None = None, overwrite: bool = False) -> Patch | None:
    """`patcher compute`: the recipe's patch written to ``out`` (``patch.json`` with the patch's
    sha256 + ``patch.safetensors``) without baking. Under several processes only rank 0 writes; the
    others return None."""
    step_settings(recipe)
    pipeline = ParallelCollect(placement or Placement())
    refuse_placement(recipe, pipeline.placement)
    folder, _ = resolve_model(recipe.model.id, recipe.model.revision, recipe.model.trust_remote_code)
    check_output_path(out, folder, overwrite, recipe_inputs(recipe))
    device = pipeline.prepare(folder, out, pipeline.placement.device)
    with _collect_state(pipeline):
        model, tokenizer = pipeline.load(folder, recipe.model.dtype, device, recipe.model.trust_remote_code)
        patch, _ = compute_patch(recipe, model, tokenizer, pipeline=pipeline)
        if not pipeline.world.is_main:
            return None
        with atomic_folder(out, overwrite) as tmp:
            patch.save(tmp)
    pipeline.finish()
    return patch


@dataclass
class RunResult:
    out: Path
    patch: Patch
    ppl_before: float
    ppl_after: float
    timings: Timings
    data: list[dict]
    eval_report: dict[str, Any] | None = None  # the JSON of the [eval] table's evaluation (no samples)

    @property
    def ppl_increase(self) -> float:
        return self.ppl_after / self.ppl_before - 1.0


def check_perplexity(model: Any, tokenizer: Any, recipe: Recipe, ids: Any = None) -> float:
    """The recipe's ``[check]`` perplexity, the one number `patcher run` gates on and `patcher tune`
    measures damage with: windows without overlap, the tokenizer's leading specials (Gemma's
    ``<bos>``) first in every window. ``ids``: the check text's tokens when the caller keeps them."""
    if ids is None:
        ids = token_stream(tokenizer, ppl_source(recipe.check)[0], recipe.check.ppl_tokens)  # type: ignore[index]
    w = recipe.check.ppl_window
    if getattr(model, "_patcher_layerwise", None) is not None:  # --sequential: the skeleton of a LayerwiseModel
        return layerwise_perplexity(model._patcher_layerwise, ids, window=w, stride=w, prefix=leading_specials(tokenizer))
    return perplexity(model, ids, window=w, stride=w, prefix=leading_specials(tokenizer))


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


def _check_eval(settings: Any, device: str) -> None:
    """Fail before the work, not after the bake: the prompt file, the evaluators (loaded once per
    process, so this costs nothing later) and matplotlib for the plot."""

    eval_prompts(settings)
    try:
        get_evaluators(list(settings.evaluators), device=resolve_device(device))
    except PatcherError as e:
        raise PatcherError(f"{e} (or run with --no-eval, or name other evaluators in the recipe's [eval] table)") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise PatcherError(f"the recipe's [eval] table writes {EVAL_PLOT}, which needs matplotlib: pip install 'patcher[eval]', or run with --no-eval")


def _evaluate_staging(staging: Path, out: Path, baseline: str, settings: Any, placement: Placement) -> dict[str, Any]:
    """Evaluate the staged output against ``baseline``; writes eval.json and eval.png into it."""

    report = evaluate(staging, baseline=baseline, settings=settings, placement=placement)
    # measured in the staging folder, published as ``out``: the report sits inside the model it
    # describes, so the model is "." (local paths in published files are relative, never absolute)
    report.model.spec, report.model.folder = ".", "."
    report.model.provenance = report.model.provenance | {"model": "."}
    report.save_json(staging / EVAL_NAME)
    data = report.to_json()
    plot_report(data, staging / EVAL_PLOT)
    update_record(staging, {}, files={name: sha256_file(staging / name) for name in (EVAL_NAME, EVAL_PLOT)})
    return data


def _write_card(staging: Path, out: Path, report: dict[str, Any] | None) -> None:
    """The model card (README.md). It is not listed in ``bake.files``: `patcher card` and `patcher
    push` may rewrite it. Without PyYAML (the ``eval`` extra) the card is left out, with a note."""

    if importlib.util.find_spec("yaml") is None:
        log.warning("no model card written (needs pyyaml: pip install 'patcher[eval]'; then `patcher card OUT`)")
        return
    write_card(staging, report, repo_id=out.name)


def run(
    recipe: Recipe,
    *,
    out: Path | None = None,
    placement: Placement | None = None,
    force: bool = False,
    overwrite: bool = False,
    run_eval: bool = True,
    stats_cache: dict | None = None,
    allow_nonfinite: bool = False,
) -> RunResult | None:
    """``placement`` (`patcher.core.placement.Placement`): device, dtype, device map, layer by layer,
    checkpoints; under several processes (torchrun) only rank 0 bakes and writes, the others return None.
    ``run_eval=False`` skips the recipe's ``[eval]`` table (the card is written without it).
    ``stats_cache`` is `compute_patch`'s: runs of recipes that share a step's statistics collect them once.
    ``allow_nonfinite``: copy untouched source tensors holding NaN or inf."""
    timings = Timings()
    spec = recipe.model.id
    pipeline = ParallelCollect(placement or Placement())
    refuse_placement(recipe, pipeline.placement)
    device = pipeline.placement.device
    effective = recipe.effective_settings(step_settings(recipe))  # every step validated before the work
    settings = eval_settings(recipe)  # refuse a bad [eval] table before the work, even when skipped
    if not run_eval:
        settings = None
    if settings is not None:
        _check_eval(settings, device)
    inputs = recipe_inputs(recipe)  # resolves every data set: a missing one stops the run before the model loads
    trust = recipe.model.trust_remote_code
    with timings.stage("load"):
        folder, _ = resolve_model(spec, recipe.model.revision, trust)
        out = Path(out or f"runs/{recipe.name}-{Path(spec).name}")
        check_output_path(out, folder, overwrite, inputs)
        device = pipeline.prepare(folder, out, device)
        load = pipeline.load
    with _collect_state(pipeline):
        with timings.stage("load"):
            model, tokenizer = load(folder, recipe.model.dtype, device, trust)
        patch, summaries = compute_patch(recipe, model, tokenizer, timings=timings, pipeline=pipeline, stats_cache=stats_cache)
        if not pipeline.world.is_main:
            return None
        record = {"recipe": {"path": str(recipe.path.resolve()), "name": recipe.name, "text": recipe.text, "settings": effective}, "data": summaries}
        holder = [model]
        del model
        with atomic_folder(out, overwrite) as staging:
            result = _bake_and_check(recipe, patch, summaries, holder, tokenizer, load, staging, out, record, timings,
                                     pipeline.placement.replace(device=device),
                                     settings, force, allow_nonfinite, folder)
    pipeline.finish()
    return result


def _bake_and_check(recipe: Recipe, patch: Patch, summaries: list[dict], holder: list[Any], tokenizer: Any, load: Any, staging: Path, out: Path,
                    record: dict[str, Any], timings: Timings, placement: Placement, settings: Any, force: bool, allow_nonfinite: bool,
                    folder: Path) -> RunResult:
    """Bake into ``staging``, check perplexity against the budget, evaluate, write the card: the
    caller publishes ``staging`` as ``out`` only when this returns. ``holder`` holds the only
    reference to the collected model, dropped once the base perplexity is measured (the baked model
    is loaded next)."""
    spec = recipe.model.id
    with timings.stage("bake"):
        prep = prepare_bake(patch, spec, untie=recipe.model.untie, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
        write_bake(patch, prep, staging, out, record=record, allow_nonfinite=allow_nonfinite)
    with timings.stage("perplexity"):
        ppl = ppl_source(recipe.check)
        before = check_perplexity(holder.pop(), tokenizer, recipe) if ppl else float("nan")  # the model is freed here
        holder.clear()
        baked, _ = load(staging, recipe.model.dtype, placement.device)
        after = check_perplexity(baked, tokenizer, recipe) if ppl else float("nan")
        del baked
    result = RunResult(out, patch, before, after, timings, summaries)
    update_record(staging, {"check": dataclasses.asdict(recipe.check) | {"ppl_before": before, "ppl_after": after, "ppl_increase": result.ppl_increase,
                                                                       "ppl_source": ppl[1] if ppl else None}})
    budget = recipe.check.max_ppl_increase
    if ppl and result.ppl_increase > budget and not force:
        raise PatcherError(
            f"perplexity rose {result.ppl_increase:+.1%} ({before:.2f} -> {after:.2f}), over the recipe's budget of "
            f"{budget:+.0%}: nothing was written; pass --force to publish anyway or raise check.max_ppl_increase"
        )
    if settings is not None:
        with timings.stage("eval"):
            # the base model as resolved for the bake (a pinned revision stays pinned)
            baseline = spec if recipe.model.revision is None else str(folder)
            result.eval_report = _evaluate_staging(staging, out, baseline, settings, placement)
    _write_card(staging, out, result.eval_report)
    return result
