"""Quantized detox that holds (issue 26): the file a user serves, measured the way the float model is.

    python benchmarks/gguf_detox.py --model smollm2-135m [--patched runs/recipes/project-stack] \
        [--recipe recipes/project-stack.toml] [--outtypes f16,q8_0] [--n-prompts 300] [--samples 5]

For one embedded model: the recipe's baked output (``--patched``: a folder ``benchmarks/recipes.py``
or ``patcher run`` baked; without it the recipe is run here) and the base model baked with an empty
patch (the same weights through the same bake and export), each exported to GGUF at every
``--outtypes`` type by ``patcher export`` (llama.cpp's converter). Then, on one prompt sample (the
``report`` part of the RTP challenging set, seeded, the quick preset's sampling):

- the float model: the baked safetensors in transformers against the base model (``patcher eval``);
- each type: the patched GGUF against the base GGUF, both generated in llama.cpp.

The target (f32, f16, bf16 and q8_0; the 4- and 5-bit types have none, their interval check is
shown): the patched GGUF's toxicity probability lies inside the float patched model's 95% interval
by every evaluator; the reduction against the base GGUF of the same type is printed. Beside
it, the paired difference (GGUF minus float, prompt by prompt, bootstrap 95% interval over prompts):
whether the two estimates differ by more than their sampling noise.
llama.cpp draws from its own random stream, so GGUF samples are not the transformers draws: the
comparison is between estimates, each with its interval. Writes ``benchmarks/results/gguf-detox-MODEL.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from patcher import Patch, bake
from patcher.core.table import render
from patcher.evaluate.metrics import bootstrap_ci, per_prompt
from patcher.evaluate.report import REPORT_PROMPTS, EvalSettings, evaluate
from patcher.io.atomic import write_text
from patcher.io.model_files import resolve_model
from patcher.io.record import library_versions, relative_paths
from patcher.publish.gguf import CONVERTER_TYPES, default_name, export_gguf
from patcher.recipe.loader import load_recipe
from patcher.workflows.run import run
from recipes import command_line, git_commit, machine  # benchmarks/recipes.py: the same provenance fields

ROOT = Path(__file__).resolve().parents[1]
RATE = "toxicity_probability"
# the issue sets its target for the converter's own types; the 4- and 5-bit ones are measured against their own base only
TARGET_TYPES = CONVERTER_TYPES


def rates(report: dict[str, Any], which: str) -> dict[str, dict[str, Any]]:
    """Toxicity probability (value and 95% interval) per evaluator of ``which`` (model / baseline)."""
    return {ev: v[RATE] for ev, v in report[which]["toxicity"].items()}


def cell(m: dict[str, Any]) -> str:
    return f"{m['value']:.3f} [{m['ci'][0]:.2f}, {m['ci'][1]:.2f}]"


def within(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
    lo, hi = outer["ci"]
    return lo <= inner["value"] <= hi


def paired_difference(gguf: dict[str, np.ndarray], floating: dict[str, np.ndarray], threshold: float, n_resamples: int,
                      seed: int) -> dict[str, dict[str, Any]]:
    """Per evaluator, the GGUF's toxicity probability minus the float model's, prompt by prompt (the
    same prompts in the same order), with a bootstrap 95% interval over prompts: two estimates that
    each carry sampling noise are compared by their difference, not one's point against the other's
    interval (which two draws of the same model miss about one time in six)."""
    out = {}
    for ev, s in floating.items():
        d = per_prompt(gguf[ev], threshold)[RATE] - per_prompt(s, threshold)[RATE]
        lo, hi = bootstrap_ci(d, n_resamples, seed)
        out[ev] = {"value": float(d.mean()), "ci": [lo, hi], "contains_zero": bool(lo <= 0 <= hi)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes/project-stack.toml")
    ap.add_argument("--patched", type=Path, help="the recipe's baked output for this model (default: run the recipe here)")
    ap.add_argument("--outtypes", default="f16,q8_0")
    ap.add_argument("--prompts", default=REPORT_PROMPTS)
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/gguf-detox"), help="work folder (baked base, exports)")
    ap.add_argument("--json", type=Path, help="default: benchmarks/results/gguf-detox-MODEL.json")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    args = ap.parse_args()
    logging.basicConfig(format="patcher: %(message)s")
    logging.getLogger("patcher").setLevel(logging.INFO)
    command = command_line()
    folder, _ = resolve_model(args.model)
    work = args.out / Path(args.model).name
    work.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    load0 = [round(x, 2) for x in os.getloadavg()]

    t = time.perf_counter()
    patched = args.patched
    if patched is None:
        patched = work / "patched"
        if not patched.is_dir():
            run(load_recipe(args.recipe).override("model", id=args.model), out=patched, run_eval=False)
    base = work / "base"
    if not base.is_dir():
        bake(Patch([], {"method": "none", "note": "benchmarks/gguf_detox.py: the base weights through the same bake and export"}), args.model, base)
    stages["patch and bake"] = time.perf_counter() - t
    outtypes = [o.strip() for o in args.outtypes.split(",") if o.strip()]
    for kind in outtypes:
        for f in (patched, base):
            if not (f / default_name(kind)).is_file():
                t = time.perf_counter()
                export_gguf(f, outtype=kind)
                stages[f"export {f.name} {kind}"] = time.perf_counter() - t

    settings = EvalSettings.from_preset("quick", prompts=args.prompts, n_prompts=args.n_prompts, samples=args.samples, ppl_tokens=0,
                                        fluency=False)
    variants: dict[str, dict[str, Any]] = {}
    t = time.perf_counter()
    float_report = evaluate(patched, baseline=folder, settings=settings)
    report = float_report.to_json()
    stages["eval float"] = time.perf_counter() - t
    variants["float"] = {"base": rates(report, "baseline"), "patched": rates(report, "model")}
    prompts = report["prompts"]
    for kind in outtypes:
        t = time.perf_counter()
        gguf_report = evaluate(patched / default_name(kind), baseline=base / default_name(kind), settings=settings)
        report = gguf_report.to_json()
        stages[f"eval {kind}"] = time.perf_counter() - t
        variants[kind] = {"base": rates(report, "baseline"), "patched": rates(report, "model"),
                          "paired_difference_from_float": paired_difference(gguf_report.model.scores, float_report.model.scores,
                                                                            settings.threshold, settings.bootstrap, settings.seed)}

    float_patched = variants["float"]["patched"]
    targeted = [k for k in outtypes if k in TARGET_TYPES]
    for kind in outtypes:
        v = variants[kind]
        v["patched_within_float_interval"] = {ev: within(v["patched"][ev], float_patched[ev]) for ev in float_patched}
        v["reduction"] = {ev: (v["base"][ev]["value"] / v["patched"][ev]["value"] if v["patched"][ev]["value"] else None) for ev in v["base"]}
    result = {
        "kind": "gguf-detox", "model": args.model, "recipe": os.path.relpath(args.recipe.resolve(), ROOT),
        "settings": dataclasses.asdict(settings),
        "prompts": {"name": args.prompts, "count": prompts["count"], "sha256": prompts["sha256"]},
        "variants": variants,
        "target": f"each patched GGUF of a type in {', '.join(TARGET_TYPES)} inside the float patched model's 95% interval by every evaluator",
        "paired": "each patched GGUF's toxicity probability minus the float patched model's, per prompt, 95% bootstrap interval over prompts",
        # None: no type with a target was measured
        "met": all(all(variants[k]["patched_within_float_interval"].values()) for k in targeted) if targeted else None,
        "provenance": {"git_commit": git_commit(), "command": command, "versions": library_versions(),
                       "wall_seconds": {k: round(v, 1) for k, v in stages.items()},
                       "machine": machine() | {"load_average_before": load0}, "note": args.note,
                       "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    out = args.json or ROOT / "benchmarks" / "results" / f"gguf-detox-{Path(args.model).name}.json"
    write_text(out, json.dumps(relative_paths(result, out.parent), indent=1) + "\n")
    evaluators = list(float_patched)
    rows = []
    for name, v in variants.items():
        inside = "" if name == "float" else "yes" if all(v["patched_within_float_interval"].values()) else "no"
        rows.append([name, *(f"{cell(v['base'][ev])} -> {cell(v['patched'][ev])}" for ev in evaluators),
                     inside if name == "float" or name in TARGET_TYPES else f"{inside} (no target)"])
    for kind in outtypes:
        pd = variants[kind]["paired_difference_from_float"]
        print(f"{kind} - float, paired by prompt: " + ", ".join(f"{ev} {v['value']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for ev, v in pd.items()))
    print(render(["model", *evaluators, "inside float interval"], rows,
                 title=f"{args.model}: toxicity probability base -> patched, {prompts['count']} prompts x {args.samples} samples"))
    print(f"wrote {out}")
    return 1 if result["met"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
