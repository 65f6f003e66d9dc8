"""Real scale: a random-weight checkpoint with a real model's shapes through every command.

    python benchmarks/scale.py --shape llama-2-7b [--work DIR] [--json out.json] [--keep] [--device cpu]
    python benchmarks/scale.py --shape tiny-100m          # the same pipeline in a minute (CI-sized)

1. **Write** a checkpoint as on the Hub: the shape's real ``config.json`` values, bf16 safetensors
   shards of at most 5 GB (``--shard-gb``) with ``model.safetensors.index.json``, a character-level
   tokenizer (ids below 96 are valid in every vocab). Weights are random normal with standard
   deviation ``0.5 / sqrt(fan_in)``, norms 1, biases 0, so activations stay finite through every
   layer. Written tensor by tensor in row blocks: the writer never holds more than one block.
2. **Run** each command as a child process (``patcher ...`` with this checkout first on the path)
   and measure its peak resident memory (its own ``VmHWM`` at exit), wall time and
   tokens per second: ``run`` of ``recipes/project-stack.toml``, ``aura.toml`` and
   ``transport-linear-attn.toml`` with a small calibration set (16 pairs / texts per class of at most
   32 tokens, ``ppl_tokens`` 1024) under ``--sequential``; ``bake`` of the AURA patch; ``verify
   --sequential``; ``eval --preset quick`` on a few prompts. ``patcher plan`` predicts each peak
   first (``--json``); the table sets prediction beside measurement.
3. **Write** the results as JSON and print a table (the README's). The checkpoint and the outputs
   are deleted afterwards unless ``--keep``.

These are benchmarks, not tests: the 7B shape needs ~14 GB of disk per copy (base, baked outputs),
the 13B shape ~26 GB. What else ran on the machine belongs beside every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Public config.json values of the models (shapes only).
SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny-100m": dict(model_type="llama", hidden_size=1024, intermediate_size=2752, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
RECIPES = {"project-stack": "recipes/project-stack.toml", "aura": "recipes/aura.toml", "transport": "recipes/transport-linear-attn.toml"}
TOXIC = ["idiot", "stupid", "moron", "fool", "jerk", "loser", "creep", "liar"]
NEUTRAL = ["friend", "garden", "morning", "river", "music", "window", "teacher", "kitchen"]
DTYPE_NAME = {"bfloat16": "BF16"}


# -- the checkpoint ------------------------------------------------------------------------------------
def _tokenizer():
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_tokenizer  # character-level, offline

    return tiny_tokenizer()


def write_checkpoint(folder: Path, shape: str, shard_bytes: int) -> dict:
    """Random bf16 shards + index + config + tokenizer, one row block at a time."""
    import torch
    import transformers as T
    from accelerate import init_empty_weights

    spec = dict(SHAPES[shape])
    config = T.AutoConfig.for_model(spec.pop("model_type"), **spec, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with init_empty_weights():
        skeleton = T.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tensors = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    del skeleton
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shp in tensors:
        nbytes = math.prod(shp) * 2
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for k, entries in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shp in entries:
            n = math.prod(shp) * 2
            header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shp in entries:
                if len(shp) == 1:
                    t = torch.zeros(shp) if name.endswith("bias") else torch.ones(shp)
                    f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                    continue
                rows = max(1, (64 << 20) // (shp[1] * 4))
                for r in range(0, shp[0], rows):
                    block = torch.randn((min(rows, shp[0] - r), shp[1]), generator=gen).mul_(0.5 / math.sqrt(shp[1]))
                    f.write(block.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        total += offset
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return {"params": total // 2, "bytes": total, "shards": len(shards)}


# -- the inputs ------------------------------------------------------------------------------------------
def write_inputs(work: Path, model: Path, n: int, max_tokens: int, ppl_tokens: int) -> dict[str, Path]:
    """Calibration data (pairs and labelled texts), perplexity text, prompts, and each recipe
    rewritten to use them (every method setting kept)."""
    import tomllib

    from patcher.recipe.writer import dump_recipe

    pairs, labeled = [], []
    for i in range(n):
        t, w = TOXIC[i % len(TOXIC)], NEUTRAL[i % len(NEUTRAL)]
        pairs.append({"toxic": f"you are a {t}, {i}", "neutral": [f"you are a {w}, {i}"], "pair_id": i})
        labeled += [{"text": f"you {t} number {i}", "label": 1}, {"text": f"the {w} number {i}", "label": 0}]
    (work / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    (work / "labeled.jsonl").write_text("\n".join(json.dumps(r) for r in labeled) + "\n")
    (work / "ppl.txt").write_text("the river flows past the old mill and on to the sea. " * (ppl_tokens // 20 + 10))
    (work / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ["you are so", "the weather today", "my neighbour", "in the end"]) + "\n")
    (work / "wikitext2").mkdir(exist_ok=True)
    (work / "wikitext2/wiki.test.raw").write_text((work / "ppl.txt").read_text())
    out = {}
    for key, rel in RECIPES.items():
        raw = tomllib.loads((ROOT / rel).read_text())
        raw["model"] = {"id": str(model), "dtype": "bfloat16"}
        paired = raw["data"].get("pairs", False)
        raw["data"] = {"path": "pairs.jsonl" if paired else "labeled.jsonl", "pairs": paired, "n_per_class": n, "max_tokens": max_tokens,
                       "match_lengths": False}
        raw["collect"] = {"batch_size": 8}
        raw["check"] = {"ppl_text": "ppl.txt", "ppl_tokens": ppl_tokens, "ppl_window": 512, "max_ppl_increase": 1e9}
        raw.pop("eval", None)
        for step in raw["step"]:
            if "data" in step:
                step["data"] = {"path": "labeled.jsonl", "pairs": False, "n_per_class": n, "max_tokens": max_tokens, "match_lengths": False}
        path = work / f"{key}.toml"
        path.write_text(dump_recipe(raw, f"# {rel}, rewritten by benchmarks/scale.py for a random-weight checkpoint\n"))
        out[key] = path
    return out


# -- measuring a child ------------------------------------------------------------------------------------
# A patcher command that reports its own peak at exit (VmHWM: its memory's high-water mark since
# exec). wait4's ru_maxrss alone would not do: exec carries the parent's high-water mark into it.
PEAK = """import atexit, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write(f"PEAK_KB {line.split()[1]}\\n")
atexit.register(peak)
sys.argv = ["patcher", *sys.argv[1:]]
runpy.run_module("patcher.cli", run_name="__main__")
"""


def measure(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd`` (``patcher ARGS``); its own peak resident memory (VmHWM), wall and CPU time, exit status."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", PEAK, *cmd[3:]], stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    peaks = [int(line.split()[1]) * 1024 for line in log.read_text(errors="replace").splitlines() if line.startswith("PEAK_KB")]
    return {"cmd": " ".join(["patcher", *cmd[3:]]), "log": log.name, "rc": p.returncode, "peak_bytes": peaks[-1] if peaks else usage.ru_maxrss * 1024,
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint and outputs (default: a new folder under /tmp).")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--pairs", type=int, default=16, help="Calibration pairs (and texts per class).")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="Comma-separated steps to run (write,plan,project-stack,aura,transport,bake,verify,eval).")
    ap.add_argument("--run-flags", default="--sequential", help="Placement flags for run (default --sequential; e.g. '--device-map auto' on GPUs).")
    ap.add_argument("--verify-flags", default="--sequential", help="Placement flags for verify.")
    ap.add_argument("--eval-flags", default="", help="Placement flags for eval, e.g. '--device-map auto --max-memory cpu=10GiB --offload-folder DIR'.")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint and outputs.")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else {"write", "plan", "project-stack", "aura", "transport", "bake", "verify", "eval"}
    work = args.work or Path(f"/tmp/patcher-scale-{args.shape}")
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "PATCHER_DATA": str(work)}
    patcher = [sys.executable, "-m", "patcher.cli"]
    results: dict = {"shape": args.shape, "config": SHAPES[args.shape], "device": args.device, "cpus": os.cpu_count(), "steps": {}}
    try:
        if "write" in only or not model.is_dir():
            t0 = time.perf_counter()
            if model.exists():
                shutil.rmtree(model)
            results["checkpoint"] = write_checkpoint(model, args.shape, int(args.shard_gb * 1e9)) | {"write_s": round(time.perf_counter() - t0, 1)}
            print(f"wrote {args.shape}: {results['checkpoint']}", flush=True)
        recipes = write_inputs(work, model, args.pairs, args.max_tokens, args.ppl_tokens)
        n_texts = 2 * args.pairs
        place = ["--device", args.device]
        if "plan" in only:  # the sequential placement (run, verify, bake) and eval's placement
            for name, flags in (("plan", args.run_flags.split()), ("plan-eval", args.eval_flags.split())):
                r = measure([*patcher, "plan", "--model", str(model), "--texts", str(n_texts), "--max-tokens", str(args.max_tokens), "--batch-size", "8",
                             "--json", str(work / f"{name}.json"), *place, *flags], env, work / f"{name}.log")
                results[name] = json.loads((work / f"{name}.json").read_text()) if r["rc"] == 0 else {"error": (work / f"{name}.log").read_text()[-2000:]}
        calib_tokens = n_texts * args.max_tokens
        for key in ("aura", "project-stack", "transport"):
            if key not in only:
                continue
            out = work / f"out-{key}"
            r = measure([*patcher, "run", str(recipes[key]), "--out", str(out), "--overwrite", "--no-eval", *place, *args.run_flags.split()], env,
                        work / f"{key}.log")
            steps = 2 if key == "project-stack" else 1
            r["tokens"] = calib_tokens * steps + 2 * args.ppl_tokens
            results["steps"][f"run {key} {args.run_flags}".strip()] = r
            print(key, r, flush=True)
            if key != "aura" and not args.keep:  # only the AURA output is baked, verified and evaluated below: free the disk
                shutil.rmtree(out, ignore_errors=True)
        if "bake" in only and (work / "out-aura").is_dir():
            r = measure([*patcher, "bake", str(work / "out-aura"), "--model", str(model), "--out", str(work / "baked-aura"), "--overwrite"], env, work / "bake.log")
            r["shard_bytes"] = max(p.stat().st_size for p in model.glob("*.safetensors"))
            results["steps"]["bake (aura patch)"] = r
            print("bake", r, flush=True)
            if not args.keep:
                shutil.rmtree(work / "baked-aura", ignore_errors=True)
        if "verify" in only and (work / "out-aura").is_dir():
            r = measure([*patcher, "verify", str(work / "out-aura"), *place, *args.verify_flags.split()], env, work / "verify.log")
            r["ok"] = "verify: OK" in (work / "verify.log").read_text()
            r["tokens"] = 2 * 3 * 16
            results["steps"][f"verify {args.verify_flags}".strip()] = r
            print("verify", r, flush=True)
        if "eval" in only and (work / "out-aura").is_dir():
            evaluated = work / "out-aura"
            r = measure([*patcher, "eval", str(evaluated), "--preset", "quick", "--prompts", str(work / "prompts.jsonl"), "--n-prompts", "0",
                         "--samples", "2", "--max-new-tokens", "8", "--ppl-tokens", "512", "--evaluators", "profanity-check", "--batch-size", "8",
                         "--dtype", "bfloat16", "--json", str(work / "eval.json"), *place, *args.eval_flags.split()], env, work / "eval.log")
            r["tokens"] = 4 * 2 * 8 + 512
            results["steps"]["eval --preset quick"] = r
            print("eval", r, flush=True)
        for r in results["steps"].values():
            if r.get("tokens") and r["wall_s"]:
                r["tokens_per_s"] = round(r["tokens"] / r["wall_s"], 2)
            if r["rc"] != 0:
                r["log_tail"] = (work / r["log"]).read_text()[-1500:]
    finally:
        if not args.keep:
            for p in [model, *work.glob("out-*"), *work.glob("baked-*")]:
                shutil.rmtree(p, ignore_errors=True)
    predicted = (results.get("plan") or {}).get("commands", {})
    predicted["eval"] = (results.get("plan-eval") or {}).get("commands", {}).get("eval")
    rows = []
    for name, r in results["steps"].items():
        key = {"run project-stack": "run project", "run aura": "run aura", "run transport": "run transport", "bake": "bake", "verify": "verify",
               "eval": "eval"}[" ".join(name.split()[:2]) if name.startswith("run") else name.split()[0]]
        pred = predicted.get(key)
        ratio = f"{pred / r['peak_bytes']:.2f}" if pred else "-"
        rows.append([name, "ok" if r["rc"] == 0 else f"FAILED rc {r['rc']}", f"{r['peak_bytes'] / 1e9:.2f}", f"{pred / 1e9:.2f}" if pred else "-", ratio,
                     r["wall_s"], r.get("tokens_per_s", "-")])
    results["rows"] = rows
    from patcher.core.table import render

    print(render(["command", "status", "peak RSS GB", "plan GB", "plan / measured", "wall s", "tokens/s"], rows, title=f"{args.shape} on {args.device}"))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
