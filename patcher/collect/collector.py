"""Forward passes with hooks, feeding streaming statistics (`patcher.collect.statistics`).

One pass over the data serves every statistic: the `Collector` cuts the texts into length-sorted
batches, places one hook per watched module, and each batch's activations go to every statistic
that asked for them. Position ids are passed explicitly so left padding gives the same activations
as right padding.

`forward_loop` is the one whole-model forward-with-hooks loop; the other ways of running a model
over data (data-parallel, resumable: `patcher.collect.parallel`; layer by layer:
`patcher.collect.layerwise`) drive the same batches and the same statistic hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol

import torch
from torch import nn

from ..core.errors import PatcherError
from ..core.hooks import Hooks
from ..core.progress import bar
from ..core.tokens import leading_specials
from ..edits.patch import Patch
from .statistics import Batch, Side, Statistic


class Pipeline(Protocol):
    """A way of running the collector's passes other than the whole model in this process."""

    def collect(self, collector: Collector, stats: Sequence[Statistic], wanted: Wanted, texts: Sequence[str], labels: Sequence[int],
                patch: Patch | None, desc: str) -> None: ...


class Collector:
    """Runs a model over texts in length-sorted batches, feeding every statistic from one pass."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        batch_size: int = 32,
        max_tokens: int = 64,
        padding_side: Literal["left", "right"] = "right",
        skip_first: bool = True,
        options: Pipeline | None = None,
    ):
        """``options``: a `patcher.collect.parallel.ParallelCollect` for data-parallel, resumable or
        layer-by-layer passes; None runs the whole model in this process."""
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.padding_side, self.skip_first = padding_side, skip_first
        self.options = options

    @property
    def device(self) -> torch.device:
        """The first parameter's device (the embedding's, under an accelerate device map); the CPU
        when accelerate offloaded it (its hooks then move the inputs)."""
        dev = next(self.model.parameters()).device
        return torch.device("cpu") if dev.type == "meta" else dev

    def batches(self, texts: Sequence[str], labels: Sequence[int]) -> Iterator[Batch]:
        """Batches sorted by token length (less padding), each row remembering its original index."""
        enc = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_tokens] for t in texts]
        empty = [i for i, e in enumerate(enc) if not e]
        if empty:
            raise PatcherError(f"text #{empty[0]} tokenizes to nothing: drop empty texts from the data")
        prefix = leading_specials(self.tokenizer)  # Gemma's <bos>, as generation sees prompts; the sink skip_first drops
        enc = [prefix + e for e in enc]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(enc[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(enc[i])
                sl = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
                ids[r, sl] = torch.tensor(enc[i])
                mask[r, sl] = 1
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)
            pool = mask.bool()
            if self.skip_first:
                first = mask.argmax(dim=1)
                long_enough = mask.sum(1) > 1
                pool[torch.arange(len(rows))[long_enough], first[long_enough]] = False
            yield Batch(ids, mask, position_ids, pool, torch.tensor([labels[i] for i in rows]), torch.tensor(rows))

    def run(self, stats: Sequence[Statistic], texts: Sequence[str], labels: Sequence[int], patch: Patch | None = None, desc: str = "collect") -> None:
        """One pass over the texts feeding ``stats``. ``patch`` (earlier steps of a stacked recipe) is
        attached as hooks, so the statistics see the model as those steps left it. The pass runs
        through ``options`` (data-parallel, resumable, layer by layer) when the collector has them."""
        wanted = watched_modules(self.model, stats)
        if self.options is not None:
            self.options.collect(self, stats, wanted, texts, labels, patch, desc)
            return
        forward_loop(self, wanted, list(self.batches(texts, labels)), patch, desc)


Wanted = dict[tuple[str, Side], list[Statistic]]


def watched_modules(model: nn.Module, stats: Sequence[Statistic]) -> Wanted:
    """``(module, side) -> statistics watching it``, checked against the model's modules."""
    modules = dict(model.named_modules())
    wanted: Wanted = {}
    for s in stats:
        for w in s.watches:
            if w[0] not in modules:
                raise PatcherError(f"the model has no module {w[0]!r}: is the recipe for another architecture?")
            wanted.setdefault(w, []).append(s)
    return wanted


def attach_statistics(hooks: Hooks, model: nn.Module, wanted: Wanted, current: list[Batch]) -> None:
    """One hook per watched module feeding every statistic that asked for it; ``current[0]`` is the
    batch in flight (set by whoever drives the passes)."""
    modules = dict(model.named_modules())
    for (name, side), users in wanted.items():
        def feed(acts: torch.Tensor, name: str = name, users: list[Statistic] = users) -> None:
            batch = current[0]
            acts = (acts[0] if isinstance(acts, tuple) else acts).detach()  # Falcon's layers return tuples
            for s in users:
                s.observe(name, acts, batch)

        if side == "output":
            hooks.output(modules[name], lambda m, a, out, feed=feed: feed(out))
        else:
            hooks.input(modules[name], lambda m, a, feed=feed: feed(a[0]))


def forward_loop(collector: Collector, wanted: Wanted, batches: Sequence[Batch], patch: Patch | None, desc: str,
                 after_batch: Callable[[int], None] | None = None, start: int = 0) -> None:
    """The forward pass with hooks, the one every whole-model pipeline uses: ``patch`` attached, the
    statistics' hooks registered after it (a statistic on an edited module sees the edited output),
    every hook removed on exit. ``after_batch(n)`` runs after batch ``start + n`` (1-based), for
    checkpoints."""
    model = collector.model
    current: list[Batch] = []
    with torch.inference_mode(), (patch or Patch([])).hooked(model), Hooks() as hooks:
        attach_statistics(hooks, model, wanted, current)
        for n, batch in enumerate(bar(batches, desc=desc), start=start + 1):
            current[:] = [batch]
            dev = collector.device
            model(
                input_ids=batch.input_ids.to(dev),
                attention_mask=batch.attention_mask.to(dev),
                position_ids=batch.position_ids.to(dev),
                use_cache=False,
                logits_to_keep=1,  # statistics never read the logits: skip most of the LM head
            )
            if after_batch is not None:
                after_batch(n)
