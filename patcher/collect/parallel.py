"""Collection beyond one process on one device: layer-by-layer runs, data-parallel processes, and
checkpoints that a killed run resumes from (`patcher.collect.resume`).

One `ParallelCollect` object carries the run's `Placement` (CLI flags: ``--device-map``,
``--max-memory``, ``--sequential``, ``--resume``, ``--checkpoint-every``), this process's place among
data-parallel processes and the checkpoint folder, and is the `Collector`'s pipeline when it has one.
Statistics stay the same objects: a pass here feeds them through the Collector's own batches, pooling masks and statistic hooks (`forward_loop`, or the layer-by-layer passes).

* **Data-parallel.** Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) rank ``r`` of
  ``N`` takes batches ``r, r + N, r + 2N, ...`` of the Collector's length-sorted batches, so every
  row sits in the same batch as in a single-process run and its activations are bit-identical. The
  per-rank statistic states (plain tensors) are exchanged with one ``all_gather_object`` (gloo; a
  gloo group beside nccl on GPUs), every rank merges all of them (later steps of a recipe collect
  with the earlier steps' patch, so every rank builds it) and rank 0 bakes and writes.
* **Resume.** See `patcher.collect.resume`. Layer-by-layer collection checkpoints completed steps only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import PatcherError
from ..core.placement import Placement
from ..edits.patch import Patch
from ..io.atomic import write_text
from ..io.checkpoint import Checkpoint
from ..io.folders import pid_alive
from .collector import Collector, Wanted, forward_loop
from .layerwise import layerwise_of, load_placed
from .resume import CollectState, collection_key
from .statistics import Statistic

log = logging.getLogger(__name__)

OWNER_FILE = "owner.json"  # the pid of the process writing a collection state folder


def _owner_pid(path: Path) -> int | None:
    try:
        pid = json.loads(path.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) else None


def _metas(state: Path) -> list[dict]:
    """The meta.json of every collection checkpointed under ``state``."""
    out = []
    for p in state.glob("*/meta.json"):
        try:
            meta = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            out.append(meta)
    return out


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
class ParallelCollect:
    """How a run loads the model and collects: see the module docstring."""

    placement: Placement = field(default_factory=Placement)
    state_dir: Path | None = None
    fingerprint: str = ""
    world: World = field(default_factory=World.from_env)
    calls: int = 0
    collecting: bool = False  # inside `collect`: a failure now cuts a collection short

    def __post_init__(self) -> None:
        if self.placement.device_map and self.world.size > 1:
            raise PatcherError("--device-map with several processes is not supported: give each process one GPU (--device cuda) or use --sequential")

    @property
    def resume(self) -> bool:
        return self.placement.resume

    @property
    def checkpoint_every(self) -> int:
        return self.placement.checkpoint_every

    def prepare(self, folder: Path, out: Path, device: str) -> str:
        """Called by run/compute before loading: the state folder beside ``out``, the model's
        fingerprint (part of the resume key), process group; returns this rank's device."""
        if self.state_dir is None and self.checkpoint_every:
            self.state_dir = Path(f"{Path(out).resolve()}.collect-state")
        if self.resume and self.state_dir is None:
            raise PatcherError("--resume needs checkpoints: drop --checkpoint-every 0")
        if self.state_dir is not None and self.world.is_main:
            self._claim_state()
        self.fingerprint = Checkpoint.open(folder).fingerprint()
        device = self.world.device(device)
        self.world.init(device)
        return device

    def load(self, folder: Path, dtype: str, device: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
        return load_placed(folder, self.placement.replace(device=device), dtype, trust_remote_code)

    def _claim_state(self) -> None:
        """Take the state folder for this process: one whose writer is still running is refused;
        one left by a dead process is resumed from (``--resume``) or removed, and the log says which."""
        state = self.state_dir
        owner = state / OWNER_FILE
        if state.exists():
            pid = _owner_pid(owner)
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                raise PatcherError(f"another patcher process (pid {pid}) is collecting into {state}: wait for it to finish or choose another --out")
            who = f"left by process {pid} (no longer running)" if pid is not None else "left by an earlier run"
            if self.resume:
                log.info("resuming from the collection state %s %s", state, who)
            else:
                shutil.rmtree(state, ignore_errors=True)
                log.warning("removed the collection state %s %s; pass --resume to continue from such state instead", state, who)
        state.mkdir(parents=True, exist_ok=True)
        write_text(owner, json.dumps({"pid": os.getpid()}))

    def abandon(self) -> None:
        """After a failed run: keep the checkpoints only when ``--resume`` can continue from them (a
        collection was cut short after at least one checkpoint); else remove them. Says which."""
        state = self.state_dir
        if not self.world.is_main or state is None or not state.exists():
            return
        if self.collecting and _metas(state):
            log.warning("kept the collection state %s: rerun with --resume to continue from its checkpoints", state)
        else:
            shutil.rmtree(state, ignore_errors=True)
            log.warning("removed the collection state %s (--resume could not use it: no collection was cut short after a checkpoint)", state)

    def finish(self) -> None:
        """After rank 0 wrote the output: the checkpoints are no longer needed."""
        if self.world.is_main and self.state_dir is not None and self.state_dir.exists():
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- the pass ----------------------------------------------------------------------------------
    def collect(self, collector: Collector, stats: Sequence[Statistic], wanted: Wanted, texts: Sequence[str], labels: Sequence[int],
                patch: Patch | None, desc: str) -> None:
        """`Collector.run` through these options: this rank's batches, layer by layer when the model
        is a `LayerwiseModel` skeleton, resuming from and writing checkpoints, then the statistics of
        every rank merged into ``stats``."""
        self.collecting = True
        self._collect(collector, stats, wanted, texts, labels, patch, desc)
        self.collecting = False

    def _collect(self, collector: Collector, stats: Sequence[Statistic], wanted: Wanted, texts: Sequence[str], labels: Sequence[int],
                 patch: Patch | None, desc: str) -> None:
        world = self.world
        k, self.calls = self.calls, self.calls + 1
        resumable = all(hasattr(s, "state") and hasattr(s, "load_state") for s in stats)
        if self.resume and not resumable:
            bad = next(type(s).__name__ for s in stats if not hasattr(s, "state"))
            raise PatcherError(f"--resume: statistic {bad} cannot be checkpointed; run without --resume")
        state = None
        if self.state_dir is not None and resumable:
            key = collection_key(collector, stats, texts, labels, patch, desc, self.fingerprint, world)
            state = CollectState(self.state_dir / f"c{k:02d}-r{world.rank}of{world.size}", key)
            if self.resume:
                state.load(stats)
                if state.done:
                    log.info("%s: resumed after %d batches from %s", desc, state.done, state.folder)
            elif state.folder.exists():
                shutil.rmtree(state.folder)
        all_batches = list(collector.batches(texts, labels))
        mine = all_batches[world.rank :: world.size]
        skip = state.done if state is not None else 0
        todo = mine[skip:]
        if world.size > 1 and world.is_main:
            log.info("%s: rank 0 of %d takes %d of the %d batches", desc, world.size, len(mine), len(all_batches))
        lw = layerwise_of(collector.model)
        since = [s.batches_seen() for s in stats] if state is not None else []
        if todo and lw is not None:
            lw.collect(collector, wanted, todo, patch, desc)
            if state is not None:
                state.save(stats, since, len(mine), complete=True)
        elif todo:
            def checkpoint(n: int) -> None:
                nonlocal since
                if state is not None and (n == len(mine) or self.checkpoint_every and n % self.checkpoint_every == 0):
                    state.save(stats, since, n, complete=n == len(mine))
                    since = [s.batches_seen() for s in stats]

            forward_loop(collector, wanted, todo, patch, desc, after_batch=checkpoint, start=skip)
        reduce_stats(stats, world)


def reduce_stats(stats: Sequence[Any], world: World) -> None:
    """Merge every rank's statistics into every rank's ``stats``."""
    if world.size <= 1:
        return
    if world.is_main:
        log.info("merging the statistics of %d processes", world.size)
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
