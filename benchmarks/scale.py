"""Layer-by-layer collection on a 1.6B-parameter model: peak memory against the whole-model path.

    python benchmarks/scale.py [--texts 32] [--max-tokens 32] [--layers 24] [--json out.json]

One run: a random-weight Llama-family model (hidden 2048, MLP 8192, 24 layers, GQA 16/8 heads,
vocab 32000: 1.64 B parameters) is written as bf16 safetensors shards to a temporary folder,
tensor by tensor (built on the meta device; no float32 copy and never the whole model in memory).
Then two child processes run AURA's collection (every MLP linear's max-pooled units) over the same
calibration texts in bf16: one loads the whole model (`load_model`), one goes layer by layer
(`--sequential`). Each child reports its peak RSS above its own baseline (`resource.getrusage`
after imports, before loading), and the two pooled-value matrices are compared.

The bound printed beside them is what `--sequential` promises: one decoder layer + the calibration
set's hidden states + 1 GB (interpreter, tokenizer, embeddings, pooled values, allocator slack).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOXIC = ["idiot", "stupid", "moron", "fool", "jerk", "loser"]
NEUTRAL = ["friend", "garden", "morning", "river", "music", "window"]


def _config(layers: int):
    import transformers as T

    return T.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)


def _tokenizer():
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_tokenizer  # character-level, offline; ids < 96 are valid in any vocab

    return tiny_tokenizer()


def write_model(folder: Path, layers: int, shard_bytes: int = 1 << 30) -> tuple[int, int]:
    """Random bf16 shards + index + config + tokenizer; returns (parameters, bytes of one layer)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = _config(layers)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shapes = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    del skeleton
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, n_shards, params = 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, n_shards
        name = f"model-{n_shards + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = name
        shard, size, n_shards = {}, 0, n_shards + 1

    folder.mkdir(parents=True, exist_ok=True)
    for name, shape in shapes:
        if len(shape) == 1:  # norms
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(1.0 / math.sqrt(shape[-1]))
        params += t.numel()
        if size and size + t.numel() * 2 > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    # shard names need the total: rename model-0000k.safetensors -> model-0000k-of-0000n.safetensors
    final = {}
    for k in range(1, n_shards + 1):
        old = f"model-{k:05d}.safetensors"
        new = f"model-{k:05d}-of-{n_shards:05d}.safetensors"
        os.rename(folder / old, folder / new)
        final[old] = new
    index = {"metadata": {"total_size": params * 2}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    layer = sum(math.prod(s) for n, s in shapes if n.startswith("model.layers.0.")) * 2
    return params, layer


def texts(n: int) -> tuple[list[str], list[int]]:
    out, labels = [], []
    for i in range(n):
        toxic = i % 2 == 0
        word = (TOXIC if toxic else NEUTRAL)[i % 6]
        out.append(f"{'you are such a' if toxic else 'we walked by the'} {word} again, number {i} of them all")
        labels.append(int(toxic))
    return out, labels


def child(mode: str, folder: str, n_texts: int, max_tokens: int, batch_size: int, out: str) -> None:
    import torch

    from patcher.collect.collector import Collector
    from patcher.collect.layerwise import load_layerwise
    from patcher.collect.parallel import ScaleOptions
    from patcher.core.models import load_model
    from patcher.methods.aura import AuraSettings, statistic

    torch.set_num_threads(os.cpu_count() or 1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if mode == "sequential":
        model, tok = load_layerwise(folder, "bfloat16")
    else:
        model, tok = load_model(Path(folder), "bfloat16")
    t_load = time.perf_counter() - t0
    stat = statistic(model.config, AuraSettings())
    c = Collector(model, tok, batch_size=batch_size, max_tokens=max_tokens)
    if mode == "sequential":
        c.options = ScaleOptions(sequential=True, checkpoint_every=0)
    xs, ys = texts(n_texts)
    hidden_bytes = sum(b.input_ids.numel() for b in c.batches(xs, ys)) * model.config.hidden_size * 2
    t1 = time.perf_counter()
    c.run([stat], xs, ys)
    t_collect = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({m: stat.matrix(m)[0] for m in stat.values}, out + ".pt")
    Path(out).write_text(json.dumps({"mode": mode, "baseline": base, "peak": peak, "above": peak - base, "load_s": t_load,
                                     "collect_s": t_collect, "hidden_bytes": hidden_bytes}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "write":
            params, layer = write_model(Path(args.child[1]), args.layers)
            Path(args.out).write_text(json.dumps([params, layer]))
        else:
            child(args.child[0], args.child[1], args.texts, args.max_tokens, args.batch_size, args.out)
        return
    # This process stays small (no torch until the children are done): ru_maxrss is inherited
    # across fork + exec, so a big parent would raise every child's baseline.
    with tempfile.TemporaryDirectory(prefix="patcher-scale-") as tmp:
        folder = Path(tmp) / "model"
        env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
        t0 = time.perf_counter()
        info = Path(tmp) / "write.json"
        subprocess.run([sys.executable, __file__, "--child", "write", str(folder), "--out", str(info), "--layers", str(args.layers)], check=True, env=env)
        params, layer = json.loads(info.read_text())
        t_write = time.perf_counter() - t0
        shards = sorted(folder.glob("*.safetensors"))
        print(f"wrote {params / 1e9:.2f} B parameters (bf16, {len(shards)} shards, {sum(p.stat().st_size for p in shards) / 1e9:.2f} GB) "
              f"in {t_write:.0f} s; one layer = {layer / 1e6:.0f} MB", flush=True)
        results = {}
        for mode in ("sequential", "whole"):
            out = str(Path(tmp) / f"{mode}.json")
            cmd = [sys.executable, __file__, "--child", mode, str(folder), "--out", out, "--texts", str(args.texts),
                   "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size)]
            subprocess.run(cmd, check=True, env=env)
            results[mode] = json.loads(Path(out).read_text())
        import torch

        from patcher.core.table import render

        a = torch.load(Path(tmp) / "sequential.json.pt", weights_only=True)
        b = torch.load(Path(tmp) / "whole.json.pt", weights_only=True)
        diff = max((a[m].float() - b[m].float()).abs().max().item() for m in a)
    hidden = results["sequential"]["hidden_bytes"]
    bound = layer + hidden + 2**30
    rows = [[mode, round(r["above"] / 1e9, 3), round(r["load_s"], 1), round(r["collect_s"], 1)] for mode, r in results.items()]
    rows.append(["bound: layer + hidden states + 1 GB", round(bound / 1e9, 3), "", ""])
    print(render(["path", "peak RSS above baseline (GB)", "load s", "collect s"], rows,
                 title=f"AURA collection, {args.texts} texts x <= {args.max_tokens} tokens, bf16, 2 cores "
                       f"(hidden states {hidden / 1e6:.1f} MB; layer {layer / 1e6:.0f} MB)"))
    print(f"max |pooled value| difference, sequential vs whole model: {diff:.3g}")
    ok = results["sequential"]["above"] <= bound
    print(f"sequential peak {'within' if ok else 'ABOVE'} the bound; whole-model peak is "
          f"{results['whole']['above'] / max(results['sequential']['above'], 1):.1f}x the sequential one")
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "layer_bytes": layer, "bound": bound, "max_diff": diff, **results}, indent=2))


if __name__ == "__main__":
    main()
