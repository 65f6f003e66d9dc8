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
import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bake import bake
from .checkpoint import check_output_path, move_into_place, resolve_model, sha256_file
from .collect import Collector
from .data import LabeledSet, load_labeled, load_pairs
from .errors import PatcherError
from .methods import StepContext, get_method
from .patch import Patch
from .perplexity import perplexity, token_stream
from .recipe import CheckSettings, DataSettings, Recipe, _line_of, _resolve, _where, build

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EVAL_PLOT = "eval.png"


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PatcherError(f"device {device!r} requested but no CUDA GPU is visible: use --device cpu")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise PatcherError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    return device


def load_model(folder: Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
               device_map: str | None = None, max_memory: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with a pad token) from a local folder; with ``device_map``
    (``auto``, ...) accelerate places it over GPUs, CPU and disk within ``max_memory``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise PatcherError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    try:
        if device_map:
            from .distributed import load_with_device_map

            model = load_with_device_map(folder, DTYPES[dtype], device_map, max_memory, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
            model = model.to(resolve_device(device)).eval()
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PatcherError(f"cannot load {folder} as a causal LM with its tokenizer ({first}): give a model folder with tokenizer files") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise PatcherError(f"the tokenizer of {folder} has neither a pad nor an eos token: add a pad token to it")
        tok.pad_token = tok.eos_token
    return model, tok


def data_source(settings: DataSettings) -> tuple[str, dict[str, Any]]:
    """The file a [data] table reads and the record of where it came from: its ``path``, else its
    catalog ``dataset`` (data folder, else the Hub; `patcher.catalog`)."""
    if settings.path:
        return settings.path, {"from": "path", "file": Path(settings.path).name}
    if not settings.dataset:
        raise PatcherError("the recipe's [data] table needs a dataset (a catalog name such as \"paradetox\") or a path to labelled toxic/non-toxic text")
    from .catalog import resolve

    found = resolve(settings.dataset)
    return str(found.path), found.record


def ppl_source(check: CheckSettings) -> tuple[str, dict[str, Any]] | None:
    """The perplexity text of a [check] table (``ppl_text``, else ``ppl_dataset``) and its record; None without one."""
    if check.ppl_text:
        return check.ppl_text, {"from": "path", "file": Path(check.ppl_text).name}
    if not check.ppl_dataset:
        return None
    from .catalog import resolve

    found = resolve(check.ppl_dataset)
    return str(found.path), found.record


def load_data(settings: DataSettings, tokenizer: Any) -> LabeledSet:
    path, _ = data_source(settings)
    if settings.pairs:
        return load_pairs(path, n=settings.n_per_class, seed=settings.seed, dedupe=settings.dedupe,
                          tokenizer=tokenizer, max_tokens=settings.max_tokens)
    return load_labeled(
        path,
        text_field=settings.text_field,
        label_field=settings.label_field,
        n_per_class=settings.n_per_class,
        seed=settings.seed,
        dedupe=settings.dedupe,
        tokenizer=tokenizer,
        max_tokens=settings.max_tokens,
        match_lengths=settings.match_lengths,
    )


def compute_patch(recipe: Recipe, model: Any, tokenizer: Any, *, batch_size: int | None = None, timings: Timings | None = None, progress: bool = True,
                  scale: Any = None, stats_cache: dict | None = None) -> tuple[Patch, list[dict]]:
    """Run the recipe's steps; returns the composed Patch and a summary of each step's data.

    ``stats_cache`` (a sweep passes the same dict for every value) reuses a step's statistics when
    its data, its settings other than the method's ``build_only`` ones, and the patch of the
    earlier steps are all unchanged."""
    timings = timings or Timings()
    c = recipe.collect
    collector = Collector(model, tokenizer, batch_size=batch_size or c.batch_size, max_tokens=recipe.data.max_tokens,
                          padding_side=c.padding_side, skip_first=c.skip_first, progress=progress, options=scale)
    patch = Patch([])
    summaries: list[dict] = []
    cache: dict[DataSettings, LabeledSet] = {}
    for i, step in enumerate(recipe.steps, start=1):
        method = get_method(step.method)
        settings = build(method.settings, step.settings, f"{recipe.path}:{step.line}", f"step[{i}]")
        data_settings = step.data or recipe.data
        with timings.stage("data"):
            if data_settings not in cache:
                cache[data_settings] = load_data(data_settings, tokenizer)
        data = cache[data_settings]
        source = data_source(data_settings)[1]  # no absolute local path goes into patch.json
        summaries.append({"step": i, "method": step.method, "data": data.summary() | {"source": source.get("name") or source["file"]}, "dataset": source})
        ctx = StepContext(model, tokenizer, collector, data, patch)
        collect_settings = {k: v for k, v in sorted(step.settings.items()) if k not in method.build_only}
        key = (i, step.method, data_settings, repr(collect_settings), patch.hash())
        with timings.stage("collect"):
            if stats_cache is not None and key in stats_cache:
                stats = stats_cache[key]
            else:
                stats = method.collect(ctx, settings)
                if stats_cache is not None:
                    stats_cache[key] = stats
        with timings.stage("compute"):
            step_patch = method.build(ctx, stats, settings)
        patch = patch.compose(step_patch) if patch.edits else step_patch
    patch.provenance = patch.provenance | {"recipe": recipe.name}
    return patch, summaries


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


def _ppl(model: Any, tokenizer: Any, recipe: Recipe) -> float:
    ids = token_stream(tokenizer, ppl_source(recipe.check)[0], recipe.check.ppl_tokens)  # type: ignore[index]
    w = recipe.check.ppl_window
    if getattr(model, "_patcher_layerwise", None) is not None:  # --sequential: the skeleton of a LayerwiseModel
        from .sequential import layerwise_perplexity

        return layerwise_perplexity(model._patcher_layerwise, ids, window=w, stride=w)
    return perplexity(model, ids, window=w, stride=w)


def eval_settings(recipe: Recipe) -> Any:
    """The recipe's ``[eval]`` table as `patcher.evaluate.EvalSettings`, or None without one (or
    with ``enabled = false``). Its keys are EvalSettings' fields, a ``preset`` supplying the ones
    left out; unknown keys and wrong types are refused with the table's line; relative ``prompts``
    and ``ppl_text`` paths are read from the recipe's folder."""
    from .evaluate import EvalSettings

    line = _line_of(recipe.text, "eval")
    if not recipe.eval and not line:
        return None
    where = _where(recipe.path, line)
    if not isinstance(recipe.eval, dict):
        raise PatcherError(f"{where}: eval should be a table ([eval]) of evaluation settings")
    table = dict(recipe.eval)
    enabled = table.pop("enabled", True)
    if not isinstance(enabled, bool):
        raise PatcherError(f"{where}: eval.enabled = {enabled!r} should be true or false")
    build(EvalSettings, table, where, "eval")  # names unknown keys and wrong types
    if not enabled:
        return None
    for key in ("prompts", "ppl_text"):
        if table.get(key):
            table[key] = _resolve(recipe.path.parent, table[key])
    try:
        return EvalSettings.from_preset(table.pop("preset", "rtp"), **table)
    except PatcherError as e:
        raise PatcherError(f"{where}: {e}") from None


def _check_eval(settings: Any, device: str) -> None:
    """Fail before the work, not after the bake: the prompt file, the evaluators (loaded once per
    process, so this costs nothing later) and matplotlib for the plot."""
    from .evaluate import eval_prompts
    from .evaluators import get_evaluators

    eval_prompts(settings)
    try:
        get_evaluators(list(settings.evaluators), device=resolve_device(device))
    except PatcherError as e:
        raise PatcherError(f"{e} (or run with --no-eval, or name other evaluators in the recipe's [eval] table)") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise PatcherError(f"the recipe's [eval] table writes {EVAL_PLOT}, which needs matplotlib: pip install 'patcher[eval]', or run with --no-eval")


def _record_files(folder: Path, names: list[str]) -> None:
    """Add the sha256 of ``names`` to ``bake.files`` in ``folder``'s patch.json (`patcher verify` rechecks them)."""
    meta = json.loads((folder / "patch.json").read_text())
    files = meta["bake"]["files"] | {name: sha256_file(folder / name) for name in names}
    meta["bake"]["files"] = dict(sorted(files.items()))
    (folder / "patch.json").write_text(json.dumps(meta, indent=2) + "\n")


def _evaluate_staging(staging: Path, out: Path, baseline: str, settings: Any, device: str, progress: bool) -> dict[str, Any]:
    """Evaluate the staged output against ``baseline``; writes eval.json and eval.png into it."""
    from .evaluate import evaluate
    from .hub import EVAL_NAME
    from .plots import plot_report

    report = evaluate(staging, baseline=baseline, settings=settings, device=device, progress=progress)
    final = str(out.resolve())  # measured in the staging folder, published as ``out``
    report.model.spec, report.model.folder = str(out), final
    report.model.provenance = report.model.provenance | {"model": final}
    report.save_json(staging / EVAL_NAME)
    data = report.to_json()
    plot_report(data, staging / EVAL_PLOT)
    _record_files(staging, [EVAL_NAME, EVAL_PLOT])
    return data


def _write_card(staging: Path, out: Path, report: dict[str, Any] | None, progress: bool) -> None:
    """The model card (README.md). It is not listed in ``bake.files``: `patcher card` and `patcher
    push` may rewrite it. Without PyYAML (the ``eval`` extra) the card is left out, with a note."""
    from .hub import write_card

    if importlib.util.find_spec("yaml") is None:
        if progress:
            print("patcher run: no model card written (needs pyyaml: pip install 'patcher[eval]'; then `patcher card OUT`)", file=sys.stderr)
        return
    write_card(staging, report, repo_id=out.name)


def run(
    recipe: Recipe,
    *,
    model_spec: str | None = None,
    out: Path | None = None,
    device: str = "cpu",
    batch_size: int | None = None,
    force: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    scale: Any = None,
    run_eval: bool = True,
    stats_cache: dict | None = None,
) -> RunResult | None:
    """``scale`` (`patcher.distributed.ScaleOptions`): device map, layer-by-layer, data-parallel,
    checkpoints; under several processes only rank 0 bakes and writes, the others return None.
    ``run_eval=False`` skips the recipe's ``[eval]`` table (the card is written without it).
    ``stats_cache`` is `compute_patch`'s: runs of recipes that share a step's statistics collect them once."""
    timings = Timings()
    spec = model_spec or recipe.model.id
    settings = eval_settings(recipe)  # refuse a bad [eval] table before the work, even when skipped
    if not run_eval:
        settings = None
    if settings is not None:
        _check_eval(settings, device)
    for data_settings in dict.fromkeys(step.data or recipe.data for step in recipe.steps):
        data_source(data_settings)  # a missing data set stops the run before the model loads
    ppl_source(recipe.check)
    with timings.stage("load"):
        folder, _ = resolve_model(spec, recipe.model.revision)
        out = Path(out or f"runs/{recipe.name}-{Path(spec).name}")
        check_output_path(out, folder, overwrite)
        if scale is not None:
            device = scale.prepare(folder, out, device)
        load = scale.load if scale is not None else load_model
        model, tokenizer = load(folder, recipe.model.dtype, device, recipe.model.trust_remote_code)
    patch, summaries = compute_patch(recipe, model, tokenizer, batch_size=batch_size, timings=timings, progress=progress, scale=scale,
                                     stats_cache=stats_cache)
    if scale is not None and not scale.world.is_main:
        return None
    staging = out.resolve().parent / f".{out.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    record = {"recipe": {"path": str(recipe.path), "name": recipe.name, "text": recipe.text}, "data": summaries}
    try:
        with timings.stage("bake"):
            bake(patch, spec, staging, untie=recipe.model.untie, record=record, progress=progress)
        with timings.stage("perplexity"):
            ppl = ppl_source(recipe.check)
            before = _ppl(model, tokenizer, recipe) if ppl else float("nan")
            del model
            baked, _ = load(staging, recipe.model.dtype, device)
            after = _ppl(baked, tokenizer, recipe) if ppl else float("nan")
            del baked
        result = RunResult(out, patch, before, after, timings, summaries)
        meta = json.loads((staging / "patch.json").read_text())
        meta["check"] = dataclasses.asdict(recipe.check) | {"ppl_before": before, "ppl_after": after, "ppl_increase": result.ppl_increase,
                                                            "ppl_source": ppl[1] if ppl else None}
        (staging / "patch.json").write_text(json.dumps(meta, indent=2) + "\n")
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
                result.eval_report = _evaluate_staging(staging, out, baseline, settings, device, progress)
        _write_card(staging, out, result.eval_report, progress)
        move_into_place(staging, out)
        if scale is not None:
            scale.finish()
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result
