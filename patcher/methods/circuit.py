"""Circuit pruning: learn binary masks over attention heads and MLP neurons, then zero them.

After SafeSeek ("Universal Attribution of Safety Circuits in Language Models", 2026): one learnable
logit per attention head and per MLP neuron, ``mask = sigmoid(logit / T)``, made binary with a
straight-through estimator (the forward pass uses ``mask > 0.5``, the backward pass the sigmoid's
gradient). The model's weights are frozen; only the logits are optimised.

Where the masks act, from the architecture map (`patcher.arch`):

* head ``h`` of layer ``i``: a forward pre-hook on ``attn_out`` (the attention output projection)
  multiplies its input, laid out head by head, by the head's mask repeated over ``head_dim``;
* neuron ``j`` of layer ``i``: a forward pre-hook on ``mlp_out`` (the MLP down projection)
  multiplies its input unit ``j``.

That is exactly what `ZeroHeads` and `ZeroNeurons` do to the weights (zero input columns), so the
baked checkpoint equals the masked model.

Objective (detoxification). Masks near 1 keep the model; the *circuit* is the set of zeros. With
``M`` the model with the current circuit removed::

    loss = LM(M, neutral text)                          keep utility
           - beta * min(LM(M, toxic text), cap)         make toxic text unlikely, capped
           + lambda * sparsity                          at most a budget of zeros

``LM`` is the mean next-token cross-entropy over real tokens (padding excluded). ``cap`` is the
unpruned model's toxic loss (first batch) plus ``toxic_cap`` nats, so the toxic term cannot run
away by wrecking the model. ``sparsity = relu(f_h - b_h) / b_h + relu(f_n - b_n) / b_n`` where
``f`` is the fraction of zeroed heads (neurons), counted on the binary mask with the soft mask's
(sigmoid's) gradient, and ``b`` the budget: zero while the circuit fits its budget, it pushes every
mask back toward 1 once it overflows. Logits start at ``+3 T`` (every mask ~0.95, binary 1: the
unpruned model). After training the budget is enforced exactly: of the zeroed units, at most
``floor(budget * N)`` are kept, those with the lowest logits.

Damage (``max_damage`` > 0, nats). The neutral LM term above rewards keeping utility but sets no
bound, so with a strong toxic term the mask prunes into a large perplexity cost. The damage term
adds ``damage_weight * relu(LM(M, neutral) - LM(model, neutral) - max_damage)`` per batch (the same
batch through the unpruned model, without gradient), and after training the circuit is cut to the
longest prefix of its units, most confident first, whose neutral loss on up to 64 neutral texts
rises at most ``max_damage``: ``log(1 + x)`` nats bounds that text's perplexity rise by ``x``.

Strength (build-only). ``strength`` scales the circuit's columns by ``1 - strength`` instead of
zeroing them (1, the default, is the paper's removal; 0 no edit), so one learned circuit gives a
frontier of toxicity against perplexity, and a sweep or a tune learns the masks once. A circuit
built below strength 1 is written as `ScaleInputs` edits (`patcher inspect` maps only whole removals).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..collect.steps import StepContext, method
from ..core.arch import Architecture, arch_for, head_layout, num_layers
from ..core.errors import PatcherError
from ..core.progress import bar as progress_bar
from ..edits.edit import ScaleInputs, ZeroHeads, ZeroNeurons
from ..edits.patch import Patch
from ..recipe.settings import Checked, setting

METHOD = "circuit"


@dataclass
class CircuitSettings(Checked):
    """Hyperparameters of `learn_circuit` (the defaults fit a small model on a CPU in minutes)."""

    temperature: float = setting(1.0, help="T in mask = sigmoid(logit / T)", exclusive_minimum=0.0)
    lr: float = setting(0.05, help="Adam learning rate on the mask logits", exclusive_minimum=0.0)
    steps: int = setting(200, help="optimiser steps", minimum=1)
    batch_size: int = setting(8, help="toxic texts and neutral texts per step (each)", minimum=1)
    max_tokens: int = setting(32, help="texts are truncated to this many tokens", minimum=2)
    head_budget: float = setting(0.01, help="at most this fraction of all heads removed, in (0, 1]", exclusive_minimum=0.0, maximum=1.0)
    neuron_budget: float = setting(0.01, help="at most this fraction of all MLP neurons removed, in (0, 1]", exclusive_minimum=0.0, maximum=1.0)
    beta: float = setting(0.5, help="weight of the (capped) toxic LM loss", minimum=0.0)
    lam: float = setting(1.0, help='weight of the over-budget sparsity penalty ("lambda")', minimum=0.0)
    toxic_cap: float = setting(2.0, help="the toxic loss counts up to the unpruned loss plus this many nats", minimum=0.0)
    max_damage: float = setting(0.0, help="> 0: neutral LM loss may rise at most this many nats over the unpruned model's (log(1.05) ~ +5% perplexity)",
                                minimum=0.0)
    damage_weight: float = setting(10.0, help="weight of the neutral loss rise beyond max_damage (per nat)", minimum=0.0)
    seed: int = setting(0, help="seed of the sampler and the mask initialisation")
    strength: float = setting(1.0, help="how much of the learned circuit is removed: its columns scaled by 1 - strength (1: zeroed, the paper; 0: no edit)",
                              build_only=True, minimum=0.0, maximum=1.0, no_edit=0.0, tune=(0.0, 1.0, 0.05))


@dataclass
class Circuit:
    """The learned circuit: what to remove, and how training went."""

    heads: dict[int, list[int]]  # layer -> removed heads
    neurons: dict[int, list[int]]  # layer -> removed neurons
    history: list[dict] = field(default_factory=list)  # per step: loss terms and sparsity
    num_layers: int = 0
    num_heads: int = 0
    head_dim: int = 0
    width: int = 0  # MLP neurons per layer (input units of the down projection)
    settings: dict = field(default_factory=dict)

    @property
    def n_heads(self) -> int:
        return sum(len(v) for v in self.heads.values())

    @property
    def n_neurons(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def binary_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(heads [layers, num_heads], neurons [layers, width])``: 1 keeps a unit, 0 removes it."""
        hm, nm = torch.ones(self.num_layers, self.num_heads), torch.ones(self.num_layers, self.width)
        for i, hs in self.heads.items():
            hm[i, hs] = 0
        for i, ns in self.neurons.items():
            nm[i, ns] = 0
        return hm, nm

    def to_patch(self, config: Any, provenance: dict | None = None, strength: float = 1.0) -> Patch:
        """`ZeroHeads` on each layer's ``attn_out``, `ZeroNeurons` on its ``mlp_out``; with
        ``strength`` < 1 the circuit's columns are scaled by ``1 - strength`` instead (`ScaleInputs`:
        the masks mixed toward identity, as AURA's strength mixes its factors), none at 0."""
        arch = arch_for(config)
        heads, head_dim = head_layout(config)
        width = self.width or _config_width(config)
        edits: list[ScaleInputs] = []
        for i in sorted(set(self.heads) | set(self.neurons)):
            if self.heads.get(i):
                edits.append(ZeroHeads.build(arch.module("attn_out", i), list(self.heads[i]), heads, head_dim, arch.layout))
            if self.neurons.get(i):
                edits.append(ZeroNeurons.build(arch.module("mlp_out", i), list(self.neurons[i]), width, arch.layout))
        if strength != 1.0:
            edits = [ScaleInputs(e.module, e.layout, factors=1.0 - strength * (1.0 - e.factors)) for e in edits] if strength > 0 else []
        record = {
            "method": METHOD,
            "heads_removed": self.n_heads,
            "neurons_removed": self.n_neurons,
            "settings": self.settings | {"strength": strength} if self.settings else self.settings,  # learned at one strength, built at this one
        }
        return Patch(edits, record | (provenance or {}))

    @classmethod
    def from_patch(cls, patch: Patch) -> Circuit:
        """The circuit a patch removes (its `ZeroHeads` and `ZeroNeurons` edits), for `inspect`."""
        heads: dict[int, list[int]] = {}
        neurons: dict[int, list[int]] = {}
        num_heads = head_dim = width = n_layers = 0
        for e in patch.edits:
            layer = _layer_index(e.module)
            if isinstance(e, ZeroHeads) and layer is not None:
                heads[layer] = list(e.heads)
                head_dim, num_heads = e.head_dim, e.factors.numel() // e.head_dim
            elif isinstance(e, ZeroNeurons) and layer is not None:
                neurons[layer] = list(e.neurons)
                width = e.factors.numel()
            else:
                continue
            n_layers = max(n_layers, layer + 1)
        return cls(heads, neurons, num_layers=n_layers, num_heads=num_heads, head_dim=head_dim, width=width)

    def summary_rows(self) -> list[list]:
        """One row per layer: ``[layer, heads removed (count), which heads, neurons removed (count)]``."""
        layers = range(self.num_layers) if self.num_layers else sorted(set(self.heads) | set(self.neurons))
        rows = []
        for i in layers:
            hs, ns = sorted(self.heads.get(i, [])), self.neurons.get(i, [])
            rows.append([i, len(hs), " ".join(map(str, hs)) or "-", len(ns)])
        return rows


SUMMARY_HEADERS = ["layer", "heads removed", "which heads", "neurons removed"]


def _layer_index(module: str) -> int | None:
    m = re.search(r"\.(\d+)\.", module)
    return int(m.group(1)) if m else None


def _config_width(config: Any) -> int:
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    for key in ("intermediate_size", "n_inner", "ffn_hidden_size"):
        if get(key):
            return int(get(key))
    hidden = get("hidden_size") or get("n_embd")
    return 4 * int(hidden)


# -- masks -----------------------------------------------------------------------------------------


def _module_width(module: nn.Module, arch: Architecture) -> int:
    w = module.weight
    return int(w.shape[1] if arch.layout == "linear" else w.shape[0])


@contextlib.contextmanager
def masked(model: nn.Module, head_mask: torch.Tensor, neuron_mask: torch.Tensor) -> Iterator[nn.Module]:
    """The model with mask pre-hooks: ``head_mask [layers, heads]`` on each ``attn_out`` input (repeated
    over ``head_dim``), ``neuron_mask [layers, width]`` on each ``mlp_out`` input. The masks are read at
    every forward pass, so they may be (differentiable functions of) tensors being trained."""
    arch = arch_for(model.config)
    _, head_dim = head_layout(model.config)
    modules = dict(model.named_modules())
    handles = []

    def head_hook(i: int):
        def pre(m: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x * head_mask[i].repeat_interleave(head_dim).to(x.dtype),) + tuple(args[1:])

        return pre

    def neuron_hook(i: int):
        def pre(m: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x * neuron_mask[i].to(x.dtype),) + tuple(args[1:])

        return pre

    try:
        for i in range(num_layers(model.config)):
            handles.append(modules[arch.module("attn_out", i)].register_forward_pre_hook(head_hook(i)))
            handles.append(modules[arch.module("mlp_out", i)].register_forward_pre_hook(neuron_hook(i)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _straight_through(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(binary mask with the sigmoid's gradient, soft mask)``."""
    soft = torch.sigmoid(logits / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach(), soft


# -- data ------------------------------------------------------------------------------------------


def _tokenize(tokenizer: Any, texts: list[str], max_tokens: int) -> list[list[int]]:
    ids = tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    return [list(x) for x in ids]


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _batch(seqs: list[list[int]], pad: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[r, : len(s)] = 1
    labels = ids.masked_fill(attn == 0, -100)
    return ids.to(device), attn.to(device), labels.to(device)


def _forward_loss(model: nn.Module, seqs: list[list[int]], pad: int, device: str | torch.device) -> torch.Tensor:
    ids, attn, labels = _batch(seqs, pad, device)
    return _lm_loss(model(input_ids=ids, attention_mask=attn, use_cache=False).logits, labels)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class _Sampler:
    """Batches of ``k`` sequences, a fresh shuffle per epoch. Batches are drawn from pools of ``4 k``
    shuffled sequences sorted by length, so a batch holds similar lengths and little padding."""

    def __init__(self, lengths: list[int], k: int, gen: torch.Generator) -> None:
        self.lengths, self.k, self.gen, self.batches = lengths, k, gen, []

    def _epoch(self) -> list[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.gen).tolist()
        batches = []
        for start in range(0, len(order), 4 * self.k):
            pool = sorted(order[start : start + 4 * self.k], key=lambda j: self.lengths[j])
            batches += [pool[i : i + self.k] for i in range(0, len(pool) - self.k + 1, self.k)]
        return [batches[j] for j in torch.randperm(len(batches), generator=self.gen).tolist()]

    def next(self) -> list[int]:
        if not self.batches:
            self.batches = self._epoch()
        return self.batches.pop()


# -- learning --------------------------------------------------------------------------------------


def learn_circuit(
    model: nn.Module,
    tokenizer: Any,
    toxic: list[str],
    neutral: list[str],
    settings: CircuitSettings,
    device: str | torch.device = "cpu",
) -> Circuit:
    """Learn binary head and neuron masks on the frozen model; return the budgeted circuit.

    ``toxic`` and ``neutral`` need at least ``settings.batch_size`` texts each; a batch of each is
    drawn per step. The model is moved to ``device`` if it is elsewhere. Its parameters are left
    bit-identical (``requires_grad`` is restored afterwards, no ``.grad`` is created) and no hook
    stays attached."""
    settings.check()
    toxic, neutral = [t for t in toxic if t and t.strip()], [t for t in neutral if t and t.strip()]
    need = settings.batch_size
    if len(toxic) < need or len(neutral) < need:
        raise PatcherError(
            f"circuit learning needs at least {need} toxic and {need} neutral texts for one batch "
            f"(batch_size={need}), got {len(toxic)} toxic and {len(neutral)} neutral; add texts or lower batch_size"
        )
    config = model.config
    arch = arch_for(config)
    n_layers = num_layers(config)
    n_heads, head_dim = head_layout(config)
    modules = dict(model.named_modules())
    width = _module_width(modules[arch.module("mlp_out", 0)], arch)

    tox_ids = [s for s in _tokenize(tokenizer, toxic, settings.max_tokens) if len(s) >= 2]
    neu_ids = [s for s in _tokenize(tokenizer, neutral, settings.max_tokens) if len(s) >= 2]
    if len(tox_ids) < need or len(neu_ids) < need:
        raise PatcherError(
            f"circuit learning needs at least {need} toxic and {need} neutral texts of 2+ tokens, "
            f"got {len(tox_ids)} and {len(neu_ids)}; add longer texts or lower batch_size"
        )
    pad = _pad_id(tokenizer)

    gen = torch.Generator().manual_seed(settings.seed)
    tox_sampler, neu_sampler = _Sampler([len(s) for s in tox_ids], need, gen), _Sampler([len(s) for s in neu_ids], need, gen)
    T = settings.temperature
    head_logits = torch.full((n_layers, n_heads), 3.0 * T, device=device, requires_grad=True)
    neuron_logits = torch.full((n_layers, width), 3.0 * T, device=device, requires_grad=True)
    opt = torch.optim.Adam([head_logits, neuron_logits], lr=settings.lr)
    head_cap, neuron_cap = int(math.floor(settings.head_budget * head_logits.numel() + 1e-9)), int(
        math.floor(settings.neuron_budget * neuron_logits.numel() + 1e-9)
    )

    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    if next(model.parameters()).device != torch.device(device):
        model.to(device)
    model.eval()
    for p, _ in grad_flags:
        p.requires_grad_(False)

    history: list[dict] = []
    cap: float | None = None
    t0 = time.perf_counter()
    bar = progress_bar(range(settings.steps), desc="circuit", unit="step")
    try:
        for step in bar:
            tox = [tox_ids[j] for j in tox_sampler.next()]
            neu = [neu_ids[j] for j in neu_sampler.next()]
            hm, h_soft = _straight_through(head_logits, T)
            nm, n_soft = _straight_through(neuron_logits, T)
            with masked(model, hm, nm):
                tox_loss, neu_loss = _forward_loss(model, tox, pad, device), _forward_loss(model, neu, pad, device)
            if cap is None:  # masks start at 1: the first batch is the unpruned model
                cap = tox_loss.item() + settings.toxic_cap
            head_frac, neuron_frac = (1 - hm).mean(), (1 - nm).mean()
            sparsity = F.relu(head_frac - settings.head_budget) / settings.head_budget + F.relu(
                neuron_frac - settings.neuron_budget
            ) / settings.neuron_budget
            loss = neu_loss - settings.beta * torch.clamp(tox_loss, max=cap) + settings.lam * sparsity
            damage = torch.zeros(())
            if settings.max_damage > 0:  # the rise of this batch's neutral loss over the unpruned model's
                with torch.no_grad():
                    neu_base = _forward_loss(model, neu, pad, device)
                damage = neu_loss - neu_base
                loss = loss + settings.damage_weight * F.relu(damage - settings.max_damage)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            rec = {
                "step": step,
                "loss": loss.item(),
                "neutral": neu_loss.item(),
                "toxic": tox_loss.item(),
                "sparsity": sparsity.item(),
                "damage": damage.item(),
                "heads_zeroed": int((hm.detach() == 0).sum()),
                "neurons_zeroed": int((nm.detach() == 0).sum()),
                "soft_mask_mean": float(torch.cat([h_soft.detach().flatten(), n_soft.detach().flatten()]).mean()),
                "seconds": time.perf_counter() - t0,
            }
            history.append(rec)
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}",
                neutral=f"{rec['neutral']:.3f}",
                toxic=f"{rec['toxic']:.3f}",
                heads=f"{rec['heads_zeroed']}/{head_logits.numel()}",
                neurons=f"{rec['neurons_zeroed']}/{neuron_logits.numel()}",
                refresh=False,
            )
    finally:
        bar.close()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)

    heads = _lowest_zeros(head_logits.detach(), head_cap)
    neurons = _lowest_zeros(neuron_logits.detach(), neuron_cap)
    if settings.max_damage > 0:
        heads, neurons = _within_damage(model, neu_ids, pad, device, (head_logits.detach(), neuron_logits.detach()), (heads, neurons), settings)
    return Circuit(
        heads=heads,
        neurons=neurons,
        history=history,
        num_layers=n_layers,
        num_heads=n_heads,
        head_dim=head_dim,
        width=width,
        settings=asdict(settings),
    )


@torch.no_grad()
def _within_damage(model: nn.Module, neu_ids: list[list[int]], pad: int, device: Any, logits: tuple[torch.Tensor, torch.Tensor],
                   circuit: tuple[dict[int, list[int]], dict[int, list[int]]], settings: CircuitSettings) -> tuple[dict, dict]:
    """The circuit cut to its most confident units (lowest logits first) so that the neutral loss on
    up to 64 neutral texts rises at most ``max_damage`` over the unpruned model's: the largest such
    prefix, found by bisection (the batch term only holds the rise near the bound on average).
    ``logits`` and ``circuit``: (heads, neurons) each."""
    (head_logits, neuron_logits), (heads, neurons) = logits, circuit
    units = [(head_logits[i, h].item(), 0, i, h) for i, hs in heads.items() for h in hs]
    units += [(neuron_logits[i, n].item(), 1, i, n) for i, ns in neurons.items() for n in ns]
    units.sort()
    sample = neu_ids[:64]

    def loss(k: int) -> float:
        hm, nm = torch.ones_like(head_logits), torch.ones_like(neuron_logits)
        for _, kind, i, j in units[:k]:
            (hm if kind == 0 else nm)[i, j] = 0
        with masked(model, hm, nm):
            return sum(_forward_loss(model, sample[b : b + 16], pad, device).item() * len(sample[b : b + 16])
                       for b in range(0, len(sample), 16)) / len(sample)

    base = loss(0)
    lo, hi = 0, len(units)
    if loss(hi) - base > settings.max_damage:
        while lo < hi:  # the largest k whose rise is within the bound
            mid = (lo + hi + 1) // 2
            if loss(mid) - base <= settings.max_damage:
                lo = mid
            else:
                hi = mid - 1
        units = units[:lo]
    out_h: dict[int, list[int]] = {}
    out_n: dict[int, list[int]] = {}
    for _, kind, i, j in sorted(units, key=lambda u: (u[1], u[2], u[3])):
        (out_h if kind == 0 else out_n).setdefault(i, []).append(j)
    return out_h, out_n


def _lowest_zeros(logits: torch.Tensor, cap: int) -> dict[int, list[int]]:
    """Units whose binary mask is 0 (logit < 0), at most ``cap`` of them, lowest logits first."""
    flat = logits.flatten().cpu()
    zeros = torch.nonzero(flat < 0).flatten()
    chosen = zeros[torch.argsort(flat[zeros], stable=True)][:cap].tolist()
    out: dict[int, list[int]] = {}
    cols = logits.shape[1]
    for idx in sorted(chosen):
        out.setdefault(idx // cols, []).append(idx % cols)
    return out


# -- plot ------------------------------------------------------------------------------------------


def plot_circuit(circuit: Circuit, config: Any | None, path: str | Path) -> None:
    """PNG map of the circuit: removed heads (layers x heads grid) and removed neurons per layer."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PatcherError("plotting needs matplotlib: run `pip install 'patcher[eval]'` or `pip install matplotlib`") from None
    n_layers = circuit.num_layers or num_layers(config)
    n_heads = (head_layout(config)[0] if config is not None else 0) or circuit.num_heads or 1
    width = circuit.width or (_config_width(config) if config is not None else 0)
    grid = torch.zeros(n_layers, n_heads)
    for i, hs in circuit.heads.items():
        grid[i, hs] = 1
    counts = [len(circuit.neurons.get(i, [])) for i in range(n_layers)]

    fig = Figure(figsize=(9, max(3.0, 0.22 * n_layers + 1.5)))
    FigureCanvasAgg(fig)
    ax_h, ax_n = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [max(n_heads, 4), 8]})
    ax_h.imshow(grid.numpy(), cmap="Reds", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax_h.set_xlabel("head")
    ax_h.set_ylabel("layer")
    ax_h.set_xticks(range(n_heads))
    ax_h.set_title(f"heads removed: {circuit.n_heads}/{n_layers * n_heads}")
    ax_n.barh(range(n_layers), counts, color="tab:red")
    ax_n.set_xlabel(f"neurons removed (of {width})")
    ax_n.set_title(f"neurons removed: {circuit.n_neurons}/{n_layers * width}")
    ax_n.set_ylim(n_layers - 0.5, -0.5)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")


def collect(ctx: StepContext, settings: CircuitSettings) -> Circuit:
    toxic = [t for t, y in zip(ctx.data.texts, ctx.data.labels) if y == 1]
    neutral = [t for t, y in zip(ctx.data.texts, ctx.data.labels) if y == 0]
    with ctx.prior.hooked(ctx.model):
        return learn_circuit(ctx.model, ctx.tokenizer, toxic, neutral, settings, device=ctx.collector.device)


def build(ctx: StepContext, stats: Circuit, settings: CircuitSettings) -> Patch:
    return stats.to_patch(ctx.config, strength=settings.strength)


# Learned binary masks over heads and neurons (weights frozen); the circuit found is zeroed.
method(METHOD, collect=collect, build=build, whole_model=True)(CircuitSettings)  # backpropagates through every layer at once
