"""The picture of a tune: every trial as toxicity proxy against perplexity, the Pareto front within
budget, the budget line and the chosen point; beside it, the proxy against the real evaluation's
toxicity for the trials that were evaluated (the rank correlation that validates the proxy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import PatcherError
from ..io.atomic import atomic_file


def plot_tune(result: dict[str, Any], path: str | Path) -> Path:
    """Write the PNG of a `TuneResult.to_json()` to ``path`` (atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PatcherError("plotting needs matplotlib: pip install 'patcher[eval]'") from None
    trials = {t["number"]: t for t in result["trials"]}
    evaluated = {int(k): v for k, v in result["evaluated"].items()}
    base = result["base"]
    fig, axes = plt.subplots(1, 2 if evaluated else 1, figsize=(13 if evaluated else 7, 5), squeeze=False)
    ax = axes[0][0]
    ax.scatter([t["ppl"] for t in trials.values()], [t["proxy"] for t in trials.values()], s=16, color="#9e9e9e", label=f"trial ({len(trials)})")
    front = [trials[n] for n in result["front"]]
    if front:
        ax.plot([t["ppl"] for t in front], [t["proxy"] for t in front], "o-", color="#1f77b4", ms=5, label="Pareto front within budget")
    ax.scatter([base["ppl"]], [base["proxy"]], marker="s", s=60, color="black", label="base model", zorder=3)
    ax.axvline(base["ppl"] * (1 + result["budget"]), color="#d62728", ls="--", lw=1, label=f"budget +{result['budget']:.1%}")
    if result["chosen"] is not None:
        c = trials[result["chosen"]]
        ax.scatter([c["ppl"]], [c["proxy"]], marker="*", s=260, color="#d62728", label=f"chosen (trial #{result['chosen']})", zorder=4)
    ax.set_xlabel("check perplexity (lower is better)")
    ax.set_ylabel(f"toxicity proxy: toxic-over-non-toxic log-likelihood margin ({result['proxy_source']})")
    ax.set_title("trials", fontsize=10)
    ax.legend(fontsize=8)
    if evaluated:
        ax2 = axes[0][1]
        xs = [trials[n]["proxy"] for n in evaluated]
        ys = [v["toxicity"] for v in evaluated.values()]
        ax2.scatter(xs, ys, color="#1f77b4")
        for n, x, y in zip(evaluated, xs, ys):
            ax2.annotate(f"#{n}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rho = result.get("spearman")
        ax2.set_title(f"proxy vs quick evaluation: Spearman {rho:.2f}" if rho is not None else "proxy vs quick evaluation", fontsize=10)
        ax2.set_xlabel("toxicity proxy")
        ax2.set_ylabel("toxicity probability, mean over evaluators")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
