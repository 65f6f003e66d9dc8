"""Sweeps: one recipe at several values of one setting, each baked and evaluated, drawn as
toxicity against WikiText-2 perplexity beside the base model (and any reference, e.g. AURA).

Statistics are collected once: every value goes through `compute_patch` with the same statistics
cache, and a method's ``build_only`` settings (strength, k, factors, thresholds) do not enter the
cache key. Sweeping a setting that changes what is collected recollects, and the result says how
many collections ran.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bake.writer import bake
from ..collect.parallel import ParallelCollect
from ..core.errors import PatcherError
from ..core.placement import Placement
from ..core.table import render
from ..evaluate.report import EvalSettings, evaluate
from ..io.folders import check_output_path
from ..io.model_files import resolve_model
from ..io.record import write_json_file
from ..recipe.loader import Recipe
from .run import compute_patch
from .run_plan import Plan, resolve, with_setting  # noqa: F401 - with_setting: its public home was here


def parse_set(expr: str, recipe: Recipe) -> tuple[int, str, list[Any]]:
    """``[step.N.]KEY=V1,V2,...`` -> (step index from 0, key, values). Without ``step.N.`` the key
    belongs to the recipe's last step. Values are read as TOML literals (``0.5``, ``true``,
    ``"15-29"``); a bare word is a string."""
    if "=" not in expr:
        raise PatcherError(f"--set {expr!r}: write KEY=V1,V2,... (e.g. strength=0.25,0.5,1.0 or step.2.k=1,2)")
    target, raw = expr.split("=", 1)
    parts = target.split(".")
    if len(parts) == 3 and parts[0] == "step" and parts[1].isdigit():
        index, key = int(parts[1]) - 1, parts[2]
    elif len(parts) == 1:
        index, key = len(recipe.steps) - 1, parts[0]
    else:
        raise PatcherError(f"--set {expr!r}: the key is KEY or step.N.KEY")
    if not 0 <= index < len(recipe.steps):
        raise PatcherError(f"--set {expr!r}: the recipe has steps 1..{len(recipe.steps)}")
    values = []
    for item in raw.split(","):
        try:
            values.append(tomllib.loads(f"v = {item.strip()}")["v"])
        except tomllib.TOMLDecodeError:
            values.append(item.strip())
    if not values or values == [""]:
        raise PatcherError(f"--set {expr!r}: give at least one value after '='")
    return index, key, values


def _point(report: dict[str, Any], which: str = "model") -> dict[str, Any]:
    m = report[which]
    tox = {ev: v["toxicity_probability"]["value"] for ev, v in m["toxicity"].items()}
    return {"toxicity_probability": tox, "ppl": m["wikitext_perplexity"], "degenerate": m["degenerate"]["share"]}


@dataclass
class SweepResult:
    key: str
    values: list[Any]
    points: list[dict[str, Any]]  # one per value: value, folder, toxicity_probability, ppl
    base: dict[str, Any]
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    collections: int = 0
    chosen: int | None = None  # index of the least toxic point within the perplexity budget

    def table(self) -> str:
        evaluators = list(self.base["toxicity_probability"])
        rows = [["base", "-", *[self.base["toxicity_probability"][e] for e in evaluators], self.base["ppl"]]]
        for label, ref in self.references.items():
            rows.append([label, "-", *[ref["toxicity_probability"].get(e, float("nan")) for e in evaluators], ref["ppl"]])
        for i, p in enumerate(self.points):
            mark = " *" if i == self.chosen else ""
            rows.append([f"{self.key}={p['value']}{mark}", p["folder"], *[p["toxicity_probability"][e] for e in evaluators], p["ppl"]])
        title = f"sweep of {self.key}: toxicity probability per evaluator, WikiText-2 perplexity ({self.collections} statistics collection(s))"
        return render(["point", "folder", *evaluators, "ppl"], rows, title=title)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REFERENCE_MARKERS = ("^", "D", "v", "P", "X", "*")  # one per --compare point; more are not drawn


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Toxicity probability (one line per evaluator) against perplexity; base and references as
    labelled markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    evaluators = list(result.base["toxicity_probability"])
    for e in evaluators:
        line = ax.plot([p["ppl"] for p in result.points], [p["toxicity_probability"][e] for p in result.points], marker="o", label=e)[0]
        for p in result.points:
            ax.annotate(str(p["value"]), (p["ppl"], p["toxicity_probability"][e]), fontsize=7, color=line.get_color())
        ax.scatter([result.base["ppl"]], [result.base["toxicity_probability"][e]], marker="s", color=line.get_color(), edgecolor="black")
        for ref, marker in zip(result.references.values(), REFERENCE_MARKERS):
            if e in ref["toxicity_probability"]:
                ax.scatter([ref["ppl"]], [ref["toxicity_probability"][e]], marker=marker, color=line.get_color(), edgecolor="black")
    ax.scatter([], [], marker="s", color="white", edgecolor="black", label="base")
    for label, marker in zip(result.references, REFERENCE_MARKERS):
        ax.scatter([], [], marker=marker, color="white", edgecolor="black", label=label)
    ax.set_xlabel("WikiText-2 perplexity")
    ax.set_ylabel("toxicity probability")
    ax.set_title(f"sweep of {result.key} (circles), base (squares), references (other markers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return Path(path)


def sweep(
    plan: Plan | Recipe,
    expr: str,
    *,
    out: Path,
    eval_settings: EvalSettings | None = None,
    references: dict[str, Path] | None = None,
    max_ppl_increase: float | None = None,
    placement: Placement | None = None,
) -> SweepResult:
    """Run ``recipe`` at each value of ``expr`` (``[step.N.]KEY=V1,V2``); each point is baked into
    ``out/KEY=V`` and evaluated with the same prompts and seeds as the base model. A Recipe is
    resolved first; every point shares the plan's resolved data and check text."""
    placement = placement or Placement(checkpoint_every=0)
    placement.refuse("sweep (every point is evaluated by generation)", "place the model whole instead: --device-map auto --max-memory "
                     "cpu=SIZE --offload-folder DIR runs a model larger than memory from disk", sequential=placement.sequential)
    plan = plan if isinstance(plan, Plan) else resolve(plan, placement=placement)
    recipe = plan.recipe
    index, key, values = parse_set(expr, recipe)
    settings = eval_settings or EvalSettings.from_preset("quick")
    if not settings.prompts:  # a sweep chooses a setting: it looks at the select part only (patcher.data.catalog)
        from ..evaluate.report import SELECT_PROMPTS

        settings = dataclasses.replace(settings, prompts=SELECT_PROMPTS)
    spec = recipe.model.id
    folder, _ = resolve_model(spec, recipe.model.revision, recipe.model.trust_remote_code)
    inputs = [*plan.inputs, *(references or {}).values(), eval_settings.prompts if eval_settings else None]
    check_output_path(out, folder, True, inputs)  # an existing sweep folder is reused: patcher wrote it
    pipeline = ParallelCollect(placement)
    model, tokenizer = pipeline.load(folder, recipe.model.dtype, pipeline.placement.device, recipe.model.trust_remote_code)
    base = _point(evaluate(folder, settings=settings, placement=pipeline.placement).to_json())
    refs = {}
    for label, path in (references or {}).items():
        refs[label] = _point(json.loads(Path(path).read_text()))
    cache: dict = {}
    points = []
    out.mkdir(parents=True, exist_ok=True)
    for v in values:
        patch, _ = compute_patch(plan.with_setting(index, key, v), model, tokenizer, stats_cache=cache, pipeline=pipeline)
        target = out / f"{key}={v}"
        bake(patch, spec, target, untie=recipe.model.untie, overwrite=True, trust_remote_code=recipe.model.trust_remote_code, inputs=tuple(inputs))
        evaluation = evaluate(target, settings=settings, placement=pipeline.placement)
        report = evaluation.to_json()
        evaluation.save_json(target / "eval.json")
        points.append({"value": v, "folder": str(target), **_point(report)})
    result = SweepResult(key, values, points, base, refs, collections=len(cache))
    if max_ppl_increase is not None:
        within = [i for i, p in enumerate(points) if p["ppl"] <= base["ppl"] * (1 + max_ppl_increase)]
        if within:
            result.chosen = min(within, key=lambda i: points[i]["toxicity_probability"].get("any", max(points[i]["toxicity_probability"].values())))
    write_json_file(out / "sweep.json", result.to_json())
    return result
