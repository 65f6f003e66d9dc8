"""Loads anywhere: a baked patcher output converted to GGUF with llama.cpp's own converter and run
with llama-cpp-python gives what transformers gives.

    python benchmarks/portability.py --build runs/portability [--n-per-class N] [--outtypes f32,f16] [--json portability.json]
    python benchmarks/portability.py OUT [OUT ...]

``--build DIR`` first writes two outputs from ``recipes/project-stack.toml`` on the embedded
SmolLM2: ``DIR/stack`` (as shipped; tied embeddings) and ``DIR/stack-untied`` (the first step also
projects the token embeddings, ``embed = true`` with ``[model] untie = true``, so the output has its
own ``lm_head.weight`` and ``tie_word_embeddings = false``). The untied one, and both with a smaller
``--n-per-class`` than the recipe's, are published with ``force``: this tests the file format, not
the recipe's quality (at 64 pairs the stack measured +5.5% perplexity, over its +5% budget).

For each output and GGUF type, the folder is converted with ``convert_hf_to_gguf.py`` from the
llama-cpp-python source distribution (``~/.cache/patcher/wheels/llama_cpp_python-VERSION.tar.gz``)
and loaded with llama-cpp-python (built from that source distribution; its wheel cached beside it).
On 10 prompts (a seeded sample of the RealToxicityPrompts challenging set), both runtimes get the
same token ids:

- greedy continuations (``--new-tokens`` tokens, no stop at end-of-text) are compared token for token;
- top-1 agreement: over prompt + transformers' continuation, the share of positions where both
  runtimes' logits have the same argmax, and the largest absolute logit difference.

The transformers reference computes in float32 with the weights the GGUF holds: as baked for f32,
rounded to float16 for f16 (so a difference is the runtime's, not the rounding's).

Target (issue 14): identical greedy continuations for at least 9 of 10 prompts at f32 and f16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"
TARGET = 9


def wheel_dir() -> Path:
    from patcher.core.embedded import cache_root

    return cache_root() / "wheels"


def converter() -> tuple[Path, Path]:
    """(convert_hf_to_gguf.py, its gguf-py folder), extracted once from the cached sdist."""
    sdist = wheel_dir() / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    dest = wheel_dir().parent / f"llama.cpp-{LLAMA_CPP_VERSION}"
    script = dest / "convert_hf_to_gguf.py"
    if not script.is_file():
        if not sdist.is_file():
            sys.exit(f"portability: {sdist} is missing: run `PATCHER_BUILD_LLAMA=1 bash scripts/install.sh dev` (downloads and builds it)")
        prefix = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
        tmp = Path(tempfile.mkdtemp(dir=dest.parent))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and m.name[len(prefix):].split("/")[0] in ("convert_hf_to_gguf.py", "gguf-py", "conversion")]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(dest)
    return script, dest / "gguf-py"


def convert(folder: Path, outtype: str, out: Path) -> float:
    """Convert ``folder`` to ``out`` (GGUF of ``outtype``); returns the seconds it took."""
    script, gguf_py = converter()
    env = os.environ | {"PYTHONPATH": f"{gguf_py}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(out), "--outtype", outtype],
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"portability: the converter refused {folder} ({outtype}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def build(dest: Path, n_per_class: int | None = None) -> list[Path]:
    """The two outputs described in the module docs, from recipes/project-stack.toml."""
    from patcher.recipe.loader import load_recipe
    from patcher.workflows.run import run

    recipe = load_recipe(ROOT / "recipes/project-stack.toml")
    if n_per_class:
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, n_per_class=n_per_class),
                                     steps=tuple(dataclasses.replace(s, data=s.data and dataclasses.replace(s.data, n_per_class=n_per_class)) for s in recipe.steps))
    first = recipe.steps[0]
    untied = dataclasses.replace(recipe, name="project-stack-untied", model=dataclasses.replace(recipe.model, untie=True),
                                 steps=(dataclasses.replace(first, settings=first.settings | {"embed": True}), *recipe.steps[1:]))
    outs = []
    for r, name, force in ((recipe, "stack", bool(n_per_class)), (untied, "stack-untied", True)):
        out = dest / name
        if not (out / "patch.json").is_file():
            run(r, out=out, force=force, run_eval=False)
        outs.append(out)
    return outs


def prompt_ids(tok: Any, n: int) -> list[list[int]]:
    from patcher.data.loaders import load_prompts
    from patcher.evaluate.report import DEFAULT_PROMPTS, data_file

    prompts = load_prompts(data_file("", DEFAULT_PROMPTS), n=n, seed=0, file_order=True).prompts
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.inference_mode()
def hf_side(model: Any, ids: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and its logits over prompt + continuation."""
    seq = list(ids)
    for _ in range(new_tokens):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    return seq[len(ids):], logits


def llama_side(llm: Any, ids: list[int], reference: list[int], new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's greedy continuation of ``ids``, and its logits over ``ids + reference``
    (transformers' continuation, so both runtimes score the same sequence)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    llm.reset()
    seq = ids + reference
    llm.eval(seq)
    return out, torch.from_numpy(np.array(llm.scores[: len(seq)], dtype=np.float32))


def compare(folder: Path, outtype: str, n_prompts: int, new_tokens: int, work: Path) -> dict[str, Any]:
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = work / f"{folder.name}-{outtype}.gguf"
    seconds = convert(folder, outtype, gguf)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if outtype == "f16":
        model = model.half().float()  # the weights the f16 GGUF holds, computed in float32
    llm = Llama(str(gguf), n_ctx=512, logits_all=True, n_threads=max(1, (os.cpu_count() or 2)), verbose=False, seed=0)
    same, agree, total, max_diff, rows = 0, 0, 0, 0.0, []
    for ids in prompt_ids(tok, n_prompts):
        ref, hf_logits = hf_side(model, ids, new_tokens)
        got, ll_logits = llama_side(llm, ids, ref, new_tokens)
        same += got == ref
        agree += int((hf_logits.argmax(-1) == ll_logits.argmax(-1)).sum())
        total += len(hf_logits)
        max_diff = max(max_diff, float((hf_logits - ll_logits).abs().max()))
        rows.append({"prompt_tokens": len(ids), "identical": got == ref, "first_difference": next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)})
    tied = json.loads((folder / "config.json").read_text()).get("tie_word_embeddings", False)
    del llm
    gguf.unlink()
    return {"output": folder.name, "tied_embeddings": tied, "gguf": outtype, "identical_greedy": same, "prompts": n_prompts,
            "top1_agreement": agree / total, "positions": total, "max_abs_logit_diff": max_diff, "convert_seconds": round(seconds, 1),
            "met": same >= TARGET * n_prompts / 10, "per_prompt": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outputs", nargs="*", type=Path, help="baked output folders")
    ap.add_argument("--build", type=Path, default=None, help="first write DIR/stack and DIR/stack-untied from recipes/project-stack.toml")
    ap.add_argument("--n-per-class", type=int, default=None, help="with --build: a smaller calibration sample than the recipe's (faster)")
    ap.add_argument("--outtypes", default="f32,f16")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from patcher.core.table import render

    outputs = list(args.outputs) + (build(args.build, args.n_per_class) if args.build else [])
    if not outputs:
        ap.error("give output folders or --build DIR")
    results = []
    with tempfile.TemporaryDirectory() as work:
        for folder in outputs:
            for outtype in args.outtypes.split(","):
                results.append(compare(folder, outtype, args.prompts, args.new_tokens, Path(work)))
                r = results[-1]
                print(f"{r['output']} {r['gguf']}: greedy identical {r['identical_greedy']}/{r['prompts']}, top-1 {r['top1_agreement']:.4f}", flush=True)
    headers = ["output", "lm_head", "GGUF", "identical greedy", "top-1 agreement", "max |logit diff|", "target >= 9/10"]
    print(render(headers, [[r["output"], "tied" if r["tied_embeddings"] else "own", r["gguf"], f"{r['identical_greedy']}/{r['prompts']}",
                            f"{r['top1_agreement']:.4f} ({r['positions']} positions)", f"{r['max_abs_logit_diff']:.2e}", "met" if r["met"] else "MISSED"]
                           for r in results], title=f"transformers vs llama-cpp-python {LLAMA_CPP_VERSION}"))
    if args.json:
        args.json.write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_VERSION, "results": results}, indent=2) + "\n")
    sys.exit(0 if all(r["met"] for r in results) else 1)


if __name__ == "__main__":
    main()
