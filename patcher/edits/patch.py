"""A Patch: an ordered list of Edits plus provenance.

On disk a patch is ``patch.json`` (edit types, modules, scalar parameters, provenance) next to a
safetensors file with the edits' tensors. In a baked output folder the same ``patch.json`` also
holds the bake record, and the tensors sit in ``patcher/patch.safetensors`` so that loaders which
glob ``*.safetensors`` never mistake them for weights.

Edits apply in list order, on the weight face and on the hook face alike, so composing two patches
is concatenation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.errors import PatcherError
from ..core.hooks import Hooks
from ..io.record import PATCH_JSON, file_inside, read_json, write_json
from .edit import AffineOutputs, Edit, ProjectOutputs, ScaleInputs, ScaleOutputs

FORMAT = "patcher.patch/1"
_LAYER = re.compile(r"\.(\d+)\.")
STANDALONE_TENSORS = "patch.safetensors"
HASH_KEY = "patch_sha256"  # in patch.json, and in a baked folder's bake record


@dataclass
class Patch:
    edits: list[Edit]
    provenance: dict[str, Any] = field(default_factory=dict)

    # -- composition -----------------------------------------------------------------------------
    def compose(self, other: Patch) -> Patch:
        """``self`` then ``other``: the edits of both, in order; provenance keeps both steps."""
        steps = self.provenance.get("steps", [self.provenance]) + other.provenance.get("steps", [other.provenance])
        return Patch(self.edits + other.edits, {"steps": [s for s in steps if s]})

    def per_layer(self) -> list[list[Any]]:
        """Rows of (layer, edits, units changed, units total, mean factor over scaled units' modules,
        projection rank) for the terminal table; "-" where a column does not apply (a layer with only
        projections has no factor: not NaN, which would read as a numerical failure)."""
        rows: dict[int | str, list[Any]] = {}
        for e in self.edits:
            m = _LAYER.search(e.module)
            layer: int | str = int(m.group(1)) if m else e.module
            row = rows.setdefault(layer, [layer, 0, 0, 0, [], 0])
            row[1] += 1
            if isinstance(e, (ScaleOutputs, ScaleInputs)):
                row[2] += int((e.factors != 1).sum())
                row[3] += e.factors.numel()
                row[4].append(e.factors.float())
            elif isinstance(e, ProjectOutputs):
                row[5] = max(row[5], e.basis.shape[1])
            elif isinstance(e, AffineOutputs):  # units moved; the mean column shows the mean scale
                row[2] += int(((e.scale != 1) | (e.shift != 0)).sum())
                row[3] += e.scale.numel()
                row[4].append(e.scale.float())
        out = []
        for key in sorted(rows, key=lambda k: (isinstance(k, str), k)):
            r = rows[key]
            mean: float | str = float(torch.cat(r[4]).mean()) if r[4] else "-"
            out.append([r[0], r[1], r[2], r[3], mean, r[5]])
        return out

    def touched_tensors(self) -> list[str]:
        return sorted({e.weight_name for e in self.edits})

    # -- hook face -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooked(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with every edit attached as a hook; hooks are removed on exit."""
        modules = dict(model.named_modules())
        with Hooks() as hooks:
            for e in self.edits:
                if e.module not in modules:
                    raise PatcherError(f"patch names module {e.module!r}, which this model does not have")
                hooks.add(e.attach(modules[e.module]))
            yield model

    # -- serialisation ---------------------------------------------------------------------------
    def _tensor_dict(self) -> dict[str, torch.Tensor]:
        """Every edit's tensors by key. Edits may share a tensor (one direction projected out of a
        layer's attention and MLP outputs): safetensors refuses shared memory, so a repeat is copied."""
        out, seen = {}, set()
        for i, e in enumerate(self.edits):
            for k, t in e.tensors().items():
                t = t.detach().float().contiguous()
                storage = t.untyped_storage().data_ptr()
                out[f"{i:05d}.{k}"] = t.clone() if storage in seen else t
                seen.add(storage)
        return out

    def to_json(self, tensor_file: str = STANDALONE_TENSORS) -> dict[str, Any]:
        edits = []
        for e in self.edits:
            edits.append({"type": e.kind, "module": e.module, "layout": e.layout, **({"params": e.params()} if e.params() else {})})
        return {"format": FORMAT, "tensor_file": tensor_file, "edits": edits, "provenance": self.provenance}

    def hash(self) -> str:
        """sha256 of the edits (types, modules, parameters, tensor bytes), not of provenance."""
        h = hashlib.sha256()
        h.update(json.dumps(self.to_json()["edits"], sort_keys=True).encode())
        for key, t in sorted(self._tensor_dict().items()):
            h.update(key.encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def save(self, folder: str | Path, tensor_file: str = STANDALONE_TENSORS, extra: dict[str, Any] | None = None) -> Path:
        """Write ``patch.json`` (with the patch's sha256, which `load` and so `bake` recheck) and
        the tensor file into ``folder`` (created if absent)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / tensor_file).parent.mkdir(parents=True, exist_ok=True)
        save_file(self._tensor_dict(), str(folder / tensor_file))
        write_json(folder, self.to_json(tensor_file) | {HASH_KEY: self.hash()} | (extra or {}))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> Patch:
        """Load from a patch folder, a baked output folder, or a ``patch.json`` path. The record is
        checked field by field (a hand-edited or ill-typed ``patch.json`` is a one-line error), its
        tensor file must be a plain name inside the folder, and the loaded edits must hash to the
        recorded ``patch_sha256``."""
        path = Path(path)
        meta_path = path / PATCH_JSON if path.is_dir() else path
        meta = read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise PatcherError(f"{meta_path} is not a patcher patch (format {meta.get('format')!r}, expected {FORMAT})")

        def bad(what: str) -> PatcherError:
            return PatcherError(f"{meta_path}: {what}: recompute the patch (patch.json was edited or damaged)")

        records = meta.get("edits")
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise bad("edits is not a list of objects")
        if not isinstance(meta.get("provenance", {}), dict):
            raise bad("provenance is not an object")
        tensor_path = file_inside(meta_path.parent, meta.get("tensor_file"), meta_path)
        try:
            tensors = load_file(str(tensor_path)) if records else {}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
            raise PatcherError(f"cannot read patch tensors {tensor_path}: {exc}; recompute the patch") from None
        edits: list[Edit] = []
        for i, rec in enumerate(records):
            etype = Edit.registry.get(rec.get("type")) if isinstance(rec.get("type"), str) else None
            if etype is None:
                raise PatcherError(f"{meta_path}: unknown edit type {rec.get('type')!r}; known: {', '.join(sorted(Edit.registry))}")
            params = rec.get("params", {})
            if not isinstance(rec.get("module"), str) or not isinstance(rec.get("layout", "linear"), str) or not isinstance(params, dict):
                raise bad(f"edit {i} needs a module name, a layout and a params object")
            names = {f.name for f in fields(etype)}
            kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
            kwargs |= {k.split(".", 1)[1]: t for k, t in tensors.items() if k.startswith(f"{i:05d}.")}
            unknown = set(kwargs) - names
            if unknown:
                raise PatcherError(f"{meta_path}: edit {i} has unknown fields {sorted(unknown)}")
            try:
                edits.append(etype(rec["module"], rec.get("layout", "linear"), **kwargs))
            except (TypeError, ValueError, RuntimeError) as exc:  # a parameter of the wrong type or shape
                raise bad(f"edit {i} ({rec['type']}) cannot be built ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        patch = cls(edits, meta.get("provenance", {}))
        recorded = meta.get(HASH_KEY, (meta.get("bake") or {}).get(HASH_KEY) if isinstance(meta.get("bake"), dict) else None)
        if recorded is None:
            raise bad(f"it records no {HASH_KEY}")
        try:
            actual = patch.hash()
        except (TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise bad(f"its edits cannot be hashed ({type(exc).__name__})") from None
        if recorded != actual:
            raise bad(f"its edits hash to {actual[:12]}..., not the recorded {HASH_KEY} {str(recorded)[:12]}...")
        return patch
