"""Forward passes with hooks, feeding streaming statistics.

One pass over the data serves every statistic: each `Statistic` names the modules it watches (their
output, or their input for the MLP neurons that a down projection reads), the `Collector` places one
hook per module, and each batch's activations go to every statistic that asked for them.

Pooling counts only real tokens: padding (left or right) is masked out, and by default the first
real token too. Position 0 is an attention sink whose hidden state has a norm ~30x the others' in
SmolLM2's middle layers; pooled over sentences of unequal length it swamps the toxic-vs-neutral
difference. Position ids are passed explicitly so left padding gives the same activations as right
padding.

Statistics merge (across batches, across processes: `merge`, `state` / `load_state`), so
data-parallel collection reduces them with one gather.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .auroc import auroc
from .errors import PatcherError
from .numerics import first_bad
from .patch import Patch
from .tokens import leading_specials

Side = Literal["input", "output"]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    pool_mask: torch.Tensor  # [B, T] bool: the tokens pooled statistics count
    labels: torch.Tensor  # [B] long
    index: torch.Tensor  # [B] long: position of each row in the caller's text list


class Statistic:
    """Something computed from activations of some modules, batch by batch."""

    watches: tuple[tuple[str, Side], ...] = ()

    def observe(self, module: str, acts: torch.Tensor, batch: Batch) -> None:
        raise NotImplementedError

    def merge(self, other: Statistic) -> None:
        raise NotImplementedError


def _check_finite(module: str, pooled: torch.Tensor, acts: torch.Tensor, how: str) -> None:
    """Refuse non-finite pooled values, naming the module, the unit and the cause: fp16 overflow
    only when the activations are float16; otherwise the model (or an earlier step's edits, which
    are attached while a later step collects) produced it."""
    if torch.isfinite(pooled).all():
        return
    sample, unit = first_bad(pooled)
    why = ("fp16 overflow: collect with --dtype float32 or bfloat16" if acts.dtype == torch.float16 else
           f"the forward pass itself produced it in {acts.dtype} (the base weights, or the edits of an earlier step, which are "
           "attached while a later step collects): check them with `patcher verify` or run the steps one at a time")
    raise PatcherError(f"{how}-pooled activations of {module} hold NaN or inf at unit {unit} (batch row {sample}): {why}")


class PooledValues(Statistic):
    """Per sample, one pooled value per unit of each watched module (max or mean over pooled tokens),
    with the sample's label and index. Stored in ``store_dtype``; memory is
    ``n_samples * sum(units) * bytes(store_dtype)`` (SmolLM2-135M, all MLP linears, 1000 sentences,
    float32: 1000 * 109,440 * 4 B = 438 MB). float16 halves that but rounds close values into ties:
    on real SmolLM2 activations the AUROC moved by up to 2.6e-3, hence the float32 default."""

    def __init__(self, watches: Sequence[tuple[str, Side]], how: Literal["max", "mean"] = "max", store_dtype: torch.dtype = torch.float32):
        self.watches = tuple(watches)
        self.how = how
        self.store_dtype = store_dtype
        self.values: dict[str, list[torch.Tensor]] = {m: [] for m, _ in self.watches}
        self.labels: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def observe(self, module: str, acts: torch.Tensor, batch: Batch) -> None:
        mask = batch.pool_mask.unsqueeze(-1).to(acts.device)
        if self.how == "max":
            pooled = acts.float().masked_fill(~mask, float("-inf")).amax(dim=1)
        else:  # float64 sum; masked_fill, not a product, so nothing at a padded position can leak in
            pooled = acts.double().masked_fill(~mask, 0.0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        _check_finite(module, pooled, acts, self.how)
        self.values[module].append(pooled.to(self.store_dtype).cpu())
        if module == self.watches[0][0]:
            self.labels.append(batch.labels.cpu())
            self.index.append(batch.index.cpu())

    def merge(self, other: Statistic) -> None:
        assert isinstance(other, PooledValues)
        for m in self.values:
            self.values[m] += other.values[m]
        self.labels += other.labels
        self.index += other.index

    def batches_seen(self) -> int:
        return len(self.labels)

    def state(self, since: int = 0) -> dict[str, torch.Tensor]:
        """What batches ``since``.. added, as plain tensors (for ``torch.save`` and gathering
        across processes); `load_state` merges it into another instance."""
        cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)  # noqa: E731
        return {"labels": cat(self.labels[since:]), "index": cat(self.index[since:])} | {
            f"values:{m}": cat(v[since:]) for m, v in self.values.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state["index"].numel():
            for m in self.values:
                self.values[m].append(state[f"values:{m}"])
            self.labels.append(state["labels"])
            self.index.append(state["index"])

    def matrix(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [n, units], labels [n])`` in the caller's sample order."""
        order = torch.cat(self.index).argsort()
        return torch.cat(self.values[module])[order], torch.cat(self.labels)[order]

    def auroc(self) -> dict[str, torch.Tensor]:
        """AUROC of every unit at telling label 1 from label 0."""
        out = {}
        for m in self.values:
            x, y = self.matrix(m)
            out[m] = auroc(x, y)
        return out


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
        progress: bool = True,
        options: Any = None,
    ):
        """``options``: a `patcher.distributed.ScaleOptions` for data-parallel, resumable or
        layer-by-layer passes; None runs the whole model in this process."""
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.padding_side, self.skip_first, self.progress = padding_side, skip_first, progress
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
        """One pass over the texts. ``patch`` (earlier steps of a stacked recipe) is attached as hooks,
        so the statistics see the model as those steps left it."""
        modules = dict(self.model.named_modules())
        wanted: dict[tuple[str, Side], list[Statistic]] = {}
        for s in stats:
            for w in s.watches:
                if w[0] not in modules:
                    raise PatcherError(f"the model has no module {w[0]!r}: is the recipe for another architecture?")
                wanted.setdefault(w, []).append(s)
        if self.options is not None:
            from .distributed import collect_scaled

            return collect_scaled(self, stats, wanted, texts, labels, patch, desc)
        current: list[Batch] = []
        handles: list = []
        n_batches = -(-len(texts) // self.batch_size)
        try:
            with torch.inference_mode(), (patch or Patch([])).hooked(self.model):
                # registered after the patch's hooks: a statistic on an edited module sees the edited output
                handles = self._register(modules, wanted, current)
                for batch in tqdm(self.batches(texts, labels), total=n_batches, desc=desc, disable=not self.progress):
                    current[:] = [batch]
                    dev = self.device
                    self.model(
                        input_ids=batch.input_ids.to(dev),
                        attention_mask=batch.attention_mask.to(dev),
                        position_ids=batch.position_ids.to(dev),
                        use_cache=False,
                        logits_to_keep=1,  # statistics never read the logits: skip most of the LM head
                    )
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _register(modules: dict[str, nn.Module], wanted: dict[tuple[str, Side], list[Statistic]], current: list[Batch]) -> list:
        handles = []
        for (name, side), users in wanted.items():
            def feed(acts: torch.Tensor, name: str = name, users: list[Statistic] = users) -> None:
                batch = current[0]
                acts = (acts[0] if isinstance(acts, tuple) else acts).detach()  # Falcon's layers return tuples
                for s in users:
                    s.observe(name, acts, batch)

            if side == "output":
                handles.append(modules[name].register_forward_hook(lambda m, a, out, feed=feed: feed(out)))
            else:
                handles.append(modules[name].register_forward_pre_hook(lambda m, a, feed=feed: feed(a[0])))
        return handles
