"""The one owner of forward-hook handles.

Statistics, a patch's hook face, layer-by-layer passes and circuit masks all attach hooks to a
model. Each does it inside a `Hooks` block, which removes every handle it registered on exit,
error or not: no hook outlives the pass that placed it, so a model handed back to the caller is the
model it was.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """Context manager owning a set of hook handles: ``with Hooks() as hooks: hooks.output(m, fn)``."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Own a handle registered elsewhere (an Edit's hook face)."""
        self._handles.append(handle)
        return handle

    def output(self, module: nn.Module, fn: Callable[[nn.Module, Any, Any], Any]) -> RemovableHandle:
        """``fn(module, args, output)`` after the module's forward; a non-None return replaces the output."""
        return self.add(module.register_forward_hook(fn))

    def input(self, module: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> RemovableHandle:
        """``fn(module, args)`` before the module's forward; a non-None return replaces the args."""
        return self.add(module.register_forward_pre_hook(fn))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
