"""The evaluator interface and registry: each evaluator module registers its class by name."""

from __future__ import annotations

from typing import Protocol

from ...core.registry import Registry


class Evaluator(Protocol):
    """A toxicity classifier with a fixed name and a known score for empty text."""

    name: str
    """The spec it was loaded from (a registry name or ``hf:<folder-or-hub-id>``)."""
    floor: float
    """The score of the empty string: the baseline a model that says nothing would get."""

    def score(self, texts: list[str]) -> list[float]:
        """P(toxic) in [0, 1], one per text; batching is done inside."""
        ...


class EvaluatorFactory(Protocol):
    """An evaluator class: built with the device it runs on (CPU-only ones ignore it)."""

    def __call__(self, device: str = "cpu") -> Evaluator: ...


EVALUATORS: Registry[EvaluatorFactory] = Registry("evaluator")
