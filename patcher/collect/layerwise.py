"""Layer-by-layer collection: statistics of a model larger than memory, one decoder layer at a time.

The model is built as a skeleton on the meta device (parameters take no memory; the small
non-persistent buffers, such as rotary ``inv_freq``, are real). Only what runs before the first
decoder layer (embeddings, and GPT-2's position embeddings) is loaded from the checkpoint. Then:

1. **Catch.** Each calibration batch goes through the model's own ``forward`` with every decoder
   layer swapped for a catcher that records its arguments and passes the hidden state on; the last
   catcher stops the pass. So the layer-0 input (embeddings, scaled as the family scales them) and
   each layer's keyword arguments (the causal / sliding-window mask, the rotary ``position_embeddings``,
   ALiBi, position ids) come from the family's own ``Model.forward``: nothing is re-implemented.
   The recorded tensors are shared between layers (the forward builds them once), so they cost one
   mask and one set of cos/sin per batch.
2. **Layers.** For each decoder layer: its weights are read from the shards (`Checkpoint.read`),
   every batch's hidden state goes through it (firing the statistics hooks and the earlier steps'
   patch hooks on its modules, exactly as in a whole-model pass), the output replaces the input,
   and the layer's matrices go back to the meta device (its 1-D norms and biases, a few KB, stay).
3. **Replay** (perplexity only). The final hidden states go back into the model's ``forward`` in
   place of the first layer's output, so the final norm, the head and any logit soft-capping are
   the family's own code too.

Memory: one layer, plus the calibration set's hidden states (``n_texts x max_tokens x hidden x
bytes``), kept in memory or, above ``hidden_max_bytes``, in an unlinked temporary file read and
written batch by batch (not memory-mapped, so it never counts as resident memory).
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.arch import arch_for, num_layers
from ..core.errors import PatcherError
from ..core.hooks import Hooks
from ..core.models import load_model, load_tokenizer, resolve_device, torch_dtype
from ..core.placement import Placement
from ..core.progress import bar
from ..edits.patch import Patch
from ..io.checkpoint import Checkpoint, TensorInfo
from .collector import Collector, Wanted, attach_statistics
from .statistics import Batch

# Families whose decoder layers return a tuple (their Model.forward reads ``outputs[0]``).
TUPLE_LAYERS = {"falcon"}
DEFAULT_HIDDEN_MAX_BYTES = 8 << 30


class _Stop(Exception):
    """Raised by the last catcher: the rest of the forward is not needed."""


class _Stand(nn.Module):
    """Stands in for a decoder layer during a catch or replay pass."""

    def __init__(self, fn, original: nn.Module):
        super().__init__()
        self.fn = fn
        object.__setattr__(self, "_original", original)  # not a submodule

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. Gemma's ``attention_type``, read by the model's loop
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class HiddenStore:
    """Every batch's hidden state, in memory or in an unlinked temporary file."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, max_bytes: int, tmp_dir: str | Path | None = None):
        self.shapes, self.dtype = list(shapes), dtype
        item = torch.empty((), dtype=dtype).element_size()
        sizes = [math.prod(s) * item for s in self.shapes]
        self.nbytes = sum(sizes)
        self.on_disk = self.nbytes > max_bytes
        self._mem: list[torch.Tensor | None] = [None] * len(self.shapes)
        self._file = None
        if self.on_disk:
            self._offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            self._sizes = sizes
            self._file = tempfile.TemporaryFile(dir=tmp_dir, prefix="patcher-hidden-")

    def put(self, b: int, t: torch.Tensor) -> None:
        t = t.detach().to("cpu", self.dtype).contiguous()
        if not self.on_disk:
            self._mem[b] = t
            return
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        fd, pos = self._file.fileno(), self._offsets[b]
        while view.nbytes:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n

    def get(self, b: int) -> torch.Tensor:
        if not self.on_disk:
            t = self._mem[b]
            assert t is not None
            return t
        buf = bytearray(self._sizes[b])
        view, pos, fd = memoryview(buf), self._offsets[b], self._file.fileno()
        while view.nbytes:
            n = os.preadv(fd, [view], pos)
            if n <= 0:
                raise PatcherError("the temporary hidden-state file ended early: is the temp disk full?")
            view, pos = view[n:], pos + n
        return torch.frombuffer(buf, dtype=torch.uint8).view(self.dtype).reshape(self.shapes[b])

    def close(self) -> None:
        self._mem = [None] * len(self.shapes)
        if self._file is not None:
            self._file.close()
            self._file = None


class LayerwiseModel:
    """A causal LM whose weights stay on disk; runs batches layer by layer (see the module doc).

    ``model`` is the skeleton (meta parameters): methods read its config and module names, and the
    `Collector` hands its passes to `collect`. The skeleton owns the engine (``layerwise_of``) and
    the engine refers back to it weakly, so dropping the skeleton frees both, embeddings and head
    included, without waiting for the cycle collector: hold the skeleton, not the engine."""

    @classmethod
    def open(
        cls,
        folder: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        trust_remote_code: bool = False,
        hidden_max_bytes: int = DEFAULT_HIDDEN_MAX_BYTES,
        tmp_dir: str | Path | None = None,
    ) -> nn.Module:
        """The skeleton of the model in ``folder`` (meta parameters), driven by a new engine that
        ``layerwise_of(skeleton)`` returns."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        cls(model.eval(), folder, dtype, device, hidden_max_bytes, tmp_dir)
        return model

    def __init__(self, model: nn.Module, folder: str | Path, dtype: torch.dtype, device: str | torch.device,
                 hidden_max_bytes: int, tmp_dir: str | Path | None):
        self.ckpt = Checkpoint.open(folder)
        config = model.config
        self.arch = arch_for(config)
        self.dtype, self.device = dtype, torch.device(device)
        self.hidden_max_bytes, self.tmp_dir = hidden_max_bytes, tmp_dir
        model._patcher_layerwise = self  # how the Collector finds the engine
        self._model = weakref.ref(model)
        self.layers: nn.ModuleList = model.get_submodule(self.arch.layers)
        if len(self.layers) != num_layers(config):
            raise PatcherError(f"sequential mode: {config.model_type} has {len(self.layers)} layer modules, config says {num_layers(config)}")
        self.n_layers = len(self.layers)
        self._tensors = self.ckpt.tensor_map()
        self._prefix = getattr(model, "base_model_prefix", "") or ""
        for mod in model.modules():
            for k, buf in list(mod._buffers.items()):
                if buf is not None and buf.device != self.device and buf.device.type != "meta":
                    mod._buffers[k] = buf.to(self.device)
        out_emb = model.get_output_embeddings()
        self._head_module = next(n for n, m in model.named_modules() if m is out_emb)
        head = self._head_module + "."
        layers = self.arch.layers + "."
        self._pre = [n for n, _ in model.named_parameters() if not n.startswith((layers, head))]
        self._head = [n for n, _ in model.named_parameters(remove_duplicate=False) if n.startswith(head)]
        self._load(self._pre)

    @property
    def model(self) -> nn.Module:
        """The skeleton this engine drives (alive while its caller holds it)."""
        model = self._model()
        if model is None:
            raise RuntimeError("LayerwiseModel: its skeleton was freed; keep the model `load_layerwise` returned")
        return model

    # -- weights -----------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo | None:
        cands = [name, name.removeprefix(self._prefix + "."), f"{self._prefix}.{name}"]
        if name.startswith(self._head_module + "."):  # GPT-NeoX: module lm_head, tensor embed_out
            cands.append(self.arch.lm_head + name[len(self._head_module):])
        for cand in cands:
            if cand in self._tensors:
                return self._tensors[cand]
        return None

    def _set(self, name: str, value: torch.Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        mod = self.model.get_submodule(owner) if owner else self.model
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)

    def _load(self, names: Sequence[str]) -> None:
        for name in names:
            info = self._info(name)
            if info is None:
                raise PatcherError(
                    f"sequential mode: the checkpoint has no tensor {name}: re-save the model with save_pretrained "
                    "(legacy tensor names) or run without --sequential"
                )
            self._set(name, self.ckpt.read(info).to(self.device, self.dtype))

    def _load_head(self) -> None:
        """The output head; a tied head (absent from the checkpoint) shares the input embedding."""
        for name in self._head:
            if self._info(name) is not None:
                self._load([name])
            else:
                emb = self.model.get_input_embeddings().weight
                if emb.device.type == "meta":
                    raise PatcherError(f"sequential mode: the checkpoint has no {name} and no input embedding to tie it to")
                self._set(name, emb)

    def _layer_params(self, i: int) -> list[str]:
        return [f"{self.arch.layers}.{i}.{n}" for n, _ in self.layers[i].named_parameters()]

    def load_layer(self, i: int) -> None:
        self._load(self._layer_params(i))

    def free_layer(self, i: int) -> None:
        """Matrices back to meta; 1-D norms and biases stay (a few KB; methods may read norms)."""
        for name in self._layer_params(i):
            p = self.model.get_parameter(name)
            if p.ndim >= 2:
                self._set(name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    # -- passes ------------------------------------------------------------------------------------
    def _swap(self, make) -> list[nn.Module]:
        originals = list(self.layers)
        for i in range(self.n_layers):
            self.layers[i] = _Stand(make(i), originals[i])
        return originals

    def _restore(self, originals: list[nn.Module]) -> None:
        for i, m in enumerate(originals):
            self.layers[i] = m

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None) -> Any:
        kw: dict[str, Any] = {"input_ids": ids.to(self.device), "use_cache": False}
        if mask is not None:
            kw["attention_mask"] = mask.to(self.device)
        if pos is not None:
            kw["position_ids"] = pos.to(self.device)
        return self.model(**kw)

    def catch(self, ids: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """The first layer's input hidden state and every layer's other arguments, as the model's
        own forward prepares them."""
        records: list[tuple[tuple, dict] | None] = [None] * self.n_layers
        first: list[torch.Tensor] = []
        as_tuple = self.model.config.model_type in TUPLE_LAYERS
        last = self.n_layers - 1

        def make(i: int):
            def fn(*args: Any, **kwargs: Any) -> Any:
                hidden = args[0] if args else kwargs.pop("hidden_states")
                records[i] = (tuple(args[1:]), kwargs)
                if i == 0:
                    first.append(hidden)
                if i == last:
                    raise _Stop
                return (hidden, None) if as_tuple else hidden

            return fn

        originals = self._swap(make)
        try:
            self._forward(ids, mask, pos)
        except _Stop:
            pass
        finally:
            self._restore(originals)
        if not first or any(r is None for r in records):
            raise PatcherError(f"sequential mode not supported for {self.model.config.model_type}: its forward did not call every decoder layer")
        return first[0], records  # type: ignore[return-value]

    def run_layer(self, i: int, hidden: torch.Tensor, record: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = record
        out = self.layers[i](hidden.to(self.device), *args, **kwargs)
        if isinstance(out, tuple) != (self.model.config.model_type in TUPLE_LAYERS):
            raise PatcherError(f"sequential mode not supported for {self.model.config.model_type}: its decoder layers return {type(out).__name__}")
        return out[0] if isinstance(out, tuple) else out

    def layer_passes(self, inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]], on_batch=None, desc: str = "layers") -> HiddenStore:
        """Run every ``(input_ids, attention_mask, position_ids)`` through all layers; returns the
        final hidden states. ``on_batch(b)`` is called before batch ``b`` enters each layer (the
        Collector points its hooks at that batch)."""
        hidden = self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.n_embd
        store = HiddenStore([(ids.shape[0], ids.shape[1], hidden) for ids, _, _ in inputs], self.dtype, self.hidden_max_bytes, self.tmp_dir)
        records = []
        try:
            for b, (ids, mask, pos) in enumerate(inputs):
                if on_batch:
                    on_batch(b)
                h, rec = self.catch(ids, mask, pos)
                store.put(b, h)
                records.append(rec)
            for i in bar(range(self.n_layers), desc=desc):
                self.load_layer(i)
                try:
                    for b in range(len(inputs)):
                        if on_batch:
                            on_batch(b)
                        store.put(b, self.run_layer(i, store.get(b), records[b][i]))
                finally:
                    self.free_layer(i)
        except BaseException:
            store.close()
            raise
        return store

    def logits(self, ids: torch.Tensor, final_hidden: torch.Tensor, mask: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from final hidden states, through the family's own final norm, head and soft-cap."""
        if any(self.model.get_parameter(n).device.type == "meta" for n in self._head):
            self._load_head()
        as_tuple = self.model.config.model_type in TUPLE_LAYERS

        def make(i: int):
            def fn(*args: Any, **kwargs: Any) -> Any:
                h = final_hidden.to(self.device) if i == 0 else (args[0] if args else kwargs["hidden_states"])
                return (h, None) if as_tuple else h

            return fn

        originals = self._swap(make)
        try:
            return self._forward(ids, mask, pos).logits
        finally:
            self._restore(originals)

    # -- statistics --------------------------------------------------------------------------------
    def collect(self, collector: Collector, wanted: Wanted, batches: Sequence[Batch], patch: Patch | None, desc: str) -> None:
        """One layer-by-layer pass over ``batches`` feeding the statistics in ``wanted`` (the
        Collector's semantics: same batches and pooling masks, the prior patch hooked, statistic
        hooks registered after it)."""
        inside = self.arch.layers + "."
        for name, _ in wanted:
            if not name.startswith(inside):
                raise PatcherError(f"sequential mode collects decoder-layer modules only, not {name}: run without --sequential")
        current: list[Batch] = []
        inputs = [(b.input_ids, b.attention_mask, b.position_ids) for b in batches]
        with torch.inference_mode(), (patch or Patch([])).hooked(self.model), Hooks() as hooks:
            attach_statistics(hooks, self.model, wanted, current)
            store = self.layer_passes(inputs, on_batch=lambda b: current.__setitem__(slice(None), [batches[b]]),
                                      desc=desc)
            store.close()


class ResidentModel:
    """`LayerwiseModel`'s catch / run_layer for a model already in memory: the same code, nothing
    loaded or freed (layer-by-layer estimation on a resident model, e.g. causal transport)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self._lw = LayerwiseModel
        self.model, self.device = model, device
        self.arch = arch_for(model.config)
        self.layers = model.get_submodule(self.arch.layers)
        self.n_layers = len(self.layers)
        self.dtype = next(model.parameters()).dtype
        self.hidden_max_bytes, self.tmp_dir = None, None

    def catch(self, *args: Any) -> Any:
        return self._lw.catch(self, *args)

    def run_layer(self, *args: Any) -> torch.Tensor:
        return self._lw.run_layer(self, *args)

    def _swap(self, make: Any) -> list[nn.Module]:
        return self._lw._swap(self, make)

    def _restore(self, originals: list[nn.Module]) -> None:
        self._lw._restore(self, originals)

    def _forward(self, *args: Any) -> Any:
        return self._lw._forward(self, *args)

    def load_layer(self, i: int) -> None:
        """Resident: nothing to load."""

    def free_layer(self, i: int) -> None:
        """Resident: nothing to free."""


def load_layerwise(folder: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                   hidden_max_bytes: int = DEFAULT_HIDDEN_MAX_BYTES) -> tuple[nn.Module, Any]:
    """(skeleton model driven by a `LayerwiseModel`, tokenizer with a pad token): `load_model`'s
    counterpart for ``--sequential``."""
    skeleton = LayerwiseModel.open(folder, torch_dtype(dtype), resolve_device(device), trust_remote_code, hidden_max_bytes)
    return skeleton, load_tokenizer(folder, trust_remote_code)


def load_placed(folder: str | Path, placement: Placement, dtype: str, trust_remote_code: bool = False, tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """(model, tokenizer) as ``placement`` says: a `LayerwiseModel` skeleton under ``--sequential``,
    else whole on ``placement.device`` or over accelerate's device map. ``dtype``: the caller's
    default (the recipe's), which ``--dtype`` overrides."""
    dtype = placement.dtype_or(dtype)
    if placement.sequential:
        return load_layerwise(folder, dtype, placement.device, trust_remote_code, placement.hidden_max_bytes)
    return load_model(Path(folder), dtype, placement.device, trust_remote_code, device_map=placement.device_map,
                      max_memory=placement.max_memory, offload_folder=placement.offload_folder, tokenizer=tokenizer)


def layerwise_of(model: Any) -> LayerwiseModel | None:
    return getattr(model, "_patcher_layerwise", None)


@torch.inference_mode()
def layerwise_perplexity(lw: LayerwiseModel, ids: torch.Tensor, window: int = 1024, stride: int = 512,
                         prefix: list[int] | None = None) -> float:
    """`patcher.perplexity.perplexity` (same windows, same scoring, same ``prefix``) with all windows
    taken through the model layer by layer."""
    spans = []
    prev_end = 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + window, len(ids))
        spans.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == len(ids):
            break
    pre = torch.tensor(prefix or [], dtype=ids.dtype)
    chunks = [torch.cat([pre, ids[b:e]])[None] for b, e, _ in spans]
    store = lw.layer_passes([(c, None, None) for c in chunks], desc="perplexity (layer by layer)")
    nll, count = 0.0, 0
    try:
        for k, (chunk, (_, _, new)) in enumerate(zip(chunks, spans)):
            logits = lw.logits(chunk, store.get(k)).float()
            logp = torch.log_softmax(logits[0, -new - 1 : -1], dim=-1)
            nll -= logp.gather(1, chunk[0, -new:, None].to(logp.device)).sum().item()
            count += new
    finally:
        store.close()
    return math.exp(nll / count)
