"""llama.cpp as a runtime for GGUF files: the prebuilt ``xllamacpp`` wheel (llama.cpp's own server
code, in process; no compiler, no network).

Used where patcher must show what the exported file does where users run it: `patcher eval` on a
``.gguf`` model (sampled continuations, the same prompts, seeds and evaluators as for a safetensors
folder) and ``benchmarks/portability.py`` (greedy continuations on given token ids, compared with
transformers). Prompts go in as token ids where the caller has them, so both runtimes read the same
input; llama.cpp adds nothing to a prompt given as ids.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..core.errors import PatcherError
from ..core.progress import bar
from .generate import GenerateOptions, Generations

log = logging.getLogger(__name__)

INSTALL = "pip install xllamacpp==2026.10.11549 (or `bash scripts/install.sh dev`)"


def _xllamacpp() -> Any:
    try:
        import xllamacpp
    except ImportError:
        raise PatcherError(f"running a GGUF file needs llama.cpp's Python wheel xllamacpp: {INSTALL}") from None
    return xllamacpp


class LlamaCpp:
    """One GGUF file loaded in llama.cpp's server (in this process), ``slots`` requests decoded together."""

    def __init__(self, path: str | Path, *, n_ctx: int = 1024, slots: int = 1, threads: int | None = None) -> None:
        x = _xllamacpp()
        path = Path(path)
        if not path.is_file():
            raise PatcherError(f"{path} is not a file: pass a .gguf file")
        p = x.CommonParams()
        p.model.path = str(path)
        p.n_parallel = slots
        p.n_ctx = n_ctx * slots  # each slot gets n_ctx tokens
        p.warmup = False
        p.verbosity = -1  # llama.cpp logs every request at its default level
        p.n_gpu_layers = 0
        p.cache_prompt = True
        threads = threads or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        self.path = path
        self.slots = slots
        try:
            self.server = x.Server(p)
        except Exception as exc:  # llama.cpp refuses a damaged or foreign file with its own message
            raise PatcherError(f"llama.cpp could not load {path} ({type(exc).__name__}: {exc}): is it a GGUF model file?") from None

    def complete(self, prompt: list[int] | str, n: int, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                 logprobs: bool = False, stop_at_eos: bool = False) -> dict[str, Any]:
        """One completion of ``n`` tokens: ``{"ids": [...], "text": str, "logprobs": [...]}``. With
        ``temperature`` 0 it is greedy (argmax at each step)."""
        req: dict[str, Any] = {"prompt": prompt, "n_predict": n, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                               "min_p": 0.0, "seed": seed, "ignore_eos": not stop_at_eos, "cache_prompt": True,
                               "n_probs": 1 if logprobs or temperature == 0 else 0, "repeat_penalty": 1.0, "return_tokens": True}
        if temperature == 0:
            req["n_probs"] = 1
        r = self.server.handle_completions(req)
        if not isinstance(r, dict) or "choices" not in r:
            raise PatcherError(f"llama.cpp refused the request on {self.path.name}: {str(r)[:300]}")
        choice = r["choices"][0]
        content = (choice.get("logprobs") or {}).get("content") or []
        ids = [c["id"] for c in content] if content else list(r.get("tokens") or [])
        return {"ids": ids, "text": choice.get("text", ""), "logprobs": [c.get("logprob") for c in content],
                "prompt_tokens": (r.get("usage") or {}).get("prompt_tokens")}

    def map(self, fn: Any, items: list[Any]) -> list[Any]:
        """``fn`` over ``items`` with up to ``slots`` requests in flight (llama.cpp batches them)."""
        if self.slots == 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(self.slots) as pool:
            return list(pool.map(fn, items))

    def close(self) -> None:
        server = getattr(self, "server", None)
        self.server = None
        del server

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_gguf(spec: str | Path) -> bool:
    return str(spec).lower().endswith(".gguf")


def sample_seed(seed: int, prompt: int, sample: int, samples: int) -> int:
    """llama.cpp's sampler seed for one continuation: fixed by the run's seed and the continuation's place."""
    return (seed * 1_000_003 + prompt * samples + sample) % (2**31 - 1)


def generate_gguf(path: str | Path, prompts: list[str], sampling: GenerateOptions | None = None, *, slots: int = 8, runtime: Any = None) -> Generations:
    """``samples`` continuations of every prompt from a GGUF file in llama.cpp, with the settings of
    `patcher.evaluate.generate.generate`: the prompt as text (llama.cpp tokenises it as the file says,
    its ``<bos>`` included), the same temperature, top-p and top-k, stop at end-of-text, one seed per
    continuation (`sample_seed`). llama.cpp's sampler draws from its own random stream, so the
    continuations are not the transformers path's draws; they are the same under the same seed.
    ``runtime``: a class with `LlamaCpp`'s interface (tests)."""
    import time

    sampling = sampling or GenerateOptions()  # its batching fields are the transformers path's; llama.cpp batches by slots
    samples, max_new_tokens, temperature, top_p, top_k, seed = (sampling.samples, sampling.max_new_tokens, sampling.temperature, sampling.top_p,
                                                                sampling.top_k, sampling.seed)
    jobs = [(p, k) for p in range(len(prompts)) for k in range(samples)]
    texts: list[list[str]] = [[""] * samples for _ in prompts]
    conts: list[list[list[int]]] = [[[] for _ in range(samples)] for _ in prompts]
    nll: list[list[float]] = [[0.0] * samples for _ in prompts]
    t0 = time.perf_counter()
    with (runtime or LlamaCpp)(path, n_ctx=512, slots=max(1, min(slots, len(jobs)))) as llm:
        def one(job: tuple[int, int]) -> tuple[tuple[int, int], dict[str, Any]]:
            p, k = job
            return job, llm.complete(prompts[p], max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                     seed=sample_seed(seed, p, k, samples), logprobs=True, stop_at_eos=True)

        chunks = [jobs[i:i + llm.slots * 4] for i in range(0, len(jobs), llm.slots * 4)]
        for chunk in bar(chunks, desc="generate (llama.cpp)", unit="batch"):
            for (p, k), r in llm.map(one, chunk):
                texts[p][k], conts[p][k] = r["text"], r["ids"]
                nll[p][k] = -float(sum(x for x in r["logprobs"] if x is not None))
    settings = {"samples": samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed,
                "runtime": "llama.cpp (xllamacpp)"}
    return Generations(prompts, [[] for _ in prompts], texts, conts, nll, time.perf_counter() - t0, len(jobs), settings)


def gguf_provenance(path: str | Path) -> dict[str, Any]:
    """The file's sha256, and, when it sits in a baked folder that lists it, that folder's recipe and patch hash."""
    import json

    from ..io.checkpoint import sha256_file

    path = Path(path)
    out: dict[str, Any] = {"gguf": path.name, "sha256": sha256_file(path)}
    record = path.parent / "patch.json"
    if record.is_file():
        try:
            meta = json.loads(record.read_text())
            entry = next((e for e in meta.get("gguf", []) if isinstance(e, dict) and e.get("file") == path.name), None)
            if entry is not None:
                out |= {"outtype": entry.get("outtype"), "recipe": (meta.get("recipe") or {}).get("name"),
                        "patch_sha256": (meta.get("bake") or {}).get("patch_sha256"), "recorded_sha256_matches": entry.get("sha256") == out["sha256"]}
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
    return out
