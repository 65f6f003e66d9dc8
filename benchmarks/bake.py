"""Benchmark `patcher.bake` against a plain copy of the same checkpoint, in one run.

    python benchmarks/bake.py [--size-gb 2.0] [--workdir DIR] [--json FILE] [--repeats 3] [--keep]

1. Writes a random bf16 Llama checkpoint of at least ``--size-gb`` GiB (Llama-3.2-1B-like widths, as
   many layers as it takes), sharded at 500 MB in the Hugging Face layout (``model-0000k-of-0000n``
   shards + ``model.safetensors.index.json`` + a real ``LlamaConfig`` ``config.json``). Tensors are
   made one shard at a time, directly in bf16, so the builder never holds the model.
2. Saves a patch with a ``ScaleOutputs`` edit (random factors) on every layer's MLP down projection.
3. Warms the page cache by reading every source file once, runs ``--warmup`` untimed copy + bake
   rounds, then alternates, ``--repeats`` times,
   a plain copy (``shutil.copyfile`` per file, i.e. ``sendfile`` on Linux) and
   ``patcher.bake(patch, model, out)`` into the same folder on the same disk. Before
   each timed run the previous output is deleted and ``os.sync()`` flushes dirty pages (not timed), so
   both start from the same cache and writeback state; nothing is dropped from the page cache.
4. Every bake runs in a fresh child process that imports patcher, loads the patch, records its
   resident memory (VmRSS), resets the peak counter (``/proc/self/clear_refs``), bakes, and reads the
   peak (VmHWM; ``ru_maxrss`` if the reset is refused). Peak memory = peak - baseline, which counts
   resident file pages mapped by the process too.
5. Times sha256 of the source files on one thread (after each bake; the output has as many bytes):
   the bake must record every output file's sha256, so (hash + copy CPU) / cores is a floor on
   its time that no implementation beats, printed as ``time_ratio_floor``.
6. Prints bake/copy time ratio (target <= 1.3) and peak memory / largest shard (target <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30
SHARD_MAX = 500_000_000  # bytes, like save_pretrained(max_shard_size="500MB")
# Llama-3.2-1B-like widths (untied head, 32k vocab); layers are added until the size is reached.
WIDTHS = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)


# --------------------------------------------------------------------------------------- checkpoint
def layer_shapes(i: int, hidden: int, inter: int, heads: int, kv_heads: int) -> list[tuple[str, tuple[int, ...]]]:
    hd = hidden // heads
    p = f"model.layers.{i}"
    return [
        (f"{p}.input_layernorm.weight", (hidden,)),
        (f"{p}.self_attn.q_proj.weight", (heads * hd, hidden)),
        (f"{p}.self_attn.k_proj.weight", (kv_heads * hd, hidden)),
        (f"{p}.self_attn.v_proj.weight", (kv_heads * hd, hidden)),
        (f"{p}.self_attn.o_proj.weight", (hidden, heads * hd)),
        (f"{p}.post_attention_layernorm.weight", (hidden,)),
        (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
        (f"{p}.mlp.up_proj.weight", (inter, hidden)),
        (f"{p}.mlp.down_proj.weight", (hidden, inter)),
    ]


def build_checkpoint(folder: Path, size_bytes: int, seed: int = 0) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    w = WIDTHS
    h, v = w["hidden_size"], w["vocab_size"]
    per_layer = 2 * sum(math.prod(s) for _, s in layer_shapes(0, h, w["intermediate_size"], w["num_attention_heads"], w["num_key_value_heads"]))
    fixed = 2 * (2 * v * h + h)  # embed + lm_head + final norm
    layers = max(1, math.ceil((size_bytes - fixed) / per_layer))
    config = LlamaConfig(**w, num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)

    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(layers):
        shapes += layer_shapes(i, h, w["intermediate_size"], w["num_attention_heads"], w["num_key_value_heads"])
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:  # save_pretrained's greedy split
        nbytes = 2 * math.prod(shape)
        if groups[-1] and used + nbytes > SHARD_MAX:
            groups.append([])
            used = 0
        groups[-1].append((name, shape))
        used += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 0.02)
            weight_map[name] = shard
            total += tensors[name].nbytes
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"layers": layers, "shards": len(groups), "tensor_bytes": total}


def build_patch(model_dir: Path, patch_dir: Path, seed: int = 1) -> int:
    import torch

    from patcher import Patch, ScaleOutputs
    from patcher.core.arch import arch_for, num_layers

    config = json.loads((model_dir / "config.json").read_text())
    arch = arch_for(config)
    gen = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]  # out units of the down projection
    edits = [
        ScaleOutputs(arch.module("mlp_out", i), arch.layout, factors=0.5 + torch.rand(hidden, generator=gen))
        for i in range(num_layers(config))
    ]
    Patch(edits, {"method": "benchmark"}).save(patch_dir)
    return len(edits)


# ---------------------------------------------------------------------------------------- timing
def shard_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def warm_cache(folder: Path) -> float:
    """Read every file once so that the source sits in the page cache for every timed run."""
    buf = bytearray(64 << 20)
    t = time.perf_counter()
    for p in shard_files(folder):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t


def reset_out(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.sync()


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def plain_copy(src: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, kernel time included)."""
    reset_out(out)
    t, c = time.perf_counter(), cpu_seconds()
    out.mkdir()
    for p in shard_files(src):
        shutil.copyfile(p, out / p.name)
    return time.perf_counter() - t, cpu_seconds() - c


def hash_only(src: Path) -> float:
    """Wall seconds to sha256 every source file on one thread: what recording the output's hashes
    costs at the least, since the output has as many bytes."""
    from patcher.io.checkpoint import sha256_file

    t = time.perf_counter()
    for p in shard_files(src):
        sha256_file(p)
    return time.perf_counter() - t


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def child_bake(patch_dir: str, model_dir: str, out: str) -> None:
    """Run in a fresh process: bake once, print time and memory as one JSON line."""
    import gc

    import patcher
    from patcher import Patch

    patch = Patch.load(patch_dir)
    gc.collect()
    base_kb = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    t, c = time.perf_counter(), cpu_seconds()
    patcher.bake(patch, model_dir, out)
    seconds, cpu = time.perf_counter() - t, cpu_seconds() - c
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "baseline_bytes": base_kb * 1024, "peak_bytes": peak_kb * 1024,
                      "hwm_reset": reset, "version": getattr(patcher, "__version__", None)}))


def timed_bake(patch_dir: Path, model_dir: Path, out: Path) -> dict:
    reset_out(out)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", str(patch_dir), str(model_dir), str(out)],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bake child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GiB (default 2)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a new folder under /tmp)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--repeats", type=int, default=3, help="alternating copy/bake runs (median taken)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed copy + bake rounds first (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_bake(*args.child)
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="patcher-bench-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, patch_dir, copy_out, bake_out = work / "model", work / "patch", work / "copy", work / "baked"
    try:
        t = time.perf_counter()
        if (model_dir / "model.safetensors.index.json").is_file() and args.workdir:
            info = {"reused": True}
        else:
            shutil.rmtree(model_dir, ignore_errors=True)
            info = build_checkpoint(model_dir, int(args.size_gb * GIB))
        build_s = time.perf_counter() - t
        n_edits = build_patch(model_dir, patch_dir)
        files = [p for p in shard_files(model_dir) if p.suffix == ".safetensors"]
        total = sum(p.stat().st_size for p in shard_files(model_dir))
        largest = max(p.stat().st_size for p in files)
        print(f"checkpoint {model_dir}: {total / 1e9:.2f} GB in {len(files)} shards (largest {largest / 1e9:.3f} GB), "
              f"{info}, built in {build_s:.1f}s; patch: {n_edits} ScaleOutputs edits on mlp.down_proj")
        warm_s = warm_cache(model_dir)
        print(f"page cache warmed: read every source file once ({warm_s:.1f}s), then {args.warmup} untimed copy + bake "
              "round(s); outputs deleted + os.sync() before each timed run")

        for _ in range(args.warmup):  # untimed: first writes of a fresh VM/page cache are slower
            plain_copy(model_dir, copy_out)
            timed_bake(patch_dir, model_dir, bake_out)
        copies, bakes, hashes = [], [], []
        for r in range(args.repeats):
            copies.append(plain_copy(model_dir, copy_out))
            bakes.append(timed_bake(patch_dir, model_dir, bake_out))
            hashes.append(hash_only(model_dir))
            print(f"  run {r + 1}: copy {copies[-1][0]:.2f}s (cpu {copies[-1][1]:.2f}s), bake {bakes[-1]['seconds']:.2f}s "
                  f"(cpu {bakes[-1]['cpu_seconds']:.2f}s), bake peak +{(bakes[-1]['peak_bytes'] - bakes[-1]['baseline_bytes']) / 1e9:.3f} GB",
                  flush=True)
        reset_out(copy_out)
        reset_out(bake_out)

        copy_s = statistics.median(c[0] for c in copies)
        bake_s = statistics.median(b["seconds"] for b in bakes)
        hash_s = statistics.median(hashes)
        copy_cpu = statistics.median(c[1] for c in copies)
        bake_cpu = statistics.median(b["cpu_seconds"] for b in bakes)
        load = os.getloadavg()
        peak = max(b["peak_bytes"] - b["baseline_bytes"] for b in bakes)
        result = {
            "checkpoint_bytes": total,
            "shards": len(files),
            "largest_shard_bytes": largest,
            "edits": n_edits,
            "repeats": args.repeats,
            "copy_seconds": copy_s,
            "bake_seconds": bake_s,
            "copy_runs": [c[0] for c in copies],
            "bake_runs": [b["seconds"] for b in bakes],
            "sha256_only_seconds": hash_s,
            "copy_cpu_seconds": copy_cpu,
            "bake_cpu_seconds": bake_cpu,
            "cpus": os.cpu_count(),
            "load_average_1min_at_end": load[0],
            "copy_gb_per_s": total / copy_s / 1e9,
            "bake_gb_per_s": total / bake_s / 1e9,
            "bake_baseline_rss_bytes": statistics.median(b["baseline_bytes"] for b in bakes),
            "bake_peak_above_baseline_bytes": peak,
            "peak_reset_via_clear_refs": all(b["hwm_reset"] for b in bakes),
            "time_ratio": bake_s / copy_s,
            "cpu_ratio": bake_cpu / copy_cpu,
            "memory_ratio": peak / largest,
            # Recording the output's sha256 costs hash_s of CPU and copying costs about copy_s; with
            # both spread over every core, no bake that records hashes can beat this ratio.
            "time_ratio_floor": max(1.0, (hash_s + copy_cpu) / (os.cpu_count() or 1) / copy_s),
            "targets": {"time_ratio": 1.3, "memory_ratio": 1.5},
        }
        rows = [
            ("checkpoint", f"{total / 1e9:.2f} GB", f"{len(files)} shards, largest {largest / 1e9:.3f} GB"),
            ("plain copy (median)", f"{copy_s:.2f} s", f"{result['copy_gb_per_s']:.2f} GB/s, cpu {copy_cpu:.2f} s"),
            ("bake (median)", f"{bake_s:.2f} s", f"{result['bake_gb_per_s']:.2f} GB/s, cpu {bake_cpu:.2f} s (all threads)"),
            ("bake peak memory", f"{peak / 1e9:.3f} GB", f"above baseline RSS {result['bake_baseline_rss_bytes'] / 1e9:.3f} GB"),
            ("bake/copy time ratio", f"{result['time_ratio']:.2f}", "target <= 1.3 " + ("OK" if result["time_ratio"] <= 1.3 else "MISSED")),
            ("sha256 alone / copy", f"{hash_s / copy_s:.2f}", f"one thread; floor for any hash-recording bake on "
             f"{os.cpu_count()} cpus: {result['time_ratio_floor']:.2f}"),
            ("bake/copy cpu ratio", f"{result['cpu_ratio']:.2f}", f"{os.cpu_count()} cpus, load average {load[0]:.1f}"),
            ("peak memory / largest shard", f"{result['memory_ratio']:.2f}", "target <= 1.5 " + ("OK" if result["memory_ratio"] <= 1.5 else "MISSED")),
        ]
        width = max(len(r[0]) for r in rows)
        print()
        for name, value, note in rows:
            print(f"{name:<{width}}  {value:>10}  {note}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.keep:  # a --workdir given by the user loses only what this script put there
            for d in (model_dir, patch_dir, copy_out, bake_out) if args.workdir else (work,):
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
