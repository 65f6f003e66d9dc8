"""Edits: pure data naming one module's weight (and bias), with two faces.

* ``apply_weight`` / ``apply_bias``: the edit folded into the stored tensors (float32 math).
* ``attach``: the same edit as a runtime hook on the owning module, leaving weights alone.

The hook face exists to prove the weight face: the tests check, for every edit type and every
architecture, that the baked checkpoint's logits equal the hooked base model's. A method never
mutates a model; it returns edits, and `bake` folds them in.

All edits act on *units*: output units are what the module writes (rows of an ``nn.Linear``
weight, columns of a GPT-2 ``Conv1D`` or of an embedding), input units what it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..core.arch import Layout
from ..core.errors import PatcherError


def _out_axis(layout: Layout) -> int:
    return 0 if layout == "linear" else 1


def _along(vec: torch.Tensor, axis: int) -> torch.Tensor:
    """Shape a per-unit vector to broadcast along ``axis`` of a 2-D weight."""
    return vec[:, None] if axis == 0 else vec[None, :]


@dataclass(frozen=True, eq=False)
class Edit:
    """Base class: one module, named by its path (= checkpoint tensor prefix)."""

    module: str
    layout: Layout = "linear"
    kind: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Edit]]] = {}

    def __init_subclass__(cls) -> None:
        Edit.registry[cls.kind] = cls

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.bias"

    def out_units(self, shape: tuple[int, ...]) -> int:
        return shape[_out_axis(self.layout)]

    def in_units(self, shape: tuple[int, ...]) -> int:
        return shape[1 - _out_axis(self.layout)]

    # -- data ------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The edit's tensor parameters (saved in the patch's safetensors file)."""
        return {}

    def params(self) -> dict:
        """The edit's scalar parameters (saved in patch.json)."""
        return {}

    def check(self, weight_shape: tuple[int, ...]) -> None:
        """Refuse an edit that does not fit the tensor it names."""
        if len(weight_shape) != 2:
            raise PatcherError(f"{self.weight_name}: expected a 2-D weight, found shape {list(weight_shape)}")
        for key, t in self.tensors().items():
            if not torch.isfinite(t).all():
                raise PatcherError(f"patch edit on {self.weight_name}: {key} holds NaN or inf; recompute the patch")

    def summary(self) -> str:
        return ""

    # -- weight face -----------------------------------------------------------------------------
    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def apply_bias(self, b: torch.Tensor) -> torch.Tensor:
        return b

    def row_block(self, rows: slice) -> Edit | None:
        """This edit restricted to a block of the stored weight's rows, so that `bake` can stream
        a tensor through cache-sized blocks; None when rows interact (then the tensor is edited
        whole; projections stay whole because a matrix product's rounding depends on its blocking,
        and the baked bytes must not depend on the block size). Per-row parameters are sliced; the
        result's ``apply_weight`` takes the block."""
        return None

    # -- hook face -------------------------------------------------------------------------------
    def attach(self, module: nn.Module) -> RemovableHandle:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class ScaleOutputs(Edit):
    """Multiply output unit ``j`` by ``factors[j]``: rows of weight and bias (AURA, Det0, Damp)."""

    factors: torch.Tensor = field(default_factory=lambda: torch.ones(0))
    kind: ClassVar[str] = "scale_outputs"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"factors": self.factors}

    def check(self, weight_shape: tuple[int, ...]) -> None:
        super().check(weight_shape)
        if self.factors.shape != (self.out_units(weight_shape),):
            raise PatcherError(
                f"{self.weight_name}: scale_outputs has {self.factors.numel()} factors, the tensor has "
                f"{self.out_units(weight_shape)} output units; recompute the patch for this model"
            )

    def summary(self) -> str:
        f = self.factors
        return f"{int((f != 1).sum())}/{f.numel()} units scaled, mean {f.float().mean():.3f}, min {f.float().min():.3f}"

    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * _along(self.factors.to(w), _out_axis(self.layout))

    def apply_bias(self, b: torch.Tensor) -> torch.Tensor:
        return b * self.factors.to(b)

    def row_block(self, rows: slice) -> Edit:
        return replace(self, factors=self.factors[rows]) if _out_axis(self.layout) == 0 else self

    def attach(self, module: nn.Module) -> RemovableHandle:
        return module.register_forward_hook(lambda m, args, out: out * self.factors.to(out))


@dataclass(frozen=True, eq=False)
class ScaleInputs(Edit):
    """Multiply input unit ``j`` by ``factors[j]`` before the module reads it: weight columns
    (rows for Conv1D). The bias is untouched. Zeroing heads and neurons are its special cases."""

    factors: torch.Tensor = field(default_factory=lambda: torch.ones(0))
    kind: ClassVar[str] = "scale_inputs"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"factors": self.factors}

    def check(self, weight_shape: tuple[int, ...]) -> None:
        super().check(weight_shape)
        if self.layout == "embedding":
            raise PatcherError(f"{self.weight_name}: an embedding's inputs are token ids; scale its outputs instead")
        if self.factors.shape != (self.in_units(weight_shape),):
            raise PatcherError(
                f"{self.weight_name}: {self.kind} has {self.factors.numel()} factors, the tensor has "
                f"{self.in_units(weight_shape)} input units; recompute the patch for this model"
            )

    def summary(self) -> str:
        f = self.factors
        return f"{int((f != 1).sum())}/{f.numel()} inputs scaled, mean {f.float().mean():.3f}"


    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * _along(self.factors.to(w), 1 - _out_axis(self.layout))

    def row_block(self, rows: slice) -> Edit:
        return replace(self, factors=self.factors[rows]) if _out_axis(self.layout) == 1 else self

    def attach(self, module: nn.Module) -> RemovableHandle:
        def pre(m: nn.Module, args: tuple) -> tuple:
            return (args[0] * self.factors.to(args[0]),) + tuple(args[1:])

        return module.register_forward_pre_hook(pre)


@dataclass(frozen=True, eq=False)
class ZeroHeads(ScaleInputs):
    """Remove attention heads: zero the output projection's input columns of each head."""

    heads: tuple[int, ...] = ()
    head_dim: int = 0
    kind: ClassVar[str] = "zero_heads"

    @classmethod
    def build(cls, module: str, heads: list[int], num_heads: int, head_dim: int, layout: Layout = "linear") -> ZeroHeads:
        factors = torch.ones(num_heads * head_dim)
        for h in heads:
            if not 0 <= h < num_heads:
                raise PatcherError(f"{module}: head {h} out of range 0..{num_heads - 1}")
            factors[h * head_dim : (h + 1) * head_dim] = 0
        return cls(module, layout, factors=factors, heads=tuple(sorted(heads)), head_dim=head_dim)

    def params(self) -> dict:
        return {"heads": list(self.heads), "head_dim": self.head_dim}

    def summary(self) -> str:
        return f"{len(self.heads)} heads zeroed: {list(self.heads)}"


@dataclass(frozen=True, eq=False)
class ZeroNeurons(ScaleInputs):
    """Remove MLP neurons: zero the down projection's input columns."""

    neurons: tuple[int, ...] = ()
    kind: ClassVar[str] = "zero_neurons"

    @classmethod
    def build(cls, module: str, neurons: list[int], width: int, layout: Layout = "linear") -> ZeroNeurons:
        factors = torch.ones(width)
        if neurons and not (0 <= min(neurons) and max(neurons) < width):
            raise PatcherError(f"{module}: neuron index out of range 0..{width - 1}")
        factors[list(neurons)] = 0
        return cls(module, layout, factors=factors, neurons=tuple(sorted(neurons)))

    def params(self) -> dict:
        return {"neurons": list(self.neurons)}

    def summary(self) -> str:
        return f"{len(self.neurons)}/{self.factors.numel()} neurons zeroed"


@dataclass(frozen=True, eq=False)
class ProjectOutputs(Edit):
    """Remove a rank-k subspace from what the module writes: ``W' = (I - s V U^T) W``,
    ``b' = (I - s V U^T) b``, with ``U`` ``[out, k]`` orthonormal (what is read out and removed),
    strength ``s`` in [0, 1], and ``V`` (``write``, where the correction goes) with ``U^T V = I``.
    Without ``write``, ``V = U``: the orthogonal projection. Another ``V`` makes an oblique
    projection that still leaves nothing along ``U`` (at ``s = 1``) but moves the output along
    ``V``; with ``V = S U (U^T S U)^-1`` it is the projection that is orthogonal in the metric
    ``S^-1`` (LEACE's eraser for a covariance ``S``)."""

    basis: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    strength: float = 1.0
    write: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 1))
    kind: ClassVar[str] = "project_outputs"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"basis": self.basis} | ({"write": self.write} if self.write.numel() else {})

    def params(self) -> dict:
        return {"strength": self.strength}

    def check(self, weight_shape: tuple[int, ...]) -> None:
        super().check(weight_shape)
        out = self.out_units(weight_shape)
        if self.basis.ndim != 2 or self.basis.shape[0] != out:
            raise PatcherError(
                f"{self.weight_name}: projection basis has shape {list(self.basis.shape)}, expected [{out}, k]; "
                "recompute the patch for this model"
            )
        if not 0.0 <= self.strength <= 1.0:
            raise PatcherError(f"{self.weight_name}: projection strength {self.strength} is outside [0, 1]")
        eye = torch.eye(self.basis.shape[1], dtype=torch.float64)
        if not torch.allclose(self.basis.double().T @ self.basis.double(), eye, atol=1e-4):
            raise PatcherError(f"{self.weight_name}: projection basis is not orthonormal; orthonormalise it (QR)")
        if self.write.numel():
            if self.write.shape != self.basis.shape:
                raise PatcherError(f"{self.weight_name}: projection write directions have shape {list(self.write.shape)}, "
                                   f"the basis {list(self.basis.shape)}; recompute the patch")
            if not torch.allclose(self.basis.double().T @ self.write.double(), eye, atol=1e-3):
                raise PatcherError(f"{self.weight_name}: projection basis^T write is not the identity, so the edit would not "
                                   "remove the basis; recompute the patch")

    def summary(self) -> str:
        kind = "oblique" if self.write.numel() else "orthogonal"
        return f"rank-{self.basis.shape[1]} {kind} projection, strength {self.strength:g}"

    def _project(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        u = self.basis.to(x)
        v = self.write.to(x) if self.write.numel() else u
        if axis == 0:  # x is [out, ...]: columns are output vectors
            return x - self.strength * (v @ (u.T @ x))
        return x - self.strength * ((x @ u) @ v.T)

    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        return self._project(w, _out_axis(self.layout))

    def apply_bias(self, b: torch.Tensor) -> torch.Tensor:
        return self._project(b[None, :], 1)[0]

    def attach(self, module: nn.Module) -> RemovableHandle:
        return module.register_forward_hook(lambda m, args, out: self._project(out, 1))


@dataclass(frozen=True, eq=False)
class AffineOutputs(Edit):
    """Output unit ``j`` becomes ``scale[j] * z_j + shift[j]``: weight rows (Conv1D columns) times
    ``scale``, bias ``b' = scale * b + shift``. This is a per-unit affine transport map folded into
    the layer that writes the unit (Linear-AcT and Mean-AcT, Rodriguez et al., ICLR 2025,
    arXiv 2410.23054, whose reference code ``apple/ml-act`` applies the same map as a hook).

    The shift needs a bias: where the module has none, `bake` turns on the family's config switch
    that gives it one (`Architecture.bias_switches`) and writes zero biases for every tensor the
    switch adds. ``layout = "norm"`` edits a 1-D norm gain instead (Gemma's post-norms, which store
    ``g - 1``: ``norm_offset = 1``); its gain becomes ``scale * g``, and since a norm has no bias
    and the residual add follows it, the shift must be zero there."""

    scale: torch.Tensor = field(default_factory=lambda: torch.ones(0))
    shift: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    norm_offset: float = 0.0
    kind: ClassVar[str] = "affine_outputs"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale, "shift": self.shift}

    def params(self) -> dict:
        return {"norm_offset": self.norm_offset} if self.layout == "norm" else {}

    @property
    def needs_bias(self) -> bool:
        """True when the edit writes a bias (a linear's shift); a norm gain has no bias slot."""
        return self.layout != "norm"

    def check(self, weight_shape: tuple[int, ...]) -> None:
        for key, t in self.tensors().items():
            if not torch.isfinite(t).all():
                raise PatcherError(f"patch edit on {self.weight_name}: {key} holds NaN or inf; recompute the patch")
        if self.layout == "norm":
            if len(weight_shape) != 1:
                raise PatcherError(f"{self.weight_name}: a norm edit expects a 1-D gain, found shape {list(weight_shape)}")
            units = weight_shape[0]
            if (self.shift != 0).any():
                raise PatcherError(
                    f"{self.module}: a norm's output has no bias slot (the residual add follows it), so the transport shift cannot "
                    "be folded there: transport the block's output projection (attn_out / mlp_out) instead"
                )
        else:
            super().check(weight_shape)
            if self.layout == "embedding":
                raise PatcherError(f"{self.weight_name}: affine_outputs edits a linear layer's outputs, not an embedding")
            units = self.out_units(weight_shape)
        if self.scale.shape != (units,) or self.shift.shape != (units,):
            raise PatcherError(
                f"{self.weight_name}: affine_outputs has {self.scale.numel()} scales and {self.shift.numel()} shifts, the tensor has "
                f"{units} output units; recompute the patch for this model"
            )

    def summary(self) -> str:
        w, b = self.scale.float(), self.shift.float()
        return f"{int(((w != 1) | (b != 0)).sum())}/{w.numel()} units moved, scale mean {w.mean():.3f}, |shift| mean {b.abs().mean():.3g}"

    def apply_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.layout == "norm":
            return self.scale.to(w) * (w + self.norm_offset) - self.norm_offset
        return w * _along(self.scale.to(w), _out_axis(self.layout))

    def apply_bias(self, b: torch.Tensor) -> torch.Tensor:
        return b * self.scale.to(b) + self.shift.to(b)

    def row_block(self, rows: slice) -> Edit | None:
        if self.layout == "norm":
            return None
        if _out_axis(self.layout) == 0:
            return replace(self, scale=self.scale[rows], shift=self.shift[rows])
        return self

    def attach(self, module: nn.Module) -> RemovableHandle:
        return module.register_forward_hook(lambda m, args, out: out * self.scale.to(out) + self.shift.to(out))


def orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis ``[d, k]`` of the span of the columns of ``vectors`` (QR, float64)."""
    q, _ = torch.linalg.qr(vectors.double())
    return q.float()
