"""Checkpoints of a collection that a killed run resumes from.

Every ``checkpoint_every`` batches the statistics observed since the last checkpoint are written
with ``torch.save`` as plain tensors to ``<state_dir>/cK-rRofN/part-XXXXX.pt``, then ``meta.json``
(atomic renames, parts first). ``--resume`` loads them with ``torch.load(weights_only=True)`` (no
arbitrary unpickling), checks that recipe, data, model and earlier patch are the same (a hash), and
continues after the last saved batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.errors import PatcherError
from ..io.atomic import atomic_file


def _stat_key(s: Any) -> list:
    return [type(s).__name__, list(map(list, s.watches)), getattr(s, "how", None), str(getattr(s, "store_dtype", ""))]


def collection_key(collector: Any, stats: Sequence[Any], texts: Sequence[str], labels: Sequence[int], patch: Any, desc: str,
                   fingerprint: str, world: Any) -> str:
    """What a collection's checkpoints must match to be resumed: statistics, model, batching, data,
    the earlier steps' patch and the process layout (``world``: its ``rank`` and ``size``)."""
    h = hashlib.sha256()
    head = {
        "desc": desc, "stats": [_stat_key(s) for s in stats], "model": fingerprint,
        "collector": [collector.batch_size, collector.max_tokens, collector.padding_side, collector.skip_first],
        "patch": patch.hash() if patch is not None and patch.edits else "", "world": [world.rank, world.size],
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
        with atomic_file(path) as tmp:
            write(tmp)

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


