"""The seed methods' strengths and fixes (issue 27): AURA's strength mixes its factors toward 1; the
probe's activation pattern points where the classes differ when its weights do not."""

from __future__ import annotations

import pytest
import torch

from patcher.core.errors import PatcherError
from patcher.methods.aura import AuraSettings, factors_from_auroc
from patcher.methods.project import ProjectSettings, estimate


def test_aura_strength_mixes_toward_identity() -> None:
    a = {"m": torch.tensor([1.0, 0.75, 0.0, 0.5])}
    full = factors_from_auroc(a, AuraSettings())["m"]
    assert torch.allclose(full, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    half = factors_from_auroc(a, AuraSettings(strength=0.5))["m"]
    assert torch.allclose(half, torch.tensor([0.5, 0.75, 1.0, 1.0]))
    assert torch.equal(factors_from_auroc(a, AuraSettings(strength=0.0))["m"], torch.ones(4))
    damp = factors_from_auroc(a, AuraSettings(mode="damp", top_k=1, damp_factor=0.2, strength=0.5))["m"]
    assert torch.allclose(damp, torch.tensor([0.6, 1.0, 1.0, 1.0]))
    with pytest.raises(PatcherError, match="strength"):
        AuraSettings(strength=1.5)


def correlated_noise(n: int = 2000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Toxic states shifted along dimension 0; a large noise shared by dimensions 0 and 1, which a
    probe cancels by weighing dimension 1 against 0 (its weights then lean on dimension 1, where the
    classes do not differ at all)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    shared = 3.0 * torch.randn(n, generator=g)
    x = 0.3 * torch.randn(n, 8, generator=g)
    x[:, 0] += shared + 1.0 * y
    x[:, 1] += shared
    return x, y


def test_probe_pattern_points_where_the_classes_differ() -> None:
    x, y = correlated_noise()
    shift = x[y == 1].mean(0) - x[y == 0].mean(0)
    shift = shift / shift.norm()
    weights, info = estimate(x, y, None, ProjectSettings(direction="probe", holdout=0.2), "t")
    pattern, _ = estimate(x, y, None, ProjectSettings(direction="probe", holdout=0.2, probe_erase="pattern"), "t")
    assert info["probe_accuracy"][0] > 0.85  # the probe itself is good (chance: 0.5)
    assert abs(float(weights[:, 0] @ shift)) < 0.8, "the weights lean on the shared-noise dimension"
    assert abs(float(pattern[:, 0] @ shift)) > 0.95, "the pattern is the direction the classes differ along"
    # removing the weight direction leaves most of the class difference; removing the pattern, little
    left = [float((shift - (u[:, 0] @ shift) * u[:, 0]).norm()) for u in (weights, pattern)]
    assert left[0] > 0.6 and left[1] < 0.3
    with pytest.raises(PatcherError, match="probe_erase"):
        ProjectSettings(direction="probe", probe_erase="x")  # type: ignore[arg-type]
