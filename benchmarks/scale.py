"""Real scale: a random-weight checkpoint with a real model's shapes through every command, each
measured beside `patcher plan`'s prediction and the issue's targets, in one run per shape.

    python benchmarks/scale.py --shape llama-2-7b [--work DIR] [--steps STEPS] [--keep-checkpoint]
    python benchmarks/scale.py --shape tiny-100m          # the same pipeline in two minutes (CI-sized)

Steps (``--steps``, comma-separated, in this order; default all):

* ``write``: a checkpoint as on the Hub: the shape's real ``config.json`` values, bf16 safetensors
  shards of at most 5 GB (``--shard-gb``) with ``model.safetensors.index.json``, a character-level
  tokenizer (ids below 96 are valid in every vocab) and a small sentencepiece ``tokenizer.model``
  that llama.cpp's converter reads (it pads the vocabulary to the config's). Weights are random
  normal with standard deviation ``0.5 / sqrt(fan_in)``, norms 1, biases 0, so activations stay
  finite through every layer. Written tensor by tensor in row blocks: the writer never holds more
  than one block. Skipped when ``WORK/model`` exists and ``write`` is not asked for.
* ``project-stack``, ``aura``, ``transport``: ``patcher run RECIPE --sequential`` (``--run-flags``)
  with a small calibration set (``--pairs`` 16 pairs / texts per class of at most ``--max-tokens`` 32
  tokens, ``ppl_tokens`` 1024); ``--compute-only`` runs ``patcher compute`` instead (no baked output,
  no perplexity: what fits on the disk for the 13B shape). Each run's patch is kept in
  ``WORK/patch-NAME`` (kilobytes to megabytes); its baked output is deleted unless ``--keep``.
* ``collect``: the AURA recipe's collection under ``--sequential`` (patcher's layer-by-layer engine,
  hooks and statistics) against a plain layer-by-layer forward over the same batches: each decoder
  layer read from the shards with ``safetensors.safe_open`` into the family's own layer module, the
  same hidden states run through, no hooks, no statistics. Both alternate ``--collect-repeats`` times
  in one child process; the ratio of plain to collection time is the throughput ratio (target >= 0.8).
* ``bake``: first the floor of `benchmarks/bake.py` on the same shards (a plain copy, its CPU time,
  and sha256 of the source on one thread: no bake that records every output file's sha256 beats
  ``max(copy, (sha256 + copy CPU) / cores)``), then ``patcher bake`` of the AURA patch; bake / floor
  is recorded (target <= 1.5), with the bake time from its own record (``bake_seconds``) and the
  command's wall time.
* ``verify``: ``patcher verify --sequential`` (``--verify-flags``) of the baked output.
* ``eval``: ``patcher eval --preset quick`` on 4 prompts x 2 samples x 8 new tokens (``--eval-flags``).
* ``export``: ``patcher export BAKED --outtype f16`` (``--outtype``): the GGUF of issue 26.

Every command runs as a child process: its own peak resident memory (VmHWM at exit), wall and CPU
time, tokens per second, a sampled trace of where the peak is (``rss_by_phase``: per progress-bar
phase the largest resident set, anonymous and file-backed apart), and ``patcher plan``'s prediction for it (``plan --json`` with the same
placement flags). Results are merged, step by step, into ``--json`` (default
``benchmarks/results/scale-SHAPE.json``), so steps can run one invocation at a time and resume on a
kept checkpoint (``--keep-checkpoint``; the baked output of ``bake`` stays for later invocations
with ``--keep``). Before anything is written the disk is checked: the steps' peak use (checkpoint,
a run's baked output, the floor's copy, the baked output, the GGUF) against the free space of
``--work``, refused in one line when it does not fit.

``--replan`` recomputes only ``patcher plan``'s predictions of the steps already in ``--json`` (from the
shape's config, with the same placement flags), beside the peaks measured earlier, and records when
and at which commit: the prediction is arithmetic on the config, the peak is the measurement.

These are benchmarks, not tests: the 7B shape needs 13.5 GB of disk per copy, the 13B shape 26 GB.
What else ran on the machine belongs beside every figure.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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
STEPS = ("write", "project-stack", "aura", "transport", "collect", "bake", "verify", "eval", "export")
PLAN_KEY = {"project-stack": "run project", "aura": "run aura", "transport": "run transport", "bake": "bake", "verify": "verify", "eval": "eval",
            "export": "export"}
TOXIC = ["idiot", "stupid", "moron", "fool", "jerk", "loser", "creep", "liar"]
NEUTRAL = ["friend", "garden", "morning", "river", "music", "window", "teacher", "kitchen"]
GB = 1e9
SHARD_PLUS_1GB = "one shard + 1 GB"
# Issue 24's (and 26's, for export) targets: peak resident memory per step, and the ratios.
_SEVEN_B = {"project-stack": 6 * GB, "aura": 6 * GB, "transport": 6 * GB, "verify": 6 * GB, "bake": SHARD_PLUS_1GB, "eval": 16 * GB,
            "export": SHARD_PLUS_1GB}
PEAK_TARGETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": _SEVEN_B,
    "qwen2.5-7b": _SEVEN_B,
    "llama-2-13b": {"project-stack": 8 * GB, "aura": 8 * GB, "transport": 8 * GB, "bake": 8 * GB, "verify": 8 * GB},
}
BAKE_OVER_FLOOR = 1.5  # bake time / the floor of a bake that records sha256 (at most)
COLLECT_RATIO = 0.8  # collection throughput / a plain layer-by-layer forward's (at least)
PLAN_ERROR = 0.25  # |plan - measured| / measured (at most)
DISK_SLACK = 1 * GB  # left free on the work disk beyond what the steps need
# bytes per weight in the GGUF (the 4- and 5-bit block types: their embeddings at q8_0 add a little)
OUTTYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32}


# -- the checkpoint ------------------------------------------------------------------------------------
def _tokenizer():
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import tiny_tokenizer  # character-level, offline

    return tiny_tokenizer()


def layout(shape: str, shard_bytes: int) -> tuple[Any, list[list[tuple[str, tuple]]], int]:
    """(config, tensors per shard in save_pretrained's greedy split, total bytes), from a meta model."""
    import torch
    import transformers as T
    from accelerate import init_empty_weights

    spec = dict(SHAPES[shape])
    config = T.AutoConfig.for_model(spec.pop("model_type"), **spec, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with init_empty_weights():
        skeleton = T.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    config.architectures = [type(skeleton).__name__]  # llama.cpp's converter picks its class by it
    tensors = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    shards: list[list[tuple[str, tuple]]] = [[]]
    size, total = 0, 0
    for name, shp in tensors:
        nbytes = math.prod(shp) * 2
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
        total += nbytes
    return config, shards, total


def sentencepiece_model() -> bytes:
    """A small character-level sentencepiece model (ids 0-2: unk, bos, eos): the vocabulary llama.cpp's
    converter reads for a Llama folder (it pads it to the config's ``vocab_size``)."""
    import sentencepiece as spm

    text = ["the river flows past the old mill and on to the sea", "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'-()"] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=80, model_type="char", character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return buf.getvalue()


def write_checkpoint(folder: Path, shape: str, shard_bytes: int) -> dict:
    """Random bf16 shards + index + config + tokenizer, one row block at a time."""
    import torch

    config, shards, _ = layout(shape, shard_bytes)
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
    if config.model_type == "llama":
        (folder / "tokenizer.model").write_bytes(sentencepiece_model())
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


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _phase(log: Path) -> str:
    """What the child is doing now: the description of its last progress bar (or its last line)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 2048))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    parts = [x.strip() for x in tail.replace("\r", "\n").split("\n") if x.strip() and not x.startswith("PEAK_KB")]
    return (parts[-1].split(":")[0] if "%|" in parts[-1] else parts[-1])[:80] if parts else "start"


def trace_rss(pid: int, log: Path, stop: threading.Event, phases: dict[str, dict[str, int]], every: float = 0.2) -> None:
    """Sample the child's resident memory (anonymous and file-backed apart) every ``every`` s; keep, per
    phase, the sample of largest VmRSS: where the peak is, and what it is made of."""
    while not stop.wait(every):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return
        kb = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines) if k in RSS_FIELDS}
        if len(kb) == len(RSS_FIELDS):
            ph = _phase(log)
            if kb["VmRSS"] > phases.get(ph, {}).get("VmRSS", -1):
                phases[ph] = kb


def run_plan(model: Path, flags: str, args: argparse.Namespace, place: list[str], env: dict[str, str], work: Path, n: int) -> dict:
    """`patcher plan --json` for the benchmark's workload under ``flags``, run as a child like every command."""
    out = work / f"plan-{n}.json"
    r = measure(["plan", "--model", str(model), "--texts", str(2 * args.pairs), "--max-tokens", str(args.max_tokens), "--batch-size", "8",
                 "--json", str(out), *place, *flags.split()], env, work / f"plan-{n}.log")
    return json.loads(out.read_text()) if r["rc"] == 0 else {}


def measure(args: list[str], env: dict[str, str], log: Path, argv: list[str] | None = None) -> dict:
    """Run ``patcher ARGS`` (or ``argv``, a script that prints its own ``PEAK_KB``): its own peak resident
    memory (VmHWM), wall and CPU time, exit status, when and beside what load it ran, and a sampled
    trace: per phase (progress-bar description) the largest resident set, anonymous and file-backed."""
    t0 = time.perf_counter()
    phases: dict[str, dict[str, int]] = {}
    stop = threading.Event()
    with open(log, "w") as f:
        p = subprocess.Popen(argv or [sys.executable, "-c", PEAK, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        tracer = threading.Thread(target=trace_rss, args=(p.pid, log, stop, phases), daemon=True)
        tracer.start()
        _, status, usage = os.wait4(p.pid, 0)
        stop.set()
        tracer.join()
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    peaks = [int(line.split()[1]) * 1024 for line in log.read_text(errors="replace").splitlines() if line.startswith("PEAK_KB")]
    return {"cmd": " ".join(argv[1:] if argv else ["patcher", *args]), "log": log.name, "rc": rc,
            "peak_bytes": peaks[-1] if peaks else usage.ru_maxrss * 1024, "wall_s": round(wall, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "rss_by_phase": dict(sorted(phases.items(), key=lambda kv: -kv[1]["VmRSS"]))}


def own_peak() -> None:
    """Print this process's peak (VmHWM) the way `PEAK` does, for `measure`."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write(f"PEAK_KB {line.split()[1]}\n")


# -- the disk ---------------------------------------------------------------------------------------------
def disk_needed(steps: list[str], ckpt: int, have_model: bool, have_baked: bool, compute_only: bool, keep: bool, outtype: str,
                keep_model: bool = True) -> tuple[int, str]:
    """(peak bytes the steps add to the work disk, what is on it at that peak), walking the steps in
    order: the checkpoint; each run's baked output (deleted after the run unless ``keep``); the
    floor's copy (deleted before the bake); the baked output; the GGUF (the checkpoint is deleted
    before it, the last step, unless ``keep_model``)."""
    held: dict[str, int] = {}
    peak, at_peak = 0, ""

    def add(what: str, n: int, gone: bool = False) -> None:
        nonlocal peak, at_peak
        held[what] = n
        if sum(held.values()) > peak:
            peak = sum(held.values())
            at_peak = " + ".join(f"{k} {v / GB:.1f} GB" for k, v in held.items())
        if gone:
            del held[what]

    if "write" in steps or not have_model:
        add("checkpoint", ckpt)
    for key in ("project-stack", "aura", "transport"):
        if key in steps and not compute_only:
            add(f"run {key}'s baked output", ckpt, gone=not keep)
    if "bake" in steps:
        add("the floor's copy", ckpt, gone=True)
        if not have_baked:
            add("baked output", ckpt)
    if "export" in steps:
        if not keep_model:
            held.pop("checkpoint", None)
        add(f"{outtype} GGUF", int(ckpt / 2 * OUTTYPE_BYTES[outtype]))
    return peak, at_peak or "nothing new"


def check_disk(work: Path, need: int, what: str, shape: str) -> dict:
    """Refuse, in one line, steps whose peak disk use does not fit in the free space of ``work``."""
    free = shutil.disk_usage(work).free
    if need + DISK_SLACK > free:
        raise SystemExit(f"scale.py: {shape} needs {(need + DISK_SLACK) / GB:.1f} GB free on {work} ({what} at once, {DISK_SLACK / GB:.0f} GB slack), "
                         f"{free / GB:.1f} GB is free: run fewer --steps (--compute-only skips run's baked output), "
                         "or give --work on a larger disk")
    return {"needed_bytes": need, "free_bytes": free, "what": what}


# -- collection against a plain layer-by-layer forward ------------------------------------------------------
def plain_layerwise(lw: Any, batches: list, folder: Path) -> dict[str, float]:
    """A plain layer-by-layer forward over ``batches``: each batch's first hidden state and the layers'
    arguments from the model's own forward (`LayerwiseModel.catch`, as the collection gets them), then
    for each decoder layer its tensors read with ``safetensors.safe_open`` into a copy of the family's
    layer module and every batch run through it; no hooks, no statistics, hidden states in a list."""
    import torch
    from safetensors import safe_open

    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    t0, c0, load = time.perf_counter(), time.process_time(), 0.0
    with torch.inference_mode():
        hidden, records = [], []
        for b in batches:
            h, rec = lw.catch(b.input_ids, b.attention_mask, b.position_ids)
            hidden.append(h)
            records.append(rec)
        for i in range(lw.n_layers):
            t = time.perf_counter()
            layer = copy.deepcopy(lw.layers[i])  # meta matrices (a skeleton), real 1-D norms
            prefix = f"{lw.arch.layers}.{i}."
            names = [n for n in weight_map if n.startswith(prefix)]
            state = {}
            for shard in sorted({weight_map[n] for n in names}):
                with safe_open(str(folder / shard), "pt") as f:
                    state |= {n[len(prefix):]: f.get_tensor(n).to(lw.device, lw.dtype) for n in names if weight_map[n] == shard}
            layer.load_state_dict(state, assign=True, strict=True)
            load += time.perf_counter() - t
            for b, (args, kwargs) in enumerate(r[i] for r in records):
                out = layer(hidden[b], *args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
            del layer, state
    return {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "load_s": load}


def child_collect(recipe_path: str, device: str, repeats: int, profile: str | None) -> None:
    """Run in a fresh process (``--child-collect``): the recipe's first step collected under
    ``--sequential`` and the plain layer-by-layer forward, alternating; one JSON line."""
    import atexit

    from patcher.core.threads import configure_threads, prefer_passive_wait

    atexit.register(own_peak)
    prefer_passive_wait()
    threads = configure_threads()
    from patcher.collect.collector import Collector
    from patcher.collect.layerwise import layerwise_of, load_placed
    from patcher.collect.parallel import ParallelCollect
    from patcher.core.placement import Placement
    from patcher.data.loaders import load_data
    from patcher.edits.patch import Patch
    from patcher.io.model_files import resolve_model
    from patcher.methods import StepContext, get_method
    from patcher.recipe.loader import load_recipe
    from patcher.workflows.run_plan import resolve

    recipe = load_recipe(Path(recipe_path))
    placement = Placement(sequential=True, device=device)
    plan = resolve(recipe, placement=placement)
    folder, _ = resolve_model(recipe.model.id)
    model, tok = load_placed(folder, placement, recipe.model.dtype)
    lw = layerwise_of(model)
    c = recipe.collect
    collector = Collector(model, tok, batch_size=c.batch_size, max_tokens=recipe.data.max_tokens, padding_side=c.padding_side,
                          skip_first=c.skip_first, options=ParallelCollect(placement))
    method = get_method(recipe.steps[0].method)
    data = load_data(plan.readable(plan.step_data(0)), tok)
    ctx = StepContext(model, tok, collector, data, Patch([]))
    batches = list(collector.batches(data.texts, data.labels))

    def collect() -> dict[str, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        method.collect(ctx, plan.settings[0])
        return {"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}

    plains, collects = [], []
    for _ in range(repeats):  # alternate, so drift on a shared machine hits both
        plains.append(plain_layerwise(lw, batches, Path(folder)))
        collects.append(collect())
    if profile:  # one more collection under cProfile, for finding where its time goes
        import cProfile

        cProfile.runctx("collect()", globals(), {"collect": collect}, profile)
    p, q = statistics.median(r["s"] for r in plains), statistics.median(r["s"] for r in collects)
    print(json.dumps({"method": recipe.steps[0].method, "batches": len(batches), "texts": len(data.texts), "threads": threads,
                      "plain_s": round(p, 2), "collect_s": round(q, 2), "throughput_ratio": round(p / q, 3),
                      "plain_load_s": round(statistics.median(r["load_s"] for r in plains), 2),
                      "plain_cpu_s": round(statistics.median(r["cpu_s"] for r in plains), 2),
                      "collect_cpu_s": round(statistics.median(r["cpu_s"] for r in collects), 2),
                      "plain_runs": [round(r["s"], 2) for r in plains], "collect_runs": [round(r["s"], 2) for r in collects]}))


# -- results ------------------------------------------------------------------------------------------------
def load_results(path: Path, shape: str) -> dict:
    """The shape's results so far (steps of earlier invocations are kept until rerun)."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("shape") == shape and old.get("config") == SHAPES[shape]:
            return old
    return {"shape": shape, "config": SHAPES[shape], "steps": {}}


def judge(shape: str, results: dict) -> list[list[Any]]:
    """Each step's row: peak beside plan and target, and the ratio targets; sets ``met`` on each."""
    rows = []
    shard = (results.get("checkpoint") or {}).get("largest_shard_bytes")
    for key in STEPS:
        r = results["steps"].get(key)
        if r is None:
            continue
        target = PEAK_TARGETS.get(shape, {}).get(key)
        if target == SHARD_PLUS_1GB:
            target = shard + 1 * GB if shard else None
        checks = []
        if target:
            checks.append(r["peak_bytes"] <= target)
        pred = r.get("plan_bytes")
        if pred:
            r["plan_over_measured"] = round(pred / r["peak_bytes"], 3)
            checks.append(abs(pred - r["peak_bytes"]) <= PLAN_ERROR * r["peak_bytes"])
        ratio = ""
        if "bake_over_floor" in r:
            ratio = f"bake / floor {r['bake_over_floor']:.2f} (<= {BAKE_OVER_FLOOR})"
            checks.append(r["bake_over_floor"] <= BAKE_OVER_FLOOR)
        if "throughput_ratio" in r:
            ratio = f"collect / plain {r['throughput_ratio']:.2f} (>= {COLLECT_RATIO})"
            checks.append(r["throughput_ratio"] >= COLLECT_RATIO)
        if key == "verify" and "ok" in r:
            checks.append(r["ok"])
        r["met"] = r["rc"] == 0 and all(checks)
        rows.append([r.get("label", key), "ok" if r["rc"] == 0 else f"FAILED rc {r['rc']}", f"{r['peak_bytes'] / GB:.2f}",
                     f"{pred / GB:.2f}" if pred else "-", f"{pred / r['peak_bytes']:.2f}" if pred else "-",
                     f"{target / GB:.2f}" if target else "-", ratio or "-", "yes" if r["met"] else "NO", r["wall_s"], r.get("tokens_per_s", "-")])
    return rows


def markdown(results: dict) -> str:
    """The README's table of a shape's results (``--markdown``)."""
    lines = ["| command | peak RSS | `plan` predicted | target | wall (CPU) | tokens/s | ratio (target) | targets met |", "|---|---|---|---|---|---|---|---|"]
    for label, status, peak, plan, ratio, target, other, met, _, tps in results["rows"]:
        key = next(k for k, r in results["steps"].items() if r.get("label", k) == label)
        r = results["steps"][key]
        extra = "" if status == "ok" else f" ({status})"
        if key == "verify":
            extra += " OK" if r.get("ok") else " FAILED"
        lines.append(f"| `{label}`{extra} | **{peak} GB** | {f'{plan} GB ({ratio}x)' if plan != '-' else '-'} | {f'<= {target} GB' if target != '-' else '-'} "
                     f"| {r['wall_s']} s ({r['cpu_s']} s) | {tps} | {other} | {met} |")
    return "\n".join(lines)


HEADERS = ["command", "status", "peak GB", "plan GB", "plan / measured", "target GB", "ratio (target)", "targets met", "wall s", "tokens/s"]


def save(path: Path, results: dict, shape: str, work: Path) -> list[list[Any]]:
    """Rows for the table; the JSON written atomically, local paths replaced by WORK."""
    rows = judge(shape, results)
    results["rows"] = rows
    text = json.dumps(results, indent=2).replace(str(work), "WORK").replace(str(ROOT), ".")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return rows


# -- main ---------------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--work", type=Path, default=None, help="Folder for the checkpoint and outputs (default /tmp/patcher-scale-SHAPE).")
    ap.add_argument("--json", type=Path, default=None, help="Results, merged by step (default benchmarks/results/scale-SHAPE.json).")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--pairs", type=int, default=16, help="Calibration pairs (and texts per class).")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", "--only", dest="steps", default="", help=f"Comma-separated steps, run in this order: {','.join(STEPS)} (default all).")
    ap.add_argument("--compute-only", action="store_true", help="patcher compute in place of run for the recipe steps (no baked output on disk).")
    ap.add_argument("--run-flags", default="--sequential", help="Placement flags for run (default --sequential; e.g. '--device-map auto' on GPUs).")
    ap.add_argument("--verify-flags", default="--sequential", help="Placement flags for verify.")
    ap.add_argument("--eval-flags", default="", help="Placement flags for eval, e.g. '--device-map auto --max-memory cpu=10GiB --offload-folder DIR'.")
    ap.add_argument("--outtype", default="f16", choices=sorted(OUTTYPE_BYTES), help="GGUF type of the export step.")
    ap.add_argument("--collect-repeats", type=int, default=2, help="Alternating plain / collection passes of the collect step (median).")
    ap.add_argument("--profile", type=Path, default=None, help="collect step: also profile one collection (cProfile) into this file.")
    ap.add_argument("--replan", action="store_true", help="Recompute only patcher plan's predictions of the steps in --json (from the shape's "
                    "config; pass the same --run-flags / --verify-flags / --eval-flags), beside the peaks measured earlier.")
    ap.add_argument("--note", default="", help="What else ran on the machine meanwhile (recorded in the JSON beside every figure).")
    ap.add_argument("--keep", action="store_true", help="Keep the checkpoint and every output.")
    ap.add_argument("--keep-checkpoint", action="store_true", help="Keep the checkpoint (and the small patches) for a later invocation.")
    ap.add_argument("--markdown", action="store_true", help="Print the README table of --json (no step runs).")
    ap.add_argument("--child-collect", nargs=3, metavar=("RECIPE", "DEVICE", "REPEATS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_collect:
        recipe, device, repeats = args.child_collect
        child_collect(recipe, device, int(repeats), str(args.profile) if args.profile else None)
        return
    if not args.shape:
        ap.error("--shape is required")
    if args.markdown:
        print(markdown(json.loads((args.json or ROOT / "benchmarks" / "results" / f"scale-{args.shape}.json").read_text())))
        return
    steps = [s for s in args.steps.split(",") if s] or list(STEPS)
    unknown = sorted(set(steps) - set(STEPS) - {"plan"})
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}")
    steps = [s for s in STEPS if s in steps]
    work = (args.work or Path(f"/tmp/patcher-scale-{args.shape}")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    json_path = args.json or ROOT / "benchmarks" / "results" / f"scale-{args.shape}.json"
    model, baked, gguf = work / "model", work / "baked-aura", work / "baked-aura" / f"model-{args.outtype}.gguf"
    keep_model = args.keep or args.keep_checkpoint
    _, _, ckpt_bytes = layout(args.shape, int(args.shard_gb * 1e9))
    disk = None if args.replan else check_disk(work, *disk_needed(steps, ckpt_bytes, model.is_dir(), baked.is_dir(), args.compute_only, args.keep,
                                                                   args.outtype, keep_model), args.shape)
    for step, needs in (("bake", work / "patch-aura"), ("verify", baked), ("eval", baked), ("export", baked)):
        if step in steps and not args.replan and not needs.exists() and not ({"aura", "bake"} & set(steps[: steps.index(step)])):
            raise SystemExit(f"scale.py: step {step} needs {needs}, which is not there: run it with the steps before it "
                             "(e.g. --steps aura,bake,verify) or keep them from an earlier invocation (--keep)")

    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "PATCHER_DATA": str(work)}
    results = load_results(json_path, args.shape)
    if not args.replan:
        results |= {"device": args.device, "cpus": os.cpu_count(), "disk": disk} | ({"note": args.note} if args.note else {})
    place = ["--device", args.device]
    plans: dict[str, dict] = {}

    def predict(flags: str, key: str) -> int | None:
        """plan's predicted peak of ``key`` under ``flags`` (one `patcher plan --json` per flag set)."""
        if flags not in plans:
            plans[flags] = run_plan(model, flags, args, place, env, work, len(plans))
            results.setdefault("plan", {})[flags or "(no flags)"] = plans[flags]
        return plans[flags].get("commands", {}).get(key)

    if args.replan:  # predictions only, from the shape's config: the measured peaks stay as measured
        config_only = work / "config-only"
        config_only.mkdir(exist_ok=True)
        layout(args.shape, int(args.shard_gb * 1e9))[0].save_pretrained(config_only)
        model = config_only
        flags_of = {"bake": args.run_flags, "verify": args.verify_flags, "eval": args.eval_flags, "export": ""}
        results["plan"] = {}
        for key, r in results["steps"].items():
            if key in PLAN_KEY and "plan_bytes" in r:
                r["plan_bytes"] = predict(flags_of.get(key, args.run_flags), PLAN_KEY[key])
        results["plan_recomputed"] = {"git_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                                                   text=True).stdout.strip(),
                                      "at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                                      "why": "patcher plan's predictions recomputed (--replan) beside the peaks measured earlier"}
        shutil.rmtree(config_only, ignore_errors=True)
        from patcher.core.table import render

        print(render(HEADERS, save(json_path, results, args.shape, work), title=f"{args.shape}: plan recomputed"))
        return

    def record(key: str, r: dict, flags: str | None = None) -> None:
        if flags is not None:
            r["plan_bytes"] = predict(flags, PLAN_KEY[key])
        if r.get("tokens") and r["wall_s"]:
            r["tokens_per_s"] = round(r["tokens"] / r["wall_s"], 2)
        if r["rc"] != 0:
            r["log_tail"] = (work / r["log"]).read_text(errors="replace")[-1500:]
        results["steps"][key] = r
        save(json_path, results, args.shape, work)
        print(key, {k: v for k, v in r.items() if k != "log_tail"}, flush=True)

    try:
        if "write" in steps or not model.is_dir():
            t0 = time.perf_counter()
            if model.exists():
                shutil.rmtree(model)
            results["checkpoint"] = write_checkpoint(model, args.shape, int(args.shard_gb * 1e9)) | {"write_s": round(time.perf_counter() - t0, 1)}
            print(f"wrote {args.shape}: {results['checkpoint']}", flush=True)
        results.setdefault("checkpoint", {})["largest_shard_bytes"] = max(p.stat().st_size for p in model.glob("*.safetensors"))
        recipes = write_inputs(work, model, args.pairs, args.max_tokens, args.ppl_tokens)
        calib_tokens = 2 * args.pairs * args.max_tokens
        for key in ("project-stack", "aura", "transport"):
            if key not in steps:
                continue
            out, patch = work / f"out-{key}", work / f"patch-{key}"
            cmd = "compute" if args.compute_only else "run"
            r = measure([cmd, str(recipes[key]), "--out", str(out), "--overwrite", *([] if args.compute_only else ["--no-eval"]), *place,
                         *args.run_flags.split()], env, work / f"{key}.log")
            r["label"] = f"{cmd} {key} {args.run_flags}".strip()
            r["tokens"] = calib_tokens * (2 if key == "project-stack" else 1) + (0 if args.compute_only else 2 * args.ppl_tokens)
            if r["rc"] == 0:  # the patch (small) for the bake step; the baked output (a checkpoint's size) goes
                shutil.rmtree(patch, ignore_errors=True)
                patch.mkdir()
                meta = json.loads((out / "patch.json").read_text())
                (patch / meta["tensor_file"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / meta["tensor_file"], patch / meta["tensor_file"])
                shutil.copyfile(out / "patch.json", patch / "patch.json")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
            record(key, r, None if args.compute_only else args.run_flags)  # plan predicts run (with its perplexity), not compute
        if "collect" in steps:
            argv = [sys.executable, str(Path(__file__).resolve()), "--child-collect", str(recipes["aura"]), args.device, str(args.collect_repeats),
                    *(["--profile", str(args.profile)] if args.profile else [])]
            r = measure([], env, work / "collect.log", argv=argv)
            r["label"] = "collect aura --sequential vs plain layer-by-layer"
            lines = [ln for ln in (work / "collect.log").read_text().splitlines() if ln.startswith("{")]
            if r["rc"] == 0 and lines:
                r |= json.loads(lines[-1])
                r["tokens"] = calib_tokens * args.collect_repeats * 2
            record("collect", r)
        if "bake" in steps:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from bake import hash_only, plain_copy, reset_out, warm_cache

            floor: dict[str, Any] = {"warm_s": round(warm_cache(model), 1)}
            copy_s, copy_cpu = plain_copy(model, work / "copy")
            reset_out(work / "copy")
            hash_s = hash_only(model)
            cores = os.cpu_count() or 1
            floor |= {"copy_s": round(copy_s, 2), "copy_cpu_s": round(copy_cpu, 2), "sha256_s": round(hash_s, 2), "cores": cores,
                      "floor_s": round(max(copy_s, (hash_s + copy_cpu) / cores), 2)}
            reset_out(baked)
            r = measure(["bake", str(work / "patch-aura"), "--model", str(model), "--out", str(baked), "--overwrite"], env, work / "bake.log")
            r["label"] = "bake (aura patch)"
            r["shard_bytes"] = results["checkpoint"]["largest_shard_bytes"]
            if r["rc"] == 0:
                r["bake_s"] = json.loads((baked / "patch.json").read_text())["bake"]["bake_seconds"]
                r |= {"floor": floor, "bake_over_floor": round(r["bake_s"] / floor["floor_s"], 3), "gb_per_s": round(ckpt_bytes / GB / r["bake_s"], 3),
                      "wall_over_floor": round(r["wall_s"] / floor["floor_s"], 3)}
            record("bake", r, args.run_flags)
        if "verify" in steps:
            r = measure(["verify", str(baked), *place, *args.verify_flags.split()], env, work / "verify.log")
            r |= {"label": f"verify {args.verify_flags}".strip(), "ok": "verify: OK" in (work / "verify.log").read_text(), "tokens": 2 * 3 * 16}
            record("verify", r, args.verify_flags)
        if "eval" in steps:
            r = measure(["eval", str(baked), "--preset", "quick", "--prompts", str(work / "prompts.jsonl"), "--n-prompts", "0",
                         "--samples", "2", "--max-new-tokens", "8", "--ppl-tokens", "512", "--evaluators", "profanity-check", "--batch-size", "8",
                         "--dtype", "bfloat16", "--json", str(work / "eval.json"), *place, *args.eval_flags.split()], env, work / "eval.log")
            r |= {"label": "eval --preset quick", "tokens": 4 * 2 * 8 + 512}
            record("eval", r, args.eval_flags)
        if "export" in steps:
            predicted = predict("", PLAN_KEY["export"])  # plan reads the checkpoint's config
            if not keep_model:  # the last step: the checkpoint is no longer needed, and the GGUF takes as much disk
                shutil.rmtree(model, ignore_errors=True)
            r = measure(["export", str(baked), "--outtype", args.outtype, "--overwrite"], env, work / "export.log")
            r |= {"label": f"export --outtype {args.outtype}", "shard_bytes": results["checkpoint"]["largest_shard_bytes"]}
            if r["rc"] == 0:
                r |= {"gguf_bytes": gguf.stat().st_size, "gb_per_s": round(gguf.stat().st_size / GB / r["wall_s"], 3)}
            if not args.keep:
                gguf.unlink(missing_ok=True)
            record("export", r | {"plan_bytes": predicted})
    finally:
        if not args.keep:
            for p in [*work.glob("out-*"), baked, work / "copy", *([] if keep_model else [model, *work.glob("patch-*")])]:
                shutil.rmtree(p, ignore_errors=True)
    from patcher.core.table import render

    rows = save(json_path, results, args.shape, work)
    print(render(HEADERS, rows, title=f"{args.shape} on {args.device} ({results.get('cpus')} cpus)"))
    print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
