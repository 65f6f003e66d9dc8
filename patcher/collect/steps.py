"""What a recipe step's method is: a settings dataclass and two functions, registered by name.

``collect(ctx, settings)`` runs the model through the shared `Collector` (with the earlier steps'
patch attached as hooks) and returns statistics; ``build(ctx, stats, settings)`` turns them into a
Patch and loads no model. The split lets a sweep or a tune collect once and build many patches:
settings fields marked ``build_only`` never change what is collected. A method registers with
`method` on its settings class, which is where everything about it is declared: each setting's
bounds, strength-like ranges and ``build_only`` on its field, the method's own facts (``layer_range``, ``whole_model``)
on the registration. This lives below ``methods/`` so that every method module can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from torch import nn

from ..core.registry import Registry
from ..data.loaders import LabeledSet
from ..edits.patch import Patch
from ..recipe.settings import build_only_fields
from .collector import Collector

S = TypeVar("S", bound=type)


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
    """A registered method: its name, settings class, functions and facts."""

    name: str
    settings: type
    collect: Callable[[StepContext, Any], Any]
    build: Callable[[StepContext, Any, Any], Patch]
    # its statistics for a set of layers hold those of every subset: a tune collects a searched
    # ``layers`` range once, at its widest, and builds each trial's sub-range from it
    layer_range: bool = False
    # needs the whole model resident (a backward pass through every layer): refused under --sequential
    whole_model: bool = False

    def build_only(self) -> frozenset[str]:
        """Settings that never change what `collect` returns (marked on the settings fields)."""
        return build_only_fields(self.settings)


METHODS: Registry[Method] = Registry("method")


def method(name: str, *, collect: Callable[[StepContext, Any], Any], build: Callable[[StepContext, Any, Any], Patch],
           layer_range: bool = False, whole_model: bool = False) -> Callable[[S], S]:
    """Register the decorated settings class as method ``name`` with its ``collect`` and ``build``
    functions (mergekit's ``easy_define`` shape: functions, no class per method); the class is
    returned unchanged."""

    def register(settings: S) -> S:
        METHODS.register(name)(Method(name, settings, collect, build, layer_range, whole_model))
        settings.method_name = name  # errors about a value set in code name the method
        return settings

    return register


def get_method(name: str) -> Method:
    """The method a recipe step names."""
    return METHODS.get(name)


def settings_record(settings: Any) -> dict[str, Any]:
    """A step's settings as its patch records them: tuples (layers, blocks, modules...) as lists, the
    form JSON gives back, so a loaded patch's provenance equals the one built."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
