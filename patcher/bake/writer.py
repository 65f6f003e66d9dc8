"""Bake a Patch into a checkpoint, shard by shard, tensor by tensor, never holding the model.

Memory is a few blocks of an edited tensor (a whole tensor for edits that mix rows); time is close
to copying the files, because untouched tensors are copied as raw bytes in-kernel and edited ones
stream through cache-sized blocks. The output appears in one rename when complete;
the source folder is only read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.arch import Architecture, arch_for, is_tied, num_layers
from ..core.errors import PatcherError
from ..core.progress import bar as progress_bar
from ..edits.edit import Edit
from ..edits.patch import Patch
from ..io.checkpoint import (
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    Checkpoint,
    NonFinite,
    ShardHeader,
    ShardWriter,
    TensorInfo,
    sha256_file,
    tensor_bytes,
)
from ..io.folders import atomic_folder, check_output_path
from ..io.model_files import resolve_model
from ..io.record import PATCH_JSON, library_versions, read_json, write_json

log = logging.getLogger(__name__)

OUTPUT_TENSOR_FILE = "patcher/patch.safetensors"


def _changes_bias(edit: Edit) -> bool:
    return type(edit).apply_bias is not Edit.apply_bias


@dataclass(frozen=True)
class BakePlan:
    """What a bake will write, decided (and validated) before any byte is written."""

    edits_by_tensor: dict[str, list[tuple[Edit, str]]]  # output tensor -> [(edit, "weight" | "bias")]
    new_tensors: dict[str, TensorInfo]  # output tensor -> the source tensor it starts from (untying)
    untied: bool
    added: dict[str, TensorInfo] = field(default_factory=dict)  # zero biases a config switch adds (start 0: no source bytes)
    switches: tuple[str, ...] = ()  # config keys the bake turns on


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
    added: dict[str, TensorInfo] = {}
    switches: list[str] = []
    for e in patch.edits:
        info = tmap.get(e.weight_name) or new_tensors.get(e.weight_name)
        if info is None:
            raise PatcherError(f"patch names tensor {e.weight_name}, which {ckpt.folder} does not hold: was the patch computed for another model?")
        e.check(info.shape)
        edits.setdefault(e.weight_name, []).append((e, "weight"))
        if getattr(e, "needs_bias", False) and e.bias_name not in tmap and e.bias_name not in added:
            key = _bias_slot(arch, ckpt, e.module)
            switches.append(key)
            added |= _zero_biases(arch, ckpt, key)
        if (e.bias_name in tmap or e.bias_name in added) and _changes_bias(e):
            edits.setdefault(e.bias_name, []).append((e, "bias"))
    return BakePlan(edits, new_tensors, touches_tied, added, tuple(dict.fromkeys(switches)))


def _bias_slot(arch: Architecture, ckpt: Checkpoint, module: str) -> str:
    """The config key that gives ``module`` a bias; a one-line refusal naming the roles that have a
    bias slot in this family when there is none."""
    found = arch.bias_switch(module)
    if found is not None:
        return found[0]
    tmap = ckpt.tensor_map()
    roles = [r for r in ("mlp_in", "mlp_out", "attn_out")
             if all(f"{m}.bias" in tmap or arch.bias_switch(m) for m in (arch.mlp_unit_modules(0, ("mlp_in",)) if r == "mlp_in" else [arch.module(r, 0)]))]
    where = f"modules with a bias slot here: {', '.join(roles)}" if roles else f"no MLP or attention output of {arch.family} has one"
    raise PatcherError(f"{module} has no bias and {arch.family} has no config switch that adds one, so a shift cannot be folded there ({where})")


def _zero_biases(arch: Architecture, ckpt: Checkpoint, key: str) -> dict[str, TensorInfo]:
    """Zero biases for every module the switch ``key`` covers, in every layer, each placed in the
    shard of its weight with the weight's dtype; shape = the weight's output units."""
    tmap = ckpt.tensor_map()
    mods = dict(arch.bias_switches)[key]
    out: dict[str, TensorInfo] = {}
    for i in range(num_layers(ckpt.config)):
        for rel in mods:
            w = tmap.get(f"{arch.layer(i)}.{rel}.weight")
            name = f"{arch.layer(i)}.{rel}.bias"
            if w is None or name in tmap:
                continue
            units = w.shape[0] if arch.layout != "conv1d" else w.shape[1]
            nbytes = units * torch.empty((), dtype=SAFETENSORS_DTYPES[w.dtype]).element_size()
            out[name] = TensorInfo(name, w.dtype, (units,), w.shard, 0, nbytes)
    return out


def added_chunks(info: TensorInfo, name: str, edits: list[tuple[Edit, str]]) -> Iterator[memoryview]:
    """The bytes of a bias the bake adds: zeros, with the patch's edits applied (float32, cast back)."""
    stored = torch.zeros(info.shape, dtype=SAFETENSORS_DTYPES[info.dtype])
    if edits:
        stored.copy_(_edit_block(stored.float(), edits, name))
    yield tensor_bytes(stored)


BLOCK_BYTES = 1 << 20  # edited tensors stream through blocks this size: they stay in the CPU cache


def _finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: one min/max pass (NaN propagates; a sum could overflow), no bool tensor."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _edit_block(x: torch.Tensor, edits: list[tuple[Edit, str]], name: str) -> torch.Tensor:
    if not _finite(x):  # the source, before any edit: blame the checkpoint, not the patch
        raise NonFinite(name)
    for edit, part in edits:
        x = edit.apply_weight(x) if part == "weight" else edit.apply_bias(x)
    if not _finite(x):
        raise PatcherError(f"editing {name} produced NaN or inf from finite weights: the patch holds non-finite or huge values; recompute it")
    return x


def edited_chunks(ckpt: Checkpoint, source: TensorInfo, name: str, edits: list[tuple[Edit, str]]) -> Iterator[memoryview]:
    """The edited tensor's stored bytes, in order: each piece is read, edited in float32 and cast
    back to the stored dtype. Where every edit acts on rows independently (the scalings and
    zeroings; see `Edit.row_block`) the tensor streams through blocks of `BLOCK_BYTES`, each chunk
    valid until the next is asked for; otherwise it is edited whole (memory: the tensor and its
    float32 copy). Blocks give the same bytes as the whole tensor, element for element. `verify`
    calls this same function, so it recomputes the same bytes."""
    blocked = len(source.shape) == 2 and source.shape[0] > 0 and all(part == "weight" for _, part in edits)
    if blocked and all(e.row_block(slice(0, 1)) is not None for e, _ in edits):
        row = 0
        for stored in ckpt.read_blocks(source, BLOCK_BYTES):
            rows = slice(row, row + stored.shape[0])
            stored.copy_(_edit_block(stored.float(), [(e.row_block(rows), p) for e, p in edits], name))
            row = rows.stop
            yield tensor_bytes(stored)
        return
    stored = ckpt.read(source)
    stored.copy_(_edit_block(stored.float(), edits, name))
    yield tensor_bytes(stored)


def _write_shard(
    ckpt: Checkpoint,
    plan: BakePlan,
    shard: ShardHeader,
    order: list[tuple[str, TensorInfo]],
    dest: Path,
    stop: threading.Event,
    bar: Any,  # the shared tqdm bar
    allow_nonfinite: bool = False,
) -> str:
    """Write one output shard (tensors in ``order``: output name, source tensor); returns its
    sha256. Sets ``stop`` when it fails and gives up when another shard has. A source tensor with
    NaN or inf is refused by name (untouched ones pass with ``allow_nonfinite``)."""
    entries = [(n, src.dtype, src.shape, src.nbytes) for n, src in order]
    writer = ShardWriter(dest, entries, shard.metadata, source=ckpt.folder / shard.name, check_finite=not allow_nonfinite)
    try:
        for name, info in order:
            if stop.is_set():
                raise PatcherError("bake stopped: another shard failed")
            if name in plan.added:
                writer.write_bytes(name, info.nbytes, added_chunks(info, name, plan.edits_by_tensor.get(name, [])))
            elif name in plan.edits_by_tensor:
                writer.write_bytes(name, info.nbytes, edited_chunks(ckpt, info, name, plan.edits_by_tensor[name]))
            else:  # untouched, or a copy of a tied tensor (untying): raw bytes
                writer.copy_range(name, info.start, info.nbytes, info.dtype)
            bar.update(info.nbytes)
        return writer.close()
    except NonFinite as exc:
        stop.set()
        writer.abort()
        flag = "" if str(exc) in plan.edits_by_tensor else " (pass --allow-nonfinite to copy untouched tensors as they are)"
        raise PatcherError(f"tensor {exc} in {ckpt.folder / shard.name} holds NaN or inf values: the source checkpoint is damaged; "
                           f"re-download it{flag}") from None
    except BaseException:
        stop.set()
        writer.abort()
        raise


@dataclass(frozen=True)
class Prepared:
    """A bake validated before anything is written: the source, its provenance, the plan."""

    ckpt: Checkpoint
    base: dict[str, Any]
    plan: BakePlan
    code: bool  # copy the model's own .py files (--trust-remote-code)


def prepare_bake(patch: Patch, model: str | Path, *, untie: bool = False, trust_remote_code: bool = False, revision: str | None = None) -> Prepared:
    """Resolve the model, read and validate every shard header, and plan the patch against it."""
    folder, base = resolve_model(str(model), revision, trust_remote_code=trust_remote_code)
    ckpt = Checkpoint.open(folder)
    return Prepared(ckpt, base, plan_bake(patch, ckpt, untie), trust_remote_code)


def base_record(base: dict[str, Any], ckpt: Checkpoint, out: Path) -> dict[str, Any]:
    """How the record names the base model: its Hub id or short name, or for a local folder its path
    relative to the output (never an absolute local path); plus the fingerprint, a hash of every
    shard's header that `verify` checks whatever way it finds the base."""
    base = dict(base)
    if "local_path" in base:
        base["local_path"] = Path(os.path.relpath(Path(base["local_path"]).resolve(), Path(out).resolve())).as_posix()
    return base | {"fingerprint": ckpt.fingerprint()}


def write_bake(patch: Patch, prep: Prepared, tmp: Path, out: Path, *, record: dict[str, Any] | None = None, allow_nonfinite: bool = False) -> None:
    """Write the baked model into the empty staging folder ``tmp``, whose final name is ``out``."""
    t0 = time.perf_counter()
    ckpt, plan = prep.ckpt, prep.plan
    if plan.untied:
        log.info("untying embeddings: writing a separate %s and setting tie_word_embeddings=false", next(iter(plan.new_tensors), "lm_head.weight"))
    total = sum(s.size for s in ckpt.shards.values())
    files: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    jobs = []
    for shard in ckpt.shards.values():
        extra = [(n, src) for n, src in (plan.new_tensors | plan.added).items() if src.shard == shard.name]
        order = [(t.name, t) for t in shard.tensors] + extra
        weight_map.update((name, shard.name) for name, _ in order)
        jobs.append((shard, order))
    with progress_bar(total=total, unit="B", unit_scale=True, desc="bake") as bar:
        try:
            # Shards are independent files: one thread each, as many at once as there are cores (file
            # I/O, sha256 and torch all release the GIL), so hashing runs at the speed of every core.
            with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
                stop = threading.Event()  # set when one shard fails, so the others stop at their next tensor
                futures = {
                    shard.name: pool.submit(_write_shard, ckpt, plan, shard, order, tmp / shard.name, stop, bar, allow_nonfinite)
                    for shard, order in jobs
                }
                for name, f in futures.items():
                    files[name] = f.result()
        except BaseException:
            bar.leave = False  # the bar is cleared: a failed bake leaves only its one-line error
            raise
    for side in ckpt.sidecar_files(code=prep.code):
        shutil.copyfile(side, tmp / side.name)
    if plan.untied or plan.switches:
        config = json.loads((tmp / "config.json").read_text()) | ({"tie_word_embeddings": False} if plan.untied else {})
        config |= {key: True for key in plan.switches}  # the bias slots the added zero biases fill
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
        "base": base_record(prep.base, ckpt, out),
        "patch_sha256": patch.hash(),
        "changed_tensors": sorted(plan.edits_by_tensor) + sorted(set(plan.new_tensors) - set(plan.edits_by_tensor)),
        "untied_embeddings": plan.untied,
        "added_tensors": sorted(plan.added),
        "config_switches": list(plan.switches),
        "versions": library_versions(),
        "bake_seconds": round(time.perf_counter() - t0, 3),
        "files": dict(sorted(files.items())),
    }
    write_json(tmp, read_json(tmp / PATCH_JSON) | {"bake": bake_record} | (record or {}))


@dataclass(frozen=True)
class BakeOptions:
    """`bake`'s keyword options: replace an output patcher wrote, allow edits on tied embeddings,
    entries added to the record, copy untouched non-finite tensors, run the model's own code, and
    other files the caller read (which the output may not touch either)."""

    overwrite: bool = False
    untie: bool = False
    record: dict[str, Any] | None = None
    allow_nonfinite: bool = False
    trust_remote_code: bool = False
    inputs: tuple[Path | str, ...] = ()


def bake(patch: Patch, model: str | Path, out: str | Path, **options: Any) -> Path:
    """Write ``model`` + ``patch`` to ``out``: same shards and index, config and tokenizer files, and
    ``patch.json`` recording the base, the patch, library versions, changed tensors and file hashes.
    ``options`` are `BakeOptions`: ``record`` adds entries to that record (the recipe, evaluation
    results); ``inputs`` are other files the caller read (the patch folder), which ``out`` may not
    touch either."""
    o = BakeOptions(**options)
    prep = prepare_bake(patch, model, untie=o.untie, trust_remote_code=o.trust_remote_code)
    out = Path(out)
    check_output_path(out, prep.ckpt.folder, o.overwrite, o.inputs)
    with atomic_folder(out, o.overwrite) as tmp:
        write_bake(patch, prep, tmp, out, record=o.record, allow_nonfinite=o.allow_nonfinite)
    return out
