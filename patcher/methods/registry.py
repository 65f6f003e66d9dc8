"""Methods: each turns a model's activations on labelled text into a Patch of Edits.

A method is a class in its own module, registered with ``@METHODS.register(name)``: it declares its
settings dataclass (fields made with `patcher.recipe.settings.setting`; those marked
``build_only`` never change what is collected), ``collect`` (runs the model through the shared
`Collector` and returns statistics) and ``build`` (statistics and settings to a Patch; loads no
model). The split lets a sweep or a tune collect once and build many patches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import nn

from ..collect.collector import Collector
from ..core.registry import Registry
from ..data.loaders import LabeledSet
from ..edits.patch import Patch
from ..recipe.settings import build_only_fields


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


class Method:
    """Base of every method: ``settings`` is its settings dataclass."""

    name: ClassVar[str]
    settings: ClassVar[type]
    whole_model: ClassVar[bool] = False  # needs the whole model resident (a backward pass): refused under --sequential

    def collect(self, ctx: StepContext, settings: Any) -> Any:
        raise NotImplementedError

    def build(self, ctx: StepContext, stats: Any, settings: Any) -> Patch:
        raise NotImplementedError

    @classmethod
    def build_only(cls) -> frozenset[str]:
        """Settings that never change what `collect` returns (marked on the settings fields)."""
        return build_only_fields(cls.settings)


METHODS: Registry[type[Method]] = Registry("method")


def get_method(name: str) -> Method:
    """An instance of the method a recipe step names."""
    return METHODS.get(name)()


def settings_record(settings: Any) -> dict[str, Any]:
    """A step's settings as its patch records them: tuples (layers, blocks, modules...) as lists, the
    form JSON gives back, so a loaded patch's provenance equals the one built."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
