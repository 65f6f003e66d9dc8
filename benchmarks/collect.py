"""Collection throughput of every method, and a collection beside a competing PyTorch job.

    python benchmarks/collect.py [--model smollm2-135m] [--n-per-class 500] [--repeats 2] [--no-contention]

1. For each method's shipped recipe (first step), the method's own ``collect`` (its statistics,
   hooks and pooling) against plain forward passes over the same batches; both skip the LM head
   beyond the last position (`logits_to_keep=1`), so the ratio measures what hooks and statistics
   cost. Circuit pruning trains masks instead of collecting and is not in this table.
2. AUROC time (AURA's) against the forward passes' time.
3. `patcher compute recipes/aura.toml` end to end, alone and beside a 2-thread PyTorch matmul loop
   in another process (the competitor keeps torch's default spinning OpenMP wait policy): the
   slowdown a user sees on a shared machine.

Targets: throughput >= 0.85x plain forward passes for every method (issue 12); AUROC time below
the forward time (issue 4); slowdown beside the competitor <= 2.2x (issue 12).

    python benchmarks/collect.py --transport [--modules mlp_out] [--repeats 2]

measures instead what causal transport estimation costs (issue 16): `transport` with ``causal =
true`` (every layer's maps fitted on activations with the earlier maps applied, the calibration set
run one layer at a time) against one plain collection pass of the same modules' mean-pooled values
over the same batches (what ``causal = false`` collects). Target: at most 1.2x.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from patcher.collect.collector import Collector
from patcher.collect.statistics import PooledValues
from patcher.core.arch import arch_for, num_layers
from patcher.core.models import load_model
from patcher.core.table import render
from patcher.data.loaders import load_data
from patcher.edits.patch import Patch
from patcher.io.model_files import resolve_model
from patcher.methods import StepContext, get_method
from patcher.methods.transport import TransportSettings, stages
from patcher.recipe.loader import load_recipe
from patcher.recipe.settings import build

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("aura.toml", "project-meandiff.toml", "scale-neurons.toml", "transport-linear.toml")
COMPETITOR = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a = (a @ a).tanh()\n"


def plain_pass(model: Any, batches: list) -> float:
    """Seconds of plain forward passes (no hooks) over ``batches``."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def timed_collect(method: Any, ctx: StepContext, settings: Any) -> tuple[float, Any]:
    """Seconds of the method's own collection, and its statistics."""
    t0 = time.perf_counter()
    stats = method.collect(ctx, settings)
    return time.perf_counter() - t0, stats


def method_rows(model: Any, tok: Any, n_per_class: int, repeats: int) -> tuple[list[dict], Any]:
    """Per recipe: plain forward time and the method's collect time over the same batches."""
    rows, aura_stats = [], None
    for name in RECIPES:
        recipe = load_recipe(ROOT / "recipes" / name)
        step = recipe.steps[0]
        method = get_method(step.method)
        settings = build(method.settings, step.settings, name, "step[1]")
        data = load_data(dataclasses.replace(step.data or recipe.data, n_per_class=n_per_class), tok)
        collector = Collector(model, tok, batch_size=recipe.collect.batch_size, max_tokens=recipe.data.max_tokens)
        batches = list(collector.batches(data.texts, data.labels))
        ctx = StepContext(model, tok, collector, data, Patch([]))
        plain_pass(model, batches)  # warm-up
        plain_t, collect_t = [], []
        for _ in range(repeats):  # alternate so drift hits both equally
            plain_t.append(plain_pass(model, batches))
            seconds, stats = timed_collect(method, ctx, settings)
            collect_t.append(seconds)
        if step.method == "aura":
            aura_stats = stats
        p, c = statistics.median(plain_t), statistics.median(collect_t)
        rows.append({"recipe": name, "method": step.method, "texts": len(data.texts), "plain_s": p, "collect_s": c, "throughput_ratio": p / c})
    return rows, aura_stats


def timed_compute(out: Path) -> float:
    """Seconds of `patcher compute recipes/aura.toml` in a fresh process (as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # patcher's own default, not the caller's
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "patcher.cli", "-q", "compute", str(ROOT / "recipes/aura.toml"), "--out", str(out), "--overwrite"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def contention() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        alone = timed_compute(Path(tmp) / "alone")
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        rival = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env)
        try:
            time.sleep(2)  # the competitor is busy before the collection starts
            beside = timed_compute(Path(tmp) / "beside")
        finally:
            rival.kill()
            rival.wait()
    return {"compute_alone_s": alone, "compute_beside_s": beside, "slowdown": beside / alone}


def transport_cost(args: argparse.Namespace) -> None:
    """Causal transport estimation time / one plain collection pass of the same statistics."""
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    folder, _ = resolve_model(args.model)
    model, tok = load_model(folder)
    data = load_data(dataclasses.replace(recipe.data, n_per_class=args.n_per_class), tok)
    collector = Collector(model, tok, batch_size=recipe.collect.batch_size, max_tokens=recipe.data.max_tokens)
    roles = tuple(args.modules.split(","))
    arch = arch_for(model.config)
    watches = [(m, "output") for i in range(num_layers(model.config)) for st in stages(arch, i, roles) for m in st]
    ctx = StepContext(model, tok, collector, data, Patch([]))
    settings = TransportSettings(modules=roles, causal=True)
    transport = get_method("transport")

    def timed(fn: Any) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
        fairer measure of the work done."""
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    def plain() -> None:
        collector.run([PooledValues(watches, how="mean")], data.texts, data.labels)

    def causal() -> None:
        transport.collect(ctx, settings)

    plain()  # warm-up
    plain_t, causal_t = [], []
    for _ in range(args.repeats):  # alternate so drift hits both equally
        plain_t.append(timed(plain))
        causal_t.append(timed(causal))
    p, c = statistics.median(t[0] for t in plain_t), statistics.median(t[0] for t in causal_t)
    pc, cc = statistics.median(t[1] for t in plain_t), statistics.median(t[1] for t in causal_t)
    result = {"model": args.model, "texts": len(data.texts), "modules": list(roles), "plain_collect_s": p, "causal_s": c,
              "ratio": c / p, "plain_cpu_s": pc, "causal_cpu_s": cc, "cpu_ratio": cc / pc,
              "plain_runs": plain_t, "causal_runs": causal_t, "threads": torch.get_num_threads()}
    print(render(["measure", "value"], [[k, round(v, 4) if isinstance(v, float) else v] for k, v in result.items()],
                 title="causal transport estimation vs one collection pass"))
    print(f"causal estimation / one plain collection pass = {c / p:.3f} wall, {cc / pc:.3f} CPU time (target <= 1.2)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-per-class", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-contention", action="store_true", help="skip the run beside a competing PyTorch job")
    ap.add_argument("--transport", action="store_true", help="causal transport estimation vs one plain collection pass")
    ap.add_argument("--modules", default="mlp_out", help="with --transport: comma-separated roles (attn_out, mlp_in, mlp_out)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/transport-linear.toml"), help="with --transport: the recipe whose data is used")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.transport:
        transport_cost(args)
        return
    torch.manual_seed(0)
    folder, _ = resolve_model(args.model)
    model, tok = load_model(folder)
    rows, aura = method_rows(model, tok, args.n_per_class, args.repeats)
    print(render(["recipe", "method", "texts", "plain s", "collect s", "throughput ratio"],
                 [[r["recipe"], r["method"], r["texts"], round(r["plain_s"], 2), round(r["collect_s"], 2), round(r["throughput_ratio"], 3)] for r in rows],
                 title=f"collection vs plain forward passes ({torch.get_num_threads()} threads; target >= 0.85)"))
    t0 = time.perf_counter()
    aura.auroc()
    auroc_t = time.perf_counter() - t0
    forward = next(r["plain_s"] for r in rows if r["method"] == "aura")
    print(f"AUROC time / forward time = {auroc_t / forward:.3f} (target < 1)")
    result: dict = {"model": args.model, "threads": torch.get_num_threads(), "methods": rows, "auroc_s": auroc_t, "auroc_over_forward": auroc_t / forward}
    if not args.no_contention:
        result["contention"] = c = contention()
        print(f"patcher compute aura.toml: alone {c['compute_alone_s']:.1f} s, beside a 2-thread PyTorch job {c['compute_beside_s']:.1f} s: "
              f"slowdown {c['slowdown']:.2f}x (target <= 2.2)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
