"""AURA: dampen each MLP unit in proportion to how well it tells toxic from non-toxic text.

"Whispering Experts" (Suau et al., ICML 2024; Apple's reference code ``apple/ml-aura``). A unit is
one output unit of an MLP linear (gate, up and down projections on Llama-style models; ``c_fc`` and
``c_proj`` on GPT-2); its value is max-pooled over a sentence's real tokens. With AUROC_m that
pooled value's AUROC at telling toxic (1) from non-toxic (0), units with AUROC_m > 0.5 are scaled by
alpha_m = 1 - 2 (AUROC_m - 0.5); the others are left alone. Scaling a unit's output is exactly scaling
its weight row and bias, so the result folds into the weights with no hyperparameter.

The paper's baselines are opt-in: ``det0`` zeroes the top-k units by AUROC, ``damp`` multiplies them
by a fixed factor. ``min_auroc`` raises the threshold above 0.5 (a noise-floor variant).
``strength`` mixes every factor toward 1 (``1 - s (1 - alpha)``): the paper's rule scaled down, so its
perplexity cost can be traded against toxicity; ``modules = ["mlp_out"]`` dampens the down
projections alone, a cheaper subset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..collect.statistics import PooledValues
from ..collect.steps import StepContext, method
from ..core.arch import arch_for, num_layers
from ..core.errors import PatcherError
from ..edits.edit import ScaleOutputs
from ..edits.patch import Patch
from ..recipe.settings import Checked, setting

ROLES = ("mlp_in", "mlp_out")


def statistic(config: Any, settings: AuraSettings) -> PooledValues:
    """Max-pooled outputs of the chosen MLP linears in every layer."""
    arch = arch_for(config)
    modules = [m for i in range(num_layers(config)) for m in arch.mlp_unit_modules(i, settings.modules)]
    return PooledValues([(m, "output") for m in modules], how="max")


def factors_from_auroc(aurocs: dict[str, torch.Tensor], settings: AuraSettings) -> dict[str, torch.Tensor]:
    """Per module, the factor of each unit, mixed toward 1 by ``strength`` (so the cost in perplexity
    can be budgeted: a tune searches it)."""
    s, factors = settings.strength, _paper_factors(aurocs, settings)
    if s == 1.0:  # the paper's factors as they are (the mix would round them)
        return factors
    return {m: 1.0 - s * (1.0 - f) for m, f in factors.items()}


def _paper_factors(aurocs: dict[str, torch.Tensor], settings: AuraSettings) -> dict[str, torch.Tensor]:
    if settings.mode == "aura":
        out = {}
        for m, a in aurocs.items():
            out[m] = torch.where(a > settings.min_auroc, 1.0 - 2.0 * (a - 0.5), torch.ones_like(a)).float()
        return out
    flat = torch.cat(list(aurocs.values()))
    k = min(settings.top_k, flat.numel())
    threshold = flat.topk(k).values.min()
    value = 0.0 if settings.mode == "det0" else settings.damp_factor
    return {m: torch.where(a >= threshold, torch.full_like(a, value), torch.ones_like(a)).float() for m, a in aurocs.items()}


def build_patch(config: Any, stats: PooledValues, settings: AuraSettings, provenance: dict | None = None) -> Patch:
    arch = arch_for(config)
    factors = factors_from_auroc(stats.auroc(), settings)
    edits = [ScaleOutputs(m, arch.layout, factors=f) for m, f in factors.items() if (f != 1).any()]
    return Patch(edits, {"method": "aura", "settings": settings.__dict__ | {"modules": list(settings.modules)}} | (provenance or {}))


def collect(ctx: StepContext, settings: AuraSettings) -> PooledValues:
    stat = statistic(ctx.config, settings)
    ctx.collector.run([stat], ctx.data.texts, ctx.data.labels, patch=ctx.prior, desc="aura: collect")
    return stat


def build(ctx: StepContext, stats: PooledValues, settings: AuraSettings) -> Patch:
    return build_patch(ctx.config, stats, settings)


# AURA (Suau et al., ICML 2024): max-pooled unit outputs, AUROC per unit, dampening folded into the rows.
@method("aura", collect=collect, build=build)
@dataclass(frozen=True)
class AuraSettings(Checked):
    """``modules``: which MLP linears hold units (``mlp_in``: gate/up or c_fc; ``mlp_out``: down
    projection). ``mode``: ``aura`` (the paper), ``det0`` or ``damp`` (its baselines, on ``top_k``
    units by AUROC, ``damp`` scaling them by ``damp_factor``)."""

    modules: tuple[str, ...] = setting(ROLES, help="MLP linears whose output units are scored: mlp_in (gate/up, c_fc), mlp_out (down projection)",
                                       choices=ROLES)
    mode: Literal["aura", "det0", "damp"] = setting("aura", help="aura (the paper), det0 or damp (its baselines, on top_k units)", build_only=True,
                                                    choices=("aura", "det0", "damp"))
    min_auroc: float = setting(0.5, help="units with AUROC above this are dampened (1: none)", build_only=True, minimum=0.5, maximum=1.0,
                               no_edit=1.0, tune=(0.5, 1.0, 0.01))
    top_k: int = setting(0, help="det0/damp: how many units by AUROC", build_only=True, minimum=0)
    damp_factor: float = setting(0.5, help="damp: the factor applied to the top_k units", build_only=True)
    strength: float = setting(1.0, help="mix toward identity: factor' = 1 - strength (1 - factor); 1 is the paper, 0 no edit", build_only=True,
                              minimum=0.0, maximum=1.0, no_edit=0.0, tune=(0.0, 1.0, 0.05))

    def rules(self) -> None:
        if self.mode != "aura" and self.top_k <= 0:
            raise PatcherError(f"aura: mode {self.mode} needs top_k > 0 (how many units to {self.mode})")
