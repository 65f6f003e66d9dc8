"""Each recipe's frontier on one model: toxicity against perplexity at several strengths, written as
committed data ``results/frontier-<model>.json`` (rendered into the README by ``benchmarks/results.py``).

    python benchmarks/frontier.py --model smollm2-135m [recipes ...] [--points 5] [--spacing geometric] \
        [--prompts rtp-challenging:report] [--n-prompts 50] [--samples 5] [--ppl-tokens 4096] [--blimp 0] \
        [--out runs/frontier] [--results results] [--resume] [--plot] [--note "what else ran"]

For each recipe (default: the seed methods' recipes) the swept setting is its last strength-like
step's ``strength`` (or the one strength-like setting the step has; ``--setting KEY`` picks another):
a field declaring ``no_edit`` and ``tune = (low, high, grid)`` (`patcher.recipe.settings.setting`), so
no method is named here. Its ``--points`` values run from the no-edit end (left out: that is the base
model) to the other end of the declared range, geometrically (levels 1/2^(n-1) ... 1/2, 1: the cheap
end, where a perplexity budget bites, is sampled densest) or linearly, each snapped to the declared
grid; the JSON records the grid used. Statistics are collected once per recipe (the swept setting is
build-only; a learned circuit is learned once and built at each strength), each point is baked into
``OUT/<recipe>/<KEY>=<V>`` and evaluated like the base model: the quick preset's sampling on the
report prompts (no choice of settings looks at them), WikiText-2 perplexity, BLiMP when ``--blimp``.
Every point holds its metrics with 95% intervals and its provenance (git commit, the command,
library versions, data sha256, seeds, wall time per stage, the machine and its load).
``--resume`` keeps the base and the points the results file already holds for the same evaluation
settings, grid and recipe (`recipe_sha256`: a recipe whose settings changed is measured again), and
measures only the others; the file is rewritten atomically after each point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patcher.core.errors import PatcherError  # noqa: E402
from patcher.core.models import load_model  # noqa: E402
from patcher.data.catalog import resolve as resolve_data  # noqa: E402
from patcher.data.catalog import split_part  # noqa: E402
from patcher.evaluate.report import REPORT_PROMPTS, EvalSettings, evaluate  # noqa: E402
from patcher.io.atomic import atomic_file  # noqa: E402
from patcher.io.checkpoint import sha256_file, sha256_inputs  # noqa: E402
from patcher.io.model_files import resolve_model  # noqa: E402
from patcher.io.record import library_versions, relative_paths  # noqa: E402
from patcher.methods import get_method  # noqa: E402
from patcher.recipe.loader import Recipe, load_recipe  # noqa: E402
from patcher.recipe.settings import tune_fields  # noqa: E402
from patcher.workflows.run import Timings, compute_patch  # noqa: E402
from patcher.workflows.run_plan import Plan, resolve  # noqa: E402
from patcher.workflows.tune.space import Param, no_edit_end  # noqa: E402
from recipes import bake_fresh, git_commit, machine, metrics, recipe_comment, recipe_sha256, save_results  # noqa: E402  (benchmarks/recipes.py)
from results import any_toxicity, ppl_change, within_budget  # noqa: E402  (benchmarks/results.py)

FORMAT = "patcher.results/1"
KIND = "frontier"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ["recipes/scale-neurons.toml", "recipes/aura.toml", "recipes/project-probe.toml", "recipes/circuit.toml",
                   "recipes/project-sae.toml"]
BUDGET = 0.05  # the README marks each recipe's least toxic point within +5% perplexity


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What is swept in one recipe: step ``index`` (from 0), setting ``key``, at ``values``."""

    index: int
    key: str
    values: list[Any]
    declared: tuple[float, float, float]  # the field's tune = (low, high, grid)
    no_edit: Any

    def record(self, spacing: str) -> dict[str, Any]:
        return {"step": self.index + 1, "setting": self.key, "values": self.values, "declared_range": list(self.declared),
                "no_edit": self.no_edit, "spacing": spacing}


def levels(points: int, spacing: str) -> list[float]:
    """Edit levels in (0, 1]: 0 is the no-edit end of a range, 1 its other end."""
    if spacing == "linear":
        return [k / points for k in range(1, points + 1)]
    return [2.0 ** -(points - k) for k in range(1, points + 1)]


def plan_sweep(recipe: Recipe, points: int, spacing: str = "geometric", key: str | None = None) -> Sweep:
    """The setting to sweep (see the module docstring) and its values on the field's declared grid."""
    for index in range(len(recipe.steps) - 1, -1, -1):
        settings_cls = get_method(recipe.steps[index].method).settings
        fields = tune_fields(settings_cls)
        if key is not None:
            if key in fields:
                break
            continue
        if "strength" in fields or len(fields) == 1:
            key = "strength" if "strength" in fields else next(iter(fields))
            break
        if fields:
            raise PatcherError(f"{recipe.path}: step {index + 1} has several strength-like settings ({', '.join(fields)}): name one with --setting")
    else:
        raise PatcherError(f"{recipe.path}: no step has a strength-like setting{f' named {key}' if key else ''} to sweep")
    f = fields[key]
    lo, hi, grid = f.metadata["tune"]
    kind = "int" if typing.get_type_hints(settings_cls)[key] is int else "float"
    param = Param(index, key, kind, lo, hi, step_size=grid if kind == "float" else None, no_edit=no_edit_end(f, lo, hi))
    values: list[Any] = []
    for t in levels(points, spacing):
        v = param.at_level(t)
        if v != f.metadata["no_edit"] and v not in values:
            values.append(v)
    return Sweep(index, key, values, (lo, hi, grid), f.metadata["no_edit"])


def data_hashes(plan: Plan | None, settings: EvalSettings) -> dict[str, str]:
    """sha256 of every file a point read: the recipe and its data (none for the base), the prompts
    (a catalog set or a file), the perplexity text and BLiMP when used."""
    out: dict[str, str] = sha256_inputs(plan.inputs) if plan is not None else {}
    names = [split_part(settings.prompts)[0], settings.ppl_text or "wikitext-2"] + (["blimp"] if settings.blimp else [])
    for name in names:
        if Path(name).is_file():
            out[Path(name).name] = sha256_file(Path(name))
            continue
        r = resolve_data(name)
        out[r.record.get("file") or r.record.get("layout_file")] = r.record["sha256"]
    return out


def relative(p: Path) -> str:
    r = p.resolve()
    return str(r.relative_to(ROOT)) if r.is_relative_to(ROOT) else p.name


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="*", type=Path, help=f"recipes (default: {' '.join(DEFAULT_RECIPES)})")
    ap.add_argument("--model", required=True, help="the model every recipe runs on (e.g. smollm2-135m, gemma3-270m, or a folder)")
    ap.add_argument("--points", type=int, default=5, help="strengths per recipe (besides the base model)")
    ap.add_argument("--spacing", choices=("geometric", "linear"), default="geometric", help="how the levels are spread over the declared range")
    ap.add_argument("--setting", help="sweep this strength-like setting in every recipe (default: strength, or the step's only one)")
    ap.add_argument("--prompts", default=REPORT_PROMPTS, help="prompt set or file (default: the report part of the RTP challenging set)")
    ap.add_argument("--n-prompts", type=int, default=50, help="seeded sample of the prompts (0 = all)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="WikiText-2 tokens for perplexity")
    ap.add_argument("--ppl-text", default="", help="perplexity text: a file or a catalog name (default: wikitext-2)")
    ap.add_argument("--blimp", type=int, default=0, help="BLiMP pairs per paradigm (0 = skip)")
    ap.add_argument("--evaluators", default=None, help="comma list (default: the quick preset's)")
    ap.add_argument("--out", type=Path, default=Path("runs/frontier"), help="baked points, OUT/<recipe>/<KEY>=<V>")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="folder of results/frontier-<model>.json")
    ap.add_argument("--keep-models", action="store_true", help="keep each baked point (default: only its eval.json)")
    ap.add_argument("--resume", action="store_true", help="keep the points the results file holds for these settings; measure the rest")
    ap.add_argument("--plot", action="store_true", help="also write frontier-<model>.png beside the JSON")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (recorded with each point)")
    args = ap.parse_args(argv)
    if args.points < 1:
        ap.error("--points should be at least 1")
    args.recipes = args.recipes or [ROOT / r for r in DEFAULT_RECIPES]
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    raw = sys.argv[1:] if argv is None else argv
    # the command as run from the repository root; an absolute local path in it is written relative to that root (never published)
    command = "python benchmarks/frontier.py " + " ".join(shlex.quote(relative(Path(a)) if os.path.isabs(a) else a) for a in raw)
    settings = EvalSettings.from_preset("quick", prompts=args.prompts, n_prompts=args.n_prompts, samples=args.samples, ppl_tokens=args.ppl_tokens,
                                        ppl_text=args.ppl_text or None, blimp=args.blimp, evaluators=args.evaluators)
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    spec = args.model
    folder, _ = resolve_model(spec)
    recipes = [(p, load_recipe(p).override("model", id=spec)) for p in args.recipes]
    # every recipe checked before any work: its sweep, its settings and data (a missing SAE names the command that trains it)
    sweeps = {r.name: plan_sweep(r, args.points, args.spacing, args.setting) for _, r in recipes}
    plans = {r.name: resolve(r) for _, r in recipes}
    path = args.results / f"frontier-{Path(spec).name}.json"
    old = json.loads(path.read_text()) if args.resume and path.is_file() else {}
    if old.get("settings") != relative_paths(wanted, args.results):  # as the file holds them (published paths are relative)
        old = {}
    results: dict[str, Any] = {"format": FORMAT, "kind": KIND, "model": spec, "settings": wanted, "budget": BUDGET,
                               "recipes": {k: v for k, v in (old.get("recipes") or {}).items()}}

    def save() -> None:  # after every point
        save_results(results, path)

    def provenance(stages: dict[str, float], plan: Plan | None, load_before: list[float]) -> dict[str, Any]:
        return {"git_commit": git_commit(), "command": command, "versions": library_versions(),
                "data_sha256": data_hashes(plan, settings), "seeds": {"eval": settings.seed, "bootstrap": settings.seed},
                "wall_seconds": {k: round(v, 2) for k, v in stages.items()}, "machine": machine() | {"load_average_before": load_before},
                "note": args.note, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    args.out.mkdir(parents=True, exist_ok=True)
    if "base" in old:
        results["base"], results["prompts"] = old["base"], old["prompts"]
    else:
        load0 = [round(x, 2) for x in os.getloadavg()]
        t0 = time.perf_counter()
        report = evaluate(folder, settings=settings).to_json()
        stages = {"eval": time.perf_counter() - t0} | {f"eval {k}": v for k, v in report["model"]["seconds"].items()}
        results["prompts"] = {"name": args.prompts if not Path(args.prompts).is_file() else Path(args.prompts).name,
                              "count": report["prompts"]["count"], "sha256": report["prompts"]["sha256"]}
        results["base"] = {"metrics": metrics(report), "provenance": provenance(stages, None, load0)}
        save()
        print(f"base evaluated ({stages['eval']:.0f}s)", flush=True)
    model = tokenizer = None
    for rpath, recipe in recipes:
        sweep = sweeps[recipe.name]
        entry = results["recipes"].get(recipe.name) or {}
        fingerprint = recipe_sha256(rpath)
        if entry.get("sweep") != json.loads(json.dumps(sweep.record(args.spacing))) or entry.get("recipe_sha256") != fingerprint:
            entry = {}  # points of another sweep, or of the recipe before its settings changed: measured again
        done = {json.dumps(p["value"]): p for p in entry.get("points", [])}
        collected_before = entry.get("collections", 0)
        entry = {"recipe": relative(rpath), "recipe_sha256": fingerprint, "method": recipe.steps[sweep.index].method,
                 "sweep": sweep.record(args.spacing), "claim": recipe_comment(rpath, "Claim"), "points": []}
        results["recipes"][recipe.name] = entry
        plan = plans[recipe.name]
        cache: dict = {}
        for v in sweep.values:
            if json.dumps(v) in done:
                entry["points"].append(done[json.dumps(v)])
                continue
            if model is None:
                model, tokenizer = load_model(folder)
            load0 = [round(x, 2) for x in os.getloadavg()]
            timings = Timings()
            patch, _ = compute_patch(plan.with_setting(sweep.index, sweep.key, v), model, tokenizer, stats_cache=cache, timings=timings)
            stages = dict(timings.seconds)
            target = args.out / recipe.name / f"{sweep.key}={v}"
            stages["bake"] = bake_fresh(patch, folder, target, recipe.model.untie)
            t = time.perf_counter()
            evaluation = evaluate(target, settings=settings)
            stages["eval"] = time.perf_counter() - t
            report = evaluation.to_json()
            evaluation.save_json(target / "eval.json", samples=False)
            if not args.keep_models:  # the point's numbers and record are kept; its weights are a bake away
                for f in target.iterdir():
                    if f.name not in ("eval.json", "patch.json"):
                        shutil.rmtree(f) if f.is_dir() else f.unlink()
            stages |= {f"eval {k}": s for k, s in report["model"]["seconds"].items()}
            entry["points"].append({"value": v, "metrics": metrics(report), "provenance": provenance(stages, plan, load0)})
            save()
            print(f"{recipe.name} {sweep.key}={v} evaluated ({stages['eval'] + stages['bake'] + stages.get('collect', 0):.0f}s)", flush=True)
        entry["collections"] = len(cache) or collected_before  # statistics collections of the run that measured the points
        save()
    save()
    if args.plot:
        plot(results, path.with_suffix(".png"))
    print(table(results))
    return path


def table(results: dict[str, Any]) -> str:
    from patcher.core.table import render

    base = results["base"]["metrics"]
    rows = [["base", "-", any_toxicity(base), base["wikitext_perplexity"]["value"], "-"]]
    for name, entry in results["recipes"].items():
        best = within_budget(entry["points"], base, results.get("budget", BUDGET))
        for i, p in enumerate(entry["points"]):
            m = p["metrics"]
            rows.append([name, f"{entry['sweep']['setting']}={p['value']}" + (" *" if i == best else ""), any_toxicity(m),
                         m["wikitext_perplexity"]["value"], f"{ppl_change(m, base):+.1%}"])
    return render(["recipe", "point", "toxicity probability (any)", "WikiText-2 ppl", "change"], rows,
                  title=f"frontier on {results['model']} (* least toxic within +{results.get('budget', BUDGET):.0%} perplexity)")


def plot(results: dict[str, Any], path: Path) -> Path:
    """Toxicity probability (one panel per evaluator) against the perplexity change, one line per
    recipe, the base model at 0 and the budget as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    base = results["base"]["metrics"]
    evaluators = list(base["toxicity"])
    fig = Figure(figsize=(4.2 * len(evaluators), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(evaluators), squeeze=False)[0]
    for ax, e in zip(axes, evaluators):
        for name, entry in results["recipes"].items():
            pts = entry["points"]
            xs = [100 * ppl_change(p["metrics"], base) for p in pts]
            ys = [p["metrics"]["toxicity"][e]["toxicity_probability"]["value"] for p in pts]
            line = ax.plot([0.0, *xs], [base["toxicity"][e]["toxicity_probability"]["value"], *ys], marker="o", label=name)[0]
            for x, y, p in zip(xs, ys, pts):
                ax.annotate(f"{p['value']:g}" if isinstance(p["value"], (int, float)) else str(p["value"]), (x, y), fontsize=7, color=line.get_color())
        ax.axvline(100 * results.get("budget", BUDGET), color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("WikiText-2 perplexity change (%)")
        ax.set_ylabel(f"toxicity probability ({e})")
        ax.set_title(e)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['model']}: toxicity vs perplexity (base at 0; dashed: +{results.get('budget', BUDGET):.0%})")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


if __name__ == "__main__":
    try:
        main()
    except PatcherError as e:
        raise SystemExit(f"frontier: error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
