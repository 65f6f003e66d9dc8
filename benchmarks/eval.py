"""Benchmark `patcher eval`'s generation on the real SmolLM2-135M, in one run.

    python benchmarks/eval.py [--prompts 8] [--batch-size 200] [--sequential 12] [--threads 1]
                              [--n-full 200] [--full] [--json FILE]

1. Loads the embedded SmolLM2-135M-Instruct (float32) and the prompts the ``rtp`` preset uses (a
   seeded sample of 200 from the RTP challenging set), and warms up once (untimed).
2. (a) Generation throughput with the ``rtp`` settings (20 new tokens, top_p 0.9, temperature 1,
   seeded sampler), counting generated tokens only:
   - batched: ``--prompts`` prompts x 25 samples through `patcher.generate.generate` with
     ``--batch-size`` rows per call (left padding, KV cache, one prompt pass per prompt);
   - one prompt at a time: ``--sequential`` calls of the same function with one prompt and one sample
     each (batch size 1, no shared prompt pass): the naive loop;
   - for reference, one prompt per call with its 25 samples as one batch.
   Wall-clock tokens/s and tokens per CPU-second of this process are both shown: the machine is
   shared, and CPU time is far less disturbed by other jobs than wall time. Target: batched >= 5x
   the one-at-a-time rate.
3. (b) The full ``rtp`` protocol on ``--n-full`` prompts (25 samples, 20 tokens, three evaluators,
   WikiText-2 perplexity on 8192 tokens with window 1024 / stride 512, fluency of 5 samples per
   prompt under the base): estimated from the measured parts (generation per prompt, evaluator
   scoring per text, one perplexity window, the fluency pass per prompt, model load), for one model and for a before/after run with ``--baseline``.
   ``--full`` also runs `patcher.evaluate.evaluate` on one model and reports the measured time.
   Target: <= 15 minutes.

Torch threads default to 1 (``--threads 0`` keeps torch's default): on a machine whose cores other
jobs also use, spinning OpenMP threads waste more than the second thread gains (a 10x slowdown was
seen on tiny models).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patcher.core.table import render
from patcher.evaluate.generate import continuation_nll, generate
from patcher.evaluate.report import DEFAULT_EVALUATORS, DEFAULT_PPL_TEXT, EvalSettings, data_file, eval_prompts, load_lm


class Clock:
    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def ppl_windows(tokens: int, window: int, stride: int) -> list[int]:
    """Lengths of the windows `patcher.evaluate.perplexity.perplexity` runs over ``tokens`` tokens."""
    out = []
    for begin in range(0, tokens - 1, stride):
        end = min(begin + window, tokens)
        out.append(end - begin)
        if end == tokens:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8, help="prompts in the batched measurement (x 25 samples; default 8)")
    ap.add_argument("--batch-size", type=int, default=200, help="rows per generate call in the batched measurement (default 200)")
    ap.add_argument("--sequential", type=int, default=12, help="one-prompt, one-sample calls in the naive measurement (default 12)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default; default 1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (default float32, as evaluated by default)")
    ap.add_argument("--n-full", type=int, default=200, help="prompts in the full-protocol estimate (default 200)")
    ap.add_argument("--full", action="store_true", help="also run the full rtp evaluation of one model on --n-full prompts and time it")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rtp = EvalSettings.from_preset("rtp", n_prompts=args.n_full, dtype=args.dtype)
    K, T, F = rtp.samples, rtp.max_new_tokens, rtp.fluency_samples or rtp.samples
    sampling = dict(max_new_tokens=T, temperature=rtp.temperature, top_p=rtp.top_p, top_k=rtp.top_k)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores, {args.dtype}, load average {load_average()}")

    with Clock() as c_load:
        model, tok, folder, _ = load_lm("smollm2-135m", args.dtype)
    prompts = eval_prompts(rtp).prompts
    generate(model, tok, prompts[:2], samples=2, batch_size=4, **sampling)  # warm-up, untimed

    # (a) batched vs one at a time
    batch_prompts = prompts[: args.prompts]
    with Clock() as c_batched:
        g = generate(model, tok, batch_prompts, samples=K, batch_size=args.batch_size, seed=0, **sampling)
    n_batched = g.new_tokens
    n_seq = 0
    with Clock() as c_seq:
        for i in range(args.sequential):
            n_seq += generate(model, tok, [prompts[i % len(prompts)]], samples=1, batch_size=1, share_prompt_pass=False, seed=i, **sampling).new_tokens
    per_prompt_n, n_pp = 2, 0
    with Clock() as c_pp:
        for i in range(per_prompt_n):
            n_pp += generate(model, tok, [prompts[i]], samples=K, batch_size=K, seed=i, **sampling).new_tokens
    rows = []
    for name, c, n in (("batched", c_batched, n_batched), ("one prompt at a time", c_seq, n_seq), (f"per prompt, {K} samples batched", c_pp, n_pp)):
        rows.append([name, n, round(c.wall, 2), round(n / c.wall, 1), round(c.cpu, 2), round(n / c.cpu, 1)])
    ratio_wall = rows[0][3] / rows[1][3]
    ratio_cpu = rows[0][5] / rows[1][5]
    print()
    print(render(["generation", "new tokens", "wall s", "tokens/s", "cpu s", "tokens/cpu-s"], rows,
                 title=f"(a) SmolLM2-135M, {T} new tokens, top_p {rtp.top_p}, T {rtp.temperature}; batched: {len(batch_prompts)} prompts x {K} samples, batch {args.batch_size}"))
    print(f"batched / one-at-a-time: {ratio_wall:.1f}x tokens/s (wall), {ratio_cpu:.1f}x tokens per CPU-second (target >= 5x)")

    # (b) the full protocol: measure the parts, scale to n_full prompts
    texts = g.flat_texts()
    from patcher.evaluate.evaluators import get_evaluators

    ev_rows = []
    ev_load, ev_per_text = [0.0, 0.0], [0.0, 0.0]  # (wall, cpu)
    for spec in DEFAULT_EVALUATORS:
        try:
            with Clock() as c_l:
                ev = get_evaluators(spec)[0]
            with Clock() as c_s:
                ev.score(texts)
        except Exception as e:  # noqa: BLE001 - an evaluator whose package is missing is reported, not fatal
            ev_rows.append([spec, "unavailable", str(e).splitlines()[0][:60]])
            continue
        for i, attr in enumerate(("wall", "cpu")):
            ev_load[i] += getattr(c_l, attr)
            ev_per_text[i] += getattr(c_s, attr) / len(texts)
        ev_rows.append([spec, round(c_l.wall, 2), f"{1000 * c_s.wall / len(texts):.2f} ms/text"])
    from patcher.evaluate.perplexity import perplexity, token_stream

    windows = ppl_windows(rtp.ppl_tokens, rtp.ppl_window, rtp.ppl_stride)
    ids = token_stream(tok, data_file("", DEFAULT_PPL_TEXT), rtp.ppl_window)
    with Clock() as c_win:
        perplexity(model, ids, window=rtp.ppl_window, stride=rtp.ppl_window)
    with Clock() as c_flu:
        continuation_nll(model, g.prompt_ids, [row[:F] for row in g.token_ids], pad_id=tok.pad_token_id, batch_size=args.batch_size)
    scale = args.n_full / len(batch_prompts)

    def estimate(i: int, attr: str) -> dict[str, float]:
        return {
            "load model": getattr(c_load, attr),
            f"generate {args.n_full} x {K} x {T} tokens": getattr(c_batched, attr) * scale,
            f"score {args.n_full * K} texts ({len(ev_rows)} evaluators, incl. load)": ev_load[i] + ev_per_text[i] * args.n_full * K,
            f"WikiText-2 ppl ({len(windows)} windows of <= {rtp.ppl_window})": getattr(c_win, attr) * sum(windows) / rtp.ppl_window,
        }

    parts, parts_cpu = estimate(0, "wall"), estimate(1, "cpu")
    single, single_cpu = sum(parts.values()), sum(parts_cpu.values())
    fluency, fluency_cpu = c_flu.wall * scale, c_flu.cpu * scale
    with_base = 2 * single - ev_load[0] + fluency
    with_base_cpu = 2 * single_cpu - ev_load[1] + fluency_cpu
    print()
    print(render(["evaluator", "load s", "scoring"], ev_rows, title="evaluators on the batched generations"))
    print()
    est_rows = [[k, round(v, 1), round(parts_cpu[k], 1)] for k, v in parts.items()]
    est_rows += [["= one model", round(single, 1), round(single_cpu, 1)],
                 [f"fluency pass of {args.n_full} x {F} samples under the base", round(fluency, 1), round(fluency_cpu, 1)],
                 ["= before/after (--baseline): 2 models + fluency", round(with_base, 1), round(with_base_cpu, 1)]]
    print(render(["part", "wall s (now)", "CPU s (a free core)"], est_rows,
                 title=f"(b) full rtp protocol on {args.n_full} prompts, {args.dtype}, scaled from the measured parts"))
    print(f"estimate: one model {single / 60:.1f} min wall now / {single_cpu / 60:.1f} min on a free core; before/after "
          f"{with_base / 60:.1f} / {with_base_cpu / 60:.1f} min (target <= 15 min); load average now {load_average()}")

    result = {
        "threads": torch.get_num_threads(), "load_average_end": load_average(),
        "generation": [dict(zip(["mode", "new_tokens", "wall_s", "tokens_per_s", "cpu_s", "tokens_per_cpu_s"], r)) for r in rows],
        "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu,
        "estimate_s": {"parts": parts, "one_model": single, "fluency": fluency, "before_after": with_base},
        "estimate_cpu_s": {"parts": parts_cpu, "one_model": single_cpu, "fluency": fluency_cpu, "before_after": with_base_cpu},
    }
    if args.full:
        from patcher.evaluate.report import evaluate

        with Clock() as c_full:
            report = evaluate(str(folder), settings=rtp, batch_size=args.batch_size)
        print(report.table())
        print(f"measured: full rtp protocol on {args.n_full} prompts, one model: {c_full.wall / 60:.1f} min wall ({c_full.cpu / 60:.1f} CPU-min); "
              f"estimate was {single / 60:.1f} min wall / {single_cpu / 60:.1f} CPU-min")
        result["full_measured_s"] = c_full.wall
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
