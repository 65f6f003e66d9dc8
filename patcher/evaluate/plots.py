"""One PNG per evaluation: toxicity per evaluator before/after with 95% intervals, and language
quality. Drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import PatcherError

ANY = "any"


def _metric(result: dict[str, Any], ev: str, metric: str) -> tuple[float, float, float]:
    m = (result.get("toxicity") or {}).get(ev, {}).get(metric) or {}
    v = m.get("value")
    lo, hi = (m.get("ci") or [None, None])[:2]
    v = float("nan") if v is None else float(v)
    return v, (v - lo) if lo is not None else 0.0, (hi - v) if hi is not None else 0.0


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write a bar chart of a report's JSON (`EvalReport.to_json()`) to ``path``: toxicity
    probability and expected maximum toxicity per evaluator (base and patched side by side, 95%
    bootstrap intervals as error bars), then WikiText-2 and fluency perplexity and the degenerate
    share."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PatcherError("plotting needs matplotlib: pip install 'patcher[eval]' or pip install matplotlib") from None
    import numpy as np

    model, base = report["model"], report.get("baseline")
    series = ([("base", base, "#8c8c8c")] if base else []) + [("patched" if base else "model", model, "#d62728" if base else "#1f77b4")]
    names = [e["name"] for e in report["evaluators"]] + [ANY]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [3, 3, 2]})
    width = 0.8 / len(series)
    x = np.arange(len(names))
    for ax, metric, title in (
        (axes[0], "toxicity_probability", "toxicity probability (>= 1 of K samples >= 0.5)"),
        (axes[1], "expected_max_toxicity", "expected maximum toxicity"),
    ):
        for i, (label, result, color) in enumerate(series):
            vals = [_metric(result, ev, metric) for ev in names]
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [v[0] for v in vals], width, yerr=[[v[1] for v in vals], [v[2] for v in vals]],
                   capsize=3, label=label, color=color)
        ax.set_xticks(x, names, rotation=15)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    quality = [("WikiText-2 ppl", "wikitext_perplexity"), ("fluency ppl", "fluency")]
    qx = np.arange(len(quality))
    for i, (label, result, color) in enumerate(series):
        vals = []
        for _, key in quality:
            v = result.get(key)
            v = v.get("perplexity") if isinstance(v, dict) else v
            vals.append(float("nan") if v is None else float(v))
        bars = axes[2].bar(qx + (i - (len(series) - 1) / 2) * width, vals, width, label=label, color=color)
        axes[2].bar_label(bars, fmt="%.1f", fontsize=7)
    axes[2].set_xticks(qx, [q[0] for q in quality])
    degenerate = ", ".join(f"{label} {r['degenerate']['share']:.1%}" for label, r, _ in series)
    axes[2].set_title(f"perplexity (lower is better)\ndegenerate output: {degenerate}", fontsize=10)
    axes[2].legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(
        f"{report['prompts']['count']} prompts x {s['samples']} samples of {s['max_new_tokens']} tokens, top_p {s['top_p']}, "
        f"T {s['temperature']}, seed {s['seed']} ({s['preset']} preset)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
