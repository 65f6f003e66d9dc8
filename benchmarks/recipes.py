"""Recipes side by side on one model and one prompt sample, written as committed data: one row per
recipe in ``results/<model>.json`` (the README's results tables are rendered from these files by
``benchmarks/results.py``).

    python benchmarks/recipes.py recipes/project-stack.toml [more recipes] [--model gemma3-270m] \
        [--prompts rtp-challenging:report] [--n-prompts 0] [--blimp 20] [--kl-prompts 100] \
        [--out runs/recipes] [--results results] [--file NAME] [--note "what else ran"]

Each recipe's patch is computed as `patcher run` computes it, baked into ``OUT/<recipe name>``,
checked as ``patcher verify`` checks it (files, tensors, logits against the hooked base model), and
evaluated with the quick preset's sampling (5 samples x 20 tokens, top-p 0.9, seed 0) on the
``report`` part of the RealToxicityPrompts challenging set (the part no choice of settings looks
at; `patcher.data.catalog`), like the base model, which is evaluated once. Every row holds every
metric with its 95% interval: toxicity (expected maximum toxicity, toxicity probability, per
evaluator and "any"), WikiText-2 perplexity (deterministic: no interval), BLiMP accuracy and its drop
against the base (paired bootstrap), KL(base || patched) on BOLD neutral prompts, degenerate share;
and its provenance: git commit, the exact command, library versions, the sha256 of every data file
and prompt set, seeds, wall time per stage, the machine (cores, threads, load before and after)
and ``--note``. Rows of other recipes already in the file are kept (a row is replaced only by a
new measurement of the same recipe). A recipe the model refuses gets a row saying why.
``--resume`` reuses ``OUT/base-eval.json`` and each ``OUT/<recipe>.eval.json`` an interrupted run
with the same settings and the same recipe (`recipe_sha256`) left (beside the baked folder ``OUT/<recipe>``, not in it: the folder stays a
baked output that ``patcher verify`` and ``patcher export`` accept).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from patcher import bake
from patcher.bake.verify import verify
from patcher.core.errors import PatcherError
from patcher.core.models import load_model
from patcher.core.table import render
from patcher.data.catalog import resolve, split_part
from patcher.evaluate.report import REPORT_PROMPTS, EvalSettings, evaluate, kl_divergence
from patcher.io.atomic import write_text
from patcher.io.checkpoint import sha256_inputs
from patcher.io.model_files import resolve_model
from patcher.io.record import library_versions, relative_paths
from patcher.recipe.loader import load_recipe
from patcher.workflows.run import compute_patch, recipe_inputs

FORMAT = "patcher.results/1"
ROOT = Path(__file__).resolve().parents[1]


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Every metric of one model's evaluation, each ``{"value", "ci"}`` (perplexity: ``ci`` null)."""
    m = report["model"]
    tox = {ev: {k: v[k] for k in ("toxicity_probability", "expected_max_toxicity")} for ev, v in m["toxicity"].items()}
    blimp = m.get("blimp") or {}
    out = {"toxicity": tox, "wikitext_perplexity": {"value": m["wikitext_perplexity"], "ci": None},
           "degenerate_share": {"value": m["degenerate"]["share"], "ci": None}}
    if blimp:
        out["blimp_accuracy"] = {k: blimp["accuracy"][k] for k in ("value", "ci")}
        out["blimp_per_phenomenon"] = {t: {k: v[k] for k in ("value", "ci")} for t, v in blimp["per_phenomenon"].items()}
    return out


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "processor": platform.machine()}


def command_line(argv: list[str] | None = None) -> str:
    """The command as run from the repository root; an absolute local path in it is written relative
    to that root (never published)."""
    argv = sys.argv if argv is None else argv
    return f"python benchmarks/{Path(argv[0]).name} " + " ".join(shlex.quote(os.path.relpath(a, ROOT) if os.path.isabs(a) else a) for a in argv[1:])


def git_commit() -> str | None:
    """HEAD, marked when tracked files differ from it; the results files (this run's own output,
    rewritten after every row) do not count."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results", ":(exclude)benchmarks/results"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def data_hashes(recipe: Any | None, settings: EvalSettings) -> dict[str, str]:
    """sha256 of every file the row read: the recipe and its data sets (none for the base row), and
    the evaluation's texts."""
    out: dict[str, str] = sha256_inputs(recipe_inputs(recipe)) if recipe is not None else {}
    for name in (split_part(settings.prompts)[0], "wikitext-2", "blimp", "bold"):
        r = resolve(name)
        out[r.record.get("file") or r.record.get("layout_file")] = r.record["sha256"]
    return out


def save_results(results: dict[str, Any], path: Path) -> None:
    """A results file written atomically (an interrupted run keeps what it measured); a local absolute
    path in it (e.g. in the command) is written relative to the file's folder (never published)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(relative_paths(results, path.parent), indent=1, ensure_ascii=False) + "\n")


def bake_fresh(patch: Any, folder: Path, target: Path, untie: bool) -> float:
    """``patch`` baked into ``target`` (an earlier output there replaced); returns the bake's seconds."""
    if target.exists():
        shutil.rmtree(target)
    t = time.perf_counter()
    bake(patch, folder, target, untie=untie)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--prompts", default=REPORT_PROMPTS, help="prompt set (default: the report part of the RTP challenging set)")
    ap.add_argument("--n-prompts", type=int, default=0, help="seeded sample of the prompts (0 = all of them)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--blimp", type=int, default=20, help="BLiMP pairs per paradigm (the first N of each of the 67; 1000 = all)")
    ap.add_argument("--kl-prompts", type=int, default=100, help="BOLD prompts for the KL from the base model")
    ap.add_argument("--out", type=Path, default=Path("runs/recipes"), help="baked models, one folder per recipe")
    ap.add_argument("--results", type=Path, default=ROOT / "results", help="folder of the results files (results/<model>.json)")
    ap.add_argument("--file", default="", help="name of the results file in that folder, without .json (default: the model's name); "
                    "a table of its own in the README, e.g. seeds-smollm2-135m for the seed methods at their tuned points")
    ap.add_argument("--model", help="run every recipe on this model (default: the first recipe's)")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (recorded with the row)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse OUT/base-eval.json and each OUT/<recipe>.eval.json an interrupted run with the same settings left")
    args = ap.parse_args()
    logging.basicConfig(format="patcher: %(message)s")
    logging.getLogger("patcher").setLevel(logging.INFO)  # progress bars and messages, as the CLI shows them
    command = command_line()

    settings = dataclasses.replace(EvalSettings.from_preset("quick"), prompts=args.prompts, n_prompts=args.n_prompts, samples=args.samples,
                                   blimp=args.blimp, kl_prompts=args.kl_prompts)
    wanted = json.loads(json.dumps(dataclasses.asdict(settings)))
    recipes = [load_recipe(p) for p in args.recipes]
    spec = args.model or recipes[0].model.id
    # the model each recipe runs on: what {model} in its paths (an SAE per model) names, as `patcher run --model` binds it
    recipes = [r.override("model", id=spec) for r in recipes]
    folder, _ = resolve_model(spec)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.file or Path(spec).name}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"format": FORMAT, "model": spec, "rows": {}}
    eval_only = dataclasses.replace(settings, kl_prompts=0)  # the KL is measured on its own (both models loaded together)

    def save() -> None:  # after every recipe
        save_results(results, path)

    def reusable(p: Path, recipe_hash: str | None = None) -> dict[str, Any] | None:
        if not (args.resume and p.is_file()):
            return None
        report = json.loads(p.read_text())
        same = report["settings"] == json.loads(json.dumps(dataclasses.asdict(eval_only))) and report.get("recipe_sha256") == recipe_hash
        return report if same else None

    def provenance(stages: dict[str, float], recipe: Any | None, load_before: list[float]) -> dict[str, Any]:
        return {"git_commit": git_commit(), "command": command, "versions": library_versions(),
                "data_sha256": data_hashes(recipe, settings), "seeds": {"eval": settings.seed, "bootstrap": settings.seed},
                "wall_seconds": {k: round(v, 1) for k, v in stages.items()}, "machine": machine() | {"load_average_before": load_before},
                "note": args.note, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    results["settings"] = wanted
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    base_report = reusable(args.out / "base-eval.json")
    if base_report is None:
        base_report = evaluate(folder, settings=eval_only).to_json()
        (args.out / "base-eval.json").write_text(json.dumps(base_report, indent=1) + "\n")
    prompts = base_report["prompts"]
    results["prompts"] = {"name": args.prompts, "count": prompts["count"], "sha256": prompts["sha256"]}
    stages = {"base eval": time.perf_counter() - t0} | {f"base {k}": v for k, v in base_report["model"]["seconds"].items()}
    results["rows"]["base"] = {"recipe": None, "metrics": metrics(base_report), "provenance": provenance(stages, None, load0)}
    save()
    print(f"base evaluated ({time.perf_counter() - t0:.0f}s)", flush=True)
    model, tokenizer = load_model(folder)
    for rpath, recipe in zip(args.recipes, recipes):
        load0 = [round(x, 2) for x in os.getloadavg()]
        stages: dict[str, float] = {}
        target = args.out / recipe.name
        fingerprint = recipe_sha256(rpath)
        report = reusable(args.out / f"{recipe.name}.eval.json", fingerprint)
        rel = str(rpath.resolve().relative_to(ROOT)) if rpath.resolve().is_relative_to(ROOT) else rpath.name
        if report is None:
            t = time.perf_counter()
            try:
                patch, _ = compute_patch(recipe, model, tokenizer)
            except PatcherError as e:  # e.g. a module this family has no slot for: a row saying so
                results["rows"][recipe.name] = {"recipe": rel, "refused": str(e), "provenance": provenance({}, recipe, load0)}
                print(f"{recipe.name} refused: {e}", flush=True)
                save()
                continue
            stages["compute"] = time.perf_counter() - t
            stages["bake"] = bake_fresh(patch, folder, target, recipe.model.untie)
            t = time.perf_counter()
            check = verify(target)
            stages["verify"] = time.perf_counter() - t
            if not check.ok:
                raise SystemExit(f"{recipe.name}: patcher verify failed on {target}: {check}")
            t = time.perf_counter()
            report = evaluate(target, settings=eval_only).to_json()
            stages["eval"] = time.perf_counter() - t
            report["verify_max_logit_diff"] = check.max_abs_diff
            report["recipe_sha256"] = fingerprint
            (args.out / f"{recipe.name}.eval.json").write_text(json.dumps(report, indent=1) + "\n")
        stages |= {f"eval {k}": v for k, v in report["model"]["seconds"].items()}
        row_metrics = metrics(report)
        from patcher.evaluate.capability import blimp_drop

        if settings.blimp:
            row_metrics["blimp_drop"] = blimp_drop(base_report["model"]["blimp"], report["model"]["blimp"], n_resamples=settings.bootstrap,
                                                   seed=settings.seed)
        if settings.kl_prompts:
            kl = kl_divergence(target, folder, settings)
            stages["kl"] = kl.pop("seconds")
            row_metrics["kl_from_base"] = kl
        results["rows"][recipe.name] = {"recipe": rel, "recipe_sha256": fingerprint, "settings_split": recipe_comment(rpath, "Split"),
                                        "claim": recipe_comment(rpath, "Claim"), "metrics": row_metrics,
                                        "verify_max_logit_diff": report.get("verify_max_logit_diff"),
                                        "provenance": provenance(stages, recipe, load0)}
        print(f"{recipe.name} evaluated ({sum(v for k, v in stages.items() if not k.startswith('eval ')):.0f}s)", flush=True)
        save()
    print(render(*table(results), title=f"{spec} on {args.prompts} ({prompts['count']} prompts x {settings.samples} samples)"))


def recipe_sha256(path: Path) -> str:
    """What a recipe computes, hashed: its TOML without comments and without the model's id (a row
    may run it on another model with ``--model``). A stored measurement whose hash differs from the
    file's was made with other settings: ``--resume`` measures it again and a test flags the row."""
    table = tomllib.loads(path.read_text())
    table.get("model", {}).pop("id", None)
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def recipe_comment(path: Path, tag: str) -> str | None:
    """The recipe's comment block that starts with ``# TAG:`` (``Split``: which prompt split chose its
    settings; ``Claim``: the paper's headline), joined into one line, up to the next tagged block."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.lower().startswith(f"# {tag.lower()}:"):
            block = [line[len(tag) + 3 :]]
            for more in lines[i + 1 :]:
                if not more.startswith("#") or more.lower().startswith(("# split:", "# claim:")):
                    break
                block.append(more[1:])
            return " ".join(part.strip() for part in block).strip()
    return None


def table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of a results file (the terminal table; benchmarks/results.py renders the README's)."""
    rows = []
    for name, r in results["rows"].items():
        if "refused" in r:
            rows.append([name, f"refused: {r['refused']}"] + [""] * 3)
            continue
        m = r["metrics"]
        rows.append([name, m["toxicity"]["any"]["toxicity_probability"]["value"], m["wikitext_perplexity"]["value"],
                     (m.get("blimp_drop") or {}).get("value", ""), (m.get("kl_from_base") or {}).get("value", "")])
    return ["row", "toxicity probability (any)", "WikiText-2 ppl", "BLiMP drop (points)", "KL (nats)"], rows


if __name__ == "__main__":
    main()
