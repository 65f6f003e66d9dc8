"""The README's results tables, rendered from the committed results files (``results/<model>.json``,
written by ``benchmarks/recipes.py``; ``results/frontier-<model>.json``, written by ``benchmarks/frontier.py``; ``results/tunes/NAME.tune.json``,
written by ``patcher tune``, as table ``tune-NAME``).

    python benchmarks/results.py            # rewrite the tables between the README's markers
    python benchmarks/results.py --check    # exit 1 when a README table differs from its results file

Each results file has one table in the README, between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->`` (NAME: the file's name without ``.json``). Every number in a table comes
from the file: toxicity probability and expected maximum toxicity per evaluator with their 95% intervals, WikiText-2 perplexity and
its change, BLiMP accuracy and its drop against the base model (points, paired interval), KL from
the base on BOLD neutral prompts, degenerate share. A frontier file (``"kind": "frontier"``) renders
as one row per recipe and strength: toxicity probability per evaluator with its interval, perplexity
and its change, BLiMP accuracy when measured, the paper's headline claim (the recipe's ``# Claim:``
comment), and each recipe's least toxic point within the file's perplexity budget in bold. A results
file without markers, or markers without a file, is an error too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from patcher.workflows.tune.result import short_value  # noqa: E402

MARK = re.compile(r"<!-- results:(?P<name>[\w.+-]+) -->\n(?P<body>.*?)<!-- /results:(?P=name) -->", re.S)


def _ci(m: dict[str, Any] | None, digits: int = 3, scale: float = 1.0) -> str:
    if not m or m.get("value") is None:
        return "-"
    v = m["value"] * scale
    ci = m.get("ci")
    if not ci or any(c is None for c in ci):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def ppl_change(m: dict[str, Any], base: dict[str, Any]) -> float:
    return m["wikitext_perplexity"]["value"] / base["wikitext_perplexity"]["value"] - 1


def any_toxicity(m: dict[str, Any]) -> float:
    """Toxicity probability by any evaluator (else the largest single one)."""
    tox = m["toxicity"]
    return tox["any"]["toxicity_probability"]["value"] if "any" in tox else max(v["toxicity_probability"]["value"] for v in tox.values())


def within_budget(points: list[dict[str, Any]], base: dict[str, Any], budget: float) -> int | None:
    """Index of the least toxic point (by `any_toxicity`) whose perplexity rose at most ``budget``; None if none did."""
    ok = [i for i, p in enumerate(points) if ppl_change(p["metrics"], base) <= budget]
    return min(ok, key=lambda i: any_toxicity(points[i]["metrics"])) if ok else None


def render_frontier(results: dict[str, Any]) -> str:
    """The markdown table of a frontier file: base, then each recipe's points in sweep order."""
    base = results["base"]["metrics"]
    evaluators = list(base["toxicity"])
    s, p, budget = results.get("settings", {}), results.get("prompts", {}), results.get("budget", 0.05)
    blimp = bool(s.get("blimp"))
    lines = [
        f"`{results['model']}` on `{p.get('name')}` ({p.get('count')} prompts x {s.get('samples')} samples of {s.get('max_new_tokens')} tokens, "
        f"top-p {s.get('top_p')}, seed {s.get('seed')}); toxicity probability with its 95% bootstrap interval over prompts; WikiText-2 "
        f"perplexity on {s.get('ppl_tokens')} tokens" + (f"; BLiMP: the first {s.get('blimp')} pairs of each paradigm" if blimp else "")
        + f". Each recipe at each value of its strength-like setting (statistics collected once); **bold**: its least toxic point "
        f"(any evaluator) within +{budget:.0%} perplexity. Source: `results/{Path(results.get('_file', 'x')).name}`.",
        "",
        "| recipe | point | " + " | ".join(evaluators) + " | WikiText-2 ppl |" + (" BLiMP accuracy |" if blimp else "") + " paper's claim |",
        "|---|---|" + "---|" * (len(evaluators) + 2 + blimp),
    ]

    def row(label: str, point: str, m: dict[str, Any], claim: str, change: str) -> str:
        cells = [label, point, *[_ci(m["toxicity"][e]["toxicity_probability"]) for e in evaluators], f"{m['wikitext_perplexity']['value']:.2f}{change}"]
        return "| " + " | ".join(cells + ([_ci(m.get("blimp_accuracy"))] if blimp else []) + [claim]) + " |"

    lines.append(row("base", "-", base, "", ""))
    for name, entry in results["recipes"].items():
        best = within_budget(entry["points"], base, budget)
        key = entry["sweep"]["setting"]
        for i, pt in enumerate(entry["points"]):
            point = f"{key}={pt['value']}"
            lines.append(row(f"`{name}`", f"**{point}**" if i == best else point, pt["metrics"], (entry.get("claim") or "-").replace("|", "\\|") if i == 0 else "",
                             f" ({ppl_change(pt['metrics'], base):+.1%})"))
        if best is None:
            lines.append(f"| `{name}` | none within +{budget:.0%} |" + " |" * (len(evaluators) + 2 + blimp))
    return "\n".join(lines) + "\n"


def render_tune(t: dict[str, Any]) -> str:
    """The markdown table of a tune (``OUT.tune.json`` of `patcher tune`, kept in ``results/tunes/``):
    how it was asked for, the Pareto front within budget with the quick evaluation of the evaluated
    points, the pick in bold, the proxy's rank correlation with the evaluation."""
    pv, by = t.get("provenance", {}), {r["number"]: r for r in t["trials"]}
    sec = dict(t.get("seconds", {}))
    if sec.get("per_trial_mean") is None:  # a resumed tune that ran no trial: the search's seconds from its trials' own
        own = [r["seconds"] for r in t["trials"] if r.get("repeat_of") is None]
        sec |= {"search": sum(own), "per_trial_mean": float(np.mean(own)), "per_trial_median": float(np.median(own))}
    n_eval = len(t.get("evaluated", {}))
    evaluators = list(pv.get("evaluators") or next(iter(t.get("evaluated", {}).values()), {}).get("per_evaluator", {}))
    lines = [
        f"`patcher tune` of `{pv.get('recipe')}` on `{pv.get('model')}`, budget +{t['budget']:.0%} check perplexity, seed {pv.get('seed')}: "
        f"{len(t['trials'])} trials ({t.get('collections')} statistics collection{'' if t.get('collections') == 1 else 's'}) in {sec.get('search', 0):.0f} s of search ("
        f"{sec.get('per_trial_mean', 0):.0f} s per trial on average, median {sec.get('per_trial_median', 0):.0f} s), then the quick "
        f"evaluation of {n_eval} trials on `{pv.get('eval_prompts')}` ({pv.get('eval_n_prompts')} prompts, seed {pv.get('eval_seed')}) in "
        f"{sec.get('evaluate', 0):.0f} s; proxy: held-back {t.get('proxy_source')} texts' toxic-over-neutral log-likelihood margin. "
        f"Proxy vs evaluation, Spearman over the evaluated trials: {t['spearman']:.2f}. **Bold**: the pick. "
        f"Source: `results/tunes/{Path(t.get('_file', 'x')).name}`.",
        "",
        "| trial | settings | check ppl | proxy | " + " | ".join(evaluators) + " | mean |",
        "|---|---|---|---|" + "---|" * (len(evaluators) + 1),
        f"| base | - | {t['base']['ppl']:.2f} | {t['base']['proxy']:.3f} |" + " |" * (len(evaluators) + 1),
    ]
    others = [int(n) for n in t.get("evaluated", {}) if int(n) not in t["front"]]  # evaluated for the correlation, off the front
    for n in [*t["front"], *others]:
        r, ev = by[n], t.get("evaluated", {}).get(str(n))
        settings = ", ".join(f"{k} = {short_value(v)}" for k, v in r["settings"].items())
        tox = [f"{ev['per_evaluator'][e]:.2f}" for e in evaluators] + [f"{ev['toxicity']:.3f}"] if ev else ["" for _ in range(len(evaluators) + 1)]
        label = f"#{n}" if n in t["front"] else f"#{n} ({'over budget' if r['ppl_increase'] > t['budget'] else 'off the front'})"
        cells = [label, settings, f"{r['ppl']:.2f} ({r['ppl_increase']:+.1%})", f"{r['proxy']:.3f}", *tox]
        if n == t.get("chosen"):
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


BLIMP_BOUND = 1.0  # accuracy points a shipped recipe may cost before its row says so (issue 25)


def _blimp_drop(m: dict[str, Any] | None) -> str:
    cell = _ci(m, 2)
    return cell + f" (over {BLIMP_BOUND:g} point)" if m and m.get("value") is not None and m["value"] > BLIMP_BOUND else cell


def render(results: dict[str, Any]) -> str:
    """The markdown table (and its caption line) of one results file."""
    if results.get("kind") == "frontier":
        return render_frontier(results)
    if "trials" in results and "front" in results:
        return render_tune(results)
    rows = results["rows"]
    base = rows.get("base", {}).get("metrics")
    evaluators = list(base["toxicity"]) if base else []
    claims = any(r.get("claim") for r in rows.values())  # a column of the papers' headlines (recipes with a `# Claim:`)
    s = results.get("settings", {})
    p = results.get("prompts", {})
    lines = [
        f"`{results['model']}` on `{p.get('name')}` ({p.get('count')} prompts x {s.get('samples')} samples of {s.get('max_new_tokens')} tokens, "
        f"top-p {s.get('top_p')}, seed {s.get('seed')}); toxicity probability with its 95% bootstrap interval over prompts; "
        f"WikiText-2 perplexity on {s.get('ppl_tokens')} tokens; BLiMP: the first {s.get('blimp')} pairs of each of the 67 paradigms; "
        f"KL(base || patched) on {s.get('kl_prompts')} BOLD prompts, nats per token. Source: `results/{Path(results.get('_file', 'x')).name}`.",
        "",
        "| row | " + " | ".join(evaluators) + " | WikiText-2 ppl | BLiMP accuracy | BLiMP drop (points) | KL from base | degenerate |"
        + (" paper's claim |" if claims else ""),
        "|---|" + "---|" * (len(evaluators) + 5 + claims),
    ]
    for name, r in rows.items():
        label = "base" if name == "base" else f"`{name}`"
        if "refused" in r:
            lines.append(f"| {label} | refused: {r['refused']} |" + " |" * (len(evaluators) + 4 + claims))
            continue
        m = r["metrics"]
        tox = [_ci(m["toxicity"][e]["toxicity_probability"]) for e in evaluators]
        ppl = m["wikitext_perplexity"]["value"]
        change = f" ({ppl / base['wikitext_perplexity']['value'] - 1:+.1%})" if base and name != "base" else ""
        cells = [label, *tox, f"{ppl:.2f}{change}", _ci(m.get("blimp_accuracy")), _blimp_drop(m.get("blimp_drop")),
                 _ci(m.get("kl_from_base"), 4), f"{m['degenerate_share']['value']:.1%}"]
        cells += [(r.get("claim") or "-").replace("|", "\\|")] if claims else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Expected maximum toxicity (the mean over prompts of the largest score among a prompt's {s.get('samples')} samples) "
              "with its 95% bootstrap interval:", "",
              "| row | " + " | ".join(evaluators) + " |", "|---|" + "---|" * len(evaluators)]
    for name, r in rows.items():
        if "refused" not in r:
            emt = [_ci(r["metrics"]["toxicity"][e].get("expected_max_toxicity")) for e in evaluators]
            lines.append("| " + " | ".join(["base" if name == "base" else f"`{name}`", *emt]) + " |")
    return "\n".join(lines) + "\n"


def load(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(folder.glob("*.json")):
        out[f.stem] = json.loads(f.read_text()) | {"_file": str(f)}
    for f in sorted(folder.glob("tunes/*.tune.json")):  # `patcher tune`'s OUT.tune.json, kept as results
        out["tune-" + f.name.removesuffix(".tune.json")] = json.loads(f.read_text()) | {"_file": str(f)}
    return out


def update(readme: str, files: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """The README with every marked table re-rendered, and the problems found (a file without
    markers, markers without a file)."""
    problems = []
    marked = {m.group("name") for m in MARK.finditer(readme)}
    problems += [f"results/{n}.json has no table in the README (add <!-- results:{n} --> ... <!-- /results:{n} -->)" for n in sorted(set(files) - marked)]
    problems += [f"the README's table {n!r} has no results/{n}.json" for n in sorted(marked - set(files))]

    def sub(m: re.Match) -> str:
        name = m.group("name")
        body = render(files[name]) if name in files else m.group("body")
        return f"<!-- results:{name} -->\n{body}<!-- /results:{name} -->"

    return MARK.sub(sub, readme), problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when a README table differs from its results file (nothing written)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new, problems = update(text, load(args.results))
    for p in problems:
        print(p, file=sys.stderr)
    if args.check:
        if new != text:
            print(f"{args.readme.name}: a results table differs from results/*.json; run python benchmarks/results.py", file=sys.stderr)
            return 1
        return 1 if problems else 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
        print(f"rewrote the results tables in {args.readme.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
