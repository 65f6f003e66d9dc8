"""Methods: each turns a model's activations on labelled text into a Patch of Edits.

A method is two functions and a settings class. ``collect`` runs the model (through the shared
`Collector`) and returns statistics; ``build`` turns statistics and settings into a Patch. The split
lets a sweep collect once and build many patches. Register a method in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..collect import Collector
from ..data import LabeledSet
from ..errors import PatcherError
from ..patch import Patch


@dataclass
class StepContext:
    """What a method may use: the model (never mutated), its tokenizer, the shared collector, the
    step's data, and the patch of the earlier steps (attached as hooks while collecting)."""

    model: nn.Module
    tokenizer: Any
    collector: Collector
    data: LabeledSet
    prior: Patch

    @property
    def config(self) -> Any:
        return self.model.config


@dataclass(frozen=True)
class Method:
    name: str
    settings: type
    collect: Callable[[StepContext, Any], Any]
    build: Callable[[StepContext, Any, Any], Patch]
    build_only: frozenset[str] = frozenset()  # settings that never change what `collect` returns


def _aura() -> Method:
    from . import aura

    def collect(ctx: StepContext, s: aura.AuraSettings) -> Any:
        stat = aura.statistic(ctx.config, s)
        ctx.collector.run([stat], ctx.data.texts, ctx.data.labels, patch=ctx.prior, desc="aura: collect")
        return stat

    return Method("aura", aura.AuraSettings, collect, lambda ctx, stats, s: aura.build_patch(ctx.config, stats, s),
                  frozenset({"mode", "min_auroc", "top_k", "damp_factor"}))


METHODS: dict[str, Callable[[], Method]] = {"aura": _aura}


def _project() -> Method:
    from . import project

    return Method("project", project.ProjectSettings, project.collect, project.build, frozenset({"strength", "k", "probe_c", "holdout", "erase"}))


def _scale() -> Method:
    from . import scale

    return Method("scale", scale.ScaleSettings, scale.collect, scale.build, frozenset({"factor", "top_n", "per_layer", "min_effect"}))


def _circuit() -> Method:
    from . import circuit

    def collect(ctx: StepContext, s: circuit.CircuitSettings) -> circuit.Circuit:
        toxic = [t for t, y in zip(ctx.data.texts, ctx.data.labels) if y == 1]
        neutral = [t for t, y in zip(ctx.data.texts, ctx.data.labels) if y == 0]
        with ctx.prior.hooked(ctx.model):
            return circuit.learn_circuit(ctx.model, ctx.tokenizer, toxic, neutral, s, device=ctx.collector.device)

    return Method("circuit", circuit.CircuitSettings, collect, lambda ctx, c, s: c.to_patch(ctx.config))


def _transport() -> Method:
    from . import transport

    # strength only: the causal estimate depends on the mode (the earlier maps it applies), never on
    # the strength, which scales the fitted maps afterwards
    return Method("transport", transport.TransportSettings, transport.collect, transport.build, frozenset({"strength"}))


METHODS["project"] = _project
METHODS["scale"] = _scale
METHODS["circuit"] = _circuit
METHODS["transport"] = _transport


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PatcherError(f"unknown method {name!r}: known methods are {', '.join(sorted(METHODS))}")
    return METHODS[name]()
