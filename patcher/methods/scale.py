"""Scale located neurons: multiply the MLP neurons that fire most on toxic text by a fixed factor.

A neuron is an input unit of the MLP's down projection (``mlp_out``). Its score is Cohen's d of
its mean-pooled value, toxic vs neutral (`patcher.collect.localisation.neuron_effects`; with ``paired`` only
complete pairs count). The ``top_n`` neurons with the largest positive d over the chosen ``layers``
(``per_layer``: the top ``top_n`` of each layer) and d above ``min_effect`` are scaled by ``factor``
(0 removes them). Scaling a neuron that the down projection reads is scaling its weight column: a
`ScaleInputs` edit on ``mlp_out``, folded, with no runtime cost. This is the inference-time neuron
scaling of the rank-one literature, baked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..collect.localisation import neuron_effects, pair_rows, parse_layers
from ..collect.statistics import PooledValues
from ..collect.steps import StepContext, method, settings_record
from ..core.arch import arch_for, num_layers
from ..core.errors import PatcherError
from ..edits.edit import ScaleInputs
from ..edits.patch import Patch
from ..recipe.settings import Checked, setting


def statistic(config: Any, s: ScaleSettings) -> PooledValues:
    arch = arch_for(config)
    layers = parse_layers(s.layers, num_layers(config))
    return PooledValues([(arch.module("mlp_out", i), "input") for i in layers], how="mean")


def collect(ctx: StepContext, s: ScaleSettings) -> PooledValues:
    stat = statistic(ctx.config, s)
    ctx.collector.run([stat], ctx.data.texts, ctx.data.labels, patch=ctx.prior, desc="scale: collect")
    return stat


def build(ctx: StepContext, stat: PooledValues, s: ScaleSettings) -> Patch:
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
    return Patch(edits, {"method": "scale", "settings": settings_record(s), "layers": records})


# Scale the MLP neurons whose pooled values differ most between toxic and neutral text.
@method("scale", collect=collect, build=build)
@dataclass(frozen=True)
class ScaleSettings(Checked):
    layers: tuple[int, ...] | str = setting("all", help='layers whose MLP neurons are scored: "all", "15-29", "3,5,7" or a list')
    top_n: int = setting(100, help="how many neurons (by effect size) are scaled", build_only=True, minimum=1)
    per_layer: bool = setting(False, help="top_n in each layer instead of over all layers", build_only=True)
    factor: float = setting(0.0, help="the scale of the chosen neurons (0 removes them, 1 keeps them)", build_only=True, minimum=0.0, maximum=1.0,
                            no_edit=1.0, tune=(0.0, 1.0, 0.05))
    min_effect: float = setting(0.0, help="only neurons whose effect size exceeds this", build_only=True)
    paired: bool = setting(False, help="score on (toxic, neutral) pairs: the data must hold pairs")
