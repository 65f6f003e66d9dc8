"""Exact AUROC against sklearn, ties included, and the pooled-value store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from patcher.core.auroc import auroc
from patcher.core.errors import PatcherError


def reference(scores: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    y = labels.numpy()
    return np.array([roc_auc_score(y, scores[:, j].double().numpy()) for j in range(scores.shape[1])])


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_matches_sklearn_on_random_scores(gen, dtype):
    labels = torch.randint(0, 2, (301,), generator=gen)
    scores = (torch.randn(301, 40, generator=gen) + 0.5 * labels[:, None] * torch.randn(40, generator=gen)).to(dtype)
    np.testing.assert_allclose(auroc(scores, labels).numpy(), reference(scores, labels), rtol=0, atol=1e-6)


def test_matches_sklearn_on_heavily_tied_scores(gen):
    labels = torch.randint(0, 2, (200,), generator=gen)
    scores = torch.randint(0, 4, (200, 30), generator=gen).float()
    scores[:, 0] = 2.0  # every sample tied: exactly 0.5
    scores[:, 1] = labels  # perfectly separated: 1.0
    out = auroc(scores, labels)
    np.testing.assert_allclose(out.numpy(), reference(scores, labels), rtol=0, atol=1e-6)
    assert out[0] == 0.5 and out[1] == 1.0


def test_float64_beyond_float32_precision(gen):
    """Distinct doubles that round to the same float32 must stay distinct (the exact slow path)."""
    labels = torch.randint(0, 2, (150,), generator=gen)
    scores = 1.0 + torch.randn(150, 6, generator=gen, dtype=torch.float64) * 1e-9
    np.testing.assert_allclose(auroc(scores, labels).numpy(), reference(scores, labels), rtol=0, atol=1e-6)


def test_signed_zeros_tie_and_infinities_order(gen):
    labels = torch.tensor([1, 0] * 50)
    zeros = torch.where(torch.arange(100) % 4 < 2, 0.0, -0.0)  # +0 and -0 across both classes
    assert auroc(zeros, labels) == 0.5
    scores = torch.randn(100, generator=gen)
    scores[::7] = float("inf")
    scores[3::11] = -float("inf")
    finite = scores.clamp(-1e30, 1e30)  # sklearn rejects inf; the same order with finite values
    assert float(auroc(scores, labels)) == pytest.approx(roc_auc_score(labels.numpy(), finite.numpy()), abs=1e-12)


def test_single_unit_and_chunking_agree(gen):
    labels = torch.randint(0, 2, (120,), generator=gen)
    scores = torch.randn(120, 7, generator=gen)
    full = auroc(scores, labels)
    assert auroc(scores[:, 3], labels).shape == ()
    assert auroc(scores[:, 3], labels) == full[3]
    assert auroc(scores[:, 3:4], labels).shape == (1,)
    assert torch.equal(auroc(scores, labels, chunk_units=3), full)
    assert torch.equal(auroc(scores, labels.bool()), full)


def test_inputs_are_left_unchanged(gen):
    labels = torch.randint(0, 2, (50,), generator=gen)
    scores = torch.randn(1, 50, generator=gen).T  # units contiguous: the layout auroc works in
    before = scores.clone()
    auroc(scores, labels)
    assert torch.equal(scores, before)


def test_one_class_is_an_error():
    with pytest.raises(PatcherError, match="both classes"):
        auroc(torch.randn(10, 3), torch.ones(10))


def test_bad_inputs(gen):
    with pytest.raises(ValueError, match="only 0 and 1"):
        auroc(torch.randn(4, 2), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="n_samples=4"):
        auroc(torch.randn(4, 2), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([[0.0], [float("nan")]]), torch.tensor([0, 1]))
