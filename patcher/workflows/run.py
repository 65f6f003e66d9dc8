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
from ..core.placement import Placement
from ..core.tokens import leading_specials
from ..data.loaders import LabeledSet, load_data, ppl_source
from ..edits.patch import Patch
from ..evaluate.perplexity import perplexity, token_stream
from ..evaluate.plots import plot_report
from ..evaluate.report import evaluate
from ..io.checkpoint import sha256_file
from ..io.folders import atomic_folder, check_output_path
from ..io.model_files import resolve_model
from ..io.record import update_record
from ..methods import StepContext, get_method
from ..publish.card import EVAL_NAME, write_card
from ..publish.gguf import OUTTYPES, default_name, export_gguf, model_class
from ..recipe.loader import DataSettings, Recipe
from ..recipe.settings import build
from .run_plan import EVAL_PLOT, Plan, eval_settings, resolve, step_settings

__all__ = ["Plan", "RunResult", "check_perplexity", "compute", "compute_patch", "eval_settings", "execute", "recipe_inputs", "resolve", "run",
           "step_settings"]
from .sae import expand_model_paths

log = logging.getLogger(__name__)



@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def compute_patch(plan: Plan | Recipe, model: Any, tokenizer: Any, *, timings: Timings | None = None,
                  pipeline: Any = None, stats_cache: dict | None = None,
                  collect_as: dict[int, dict[str, Any]] | None = None) -> tuple[Patch, list[dict]]:
    """Run the plan's steps (a Recipe is resolved first); returns the composed Patch and a summary
    of each step's data.

    ``stats_cache`` (a sweep passes the same dict for every value) reuses a step's statistics when
    its data, its settings other than the method's ``build_only`` ones, and the patch of the
    earlier steps are all unchanged. ``collect_as`` (step index from 0 -> settings) collects a step
    with those settings in place of its own and builds with its own: a tune searching a layer range
    collects every layer of the range once and builds each trial's sub-range from it."""
    plan = plan if isinstance(plan, Plan) else resolve(plan)
    recipe, timings = plan.recipe, timings or Timings()
    c = recipe.collect
    collector = Collector(model, tokenizer, batch_size=c.batch_size, max_tokens=recipe.data.max_tokens,
                          padding_side=c.padding_side, skip_first=c.skip_first, options=pipeline)
    patch = Patch([])
    summaries: list[dict] = []
    cache: dict[DataSettings, LabeledSet] = {}
    for i, (step, settings) in enumerate(zip(recipe.steps, plan.settings), start=1):
        method = get_method(step.method)
        data_settings = plan.step_data(i - 1)
        with timings.stage("data"):
            if data_settings not in cache:
                cache[data_settings] = load_data(plan.readable(data_settings), tokenizer)
        data = cache[data_settings]
        source = plan.data[data_settings]  # its record names no absolute local path
        summaries.append({"step": i, "method": step.method, "data": data.summary() | {"source": source.name}, "dataset": source.record})
        ctx = StepContext(model, tokenizer, collector, data, patch)
        wider = (collect_as or {}).get(i - 1)
        collect_table = expand_model_paths(step.settings | wider, recipe.model.id) if wider else step.settings
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
    """Every local file a recipe reads (`Plan.inputs` of its plan)."""
    return resolve(recipe).inputs


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


def compute(recipe: Recipe, out: Path, *, placement: Placement | None = None, overwrite: bool = False) -> Patch | None:
    """`patcher compute`: the recipe's patch written to ``out`` (``patch.json`` with the patch's
    sha256 and the plan + ``patch.safetensors``) without baking. Under several processes only rank
    0 writes; the others return None."""
    plan = resolve(recipe, placement=placement)
    pipeline = ParallelCollect(plan.placement)
    folder, _ = resolve_model(recipe.model.id, recipe.model.revision, recipe.model.trust_remote_code)
    check_output_path(out, folder, overwrite, plan.inputs)
    device = pipeline.prepare(folder, out, pipeline.placement.device)
    with _collect_state(pipeline):
        model, tokenizer = pipeline.load(folder, recipe.model.dtype, device, recipe.model.trust_remote_code)
        patch, _ = compute_patch(plan, model, tokenizer, pipeline=pipeline)
        if not pipeline.world.is_main:
            return None
        with atomic_folder(out, overwrite) as tmp:
            patch.save(tmp, extra={"plan": plan.record()})
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


@dataclass
class Bake:
    """What the bake-and-check step needs beyond the plan: the collected model (given up once the
    base perplexity is measured, before the baked model loads), its tokenizer, how a model loads,
    where the base came from, and the run's switches."""

    model: Any
    tokenizer: Any
    load: Any
    folder: Path
    placement: Placement
    force: bool = False
    allow_nonfinite: bool = False

    def take_model(self) -> Any:
        """The collected model, dropping this object's reference: the caller's is then the last."""
        model, self.model = self.model, None
        return model


def run(
    recipe: Recipe,
    *,
    out: Path | None = None,
    placement: Placement | None = None,
    force: bool = False,
    overwrite: bool = False,
    run_eval: bool = True,
    **options: Any,
) -> RunResult | None:
    """``placement`` (`patcher.core.placement.Placement`): device, dtype, device map, layer by layer,
    checkpoints; under several processes (torchrun) only rank 0 bakes and writes, the others return None.
    ``run_eval=False`` skips the recipe's ``[eval]`` table (the card is written without it).
    ``options``: ``stats_cache`` (`compute_patch`'s: runs of recipes that share a step's statistics
    collect them once), ``allow_nonfinite`` (copy untouched source tensors holding NaN or inf) and
    ``gguf``: a GGUF type (``f16``, ``q8_0``, ...): the last step exports the staged folder to
    ``model-TYPE.gguf`` inside it (`patcher.publish.gguf`), checked possible before the work."""
    unknown = set(options) - {"stats_cache", "allow_nonfinite", "gguf"}
    if unknown:
        raise TypeError(f"run() got unexpected options {sorted(unknown)}")
    plan = resolve(recipe, placement=placement, run_eval=run_eval)  # everything checked and resolved before the work
    return execute(plan, out=out, force=force, overwrite=overwrite, **options)


def execute(plan: Plan, *, out: Path | None = None, force: bool = False, overwrite: bool = False,
            stats_cache: dict | None = None, allow_nonfinite: bool = False, gguf: str | None = None) -> RunResult | None:
    """A plan's run: load, compute, bake into a staging folder, check, evaluate, publish (and export a GGUF)."""
    recipe, pipeline, timings = plan.recipe, ParallelCollect(plan.placement), Timings()
    spec, trust = recipe.model.id, recipe.model.trust_remote_code
    with timings.stage("load"):
        folder, _ = resolve_model(spec, recipe.model.revision, trust)
        out = Path(out or f"runs/{recipe.name}-{Path(spec).name}")
        check_output_path(out, folder, overwrite, plan.inputs)
        if gguf is not None:
            if gguf not in OUTTYPES:
                raise PatcherError(f"--gguf {gguf!r} is not a GGUF type patcher exports: choose one of {', '.join(OUTTYPES)}")
            model_class(folder)  # the converter is installed and knows the architecture, before the work
        device = pipeline.prepare(folder, out, pipeline.placement.device)
        load = pipeline.load
    with _collect_state(pipeline):
        with timings.stage("load"):
            model, tokenizer = load(folder, recipe.model.dtype, device, trust)
        patch, summaries = compute_patch(plan, model, tokenizer, timings=timings, pipeline=pipeline, stats_cache=stats_cache)
        if not pipeline.world.is_main:
            return None
        job = Bake(model, tokenizer, load, folder, pipeline.placement.replace(device=device), force, allow_nonfinite)
        del model
        result = RunResult(out, patch, float("nan"), float("nan"), timings, summaries)
        with atomic_folder(out, overwrite) as staging:
            _bake_and_check(plan, job, staging, result)
            if gguf is not None:
                export_gguf(staging, default_name(gguf), gguf, title=out.name)
                _write_card(staging, out, result.eval_report)  # the card names the GGUF
    pipeline.finish()
    return result


def _bake_and_check(plan: Plan, job: Bake, staging: Path, result: RunResult) -> None:
    """Bake into ``staging``, check perplexity against the budget, evaluate, write the card: the
    caller publishes ``staging`` as ``result.out`` only when this returns."""
    recipe, timings, out = plan.recipe, result.timings, result.out
    spec = recipe.model.id
    record = {"recipe": {"path": str(recipe.path.resolve()), "name": recipe.name, "text": recipe.text, "settings": plan.effective_settings()},
              "data": result.data, "plan": plan.record()}
    with timings.stage("bake"):
        prep = prepare_bake(result.patch, spec, untie=recipe.model.untie, trust_remote_code=recipe.model.trust_remote_code, revision=recipe.model.revision)
        write_bake(result.patch, prep, staging, out, record=record, allow_nonfinite=job.allow_nonfinite)
    from .capability_gate import CapabilityGate

    gate = CapabilityGate(recipe.check, job.tokenizer)  # [check] max_blimp_drop / max_kl: measured like perplexity
    capability: dict[str, float] = {}
    with timings.stage("perplexity"):
        ids = token_stream(job.tokenizer, plan.ppl.path, recipe.check.ppl_tokens) if plan.ppl else None
        base_model = job.take_model()  # the collected model is freed once measured
        if ids is not None:
            result.ppl_before = check_perplexity(base_model, job.tokenizer, recipe, ids)
        if gate.active:
            gate.measure_base(base_model)
        del base_model
        baked, _ = job.load(staging, recipe.model.dtype, job.placement.device)
        if ids is not None:
            result.ppl_after = check_perplexity(baked, job.tokenizer, recipe, ids)
        if gate.active:
            capability = gate.measure(baked)
        del baked
    update_record(staging, {"check": dataclasses.asdict(recipe.check) | {"ppl_before": result.ppl_before, "ppl_after": result.ppl_after,
                                                                       "ppl_increase": result.ppl_increase,
                                                                       "ppl_source": plan.ppl.record if plan.ppl else None} | capability})
    budget = recipe.check.max_ppl_increase
    if plan.ppl and result.ppl_increase > budget and not job.force:
        raise PatcherError(
            f"perplexity rose {result.ppl_increase:+.1%} ({result.ppl_before:.2f} -> {result.ppl_after:.2f}), over the recipe's budget of "
            f"{budget:+.0%}: nothing was written; pass --force to publish anyway or raise check.max_ppl_increase"
        )
    if capability and gate.excess(capability) > 0 and not job.force:
        raise PatcherError(f"{gate.describe(capability)}: over the recipe's [check] budget; nothing was written; pass --force to publish anyway "
                           "or raise check.max_blimp_drop / check.max_kl")
    if plan.eval is not None:
        with timings.stage("eval"):
            # the base model as resolved for the bake (a pinned revision stays pinned)
            baseline = spec if recipe.model.revision is None else str(job.folder)
            result.eval_report = _evaluate_staging(staging, out, baseline, plan.eval, job.placement)
    _write_card(staging, out, result.eval_report)
