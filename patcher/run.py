"""The main job: recipe -> statistics -> Patch -> baked checkpoint, with a perplexity budget.

`compute_patch` runs a recipe's steps on a loaded model (each later step collects with the earlier
steps' edits attached as hooks) and returns the composed Patch. `run` bakes it into a staging folder
beside the output, measures perplexity before and after on a held-back text slice, and publishes the
folder with one rename only when the rise is within the recipe's budget (or ``force``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bake import bake
from .checkpoint import check_output_path, move_into_place, resolve_model
from .collect import Collector
from .data import LabeledSet, load_labeled
from .errors import PatcherError
from .methods import StepContext, get_method
from .patch import Patch
from .perplexity import perplexity, token_stream
from .recipe import DataSettings, Recipe, build

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if device != "cpu" and not device.startswith("cuda"):
        raise PatcherError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


def load_model(folder: Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with a pad token) from a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise PatcherError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model = model.to(resolve_device(device)).eval()
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_data(settings: DataSettings, tokenizer: Any) -> LabeledSet:
    if not settings.path:
        raise PatcherError("the recipe's [data] table needs a path to labelled toxic/non-toxic text")
    return load_labeled(
        settings.path,
        text_field=settings.text_field,
        label_field=settings.label_field,
        n_per_class=settings.n_per_class,
        seed=settings.seed,
        dedupe=settings.dedupe,
        tokenizer=tokenizer,
        max_tokens=settings.max_tokens,
        match_lengths=settings.match_lengths,
    )


def compute_patch(recipe: Recipe, model: Any, tokenizer: Any, *, batch_size: int | None = None, timings: Timings | None = None, progress: bool = True) -> tuple[Patch, list[dict]]:
    """Run the recipe's steps; returns the composed Patch and a summary of each step's data."""
    timings = timings or Timings()
    c = recipe.collect
    collector = Collector(model, tokenizer, batch_size=batch_size or c.batch_size, max_tokens=recipe.data.max_tokens,
                          padding_side=c.padding_side, skip_first=c.skip_first, progress=progress)
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
        summaries.append({"step": i, "method": step.method, "data": data.summary()})
        ctx = StepContext(model, tokenizer, collector, data, patch)
        with timings.stage("collect"):
            stats = method.collect(ctx, settings)
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

    @property
    def ppl_increase(self) -> float:
        return self.ppl_after / self.ppl_before - 1.0


def _ppl(model: Any, tokenizer: Any, recipe: Recipe) -> float:
    ids = token_stream(tokenizer, recipe.check.ppl_text, recipe.check.ppl_tokens)
    w = recipe.check.ppl_window
    return perplexity(model, ids, window=w, stride=w)


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
) -> RunResult:
    timings = Timings()
    spec = model_spec or recipe.model.id
    with timings.stage("load"):
        folder, _ = resolve_model(spec, recipe.model.revision)
        out = Path(out or f"runs/{recipe.name}-{Path(spec).name}")
        check_output_path(out, folder, overwrite)
        model, tokenizer = load_model(folder, recipe.model.dtype, device, recipe.model.trust_remote_code)
    patch, summaries = compute_patch(recipe, model, tokenizer, batch_size=batch_size, timings=timings, progress=progress)
    staging = out.resolve().parent / f".{out.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    record = {"recipe": {"path": str(recipe.path), "name": recipe.name, "text": recipe.text}, "data": summaries}
    try:
        with timings.stage("bake"):
            bake(patch, spec, staging, record=record, progress=progress)
        with timings.stage("perplexity"):
            before = _ppl(model, tokenizer, recipe) if recipe.check.ppl_text else float("nan")
            del model
            baked, _ = load_model(staging, recipe.model.dtype, device)
            after = _ppl(baked, tokenizer, recipe) if recipe.check.ppl_text else float("nan")
            del baked
        result = RunResult(out, patch, before, after, timings, summaries)
        meta = json.loads((staging / "patch.json").read_text())
        meta["check"] = dataclasses.asdict(recipe.check) | {"ppl_before": before, "ppl_after": after, "ppl_increase": result.ppl_increase}
        (staging / "patch.json").write_text(json.dumps(meta, indent=2) + "\n")
        budget = recipe.check.max_ppl_increase
        if recipe.check.ppl_text and result.ppl_increase > budget and not force:
            raise PatcherError(
                f"perplexity rose {result.ppl_increase:+.1%} ({before:.2f} -> {after:.2f}), over the recipe's budget of "
                f"{budget:+.0%}: nothing was written; pass --force to publish anyway or raise check.max_ppl_increase"
            )
        move_into_place(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return result
