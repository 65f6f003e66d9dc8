"""Collection beyond one process on one device: accelerate device maps, layer-by-layer runs,
data-parallel processes, and checkpoints that a killed run resumes from.

One `ScaleOptions` object carries the choices (CLI flags: ``--device-map``, ``--max-memory``,
``--sequential``, ``--resume``, ``--checkpoint-every``); the `Collector` hands a pass to
`collect_scaled` when it has one. Statistics stay the same objects: a pass here feeds them through
the Collector's own batches, pooling masks and hooks.

* **Data-parallel.** Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) rank ``r`` of
  ``N`` takes batches ``r, r + N, r + 2N, ...`` of the Collector's length-sorted batches, so every
  row sits in the same batch as in a single-process run and its activations are bit-identical. The
  per-rank statistic states (plain tensors) are exchanged with one ``all_gather_object`` (gloo; a
  gloo group beside nccl on GPUs), every rank merges all of them (later steps of a recipe collect
  with the earlier steps' patch, so every rank builds it) and rank 0 bakes and writes.
* **Resume.** Every ``checkpoint_every`` batches the statistics observed since the last checkpoint
  are written with ``torch.save`` as plain tensors to ``<state_dir>/cK-rRofN/part-XXXXX.pt``, then
  ``meta.json`` (atomic renames, parts first). ``--resume`` loads them with
  ``torch.load(weights_only=True)`` (no arbitrary unpickling), checks that recipe, data, model and
  earlier patch are the same (a hash), and continues after the last saved batch. Layer-by-layer
  collection checkpoints completed steps only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import PatcherError

# -- device maps -------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MAX_MEMORY_HELP = "write DEVICE=SIZE pairs separated by commas, e.g. --max-memory 0=70GiB,1=70GiB,cpu=100GiB"


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_max_memory(spec: str | None) -> dict[int | str, int] | None:
    """``"0=70GiB,cpu=100GiB"`` -> ``{0: bytes, "cpu": bytes}``; every GPU index must be visible."""
    if spec is None or not spec.strip():
        return None
    out: dict[int | str, int] = {}
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise PatcherError(f"--max-memory {spec!r}: {part.strip()!r} is not DEVICE=SIZE; {MAX_MEMORY_HELP}")
        try:
            size = parse_size(value)
        except ValueError:
            raise PatcherError(f"--max-memory {spec!r}: size {value.strip()!r} is not a size like 70GiB, 500MB or 1e9 bytes; {MAX_MEMORY_HELP}") from None
        if key == "cpu":
            out["cpu"] = size
            continue
        index = key.removeprefix("cuda:")
        if not index.isdigit():
            raise PatcherError(f"--max-memory {spec!r}: unknown device {key!r}: use a GPU index (0, 1, ...) or cpu; {MAX_MEMORY_HELP}")
        if int(index) >= n_gpu:
            seen = f"GPUs 0-{n_gpu - 1} are visible" if n_gpu else "no CUDA GPU is visible"
            raise PatcherError(f"--max-memory names GPU {index}, which does not exist ({seen}): list only visible GPUs, or give only cpu=SIZE")
        out[int(index)] = size
    return out


def device_map_kwargs(device_map: str, max_memory: str | None) -> dict[str, Any]:
    """``device_map`` and ``max_memory`` for ``from_pretrained`` (accelerate's placement over the
    visible GPUs, then CPU memory, then disk), checked: a bad value is a PatcherError."""
    kw: dict[str, Any] = {}
    dm = device_map.strip()
    if dm in DEVICE_MAPS:
        kw["device_map"] = dm
    else:
        from .run import resolve_device

        try:
            kw["device_map"] = {"": resolve_device(dm)}
        except PatcherError:
            raise PatcherError(f"--device-map {device_map!r}: use {', '.join(DEVICE_MAPS)}, or one device (cpu, cuda:N)") from None
        if dm.startswith("cuda:") and int(dm.split(":")[1] or 0) >= torch.cuda.device_count():
            raise PatcherError(f"--device-map {device_map!r}: GPU {dm.split(':')[1]} does not exist ({torch.cuda.device_count()} visible): pick a visible GPU")
    mm = parse_max_memory(max_memory)
    if mm is not None:
        if dm in DEVICE_MAPS and "cpu" not in mm:
            mm["cpu"] = _total_ram()
        kw["max_memory"] = mm
    return kw


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


# -- processes ---------------------------------------------------------------------------------------
@dataclass
class World:
    """This process's place among data-parallel processes (from torchrun / accelerate env vars)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    _group: Any = None

    @classmethod
    def from_env(cls) -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        if size > 1 and not 0 <= rank < size:
            raise PatcherError(f"RANK={rank} is outside WORLD_SIZE={size}: launch with torchrun or accelerate launch")
        return cls(rank, size, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """Each rank takes its own GPU: ``cuda`` -> ``cuda:LOCAL_RANK``."""
        if self.size > 1 and device in ("cuda", "auto") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def init(self, device: str) -> None:
        if self.size <= 1 or self._group is not None:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = device.startswith("cuda") and torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(torch.device(device))
            dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank."""
        if self.size <= 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self._group)
        return out


# -- options -----------------------------------------------------------------------------------------
@dataclass
class ScaleOptions:
    """How a run loads the model and collects: see the module docstring."""

    sequential: bool = False
    hidden_max_gib: float = 8.0
    device_map: str | None = None
    max_memory: str | None = None
    state_dir: Path | None = None
    resume: bool = False
    checkpoint_every: int = 16
    fingerprint: str = ""
    world: World = field(default_factory=World.from_env)
    calls: int = 0

    def __post_init__(self) -> None:
        if self.max_memory and not self.device_map:
            raise PatcherError("--max-memory needs --device-map (e.g. --device-map auto --max-memory 0=70GiB,cpu=100GiB)")
        if self.device_map and self.sequential:
            raise PatcherError("--device-map and --sequential exclude each other: --sequential loads one layer at a time on --device")
        if self.device_map and self.world.size > 1:
            raise PatcherError("--device-map with several processes is not supported: give each process one GPU (--device cuda) or use --sequential")
        if self.checkpoint_every < 0:
            raise PatcherError(f"--checkpoint-every must be >= 0 (0 turns checkpoints off), got {self.checkpoint_every}")
        if self.device_map:
            device_map_kwargs(self.device_map, self.max_memory)  # fail early on bad values

    def prepare(self, folder: Path, out: Path, device: str) -> str:
        """Called by run/compute before loading: the state folder beside ``out``, the model's
        fingerprint (part of the resume key), process group; returns this rank's device."""
        from .checkpoint import Checkpoint

        if self.state_dir is None and self.checkpoint_every:
            self.state_dir = Path(f"{Path(out).resolve()}.collect-state")
        if self.resume and self.state_dir is None:
            raise PatcherError("--resume needs checkpoints: drop --checkpoint-every 0")
        self.fingerprint = Checkpoint.open(folder).fingerprint()
        device = self.world.device(device)
        self.world.init(device)
        return device

    def load(self, folder: Path, dtype: str, device: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
        from .run import load_model

        if self.sequential:
            from .sequential import load_layerwise

            return load_layerwise(folder, dtype, device, trust_remote_code, int(self.hidden_max_gib * 2**30))
        return load_model(folder, dtype, device, trust_remote_code, device_map=self.device_map, max_memory=self.max_memory)

    def finish(self) -> None:
        """After rank 0 wrote the output: the checkpoints are no longer needed."""
        if self.world.is_main and self.state_dir is not None and self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)


def load_with_device_map(folder: Path, dtype: torch.dtype, device_map: str, max_memory: str | None, trust_remote_code: bool) -> Any:
    """``from_pretrained`` across devices; the offload folder is removed with the model."""
    from transformers import AutoModelForCausalLM

    kw = device_map_kwargs(device_map, max_memory)
    kw["offload_folder"] = tempfile.mkdtemp(prefix="patcher-offload-")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    except (ValueError, RuntimeError) as exc:
        shutil.rmtree(kw["offload_folder"], ignore_errors=True)
        raise PatcherError(f"loading with --device-map {device_map} failed ({str(exc).splitlines()[0][:200]}): check --max-memory") from None
    weakref.finalize(model, shutil.rmtree, kw["offload_folder"], True)
    return model.eval()


# -- checkpoints -------------------------------------------------------------------------------------
def _stat_key(s: Any) -> list:
    return [type(s).__name__, list(map(list, s.watches)), getattr(s, "how", None), str(getattr(s, "store_dtype", ""))]


def collection_key(collector: Any, stats: Sequence[Any], texts: Sequence[str], labels: Sequence[int], patch: Any, desc: str, opts: ScaleOptions) -> str:
    h = hashlib.sha256()
    head = {
        "desc": desc, "stats": [_stat_key(s) for s in stats], "model": opts.fingerprint,
        "collector": [collector.batch_size, collector.max_tokens, collector.padding_side, collector.skip_first],
        "patch": patch.hash() if patch is not None and patch.edits else "", "world": [opts.world.rank, opts.world.size],
    }
    h.update(json.dumps(head, sort_keys=True).encode())
    for t, y in zip(texts, labels):
        h.update(f"{int(y)}\x00{t}\x00".encode())
    return h.hexdigest()


class CollectState:
    """One collection's checkpoints: parts of plain tensors plus a ``meta.json`` naming them."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.parts: list[str] = []
        self.done = 0
        self.complete = False

    @staticmethod
    def _atomic(path: Path, write) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        write(tmp)
        os.replace(tmp, path)

    def load(self, stats: Sequence[Any]) -> None:
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            return
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != self.key:
            raise PatcherError(
                f"the collection state in {self.folder} was made by another recipe, data set, model or process count: "
                "delete it or run without --resume"
            )
        for name in meta["parts"]:
            part = torch.load(self.folder / name, weights_only=True, map_location="cpu")
            for j, s in enumerate(stats):
                s.load_state(part[f"s{j}"])
        self.parts, self.done, self.complete = list(meta["parts"]), int(meta["done"]), bool(meta.get("complete"))

    def save(self, stats: Sequence[Any], since: Sequence[int], done: int, complete: bool = False) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.parts):05d}.pt"
        part = {f"s{j}": s.state(since[j]) for j, s in enumerate(stats)}
        self._atomic(self.folder / name, lambda p: torch.save(part, p))
        self.parts.append(name)
        self.done, self.complete = done, complete
        meta = {"key": self.key, "parts": self.parts, "done": done, "complete": complete}
        self._atomic(self.folder / "meta.json", lambda p: p.write_text(json.dumps(meta)))


# -- the pass ----------------------------------------------------------------------------------------
def collect_scaled(collector: Any, stats: Sequence[Any], wanted: dict, texts: Sequence[str], labels: Sequence[int], patch: Any, desc: str) -> None:
    """`Collector.run` for a collector with `ScaleOptions`: this rank's batches, layer by layer when
    the model is a `LayerwiseModel` skeleton, resuming from and writing checkpoints, then the
    statistics of every rank merged into ``stats``."""
    from .patch import Patch
    from .sequential import layerwise_of

    opts: ScaleOptions = collector.options
    world = opts.world
    k, opts.calls = opts.calls, opts.calls + 1
    resumable = all(hasattr(s, "state") and hasattr(s, "load_state") for s in stats)
    if opts.resume and not resumable:
        bad = next(type(s).__name__ for s in stats if not hasattr(s, "state"))
        raise PatcherError(f"--resume: statistic {bad} cannot be checkpointed; run without --resume")
    state = None
    if opts.state_dir is not None and resumable:
        state = CollectState(opts.state_dir / f"c{k:02d}-r{world.rank}of{world.size}", collection_key(collector, stats, texts, labels, patch, desc, opts))
        if opts.resume:
            state.load(stats)
            if state.done:
                print(f"patcher: {desc}: resumed after {state.done} batches from {state.folder}", flush=True)
        elif state.folder.exists():
            shutil.rmtree(state.folder)
    all_batches = list(collector.batches(texts, labels))
    mine = all_batches[world.rank :: world.size]
    skip = state.done if state is not None else 0
    todo = mine[skip:]
    if world.size > 1 and world.is_main:
        print(f"patcher: {desc}: rank 0 of {world.size} takes {len(mine)} of the {len(all_batches)} batches", flush=True)
    progress = collector.progress and world.is_main
    lw = layerwise_of(collector.model)
    since = [s.batches_seen() for s in stats] if state is not None else []
    if todo and lw is not None:
        lw.collect(collector, stats, wanted, todo, patch, desc)
        if state is not None:
            state.save(stats, since, len(mine), complete=True)
    elif todo:
        model = collector.model
        modules = dict(model.named_modules())
        current: list[Any] = []
        handles: list = []
        try:
            with torch.inference_mode(), (patch or Patch([])).hooked(model):
                handles = collector._register(modules, wanted, current)
                for n, batch in enumerate(tqdm(todo, desc=desc, disable=not progress), start=skip + 1):
                    current[:] = [batch]
                    dev = collector.device
                    model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                          position_ids=batch.position_ids.to(dev), use_cache=False, logits_to_keep=1)
                    if state is not None and (n == len(mine) or opts.checkpoint_every and n % opts.checkpoint_every == 0):
                        state.save(stats, since, n, complete=n == len(mine))
                        since = [s.batches_seen() for s in stats]
        finally:
            for h in handles:
                h.remove()
    reduce_stats(stats, world)


def reduce_stats(stats: Sequence[Any], world: World) -> None:
    """Merge every rank's statistics into every rank's ``stats``."""
    if world.size <= 1:
        return
    if world.is_main:
        print(f"patcher: merging the statistics of {world.size} processes", flush=True)
    if all(hasattr(s, "state") for s in stats):
        gathered = world.gather([s.state() for s in stats])
        for r, states in enumerate(gathered):
            if r != world.rank:
                for s, st in zip(stats, states):
                    s.load_state(st)
        return
    gathered = world.gather(list(stats))
    for r, objs in enumerate(gathered):
        if r != world.rank:
            for s, other in zip(stats, objs):
                s.merge(other)
