"""Projections: remove a toxic direction (or a rank-k subspace) from what chosen blocks write.

For each chosen layer and block (``mlp_out``: the MLP's down projection; ``attn_out``: the attention
output projection) a basis ``D`` ``[d_model, k]`` in the residual stream is estimated from mean-pooled
activations of toxic (1) and neutral (0) text, and the block's output projection becomes
``W' = (I - s U U^T) W`` (bias alike) with ``U = orthonormal(D)`` and strength ``s``: a `ProjectOutputs`
edit, exact and folded. For Gemma 2/3, whose blocks pass a norm with gain ``g`` before the residual
add, ``U = orthonormal(g * D)`` is removed from the projection's output, which removes ``D`` from
what the block writes (`arch.residual_to_output_direction`).

Directions (``direction``):

* ``meandiff``: mean(toxic) - mean(neutral) (with ``paired``: the mean of the pair differences);
  one direction per layer (k = 1). Meow2X / TRNE style.
* ``probe``: a logistic-regression probe per layer (scikit-learn, L2, ``probe_c``); its weight vector
  is the direction; ``k`` > 1 runs iterative nullspace projection (refit after projecting out the
  directions found so far). Held-out accuracy (``holdout`` fraction, pairs kept together) is
  printed and kept in the patch's provenance. ``probe_erase = "pattern"`` removes the probe's
  activation pattern (within-class covariance times its weights, Haufe et al. 2014) instead of its
  weight vector (`probe_pattern`).
* ``profs``: ProFS (Uppaal et al., ICLR 2025). Paired toxic/neutral states X-, X+; remove the top
  singular vector of X+ (the shared "context" direction) from the differences T = X- - X+, and take
  the top-k right singular vectors of what is left. Needs ``paired = true``.
* ``sae``: decoder vectors of a sparse autoencoder (a SAELens folder, a Gemma Scope ``params.npz``,
  a safetensors file with ``W_enc`` [d_model, d_sae], ``W_dec`` [d_sae, d_model], ``b_enc``,
  ``b_dec``, optional JumpReLU ``threshold``, or any of these as ``hf://...``; `patcher.io.sae_files`) that
  reads the residual stream after layer ``sae_layer`` (from ``cfg.json`` where the SAE has one). Features are given by
  index (``sae_features``) or picked as the ``sae_top`` features whose mean activation rises most on
  toxic text (difference of means times decoder norm). One basis for every chosen layer.

What the direction is estimated from (``source``): ``block`` is the block's own output (what it
writes), ``residual`` the residual stream after the layer (ProFS's "layer states"); ``auto`` picks
``residual`` for profs and ``block`` otherwise.

With ``embed = true`` the direction is also projected out of the token embeddings (each row
``e <- (I - s U U^T) e``), estimated from what the embedding writes (for ``sae``, the SAE's basis).
On a model with tied embeddings that needs ``untie = true`` in ``[model]``: the output head keeps
the original matrix, because an edit never silently changes both.

Layers: ``layers`` is a list, a range string ``"15-29"``, or ``"all"``; with ``top_n`` > 0 only the
``top_n`` of those layers with the largest localisation score for each block are edited (see
`patcher.collect.localisation`; the whitened score when ``outliers = "whiten"``).

Outlier dimensions (``outliers``). A few residual dimensions of models like SmolLM2 carry values
tens of times larger than the rest; a direction estimated naively leans on them (3 dimensions held
83% of SmolLM2's ProFS direction), and projecting it out then shifts those huge coordinates, which
is where the perplexity cost comes from.

* ``keep``: no handling.
* ``exclude``: the ``n_outliers`` dimensions with the largest RMS over neutral samples are dropped
  from the estimate and zeroed in the direction: the edit never touches them.
* ``whiten``: estimate in coordinates scaled by each dimension's std over neutral samples, and map
  the result back as a read direction (``w / std``: diagonal LDA for meandiff), which weighs each
  dimension by its signal-to-noise ratio rather than its size.

How the direction is removed (``erase``): ``orthogonal`` projects it out, ``W' = (I - s U U^T) W``;
``whitened`` removes the same read-out ``U`` but writes the correction along ``V = S U (U^T S U)^-1``,
``S`` the diagonal covariance of the neutral states, which is the projection that is orthogonal in
whitened coordinates (the diagonal form of LEACE's least-squares eraser). On SmolLM2, at the same
strength, it removes more toxicity for more perplexity; `recipes/project-stack.toml` uses it (README,
Results, has both measured).

Every step records, per edited layer and block, the share of the direction's squared norm on the
outlier dimensions and on its 3 largest coordinates (``provenance.layers``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..collect.localisation import direction_effect, pair_rows, parse_layers
from ..collect.statistics import Batch, PooledValues, Statistic
from ..collect.steps import StepContext, method, settings_record
from ..core.arch import (
    BLOCKS,
    arch_for,
    norm_gain,
    num_layers,
    residual_module,
    residual_to_output_direction,
    writer_module,
)
from ..core.errors import PatcherError
from ..core.numerics import RIDGE, floor_variance, require_finite, ridge_inverse, safe_reciprocal
from ..edits.edit import ProjectOutputs
from ..edits.patch import Patch
from ..io.sae_files import SAE, read_sae
from ..recipe.settings import Checked, setting

log = logging.getLogger(__name__)

DIRECTIONS = ("meandiff", "probe", "profs", "sae")


# -- SAE ---------------------------------------------------------------------------------------------
class SaeFeatures(PooledValues):
    """Mean-pooled SAE feature activations of one module's output (padding and the sink skipped)."""

    def __init__(self, module: str, sae: SAE):
        super().__init__([(module, "output")], how="mean")
        self.sae = sae

    def observe(self, module: str, acts: Any, batch: Batch) -> None:
        if isinstance(acts, tuple):
            acts = acts[0]
        super().observe(module, self.sae.encode(acts.float()), batch)


# -- collecting --------------------------------------------------------------------------------------
def _sae_layer(s: ProjectSettings, sae: SAE, layers: list[int], n_layers: int) -> int:
    if s.sae_layer >= 0 and sae.layer is not None and s.sae_layer != sae.layer:
        raise PatcherError(f"project: sae_layer = {s.sae_layer} but the SAE {sae.path} reads the residual stream after layer {sae.layer}: "
                           f"set sae_layer = {sae.layer} or leave it out")
    layer = s.sae_layer if s.sae_layer >= 0 else (sae.layer if sae.layer is not None else layers[-1])
    if not 0 <= layer < n_layers:
        raise PatcherError(f"project: sae_layer {layer} is out of range; valid layers are 0-{n_layers - 1} (the model has {n_layers})")
    return layer


def statistics(config: Any, s: ProjectSettings) -> dict[str, Statistic]:
    arch = arch_for(config)
    n_layers = num_layers(config)
    layers = parse_layers(s.layers, n_layers)
    watches: list[tuple[str, str]] = []
    stats: dict[str, Statistic] = {}
    if s.resolved_source == "block" and s.direction != "sae" or s.top_n:
        watches += [(writer_module(arch, b, i), "output") for i in layers for b in s.blocks]
    if s.direction == "sae":
        sae = read_sae(s.sae_path, _hidden(config), n_layers)
        layer = _sae_layer(s, sae, layers, n_layers)
        if s.sae_top:
            stats["sae"] = SaeFeatures(residual_module(arch, layer), sae)
        if s.outliers == "exclude":
            watches.append((residual_module(arch, layer), "output"))
    elif s.resolved_source == "residual":
        watches += [(residual_module(arch, i), "output") for i in layers]
    if s.embed and s.direction != "sae":
        watches.append((arch.embed, "output"))
    if watches:
        stats["pooled"] = PooledValues(list(dict.fromkeys(watches)), how="mean")
    return stats


def collect(ctx: StepContext, s: ProjectSettings) -> dict[str, Statistic]:
    stats = statistics(ctx.config, s)
    if stats:
        try:
            ctx.collector.run(list(stats.values()), ctx.data.texts, ctx.data.labels, patch=ctx.prior, desc=f"project ({s.direction}): collect")
        except AttributeError as exc:  # the collector hands a decoder layer's tuple output on as is
            if "tuple" not in str(exc):
                raise
            raise PatcherError(f"project: this model's decoder layers return a tuple, so the residual stream cannot be watched "
                               f"(source = \"{s.resolved_source}\"): set source = \"block\"") from None
    return stats


def _hidden(config: Any) -> int:
    return int(getattr(config, "hidden_size", None) or config.n_embd)


# -- directions --------------------------------------------------------------------------------------
@dataclass
class Frame:
    """Coordinates a direction is estimated in: ``z = x / scale`` with ``dropped`` dimensions zeroed;
    an estimate ``w`` in z maps back to the read direction ``w / scale`` (dropped dims zero)."""

    scale: torch.Tensor
    dropped: torch.Tensor  # bool [d]
    outlier_dims: torch.Tensor  # long: the n_outliers largest-RMS dims over neutral samples

    def to_z(self, x: torch.Tensor) -> torch.Tensor:
        z = x.double() / self.scale
        z[:, self.dropped] = 0
        return z

    def back(self, w: torch.Tensor) -> torch.Tensor:
        d = w.double() / self.scale[:, None]
        d[self.dropped] = 0
        return d


def frame(x: torch.Tensor, labels: torch.Tensor, s: ProjectSettings) -> Frame:
    neutral = x[labels == 0].double()
    d = x.shape[1]
    rms = neutral.pow(2).mean(0).sqrt()
    m = min(s.n_outliers, d - 1)
    outlier = rms.topk(m).indices if m else torch.zeros(0, dtype=torch.long)
    dropped = torch.zeros(d, dtype=torch.bool)
    scale = torch.ones(d, dtype=torch.float64)
    if s.outliers == "exclude":
        dropped[outlier] = True
    elif s.outliers == "whiten":
        scale = neutral_std(x, labels)
    return Frame(scale, dropped, outlier)


def neutral_std(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-dimension std over neutral samples (float64), its variance floored relative to the
    largest (`patcher.core.numerics.floor_variance`: zero and rounding-level spreads), then floored at 1%
    of its median, so that no nearly constant dimension dominates a whitened estimate."""
    std = floor_variance(x[labels == 0].double().var(0)).sqrt()
    return std.clamp(min=float(1e-2 * std.median()))


def whitened_write(u: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Write directions ``V = S U (U^T S U)^-1`` for ``S = diag(std^2)``: the edit then removes
    what ``U`` reads while moving the output least in whitened coordinates, so the few huge
    dimensions absorb the correction in proportion to their spread (diagonal LEACE eraser,
    Belrose et al. 2023) instead of the small dimensions taking all of it."""
    var = std.double() ** 2
    ridge = RIDGE * float(var.max())  # S + ridge I: U^T V = I stays exact, the inverse stays bounded
    u = u.double()
    return ((var + ridge)[:, None] * u @ ridge_inverse(u.T @ (var[:, None] * u), ridge)).float()


def meandiff(z: torch.Tensor, labels: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if pairs is not None:
        diff = (z[pairs[0]] - z[pairs[1]]).mean(0)
    else:
        diff = z[labels == 1].mean(0) - z[labels == 0].mean(0)
    return diff[:, None]


def profs(z: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    """ProFS: top-k right singular vectors of the paired differences after removing the top singular
    vector of the neutral states."""
    x_pos, x_neg = z[pairs[1]], z[pairs[0]]
    mu = torch.linalg.svd(x_pos, full_matrices=False).Vh[0]
    t = x_neg - x_pos
    t = t - (t @ mu)[:, None] * mu[None, :]
    _, sv, vh = torch.linalg.svd(t, full_matrices=False)
    rank = int((sv > sv[0] * 1e-6).sum()) if sv.numel() and sv[0] > 0 else 0
    if k > rank:
        raise PatcherError(
            f"project: k = {k} but ProFS on {len(pairs[0])} pairs of {z.shape[1]}-dim states gives at most {rank} directions "
            "(after removing the neutral context direction): lower k or use more pairs"
        )
    return vh[:k].T


def _split(labels: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / test rows; pairs stay together; stratified otherwise."""
    g = torch.Generator().manual_seed(seed)
    if pairs is not None:
        perm = torch.randperm(len(pairs[0]), generator=g)
        n_test = max(1, int(round(holdout * len(perm))))
        te, tr = perm[:n_test], perm[n_test:]
        return torch.cat([pairs[0][tr], pairs[1][tr]]), torch.cat([pairs[0][te], pairs[1][te]])
    train, test = [], []
    for c in (0, 1):
        rows = (labels == c).nonzero()[:, 0]
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_test = max(1, int(round(holdout * len(rows))))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train), torch.cat(test)


def probe(z: torch.Tensor, labels: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor] | None, k: int, c: float,
          holdout: float, seed: int) -> tuple[torch.Tensor, list[float]]:
    """``k`` probe directions by iterative nullspace projection, and each probe's held-out accuracy."""
    from sklearn.linear_model import LogisticRegression

    train, test = _split(labels, pairs, holdout, seed)
    ytr, yte = labels[train].numpy(), labels[test].numpy()
    if len(set(ytr.tolist())) < 2 or len(set(yte.tolist())) < 2:
        raise PatcherError("project: the probe needs both classes in its training and held-out parts: use more data")
    if k > z.shape[1] - 1 or k > len(train) - 1:
        raise PatcherError(f"project: k = {k} probe directions but the data allows at most {min(z.shape[1], len(train)) - 1} "
                           f"({len(train)} training samples, {z.shape[1]} dims): lower k")
    mean = z[train].mean(0)
    zc = z - mean
    unit = zc[train].std().clamp(min=1e-12)  # one scalar: conditions the solver, leaves directions alone
    zc = zc / unit
    found: list[torch.Tensor] = []
    accs: list[float] = []
    for _ in range(k):
        zp = zc.clone()
        if found:
            q = torch.linalg.qr(torch.stack(found, 1)).Q
            zp = zp - (zp @ q) @ q.T
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(zp[train].numpy(), ytr)
        accs.append(float(clf.score(zp[test].numpy(), yte)))
        w = torch.from_numpy(clf.coef_[0]).double()
        if found:
            w = w - q @ (q.T @ w)
        if w.norm() < 1e-12:
            raise PatcherError(f"project: probe direction {len(found) + 1} is zero: the data allows fewer than k = {k} directions")
        found.append(w / w.norm())
    return torch.stack(found, 1), accs


def probe_pattern(x: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The activation patterns ``Sigma_w W`` of read directions ``W`` [d, k] (Haufe et al. 2014),
    ``Sigma_w`` the within-class covariance of ``x``: where the states move when the probe's output
    moves. A probe's weights also cancel noise shared with the signal, so they can point far from
    where toxic and neutral states differ; removing them from what a block writes then removes little
    of the difference, and the pattern is the direction to erase."""
    xd = x.double()
    centred = torch.cat([xd[labels == c] - xd[labels == c].mean(0) for c in (0, 1) if (labels == c).any()])
    return centred.T @ (centred @ w.double()) / max(1, len(centred) - 2)


def basis(d: torch.Tensor, what: str) -> torch.Tensor:
    """Orthonormal basis of the columns of ``d``, refusing (near-)dependent columns."""
    require_finite(d, f"{what}: the direction", "the pooled states hold NaN/inf or a dimension's spread is zero; "
                   "run `patcher localize` on the recipe to see which layer's statistics are broken")
    sv = torch.linalg.svdvals(d.double())
    if sv.numel() == 0 or sv[0] == 0 or sv[-1] < 1e-8 * sv[0]:
        raise PatcherError(f"{what}: the {d.shape[1]} directions are (close to) linearly dependent or zero: lower k or pick other features")
    q, r = torch.linalg.qr(d.double())
    return (q * torch.sign(torch.diagonal(r))[None, :]).float()


def _shares(u: torch.Tensor, outlier_dims: torch.Tensor) -> dict[str, float]:
    sq = u.double().pow(2)
    total = float(sq.sum())
    first = sq[:, 0]
    return {
        "outlier_share": round(float(sq[outlier_dims].sum()) / total, 4) if total else 0.0,
        "top3_share": round(float(first.topk(min(3, first.numel())).values.sum() / first.sum()), 4),
    }


def estimate(x: torch.Tensor, labels: torch.Tensor, pair_ids: Any, s: ProjectSettings, what: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Orthonormal basis ``[d, k]`` (residual coordinates) for one layer's states, and a record."""
    pairs = pair_rows(labels, pair_ids) if s.paired else None
    f = frame(x, labels, s)
    z = f.to_z(x)
    info: dict[str, Any] = {}
    if s.direction == "meandiff":
        w = meandiff(z, labels, pairs)
    elif s.direction == "profs":
        assert pairs is not None
        w = profs(z, pairs, s.k)
    else:
        w, accs = probe(z, labels, pairs, s.k, s.probe_c, s.holdout, s.seed)
        info["probe_accuracy"] = [round(a, 4) for a in accs]
    read = f.back(w)
    if s.direction == "probe" and s.probe_erase == "pattern":
        read = probe_pattern(x, labels, read)
        read[f.dropped] = 0  # excluded outlier dimensions stay untouched
    u = basis(read, what)
    info |= _shares(u, f.outlier_dims)
    if s.erase == "whitened":
        info["write"] = whitened_write(u, neutral_std(x, labels))
        require_finite(info["write"], f"{what}: whitened write direction", "the neutral covariance is degenerate; use erase = \"orthogonal\"")
    if s.outliers != "keep" and s.direction != "probe":  # the same estimate without the handling, for the record
        w0 = meandiff(x.double(), labels, pairs) if s.direction == "meandiff" else profs(x.double(), pairs, s.k)  # type: ignore[arg-type]
        info["outlier_share_if_kept"] = _shares(basis(w0, what), f.outlier_dims)["outlier_share"]
    return u, info


def sae_basis(ctx: Any, stats: dict[str, Statistic], s: ProjectSettings) -> tuple[torch.Tensor, dict[str, Any]]:
    config = ctx.config
    sae = read_sae(s.sae_path, _hidden(config), num_layers(config))
    layers = parse_layers(s.layers, num_layers(config))
    layer = _sae_layer(s, sae, layers, num_layers(config))
    if s.sae_features:
        feats = list(s.sae_features)
        bad = [f for f in feats if not 0 <= f < sae.width]
        if bad:
            raise PatcherError(f"project: SAE feature {bad[0]} is out of range; the SAE has {sae.width} features (0-{sae.width - 1})")
        scores = None
    else:
        st = stats["sae"]
        assert isinstance(st, SaeFeatures)
        fx, y = st.matrix(residual_module(arch_for(config), layer))
        if s.paired:
            tr, nr = pair_rows(y, ctx.data.pair_ids)
            diff = fx[tr].mean(0) - fx[nr].mean(0)
        else:
            diff = fx[y == 1].mean(0) - fx[y == 0].mean(0)
        scores = diff * sae.W_dec.norm(dim=1)
        if s.sae_top > sae.width:
            raise PatcherError(f"project: sae_top = {s.sae_top} but the SAE has only {sae.width} features")
        top = scores.topk(s.sae_top)
        if (top.values <= 0).any():
            n_pos = int((scores > 0).sum())
            raise PatcherError(f"project: sae_top = {s.sae_top} but only {n_pos} SAE features are more active on toxic text: lower sae_top")
        feats = top.indices.tolist()
    d = sae.W_dec[feats].T.double()
    info: dict[str, Any] = {"sae": sae.path, "sae_layer": layer, "features": feats}
    if scores is not None:
        info["feature_scores"] = [round(float(scores[f]), 5) for f in feats]
    if s.outliers == "exclude":
        x, y = stats["pooled"].matrix(residual_module(arch_for(config), layer))  # type: ignore[attr-defined]
        f = frame(x, y, s)
        info["outlier_share_if_kept"] = _shares(basis(d, "project (sae)"), f.outlier_dims)["outlier_share"]
        d = f.back(d)
        info |= _shares(basis(d, "project (sae)"), f.outlier_dims)
    return basis(d, "project (sae)"), info


# -- building ----------------------------------------------------------------------------------------
def _to_block_output(model: Any, arch: Any, block: str, i: int, u: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual basis (and write directions) -> what to remove from the projection's output: for
    Gemma, whose block output passes a norm with gain ``g``, read ``g * u`` and write ``v / g``."""
    if getattr(arch, f"{block}_norm") is None:
        return u, v
    norm = dict(model.named_modules())[arch.module(f"{block}_norm", i)]
    weight = norm.weight.detach().cpu()
    cols = [residual_to_output_direction(weight, u[:, j]) for j in range(u.shape[1])]
    u_out = basis(torch.stack(cols, 1), f"project: layer {i} {block}")
    if v is None:
        return u_out, None
    # the block writes g * y / rms(y): a write v in the residual needs v / g in y, and nothing where g = 0
    raw = v.double() * safe_reciprocal(norm_gain(weight))[:, None]
    write = (raw @ torch.linalg.inv(u_out.double().T @ raw)).float()
    require_finite(write, f"project: layer {i} {block} write direction", "the block's output norm gain is (close to) zero "
                   "where the direction writes: use erase = \"orthogonal\"")
    return u_out, write


SHARED_INFO = ("sae", "sae_layer", "features", "feature_scores", "write")  # not repeated in each layer's record


def _write(v: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if v is None else {"write": v}


def build(ctx: StepContext, stats: dict[str, Statistic], s: ProjectSettings) -> Patch:
    config = ctx.config
    arch = arch_for(config)
    n_layers = num_layers(config)
    layers = parse_layers(s.layers, n_layers)
    pooled = stats.get("pooled")
    pair_ids = getattr(ctx.data, "pair_ids", None)
    chosen: dict[str, list[int]] = {b: layers for b in s.blocks}
    scores: dict[tuple[str, int], float] = {}
    if s.top_n:
        assert pooled is not None
        pairs = None
        for b in s.blocks:
            for i in layers:
                x, y = pooled.matrix(writer_module(arch, b, i))  # type: ignore[attr-defined]
                if s.paired and pairs is None:
                    pairs = pair_rows(y, pair_ids)
                scores[(b, i)] = direction_effect(x, y, pairs, s.seed, whiten=s.outliers == "whiten")
            chosen[b] = sorted(sorted(layers, key=lambda i: -scores[(b, i)])[: s.top_n])
    shared = sae_basis(ctx, stats, s) if s.direction == "sae" else None
    edits = []
    records = []
    cache: dict[int, tuple[torch.Tensor, dict]] = {}
    for i in layers:
        for b in s.blocks:
            if i not in chosen[b]:
                continue
            if shared is not None:
                u, info = shared
            elif s.resolved_source == "residual":
                if i not in cache:
                    x, y = pooled.matrix(residual_module(arch, i))  # type: ignore[union-attr]
                    cache[i] = estimate(x, y, pair_ids, s, f"project: layer {i} residual")
                u, info = cache[i]
            else:
                x, y = pooled.matrix(writer_module(arch, b, i))  # type: ignore[union-attr]
                u, info = estimate(x, y, pair_ids, s, f"project: layer {i} {b}")
            module = arch.module(b, i)
            u_out, v_out = _to_block_output(ctx.model, arch, b, i, u, info.get("write"))
            edits.append(ProjectOutputs(module, arch.layout, basis=u_out, strength=s.strength, **_write(v_out)))
            rec = {"layer": i, "block": b} | ({"score": round(scores[(b, i)], 4)} if scores else {})
            records.append(rec | {k: v for k, v in info.items() if k not in SHARED_INFO})
            if "probe_accuracy" in info:
                log.info("project: layer %d %s: probe held-out accuracy %s", i, b, ", ".join(f"{a:.3f}" for a in info["probe_accuracy"]))
    if s.embed:  # the residual stream's first writer; its output is the stream before layer 0
        if shared is not None:
            u, info = shared
        else:
            x, y = pooled.matrix(arch.embed)  # type: ignore[union-attr]
            u, info = estimate(x, y, pair_ids, s, "project: embeddings")
        edits.insert(0, ProjectOutputs(arch.embed, "embedding", basis=u, strength=s.strength, **_write(info.get("write"))))
        records.insert(0, {"layer": "embed", "block": "embed"} | {k: v for k, v in info.items() if k not in SHARED_INFO})
    prov: dict[str, Any] = {"method": "project", "settings": settings_record(s), "layers": records}
    if shared is not None:
        prov["sae"] = {k: v for k, v in shared[1].items() if k in ("sae", "sae_layer", "features", "feature_scores")}
    return Patch(edits, prov)


# Rank-k projection of a toxic direction out of what the chosen layers write. Its statistics for a set
# of layers hold those of every subset (``layer_range``).
@method("project", collect=collect, build=build, layer_range=True)
@dataclass(frozen=True)
class ProjectSettings(Checked):
    direction: Literal["meandiff", "probe", "profs", "sae"] = setting("meandiff", help="meandiff, probe, profs (SVD of paired differences) or sae (decoder vectors)",
                                                                               choices=DIRECTIONS)
    layers: tuple[int, ...] | str = setting("all", help='layers to edit: "all", "15-29", "3,5,7" or a list')
    top_n: int = setting(0, help="edit only the top_n layers by localisation (0: all chosen layers)", minimum=0)
    blocks: tuple[str, ...] = setting(("mlp_out",), help="what the direction is projected out of: mlp_out, attn_out", choices=BLOCKS)
    embed: bool = setting(False, help="also project the token embeddings (tied models need [model] untie = true)")
    k: int = setting(1, help="rank: directions per layer", build_only=True, minimum=1)
    strength: float = setting(1.0, help="fraction of the direction removed, in [0, 1]", build_only=True, minimum=0.0, maximum=1.0,
                              no_edit=0.0, tune=(0.0, 1.0, 0.05))
    paired: bool = setting(False, help="estimate on (toxic, neutral) pairs: the data must hold pairs")
    source: Literal["auto", "block", "residual"] = setting("auto", help="estimate from each block's output or the residual stream after the layer",
                                                                choices=("auto", "block", "residual"))
    outliers: Literal["keep", "exclude", "whiten"] = setting("keep", help="outlier residual dimensions: keep, exclude or whiten the estimate",
                                                                 choices=("keep", "exclude", "whiten"))
    erase: Literal["orthogonal", "whitened"] = setting("orthogonal", help="orthogonal projection, or LEACE's eraser with the diagonal neutral covariance",
                                                                 build_only=True, choices=("orthogonal", "whitened"))
    n_outliers: int = setting(8, help="how many residual dimensions count as outliers", minimum=0)
    probe_c: float = setting(1.0, help="probe: inverse L2 regularisation strength", build_only=True)
    holdout: float = setting(0.2, help="probe: share of the data held out to score it", build_only=True, exclusive_minimum=0.0,
                              exclusive_maximum=1.0)
    probe_erase: Literal["weights", "pattern"] = setting(
        "weights", help="probe: remove its weight vector, or its activation pattern (within-class covariance times the weights)", build_only=True,
        choices=("weights", "pattern"))
    sae_path: str = setting("", help="sae: a safetensors file with W_enc, W_dec, b_enc, b_dec")
    sae_layer: int = setting(-1, help="sae: the layer whose residual stream the SAE reads (-1: from the file)")
    sae_features: tuple[int, ...] = setting((), help="sae: feature indices to project out")
    sae_top: int = setting(0, help="sae: pick this many features by toxic-vs-neutral effect instead", minimum=0)
    seed: int = setting(0, help="seed of the probe's holdout split")

    def rules(self) -> None:
        if self.direction == "meandiff" and self.k != 1:
            raise PatcherError("project: meandiff gives one direction per layer (k = 1); for k > 1 use direction = \"profs\" or \"probe\"")
        if self.direction == "profs" and not self.paired:
            raise PatcherError("project: profs needs paired toxic/neutral text: set paired = true (ParaDetox pairs)")
        if self.erase == "whitened" and self.direction == "sae":
            raise PatcherError("project: erase = \"whitened\" needs the states the direction came from; with SAE directions use erase = \"orthogonal\"")
        if self.direction == "sae":
            if not self.sae_path:
                raise PatcherError("project: direction = \"sae\" needs sae_path (a SAELens folder, a params.npz, a safetensors file, or hf://OWNER/NAME/path)")
            if bool(self.sae_features) == bool(self.sae_top):
                raise PatcherError("project: direction = \"sae\" needs exactly one of sae_features (indices) or sae_top (how many to pick)")
            if self.outliers == "whiten":
                raise PatcherError("project: outliers = \"whiten\" re-estimates a direction; SAE decoder vectors are fixed: use keep or exclude")

    @property
    def resolved_source(self) -> str:
        if self.source != "auto":
            return self.source
        return "residual" if self.direction in ("profs", "sae") else "block"
