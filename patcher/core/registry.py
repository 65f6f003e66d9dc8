"""Named plug-ins: methods and evaluators register themselves by name with a decorator, and callers
look them up by the name a recipe or a flag uses. One pattern for every kind of plug-in, so adding
one is one decorated class in its own module, and an unknown name is a one-line error listing the
known ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import PatcherError

T = TypeVar("T")


class Registry(Generic[T]):
    """``kind`` names the plug-ins in error messages ("method", "evaluator")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise PatcherError(f"unknown {self.kind} {name!r}: known {self.kind}s are {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)
