"""Statistics: what a pass over the calibration data computes from activations, batch by batch.

Each `Statistic` names the modules it watches (their output, or their input for the MLP neurons
that a down projection reads) and receives each batch's activations there. Statistics merge
(across batches and processes: `merge`, `state` / `load_state`), so data-parallel collection
reduces them with one gather and a killed run resumes from saved states.

Pooling counts only real tokens: padding (left or right) is masked out, and by default the first
real token too. Position 0 is an attention sink whose hidden state has a norm many times the others'
in a trained model's middle layers; pooled over sentences of unequal length it swamps the toxic-vs-neutral
difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..core.auroc import auroc
from ..core.errors import PatcherError
from ..core.numerics import first_bad

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
        if self.how == "max":  # in the activations' own dtype (a max is exact in any), then float32: no float copy of every activation
            pooled = acts.masked_fill(~mask, float("-inf")).amax(dim=1).float()
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
