"""Localisation: where in the model toxic and neutral text differ, per layer, block and neuron.

For every decoder layer and each block (``attn_out``: what attention writes into the residual
stream; ``mlp_out``: what the MLP writes) the score is an **effect size along the toxic-minus-neutral
mean difference**, cross-fitted so that it does not reward noise:

1. the samples (or, with paired data, the pairs) are split in two halves at random (fixed seed);
2. on one half, ``u = normalise(mean(toxic) - mean(neutral))`` of the block's mean-pooled output;
3. on the other half, each sample's output is projected on ``u`` and Cohen's d of those projections
   is taken: ``(mean_toxic - mean_neutral) / pooled_std``;
4. the two halves swap roles and the two d's are averaged.

Without the split, a direction fitted on the same samples it is scored on separates them by chance
alone in 576 dimensions; with it, a block that writes nothing toxic-specific scores ~0. With
``paired = true`` only complete (toxic, neutral) pairs count, the direction is the mean of the pair
differences, and a pair's two members always land in the same half.

A second score, ``whitened``, does the same along ``diff / var`` (per-dimension within-class
variance: diagonal LDA). Outlier residual dimensions (SmolLM2 has a few carrying values tens of
times the rest) can swamp the plain mean difference with noise, so a block can score ~0 on the
first and high on the second; the gap between the two flags such blocks.

Per MLP neuron (an input unit of ``mlp_out``: the value the down projection reads) the score is
plain Cohen's d of its mean-pooled value, toxic vs neutral (no direction, no split needed).

Mean pooling comes from the shared `Collector`, which skips padding and the first real token (the
attention sink, whose norm is many times the others' in a trained model's middle layers).

For Gemma 2/3, whose blocks pass a norm before the residual add, "what the block writes" is that
norm's output, so the watched module is the norm (`writer_module`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..collect.statistics import PooledValues
from ..core.arch import BLOCKS, arch_for, num_layers, writer_module
from ..core.errors import PatcherError
from ..core.numerics import floor_variance


def parse_layers(spec: Any, n_layers: int, what: str = "layers") -> list[int]:
    """``"all"``, a range ``"15-29"``, a range of depth ``"50%-100%"`` (layers ``floor(0.5 n)`` to
    ``ceil(1.0 n) - 1``, so one recipe picks the upper half of a 30-layer SmolLM2, 15-29, and of an
    18-layer Gemma 3, 9-17), a comma list ``"3,5,7"``, or a list of ints -> sorted layers, each
    checked against ``0..n_layers-1``."""
    valid = f"valid layers are 0-{n_layers - 1} (the model has {n_layers})"
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("all", "", "*"):
            return list(range(n_layers))
        out: list[int] = []
        try:
            for part in s.split(","):
                part = part.strip()
                m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
                pct = re.fullmatch(r"(\d+(?:\.\d+)?)%\s*-\s*(\d+(?:\.\d+)?)%", part)
                if pct:
                    lo_p, hi_p = float(pct.group(1)), float(pct.group(2))
                    if not 0 <= lo_p < hi_p <= 100:
                        raise PatcherError(f"{what} = {spec!r}: a depth range needs 0% <= low < high <= 100%")
                    out += list(range(math.floor(lo_p / 100 * n_layers), math.ceil(hi_p / 100 * n_layers)))
                elif m:
                    lo, hi = int(m.group(1)), int(m.group(2))
                    if lo > hi:
                        raise PatcherError(f"{what} = {spec!r}: range {part} runs backwards; write low-high")
                    out += list(range(lo, hi + 1))
                else:
                    out.append(int(part))
        except ValueError:
            raise PatcherError(f"{what} = {spec!r}: write a list of ints, a range like \"15-29\", or \"all\"") from None
    else:
        out = [int(x) for x in spec]
    if not out:
        raise PatcherError(f"{what} is empty: name at least one layer; {valid}")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise PatcherError(f"{what}: layer {bad[0]} is out of range; {valid}")
    return sorted(set(out))


# -- pairing -------------------------------------------------------------------------------------
def pair_rows(labels: torch.Tensor, pair_ids: Sequence[Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(toxic_rows, neutral_rows)``: for every pair id with both a toxic (1) and a neutral (0)
    member, the row of each (the first one seen). Refuses data without pair ids."""
    if pair_ids is None or all(p is None for p in pair_ids):
        raise PatcherError(
            "paired = true needs data with pair ids (e.g. ParaDetox: toxicity_labeled/paradetox_pairs.jsonl "
            "or paradetox_labeled.jsonl, which carry pair_id); set paired = false for unpaired data"
        )
    tox: dict[Any, int] = {}
    neu: dict[Any, int] = {}
    for row, (lab, pid) in enumerate(zip(labels.tolist(), pair_ids)):
        if pid is None:
            continue
        (tox if lab == 1 else neu).setdefault(pid, row)
    common = [p for p in tox if p in neu]
    if len(common) < 4 or len(common) < len(tox) / 2:
        raise PatcherError(
            f"paired = true but only {len(common)} of {len(tox)} toxic texts have their neutral partner in the sample: "
            "point the data at a pairs file (toxicity_labeled/paradetox_pairs.jsonl), or set paired = false"
        )
    return torch.tensor([tox[p] for p in common]), torch.tensor([neu[p] for p in common])


def _halves(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return perm[: n // 2], perm[n // 2 :]


# -- effect sizes ----------------------------------------------------------------------------------
def cohens_d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cohen's d of ``a`` vs ``b`` along dim 0 (pooled standard deviation); 0 where both are constant."""
    a, b = a.double(), b.double()
    na, nb = a.shape[0], b.shape[0]
    if na < 2 or nb < 2:
        raise PatcherError(f"an effect size needs at least 2 samples per class, got {na} toxic and {nb} neutral")
    var = ((na - 1) * a.var(0) + (nb - 1) * b.var(0)) / (na + nb - 2)
    # floored relative to the largest column's variance: a nearly constant unit (a dead neuron's rounding
    # noise) must not get a huge d from a difference of the same tiny size
    d = (a.mean(0) - b.mean(0)) / floor_variance(var).sqrt()
    d[var == 0] = 0.0
    return torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0).float()


def direction_effect(x: torch.Tensor, labels: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                     whiten: bool = False) -> float:
    """Cross-fitted Cohen's d of the projection on the toxic-minus-neutral mean difference (module doc).
    ``whiten``: project on ``diff / var`` instead (per-dimension within-class variance of the fitting
    half: diagonal LDA), which a few huge, noisy dimensions cannot dominate."""
    x = x.double()
    if pairs is not None:
        t_rows, n_rows = pairs
        folds = _halves(len(t_rows), seed)
        sets = [(t_rows[f], n_rows[f]) for f in folds]
    else:
        t_all, n_all = (labels == 1).nonzero()[:, 0], (labels == 0).nonzero()[:, 0]
        if len(t_all) < 4 or len(n_all) < 4:
            raise PatcherError(f"localisation needs at least 4 samples per class, got {len(t_all)} toxic and {len(n_all)} neutral")
        ft, fn = _halves(len(t_all), seed), _halves(len(n_all), seed + 1)
        sets = [(t_all[ft[j]], n_all[fn[j]]) for j in range(2)]
    ds = []
    for fit, score in ((sets[0], sets[1]), (sets[1], sets[0])):
        u = x[fit[0]].mean(0) - x[fit[1]].mean(0)
        if whiten:
            var = torch.cat([x[fit[0]] - x[fit[0]].mean(0), x[fit[1]] - x[fit[1]].mean(0)]).pow(2).mean(0)
            u = u / var.clamp(min=float(1e-4 * var.median().clamp(min=1e-12)))
        norm = u.norm()
        if norm == 0:
            ds.append(0.0)
            continue
        u = u / norm
        ds.append(float(cohens_d(x[score[0]] @ u[:, None], x[score[1]] @ u[:, None])[0]))
    return sum(ds) / 2


def neuron_effects(x: torch.Tensor, labels: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Cohen's d of each column of ``x`` (toxic vs neutral); only complete pairs when paired."""
    if pairs is not None:
        return cohens_d(x[pairs[0]], x[pairs[1]])
    return cohens_d(x[labels == 1], x[labels == 0])


# -- the result ------------------------------------------------------------------------------------
@dataclass
class Localisation:
    """Scores of one model on one data set. ``blocks[b][i]``: cross-fitted Cohen's d of block ``b``
    in layer ``i``; ``whitened``: the same along the diagonal-LDA direction; ``neurons[i]``: Cohen's d
    of every MLP neuron of layer ``i`` (or None)."""

    layers: list[int]
    blocks: dict[str, list[float]]
    neurons: dict[int, torch.Tensor] | None = None
    paired: bool = False
    n: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    whitened: dict[str, list[float]] = field(default_factory=dict)

    def score(self, block: str, layer: int) -> float:
        return self.blocks[block][self.layers.index(layer)]

    def top_layers(self, block: str, n: int) -> list[int]:
        """The ``n`` layers whose ``block`` scores highest, in layer order."""
        order = sorted(self.layers, key=lambda i: -self.score(block, i))
        return sorted(order[:n])

    def top_neurons(self, n: int, layers: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
        """``(layer, neuron, d)`` of the ``n`` neurons with the largest positive d (fire more on toxic)."""
        if not self.neurons:
            return []
        rows = [(i, j, float(v)) for i, d in self.neurons.items() if layers is None or i in layers for j, v in enumerate(d.tolist())]
        rows.sort(key=lambda r: -r[2])
        return rows[:n]

    def table_rows(self, top: int = 10) -> list[list[Any]]:
        """Rows for the terminal: the ``top`` layers by their best block score."""
        order = sorted(self.layers, key=lambda i: -max(self.score(b, i) for b in self.blocks))[:top]
        rows = []
        for i in order:
            row: list[Any] = [i] + [round(self.score(b, i), 3) for b in self.blocks]
            row += [round(self.whitened[b][self.layers.index(i)], 3) for b in self.whitened]
            if self.neurons:
                d = self.neurons[i]
                j = int(d.argmax())
                row += [j, round(float(d[j]), 3), int((d > 0.5).sum())]
            rows.append(row)
        return rows

    def headers(self) -> list[str]:
        h = ["layer"] + [f"{b} d" for b in self.blocks] + [f"{b} d (whitened)" for b in self.whitened]
        if self.neurons:
            h += ["top neuron", "neuron d", "neurons d>0.5"]
        return h

    def to_json(self, neurons_per_layer: int = 20) -> dict[str, Any]:
        out: dict[str, Any] = {
            "score": "cross-fitted Cohen's d of mean-pooled block outputs projected on the toxic-minus-neutral mean difference"
            + (" (paired: direction from pair differences, pairs split together)" if self.paired else ""),
            "neuron_score": "Cohen's d of each MLP neuron's mean-pooled value (input of mlp_out), toxic vs neutral",
            "paired": self.paired,
            "n": self.n,
            "layers": self.layers,
            "blocks": {b: [round(v, 5) for v in s] for b, s in self.blocks.items()},
            "whitened_score": "the same along (mean difference / per-dimension within-class variance): diagonal LDA, robust to outlier dimensions",
            "blocks_whitened": {b: [round(v, 5) for v in s] for b, s in self.whitened.items()},
        } | self.meta
        if self.neurons:
            out["neurons"] = {
                str(i): {
                    "max_d": round(float(d.max()), 5),
                    "min_d": round(float(d.min()), 5),
                    "count_d_gt_0.5": int((d > 0.5).sum()),
                    "top": [[int(j), round(float(d[j]), 5)] for j in d.argsort(descending=True)[:neurons_per_layer].tolist()],
                }
                for i, d in self.neurons.items()
            }
            out["top_neurons"] = [[i, j, round(v, 5)] for i, j, v in self.top_neurons(50)]
        return out

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Heat map: block scores per layer (top), and the sorted top-64 neuron d's per layer (bottom)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n_rows = 2 if self.neurons else 1
        fig, axes = plt.subplots(n_rows, 1, figsize=(max(6, 0.3 * len(self.layers) + 2), 2.2 + 3 * (n_rows - 1)), squeeze=False,
                                 gridspec_kw={"height_ratios": [1, 3][:n_rows]})
        ax = axes[0][0]
        grid = torch.tensor([self.blocks[b] for b in self.blocks])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma")
        ax.set_yticks(range(len(self.blocks)), list(self.blocks))
        ax.set_xticks(range(len(self.layers)), [str(i) for i in self.layers], fontsize=7)
        ax.set_title(title or f"toxic vs neutral effect size (Cohen's d){' , paired' if self.paired else ''}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
        if self.neurons:
            ax = axes[1][0]
            top = min(64, min(d.numel() for d in self.neurons.values()))
            g = torch.stack([self.neurons[i].sort(descending=True).values[:top] for i in self.layers], dim=1)
            im = ax.imshow(g.numpy(), aspect="auto", cmap="viridis")
            ax.set_xticks(range(len(self.layers)), [str(i) for i in self.layers], fontsize=7)
            ax.set_xlabel("layer")
            ax.set_ylabel(f"neuron rank (top {top})")
            ax.set_title("MLP neurons: Cohen's d, sorted per layer", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# -- computing it ----------------------------------------------------------------------------------
def statistics(config: Any, layers: Sequence[int], blocks: Sequence[str] = BLOCKS, neurons: bool = True) -> list[PooledValues]:
    """Mean-pooled block outputs of ``layers`` and, with ``neurons``, MLP neuron values (a second
    statistic: pooled values are keyed by module, and ``mlp_out``'s input and output are both wanted)."""
    arch = arch_for(config)
    stats = [PooledValues([(writer_module(arch, b, i), "output") for i in layers for b in blocks], how="mean")]
    if neurons:
        stats.append(PooledValues([(arch.module("mlp_out", i), "input") for i in layers], how="mean"))
    return stats


def from_statistics(config: Any, stats: Sequence[PooledValues], layers: Sequence[int], blocks: Sequence[str] = BLOCKS, *,
                    pair_ids: Sequence[Any] | None = None, paired: bool = False, seed: int = 0) -> Localisation:
    arch = arch_for(config)
    scores: dict[str, list[float]] = {b: [] for b in blocks}
    whitened: dict[str, list[float]] = {b: [] for b in blocks}
    neuron_d: dict[int, torch.Tensor] = {}
    pairs = None
    n: dict[str, int] = {}
    stat = stats[0]
    neurons = len(stats) > 1
    for i in layers:
        for b in blocks:
            x, y = stat.matrix(writer_module(arch, b, i))
            if paired and pairs is None:
                pairs = pair_rows(y, pair_ids)
            if not n:
                n = {"pairs": len(pairs[0])} if pairs is not None else {"toxic": int((y == 1).sum()), "neutral": int((y == 0).sum())}
            scores[b].append(direction_effect(x, y, pairs, seed))
            whitened[b].append(direction_effect(x, y, pairs, seed, whiten=True))
        if neurons:
            x, y = stats[1].matrix(arch.module("mlp_out", i))
            if paired and pairs is None:
                pairs = pair_rows(y, pair_ids)
            neuron_d[i] = neuron_effects(x, y, pairs)
    return Localisation(list(layers), scores, neuron_d or None, paired, n, whitened=whitened)


@dataclass(frozen=True)
class LocaliseOptions:
    """What `localize` scores: ``layers`` (None: all), ``blocks``, per-neuron scores, on pairs or
    not, with the earlier steps' patch ``prior`` attached, and the seed of the cross-fitting split."""

    layers: Sequence[int] | None = None
    blocks: Sequence[str] = BLOCKS
    neurons: bool = True
    paired: bool = False
    prior: Any = None
    seed: int = 0


def localize(model: Any, collector: Any, data: Any, **options: Any) -> Localisation:
    """Run the model once over ``data`` (a `LabeledSet`) and score every layer, block and neuron;
    ``options`` are `LocaliseOptions`."""
    o = LocaliseOptions(**options)
    config = model.config
    layers = list(range(num_layers(config))) if o.layers is None else list(o.layers)
    stats = statistics(config, layers, o.blocks, o.neurons)
    collector.run(stats, data.texts, data.labels, patch=o.prior, desc="localize")
    return from_statistics(config, stats, layers, o.blocks, pair_ids=getattr(data, "pair_ids", None), paired=o.paired, seed=o.seed)
