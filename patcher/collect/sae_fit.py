"""Training sparse autoencoders on residual-stream activations, for ``direction = "sae"`` on models
that have no published SAE (`patcher.io.sae_files` reads what this writes).

The SAE is the standard ReLU architecture SAELens calls ``standard``: ``f = relu((x - b_dec) W_enc +
b_enc)``, ``x_hat = f W_dec + b_dec``, trained with the L1 penalty weighted by each feature's decoder
norm (Anthropic's April 2024 recipe), so no norm constraint is needed and the written weights read
like any SAELens SAE. Activations are scaled to a mean squared distance from their mean of ``d_model`` while training
(one L1 coefficient then fits every model) and the scale is folded into the weights before they are
returned. Features that stop firing are resampled toward badly reconstructed inputs during the
first half of training (Bricken et al. 2023), so few are dead at the end.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import PatcherError
from ..core.progress import bar
from ..io.sae_files import SAE
from ..recipe.settings import setting


@dataclass(frozen=True)
class TrainSettings:
    """How an SAE is trained; every field has a default a residual stream of a small model trains
    with (``patcher sae train``'s flags are generated from these fields)."""

    width: int = setting(0, minimum=0, help="Features (0: expansion times the residual width)")
    expansion: int = setting(8, minimum=1, help="Features per residual dimension")
    l1: float = setting(5.0, minimum=0, help="L1 coefficient (activations scaled to unit spread per dimension)")
    steps: int = setting(2000, minimum=1, help="Optimiser steps per SAE")
    batch: int = setting(2048, minimum=1, help="Activation vectors per step")
    lr: float = setting(1e-3, exclusive_minimum=0, help="Adam learning rate")
    warmup: float = setting(0.05, minimum=0, exclusive_maximum=1, help="Share of the steps over which the L1 coefficient ramps up from 0")
    resample_every: int = setting(250, help="Resample dead features every this many steps, during the first half")
    seed: int = setting(0, help="Seed of the window order, initialisation and batches")

    def __post_init__(self) -> None:
        for name in ("expansion", "steps", "batch"):
            if getattr(self, name) < 1:
                raise PatcherError(f"sae train: {name} must be at least 1, got {getattr(self, name)}")
        if self.width < 0 or self.l1 < 0 or self.lr <= 0 or not 0 <= self.warmup < 1:
            raise PatcherError("sae train: width and l1 must be >= 0, lr > 0 and warmup in [0, 1)")


def _scale(x: torch.Tensor) -> float:
    """The factor that brings the mean squared distance of ``x``'s rows from their mean to its width
    (the mean itself is the decoder bias's job, and a residual stream's mean can dwarf its spread)."""
    x = x[: 1 << 16].float()
    ms = (x - x.mean(0)).pow(2).sum(-1).mean().item()
    if not math.isfinite(ms) or ms <= 0:
        raise PatcherError("sae train: the activations are all zero or not finite; pick another layer")
    return math.sqrt(x.shape[1] / ms)


def fit_sae(acts: torch.Tensor, settings: TrainSettings, desc: str = "sae") -> SAE:
    """A ReLU SAE fitted to ``acts`` [n, d_model] (rows in any order), in the activations' own scale."""
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise PatcherError("sae train: need at least two activation vectors")
    n, d = acts.shape
    width = settings.width or settings.expansion * d
    g = torch.Generator().manual_seed(settings.seed)
    c = _scale(acts)
    w_dec = torch.randn(width, d, generator=g)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * 0.1
    w_enc = w_dec.T.clone()
    b_enc = torch.zeros(width)
    sample = acts[torch.randint(0, n, (min(n, 8192),), generator=g)].float() * c
    b_dec = sample.median(dim=0).values  # a cheap stand-in for the geometric median
    params = [p.requires_grad_() for p in (w_enc, w_dec, b_enc, b_dec)]
    opt = torch.optim.Adam(params, lr=settings.lr, betas=(0.9, 0.999))
    fired = torch.zeros(width, dtype=torch.bool)
    decay_from = int(settings.steps * 0.8)
    for step in bar(range(settings.steps), desc=desc):
        lr = settings.lr * (1.0 if step < decay_from else (settings.steps - step) / max(1, settings.steps - decay_from))
        for group in opt.param_groups:
            group["lr"] = lr
        x = acts[torch.randint(0, n, (settings.batch,), generator=g)].float() * c
        f = torch.relu((x - b_dec) @ w_enc + b_enc)
        x_hat = f @ w_dec + b_dec
        mse = (x - x_hat).pow(2).sum(-1).mean()
        l1 = (f * w_dec.norm(dim=1)).sum(-1).mean()
        ramp = min(1.0, step / max(1.0, settings.warmup * settings.steps))
        loss = mse + settings.l1 * ramp * l1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        fired |= (f > 0).any(0).detach()
        if settings.resample_every and (step + 1) % settings.resample_every == 0:
            if step < settings.steps // 2:
                _resample(~fired, x.detach(), x_hat.detach(), w_enc, w_dec, b_enc, opt, g)
            fired.zero_()
    with torch.no_grad():
        # fold the scale: f(x) = relu((x c - b) W_enc + b_enc) = relu((x - b / c)(c W_enc) + b_enc)
        return SAE(W_enc=(w_enc * c).detach().contiguous(), W_dec=(w_dec / c).detach().contiguous(), b_enc=b_enc.detach().clone(),
                   b_dec=(b_dec / c).detach().clone(), b_dec_in=True)


@torch.no_grad()
def _resample(dead: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, w_enc: torch.Tensor, w_dec: torch.Tensor, b_enc: torch.Tensor,
              opt: torch.optim.Adam, g: torch.Generator) -> None:
    """Point dead features at inputs the SAE reconstructs worst (chosen with probability by squared
    error), with a small encoder norm so they start near off; their optimiser state is reset."""
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return
    err = (x - x_hat).pow(2).sum(-1)
    pick = torch.multinomial(err / err.sum(), idx.numel(), replacement=True, generator=g)
    dirs = x[pick] - x_hat[pick]
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    alive_norm = w_enc[:, ~dead].norm(dim=0).mean().item() if (~dead).any() else 1.0
    w_dec[idx] = dirs * 0.1
    w_enc[:, idx] = dirs.T * alive_norm * 0.2
    b_enc[idx] = 0.0
    for p in (w_enc, w_dec, b_enc):
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                if p is w_enc:
                    state[key][:, idx] = 0.0
                else:
                    state[key][idx] = 0.0


def decode(sae: SAE, f: torch.Tensor) -> torch.Tensor:
    return f @ sae.W_dec.to(f) + sae.b_dec.to(f)


@torch.no_grad()
def quality(sae: SAE, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """Reconstruction quality on ``acts``: explained variance (1 - residual / total variance, summed
    over dimensions), features that never fire (count and share), and the mean number of active
    features per vector (L0)."""
    sq_err, fired, l0 = 0.0, torch.zeros(sae.width, dtype=torch.bool), 0.0
    x_all = acts.float()
    total = (x_all - x_all.mean(0)).pow(2).sum().item()
    for i in range(0, len(acts), batch):
        x = x_all[i : i + batch]
        f = sae.encode(x)
        sq_err += (x - decode(sae, f)).pow(2).sum().item()
        fired |= (f > 0).any(0)
        l0 += (f > 0).sum().item()
    dead = int((~fired).sum())
    return {"explained_variance": 1.0 - sq_err / total, "dead_features": dead, "dead_share": dead / sae.width,
            "l0": l0 / len(acts), "vectors": len(acts)}


def write_sae(sae: SAE, folder: Path, cfg: dict[str, Any]) -> None:
    """``folder/cfg.json`` and ``folder/sae_weights.safetensors`` in the SAELens layout (a standard
    ReLU SAE reading ``blocks.{layer}.hook_resid_post``); ``cfg`` adds or overrides keys."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": sae.W_enc.contiguous(), "W_dec": sae.W_dec.contiguous(), "b_enc": sae.b_enc.contiguous(),
               "b_dec": sae.b_dec.contiguous()}, str(folder / "sae_weights.safetensors"))
    base = {"architecture": "standard", "d_in": sae.d_model, "d_sae": sae.width, "dtype": "float32", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "hook_name": f"blocks.{sae.layer}.hook_resid_post", "hook_layer": sae.layer,
            "hook_head_index": None, "context_size": None, "prepend_bos": True}
    (folder / "cfg.json").write_text(json.dumps(base | cfg, indent=2) + "\n")


def settings_record(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)
