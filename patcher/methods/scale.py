"""Scale located neurons: multiply the MLP neurons that fire most on toxic text by a fixed factor.

A neuron is an input unit of the MLP's down projection (``mlp_out``). Its score is Cohen's d of
its mean-pooled value, toxic vs neutral (`patcher.localize.neuron_effects`; with ``paired`` only
complete pairs count). The ``top_n`` neurons with the largest positive d over the chosen ``layers``
(``per_layer``: the top ``top_n`` of each layer) and d above ``min_effect`` are scaled by ``factor``
(0 removes them). Scaling a neuron that the down projection reads is scaling its weight column: a
`ScaleInputs` edit on ``mlp_out``, folded, with no runtime cost. This is the inference-time neuron
scaling of the rank-one literature, baked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..arch import arch_for, num_layers
from ..edits import ScaleInputs
from ..errors import PatcherError
from ..localize import PooledStates, neuron_effects, pair_rows, parse_layers
from ..patch import Patch


@dataclass(frozen=True)
class ScaleSettings:
    layers: tuple[int, ...] | str = "all"
    top_n: int = 100
    per_layer: bool = False
    factor: float = 0.0
    min_effect: float = 0.0
    paired: bool = False

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise PatcherError(f"scale: top_n must be at least 1, got {self.top_n}")
        if not 0.0 <= self.factor < 1.0:
            raise PatcherError(f"scale: factor must be in [0, 1) (0 removes the neurons), got {self.factor}")


def statistic(config: Any, s: ScaleSettings) -> PooledStates:
    arch = arch_for(config)
    layers = parse_layers(s.layers, num_layers(config))
    return PooledStates([(arch.module("mlp_out", i), "input") for i in layers], how="mean")


def collect(ctx: Any, s: ScaleSettings) -> PooledStates:
    stat = statistic(ctx.config, s)
    ctx.collector.run([stat], ctx.data.texts, ctx.data.labels, patch=ctx.prior, desc="scale: collect")
    return stat


def build(ctx: Any, stat: PooledStates, s: ScaleSettings) -> Patch:
    arch = arch_for(ctx.config)
    layers = parse_layers(s.layers, num_layers(ctx.config))
    effects: dict[int, torch.Tensor] = {}
    pairs = None
    for i in layers:
        x, y = stat.matrix(arch.module("mlp_out", i))
        if s.paired and pairs is None:
            pairs = pair_rows(y, getattr(ctx.data, "pair_ids", None))
        effects[i] = neuron_effects(x, y, pairs)
    picks: dict[int, list[int]] = {i: [] for i in layers}
    if s.per_layer:
        for i, d in effects.items():
            top = d.topk(min(s.top_n, d.numel()))
            picks[i] = [int(j) for j, v in zip(top.indices, top.values) if v > s.min_effect]
    else:
        flat = [(float(v), i, j) for i, d in effects.items() for j, v in enumerate(d.tolist()) if v > s.min_effect]
        flat.sort(reverse=True)
        for _, i, j in flat[: s.top_n]:
            picks[i].append(j)
    if not any(picks.values()):
        raise PatcherError(f"scale: no neuron has an effect size above min_effect = {s.min_effect}: lower it or check the data's labels")
    edits = []
    records = []
    for i in layers:
        if not picks[i]:
            continue
        d = effects[i]
        f = torch.ones(d.numel())
        f[picks[i]] = s.factor
        edits.append(ScaleInputs(arch.module("mlp_out", i), arch.layout, factors=f))
        records.append({"layer": i, "neurons": sorted(picks[i]), "min_d": round(float(d[picks[i]].min()), 4)})
    settings = asdict(s) | {"layers": list(s.layers) if isinstance(s.layers, tuple) else s.layers}
    return Patch(edits, {"method": "scale", "settings": settings, "layers": records})
