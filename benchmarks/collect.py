"""Collection throughput: AURA's hooked, pooled forward passes vs plain forward passes over the
same batches, and AUROC time vs forward time. Prints ratios measured in one run.

    python benchmarks/collect.py [--model smollm2-135m] [--n-per-class 500] [--repeats 2]

Both sides skip the LM head beyond the last position (`logits_to_keep=1`), so the ratio
measures what hooks and pooling cost.

Target (issue 4): collection throughput >= 0.85x plain forward passes; AUROC time below the
forward passes' time.

    python benchmarks/collect.py --transport [--modules mlp_out] [--repeats 2]

measures instead what causal transport estimation costs (issue 16): `transport` with ``causal =
true`` (every layer's maps fitted on activations with the earlier maps applied, the calibration set
run one layer at a time) against one plain collection pass of the same modules' mean-pooled values
over the same batches (what ``causal = false`` collects). Target: at most 1.2x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from patcher.checkpoint import resolve_model
from patcher.collect import Collector
from patcher.methods.aura import AuraSettings, statistic
from patcher.recipe import load_recipe
from patcher.run import load_data, load_model
from patcher.table import render

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/aura.toml"))
    ap.add_argument("--n-per-class", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--transport", action="store_true", help="causal transport estimation vs one plain collection pass")
    ap.add_argument("--modules", default="mlp_out", help="with --transport: comma-separated roles (attn_out, mlp_in, mlp_out)")
    args = ap.parse_args()
    if args.transport:
        return transport_cost(args)
    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    folder, _ = resolve_model(args.model)
    model, tok = load_model(folder)
    from dataclasses import replace

    data = load_data(replace(recipe.data, n_per_class=args.n_per_class), tok)
    collector = Collector(model, tok, batch_size=recipe.collect.batch_size, max_tokens=recipe.data.max_tokens, progress=False)
    batches = list(collector.batches(data.texts, data.labels))
    n_tokens = int(sum(b.attention_mask.sum() for b in batches))

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False, logits_to_keep=1)
        return time.perf_counter() - t0

    stat = None

    def hooked() -> float:
        nonlocal stat
        stat = statistic(model.config, AuraSettings())
        t0 = time.perf_counter()
        collector.run([stat], data.texts, data.labels)
        return time.perf_counter() - t0

    plain_t, hooked_t = [], []
    plain()  # warm-up
    for _ in range(args.repeats):  # alternate so drift hits both equally
        plain_t.append(plain())
        hooked_t.append(hooked())
    t0 = time.perf_counter()
    aurocs = stat.auroc()
    auroc_t = time.perf_counter() - t0
    units = sum(a.numel() for a in aurocs.values())
    p, h = statistics.median(plain_t), statistics.median(hooked_t)
    result = {
        "model": args.model, "texts": len(data.texts), "real_tokens": n_tokens, "units": units,
        "plain_s": p, "collect_s": h, "auroc_s": auroc_t,
        "throughput_ratio": p / h, "auroc_over_forward": auroc_t / p, "threads": torch.get_num_threads(),
    }
    print(render(["measure", "value"], [[k, round(v, 4) if isinstance(v, float) else v] for k, v in result.items()], title="collection benchmark"))
    print(f"collection throughput / plain forward = {p / h:.3f} (target >= 0.85); AUROC time / forward time = {auroc_t / p:.3f} (target < 1)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def transport_cost(args: argparse.Namespace) -> None:
    """Causal transport estimation time / one plain collection pass of the same statistics."""
    from dataclasses import replace

    from patcher.arch import arch_for, num_layers
    from patcher.collect import PooledValues
    from patcher.methods import StepContext
    from patcher.methods.transport import TransportSettings, collect, stages
    from patcher.patch import Patch

    torch.manual_seed(0)
    recipe = load_recipe(args.recipe)
    folder, _ = resolve_model(args.model)
    model, tok = load_model(folder)
    data = load_data(replace(recipe.data, n_per_class=args.n_per_class), tok)
    collector = Collector(model, tok, batch_size=recipe.collect.batch_size, max_tokens=recipe.data.max_tokens, progress=False)
    roles = tuple(args.modules.split(","))
    arch = arch_for(model.config)
    watches = [(m, "output") for i in range(num_layers(model.config)) for st in stages(arch, i, roles) for m in st]
    ctx = StepContext(model, tok, collector, data, Patch([]))
    settings = TransportSettings(modules=roles, causal=True)

    def timed(fn) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
        fairer measure of the work done."""
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0

    def plain() -> None:
        collector.run([PooledValues(watches, how="mean")], data.texts, data.labels)

    def causal() -> None:
        collect(ctx, settings)

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


if __name__ == "__main__":
    main()
