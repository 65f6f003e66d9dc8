"""Activation transport folded into the weights: Linear-AcT and Mean-AcT as `AffineOutputs` edits.

"Controlling Language and Diffusion Models by Transporting Activations" (Rodriguez et al., ICLR
2025, arXiv 2410.23054; reference code ``apple/ml-act``, ``LinearOTHook`` / ``OnlyMeanHook`` in
``act/hooks``). What this module follows from them:

* **Units and pooling.** Each output unit of a chosen module is transported on its own. A
  sentence's value for a unit is its activation mean-pooled over the sentence's real tokens (the
  shared `Collector`'s pooling mask: padding and, by default, the attention-sink first token left
  out), on equal numbers of toxic (A, label 1) and non-toxic (B, label 0) sentences (the first
  ``n = min(|A|, |B|)`` of each, as ml-act truncates to the shorter set).
* **1-D optimal transport is sorting.** A and B are sorted independently per unit, and the affine
  map ``z -> w z + b`` is the least-squares fit on the sorted pairs:
  ``w = sum(a~ b~) / sum(a~^2)`` on centred values, ``b = m_b - w m_a`` (``mode = "linear"``,
  Linear-AcT). ``mode = "mean"`` is Mean-AcT: ``w = 1``, ``b = m_b - m_a``. A unit that is constant
  on A gets ``w = 1``.
* **Strength.** ``z -> (1 - s) z + s (w z + b)``, i.e. scale ``1 - s + s w`` and shift ``s b``;
  the paper's best is ``s = 1``.
* **Causal estimation** (``causal = true``, the paper's default and its better variant): modules are
  fitted in depth order, each on activations recomputed with every earlier map applied at full
  strength (the strength is an inference-time knob in the paper, so it stays a build-only setting
  here and a sweep over it estimates once).

What is *not* followed: the paper restricts each map to the toxic sentences' range of the unit
("transport support", a clamp on the input). That is not affine, so it cannot be folded; the
folded map is the unrestricted one, applied at every token.

How causal estimation costs one pass. A whole-model pass per layer would cost ``L`` passes. Instead
the calibration set goes through the model **one decoder layer at a time** (the machinery of
`patcher.collect.layerwise`: the model's own forward prepares each layer's arguments, then every batch's
hidden state goes through layer ``i`` before any goes through ``i + 1``). Layer ``i``'s maps are
fitted when every batch has been through it, attached as hooks, and only then does layer ``i + 1``
run, so every statistic sees all earlier maps. Within a layer the chosen roles are fitted in forward
order (``attn_out``, then ``mlp_in``, then ``mlp_out``), each stage one run of that layer. The last
stage's map must then reach the layer's output: for ``mlp_out`` (added to the residual stream as is
in every family where it has a bias slot; Gemma's post-norm follows it, but Gemma has no slot there)
the stored output is corrected in place, ``out + (w y + b) - y``, with ``y`` the down projection's
output kept from the same run; any other last stage runs the layer once more. So ``mlp_out`` alone, the
default, costs one layer run per layer, the same work as one plain collection pass; each further
role in a layer adds one run of that layer. Layers after the last chosen one never run. Whole-model
and ``--sequential`` runs use the same loop (the latter loads each layer from disk).

Memory: the hidden states of the calibration set (``n_texts x max_tokens x hidden x bytes``; above
``--hidden-max-gib`` in a temporary file, as `patcher.collect.layerwise` does) plus, for a ``mlp_out`` last
stage, the same again for the down projection's outputs; the pooled values of one stage at a time,
``n_texts x units x 4`` bytes. Without ``causal`` the pooled values of every chosen module are
collected in one ordinary pass (`collect.PooledValues`: ``n_texts x sum(units) x 4`` bytes, e.g.
SmolLM2, every down projection, 1000 sentences: 1000 x 30 x 576 x 4 B = 69 MB); they are the
sorted samples themselves, so the fit is exact on the collected set, and they merge across
processes (`torchrun`) by concatenation like every `PooledValues`. Causal estimation under
``torchrun`` is refused: each layer's fit would need a gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..collect.collector import attach_statistics
from ..collect.layerwise import DEFAULT_HIDDEN_MAX_BYTES, HiddenStore, ResidentModel, layerwise_of
from ..collect.localisation import parse_layers
from ..collect.statistics import PooledValues
from ..collect.steps import StepContext, method, settings_record
from ..core.arch import Architecture, arch_for, num_layers
from ..core.errors import PatcherError
from ..core.hooks import Hooks
from ..core.progress import bar
from ..edits.edit import AffineOutputs
from ..edits.patch import Patch
from ..recipe.settings import Checked, setting

ROLES = ("attn_out", "mlp_in", "mlp_out")  # forward order inside a decoder layer
POST_NORMS = ("mlp_out_norm", "attn_out_norm")


# -- the fit -----------------------------------------------------------------------------------------
def fit_maps(x: torch.Tensor, labels: torch.Tensor, mode: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit (columns of ``x`` ``[n_samples, units]``), the map ``(w, b)`` that transports the
    label-1 values onto the label-0 values: sort each side, least squares on the sorted pairs."""
    a, b = x[labels == 1].double(), x[labels == 0].double()
    n = min(len(a), len(b))
    if n < 2:
        raise PatcherError(f"transport: needs at least 2 toxic and 2 non-toxic sentences, got {len(a)} and {len(b)}")
    a, b = a[:n].sort(dim=0).values, b[:n].sort(dim=0).values
    ma, mb = a.mean(0), b.mean(0)
    if mode == "mean":
        return torch.ones_like(ma).float(), (mb - ma).float()
    ac, bc = a - ma, b - mb
    var = (ac * ac).sum(0)
    w = torch.where(var > 0, (ac * bc).sum(0) / var.clamp(min=torch.finfo(torch.float64).tiny), torch.ones_like(var))
    return w.float(), (mb - w * ma).float()


def _with_strength(w: torch.Tensor, b: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    return 1.0 - s + s * w, s * b


# -- modules and slots -------------------------------------------------------------------------------
def stages(arch: Architecture, i: int, roles: tuple[str, ...]) -> list[list[str]]:
    """Layer ``i``'s chosen modules grouped by role, in forward order."""
    out = []
    for role in ROLES:
        if role in roles:
            out.append(arch.mlp_unit_modules(i, ("mlp_in",)) if role == "mlp_in" else [arch.module(role, i)])
    return out


def check_slots(model: nn.Module, arch: Architecture, roles: tuple[str, ...]) -> None:
    """Refuse before collecting when a chosen role has neither a bias nor a config switch adding one."""
    mods = dict(model.named_modules())
    ok = {r: all(getattr(mods[m], "bias", None) is not None or arch.bias_switch(m) for st in stages(arch, 0, (r,)) for m in st) for r in ROLES}
    missing = [r for r in roles if not ok[r]]
    if missing:
        good = [r for r in ROLES if ok[r]]
        where = f"roles with a bias slot here: {', '.join(good)}" if good else f"no MLP or attention output of {arch.family} has one: use project or aura"
        raise PatcherError(f"transport: {arch.family} has no bias slot for {missing[0]} (no bias, no config switch adding one), "
                           f"so the shift cannot be folded ({where})")


# -- collecting --------------------------------------------------------------------------------------
@dataclass
class TransportMaps:
    """Fitted maps at full strength, per module, and how many sentences per class they saw."""

    maps: dict[str, tuple[torch.Tensor, torch.Tensor]]
    n_per_class: int


def collect(ctx: StepContext, s: TransportSettings) -> TransportMaps:
    config = ctx.config
    arch = arch_for(config)
    check_slots(ctx.model, arch, s.modules)
    layers = parse_layers(s.layers, num_layers(config))
    n = min(sum(ctx.data.labels), len(ctx.data.labels) - sum(ctx.data.labels))
    if s.causal:
        return TransportMaps(causal_maps(ctx, arch, {i: stages(arch, i, s.modules) for i in layers}, s.mode), n)
    stat = PooledValues([(m, "output") for i in layers for st in stages(arch, i, s.modules) for m in st], how="mean")
    ctx.collector.run([stat], ctx.data.texts, ctx.data.labels, patch=ctx.prior, desc=f"transport ({s.mode}): collect")
    maps = {}
    for m, _ in stat.watches:
        x, y = stat.matrix(m)
        maps[m] = fit_maps(x, y, s.mode)
    return TransportMaps(maps, n)


def causal_maps(ctx: StepContext, arch: Architecture, chosen: dict[int, list[list[str]]], mode: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fit every chosen module in depth order, each on activations with all earlier maps applied,
    running the calibration set one decoder layer at a time (see the module docstring)."""
    collector, model = ctx.collector, ctx.model
    opts = collector.options
    if opts is not None and opts.world.size > 1:
        raise PatcherError("transport: causal estimation under torchrun would need a gather per layer: set causal = false, or run one process")
    engine: Any = layerwise_of(model) or ResidentModel(model, collector.device)
    max_bytes = engine.hidden_max_bytes if engine.hidden_max_bytes is not None else DEFAULT_HIDDEN_MAX_BYTES
    batches = list(collector.batches(ctx.data.texts, ctx.data.labels))
    modules = dict(model.named_modules())
    hidden = int(getattr(model.config, "hidden_size", None) or model.config.n_embd)
    shapes = [(b.input_ids.shape[0], b.input_ids.shape[1], hidden) for b in batches]
    last_layer = max((i for i, st in chosen.items() if st), default=-1)
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    store = HiddenStore(shapes, engine.dtype, max_bytes, engine.tmp_dir)
    ys: HiddenStore | None = None
    current: list[Any] = []

    def run(i: int, keep: bool, on_out: Any = None) -> None:
        for b, batch in enumerate(batches):
            current[:] = [batch]
            out = engine.run_layer(i, store.get(b), records[b][i])
            if on_out is not None:
                on_out(b)
            if keep:
                store.put(b, out)

    try:
        with torch.inference_mode(), ctx.prior.hooked(model), Hooks() as fitted:
            records = []
            for b, batch in enumerate(batches):
                h, rec = engine.catch(batch.input_ids, batch.attention_mask, batch.position_ids)
                store.put(b, h)
                records.append(rec)
            for i in bar(range(last_layer + 1), desc=f"transport ({mode}, causal): layers"):
                engine.load_layer(i)
                try:
                    groups = chosen.get(i, [])
                    if not groups:
                        run(i, keep=True)
                        continue
                    fix = groups[-1] == [arch.module("mlp_out", i)] and i < last_layer and arch.mlp_out_norm is None
                    for k, group in enumerate(groups):
                        last = k == len(groups) - 1
                        stat = PooledValues([(m, "output") for m in group], how="mean")
                        with Hooks() as hooks:
                            attach_statistics(hooks, model, {(m, "output"): [stat] for m in group}, current)
                            got: list[torch.Tensor] = []
                            if last and fix:  # keep the down projection's raw output to correct the layer output afterwards
                                ys = HiddenStore(shapes, engine.dtype, max_bytes, engine.tmp_dir)
                                hooks.output(modules[group[0]], lambda m, a, out, got=got: got.append(out.detach().clone()))  # Falcon adds to it in place
                            run(i, keep=last and fix, on_out=(lambda b, got=got, ys=ys: ys.put(b, got.pop())) if last and fix else None)
                        for m in group:
                            x, y = stat.matrix(m)
                            maps[m] = fit_maps(x, y, mode)
                            fitted.add(AffineOutputs(m, arch.layout, scale=maps[m][0], shift=maps[m][1]).attach(modules[m]))
                    if i == last_layer:
                        break
                    if fix:
                        _correct_writer(i, maps[arch.module("mlp_out", i)], store, ys)
                        ys.close()
                        ys = None
                    else:
                        run(i, keep=True)
                finally:
                    engine.free_layer(i)
    finally:
        store.close()
        if ys is not None:
            ys.close()
    return maps


def _correct_writer(i: int, wb: tuple[torch.Tensor, torch.Tensor], store: Any, ys: Any) -> None:
    """Put the just-fitted down-projection map into layer ``i``'s stored outputs: the MLP's output
    ``y`` is added to the residual stream as is (families with a post-norm there are excluded by
    the caller), so ``out + (w y + b) - y`` is the output the layer gives with the map applied."""
    for b in range(len(store.shapes)):
        out, y = store.get(b), ys.get(b).to(store.get(b).device)
        store.put(b, out + ((y * wb[0].to(y) + wb[1].to(y)) - y).to(out.dtype))


# -- building ----------------------------------------------------------------------------------------
def build(ctx: StepContext, stats: TransportMaps, s: TransportSettings) -> Patch:
    arch = arch_for(ctx.config)
    edits = []
    records = []
    for m, (w, b) in stats.maps.items():
        scale, shift = _with_strength(w, b, s.strength)
        edits.append(AffineOutputs(m, arch.layout, scale=scale, shift=shift))
        records.append({"module": m, "scale_mean": round(float(w.mean()), 4), "shift_abs_mean": round(float(b.abs().mean()), 5)})
    return Patch(edits, {"method": "transport", "settings": settings_record(s), "n_per_class": stats.n_per_class, "maps": records})


# Linear-AcT / Mean-AcT (Rodriguez et al., ICLR 2025) folded into weights and biases.
@method("transport", collect=collect, build=build)
@dataclass(frozen=True)
class TransportSettings(Checked):
    """``mode``: ``linear`` (Linear-AcT) or ``mean`` (Mean-AcT). ``modules``: which outputs are
    transported: ``mlp_out`` (the MLP's down projection, what it writes to the residual stream),
    ``attn_out`` (the attention output projection), ``mlp_in`` (the MLP units: gate and up
    projections). ``layers``: a list, a range ``"10-29"`` or ``"all"``. ``strength`` in [0, 1].
    ``causal``: fit in depth order on activations with the earlier maps applied."""

    mode: Literal["linear", "mean"] = setting("linear", help="linear (Linear-AcT: per-unit scale and shift) or mean (Mean-AcT: shift only)",
                                              choices=("linear", "mean"))
    modules: tuple[str, ...] = setting(("mlp_out",), help="outputs transported: mlp_out (down projection), attn_out (attention output projection), mlp_in (MLP units)")
    layers: tuple[int, ...] | str = setting("all", help='layers: "all", "10-29", "50%-100%" or a list')
    strength: float = setting(1.0, help="lambda in [0, 1]: z -> (1 - lambda) z + lambda (w z + b)", build_only=True, minimum=0.0, maximum=1.0,
                              no_edit=0.0, tune=(0.0, 1.0, 0.05))
    causal: bool = setting(True, help="fit in depth order on activations with the earlier maps applied")

    def rules(self) -> None:
        norms = set(self.modules) & set(POST_NORMS)
        if norms:
            raise PatcherError(
                f"transport: {min(norms)} is a post-norm, whose output has no bias slot (the residual add follows it), so the "
                "transport shift cannot be folded there: use attn_out or mlp_out (the projection the norm reads)"
            )
        bad = set(self.modules) - set(ROLES)
        if bad or not self.modules:
            raise PatcherError(f"transport: modules must be a non-empty subset of {list(ROLES)}, got {list(self.modules)}")
