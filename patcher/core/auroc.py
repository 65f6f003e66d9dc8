"""Exact AUROC of many units at once, and a store of pooled unit values to compute it from.

AUROC here is the Mann-Whitney U statistic divided by ``n_pos * n_neg``: the probability that a
random positive scores above a random negative, ties counting one half. That is what
``sklearn.metrics.roc_auc_score`` returns, ties included, and it matters: fp16 rounding and ReLU
zeros create many ties, and any tie-breaking other than one half biases units away from 0.5.

Speed comes from sorting plain integer keys with numpy (an AVX-512 sort here; ``torch.sort`` on CPU
was ~6x slower in our measurements). Each score becomes an order-preserving integer and the label
rides in the key's lowest bit, so one value-only sort per unit orders the samples with
negatives before positives inside every tie group. The positives' positions then give U with ties
counted as wins; only units holding a tie across the classes need a second sort with the label bit
flipped (ties counted as losses), and the mean of the two is exact.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .errors import PatcherError

# Scores per chunk (chunk_units * n_samples) when the caller does not choose.
_CHUNK_SCORES = 1 << 22


def auroc(scores: torch.Tensor, labels: torch.Tensor, *, chunk_units: int | None = None) -> torch.Tensor:
    """AUROC of each unit (column) at telling label 1 from label 0; exact, ties counted one half.

    ``scores``: [n_samples, n_units] (or [n_samples] for one unit), any float dtype, any device (it
    is read chunk by chunk onto the CPU). ``labels``: [n_samples] of 0/1 or bool. Returns float64
    [n_units] (a 0-d tensor for 1-D scores).

    Comparisons are exact in float32 because float16/bfloat16/float32 values convert to it without
    loss; float64 chunks that float32 cannot hold exactly take a slower stable-argsort path. Counts
    are integers held in float64, exact below 2**53.

    Memory beyond ``scores``: about ``32 * chunk_units * n_samples`` bytes per worker thread
    (torch.get_num_threads() of them; measured peak 28 B per float32 score: the widened copy, int64
    keys sorted in place, float64 label bits), ~130 MB each with the default chunk of 2**22 scores.
    Speed: 1000 samples x 500,000 float32 units took 7 s of CPU time on 2 cores (12-16 s wall on a
    machine with load ~7).
    """
    squeeze = scores.dim() == 1
    x = scores.unsqueeze(1) if squeeze else scores
    y = _check_labels(labels, x.shape[0])
    chunk = chunk_units or max(1, _CHUNK_SCORES // x.shape[0])
    starts = range(0, x.shape[1], chunk)
    # numpy's sort and ufuncs release the GIL, so threads use the cores without copying ``scores``.
    with ThreadPoolExecutor(max_workers=min(len(starts), torch.get_num_threads())) as pool:
        out = torch.cat(list(pool.map(lambda a: _auroc_chunk(x[:, a : a + chunk], y), starts)))
    return out[0] if squeeze else out


def _check_labels(labels: torch.Tensor, n_samples: int) -> np.ndarray:
    """Labels as a bool array; one class only is an error, since AUROC is then undefined."""
    if labels.dim() != 1 or labels.shape[0] != n_samples:
        raise ValueError(f"labels must be [n_samples={n_samples}], got shape {tuple(labels.shape)}")
    y = labels.detach().cpu()
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must hold only 0 and 1")
    y = y.bool().numpy()
    n_pos = int(y.sum())
    if n_pos in (0, n_samples):
        raise PatcherError(
            f"AUROC needs both classes but all {n_samples} samples have label {int(n_pos > 0)}: "
            "give the concept set both toxic (1) and non-toxic (0) texts"
        )
    return y


def _auroc_chunk(x: torch.Tensor, y: np.ndarray) -> torch.Tensor:
    """AUROC of the units of one [n_samples, chunk] slice."""
    x = x.detach().cpu()
    if x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.double()  # bfloat16 and integers: exact in float64, and numpy has no bfloat16
    src = x.numpy().T
    # A copy, [chunk, n_samples], each unit's scores contiguous; narrower floats widen losslessly.
    rows = np.array(src, dtype=np.float64 if src.dtype == np.float64 else np.float32, order="C")
    if np.isnan(rows).any():
        raise ValueError("scores hold NaN; AUROC is undefined for them")
    n_pos = int(y.sum())
    if rows.dtype == np.float64:
        rows32 = rows.astype(np.float32)
        if not np.array_equal(rows32, rows):
            return torch.from_numpy(_u_stable_argsort(rows, y) / (n_pos * (y.size - n_pos)))
        rows = rows32
    return torch.from_numpy(_u_int_keys(rows, y) / (n_pos * (y.size - n_pos)))


def _u_int_keys(rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """U per unit for float32 scores [units, n], from sorts of (ordered score, label bit) keys."""
    keys = _ordered_keys(rows, y)
    keys.sort(axis=1)
    u = _u_from_sorted(keys & 1)
    # Adjacent keys that differ only in the label bit: a tie between a negative and a positive.
    cross = ((keys[:, 1:] ^ keys[:, :-1]) == 1).any(axis=1)
    if cross.any():
        flipped = np.sort(keys[cross] ^ 1, axis=1)  # positives first inside ties: ties count as losses
        u[cross] = (u[cross] + _u_from_sorted(1 - (flipped & 1))) / 2
    return u


def _ordered_keys(rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Integer keys [units, n] ordered as the float32 scores ``rows`` are, label in the lowest bit.

    Modifies ``rows``. A float32's bits read as int32 order non-negative floats correctly and
    negative ones in reverse; flipping the low 31 bits of negatives fixes that, and the extra +1
    maps -0.0 onto +0.0 (equal floats must give equal keys). Values widened from float16 or
    bfloat16 leave the lowest bit zero, so the label fits in int32 keys, which sort ~4x faster;
    full float32 values need int64 keys."""
    bits = rows.view(np.int32)
    neg = bits >> 31  # -1 where the float is negative, else 0
    bits ^= neg & 0x7FFFFFFF
    bits -= neg
    keys = bits if not np.bitwise_or.reduce(bits, axis=None) & 1 else np.left_shift(bits, 1, dtype=np.int64)
    keys |= y
    return keys


def _u_stable_argsort(rows: np.ndarray, y: np.ndarray) -> np.ndarray:
    """U per unit for scores [units, n] of any dtype: two stable argsorts, negatives placed first
    (ties count as wins) and then positives first (ties count as losses); their mean is exact."""
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    hi = np.argsort(rows[:, np.concatenate([neg, pos])], axis=1, kind="stable") >= neg.size
    lo = np.argsort(rows[:, np.concatenate([pos, neg])], axis=1, kind="stable") < pos.size
    return (_u_from_sorted(hi) + _u_from_sorted(lo)) / 2


def _u_from_sorted(is_pos: np.ndarray) -> np.ndarray:
    """U (negatives ranked below each positive, summed) from the sorted order's positive mask
    [units, n]: the positives' positions summed, less the positives ranked below each other."""
    n_pos = int(is_pos[0].sum())
    positions = np.arange(is_pos.shape[1], dtype=np.float64)
    return is_pos.astype(np.float64) @ positions - n_pos * (n_pos - 1) / 2
