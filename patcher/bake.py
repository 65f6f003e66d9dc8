"""Bake a Patch into a checkpoint, shard by shard, tensor by tensor, never holding the model.

Memory is one edited tensor (in float32, plus its stored copy); time is close to copying the files,
because untouched tensors are copied as raw bytes. The output appears in one rename when complete;
the source folder is only read.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .arch import arch_for, is_tied
from .checkpoint import (
    INDEX_NAME,
    Checkpoint,
    ShardWriter,
    TensorInfo,
    atomic_folder,
    check_output_path,
    resolve_model,
    sha256_file,
    tensor_bytes,
)
from .edits import Edit
from .errors import PatcherError
from .patch import PATCH_JSON, Patch

OUTPUT_TENSOR_FILE = "patcher/patch.safetensors"


def library_versions() -> dict[str, str]:
    names = ("patcher", "torch", "transformers", "safetensors", "accelerate", "huggingface-hub")
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def _changes_bias(edit: Edit) -> bool:
    return type(edit).apply_bias is not Edit.apply_bias


@dataclass(frozen=True)
class BakePlan:
    """What a bake will write, decided (and validated) before any byte is written."""

    edits_by_tensor: dict[str, list[tuple[Edit, str]]]  # output tensor -> [(edit, "weight" | "bias")]
    new_tensors: dict[str, TensorInfo]  # output tensor -> the source tensor it starts from (untying)
    untied: bool


def plan_bake(patch: Patch, ckpt: Checkpoint, untie: bool = False) -> BakePlan:
    """Validate the patch against the checkpoint: every named tensor exists with a fitting shape,
    values are finite, and tied embeddings are either untied explicitly or left alone."""
    arch = arch_for(ckpt.config)
    tmap = ckpt.tensor_map()
    tied = is_tied(ckpt.config)
    embed, head = f"{arch.embed}.weight", f"{arch.lm_head}.weight"
    touches_tied = tied and any(e.weight_name in (embed, head) for e in patch.edits)
    if touches_tied and not untie:
        raise PatcherError(
            f"the patch edits {embed} or {head}, which this model ties together: pass --untie to write a separate "
            f"{head} (config tie_word_embeddings becomes false), or drop that edit"
        )
    new_tensors = {head: tmap[embed]} if touches_tied and head not in tmap else {}
    edits: dict[str, list[tuple[Edit, str]]] = {}
    for e in patch.edits:
        info = tmap.get(e.weight_name) or new_tensors.get(e.weight_name)
        if info is None:
            raise PatcherError(f"patch names tensor {e.weight_name}, which {ckpt.folder} does not hold: was the patch computed for another model?")
        e.check(info.shape)
        edits.setdefault(e.weight_name, []).append((e, "weight"))
        if e.bias_name in tmap and _changes_bias(e):
            edits.setdefault(e.bias_name, []).append((e, "bias"))
    return BakePlan(edits, new_tensors, touches_tied)


def _edited_bytes(ckpt: Checkpoint, source: TensorInfo, name: str, edits: list[tuple[Edit, str]]) -> memoryview:
    """Read a tensor, apply its edits in float32, cast back into the stored tensor, return its bytes.
    Memory is the stored tensor plus its float32 copy. `verify` calls this same function, so it
    recomputes the same bytes."""
    stored = ckpt.read(source)
    x = stored.float()
    for edit, part in edits:
        x = edit.apply_weight(x) if part == "weight" else edit.apply_bias(x)
    if not math.isfinite(float(x.sum())):  # NaN and inf survive a sum: one pass, no bool tensor
        raise PatcherError(f"editing {name} produced NaN or inf: check the base weights and the patch")
    stored.copy_(x)
    return tensor_bytes(stored)


def bake(
    patch: Patch,
    model: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    untie: bool = False,
    record: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write ``model`` + ``patch`` to ``out``: same shards and index, config and tokenizer files, and
    ``patch.json`` recording the base, the patch, library versions, changed tensors and file hashes.
    ``record`` adds entries to that record (the recipe, evaluation results)."""
    t0 = time.perf_counter()
    folder, base = resolve_model(str(model))
    ckpt = Checkpoint.open(folder)
    out = Path(out)
    check_output_path(out, folder, overwrite)
    plan = plan_bake(patch, ckpt, untie)
    if plan.untied and progress:
        print(f"patcher: untying embeddings: writing a separate {next(iter(plan.new_tensors), 'lm_head.weight')} and setting tie_word_embeddings=false")
    total = sum(s.size for s in ckpt.shards.values())
    files: dict[str, str] = {}
    with atomic_folder(out) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="bake", disable=not progress) as bar:
        weight_map: dict[str, str] = {}
        # Shards are hashed in the background: the next shard is copied while the previous ones are
        # still being hashed, with at most `hashing` shards in flight.
        hashing = max(2, min(4, os.cpu_count() or 1))
        writers: list[tuple[str, ShardWriter]] = []
        try:
            for shard in ckpt.shards.values():
                while len(writers) >= hashing:
                    done, w = writers.pop(0)
                    files[done] = w.digest()
                extra = [(n, src) for n, src in plan.new_tensors.items() if src.shard == shard.name]
                order = [(t.name, t) for t in shard.tensors] + extra
                entries = [(n, src.dtype, src.shape, src.nbytes) for n, src in order]
                writer = ShardWriter(tmp / shard.name, entries, shard.metadata, source=folder / shard.name)
                writers.append((shard.name, writer))
                for name, info in order:
                    if name in plan.edits_by_tensor:
                        writer.write_bytes(name, _edited_bytes(ckpt, info, name, plan.edits_by_tensor[name]))
                    else:  # untouched, or a copy of a tied tensor (untying): raw bytes
                        writer.copy_range(name, info.start, info.nbytes)
                    weight_map[name] = shard.name
                    bar.update(info.nbytes)
                writer.close(wait=False)
            while writers:
                done, w = writers.pop(0)
                files[done] = w.digest()
        finally:
            for _, w in writers:
                w.abort()
        for side in ckpt.sidecar_files():
            shutil.copyfile(side, tmp / side.name)
        if plan.untied:
            config = json.loads((tmp / "config.json").read_text()) | {"tie_word_embeddings": False}
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if ckpt.index is not None:
            index = dict(ckpt.index, weight_map=dict(sorted(weight_map.items())))
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        patch.save(tmp, OUTPUT_TENSOR_FILE)  # tensors now; patch.json rewritten below with the record
        for p in sorted(tmp.rglob("*")):
            rel = p.relative_to(tmp).as_posix()
            if p.is_file() and rel not in files and rel != PATCH_JSON:
                files[rel] = sha256_file(p)
        bake_record = {
            "base": base | {"fingerprint": ckpt.fingerprint()},
            "patch_sha256": patch.hash(),
            "changed_tensors": sorted(plan.edits_by_tensor) + sorted(set(plan.new_tensors) - set(plan.edits_by_tensor)),
            "untied_embeddings": plan.untied,
            "versions": library_versions(),
            "bake_seconds": round(time.perf_counter() - t0, 3),
            "files": dict(sorted(files.items())),
        }
        meta = json.loads((tmp / PATCH_JSON).read_text())
        (tmp / PATCH_JSON).write_text(json.dumps(meta | {"bake": bake_record} | (record or {}), indent=2) + "\n")
    return out


def read_record(out: str | Path) -> dict[str, Any]:
    """The ``patch.json`` of a baked output folder."""
    path = Path(out) / PATCH_JSON
    if not path.is_file():
        raise PatcherError(f"{out} holds no {PATCH_JSON}: is it a folder written by `patcher bake` or `patcher run`?")
    meta = json.loads(path.read_text())
    if "bake" not in meta:
        raise PatcherError(f"{path} is a patch, not a baked output: bake it with `patcher bake`")
    return meta
