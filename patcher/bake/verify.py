"""Prove a baked folder is exactly base + patch.

The record (``patch.json``) is checked for its own consistency first (types, file names inside the
folder); then these checks, each able to fail on its own:
1. every file in the folder is listed in the record with its sha256, and every listed file is there
   with that sha256: an added ``.py`` or ``.bin``, a swapped file or a removed entry is a mismatch.
   Two files are not listed: ``patch.json`` itself (the record) and the model card ``README.md``,
   which `patcher card` and `patcher push` rewrite; it is documentation, loaders never read it.
   Hidden files and folders (``.git``, ``.cache``) are skipped as `push` skips them: never uploaded;
   the patch inside the folder must hash to the recorded ``patch_sha256``;
2. tensor by tensor, the output equals the base (untouched tensors: identical bytes) or the base with
   the patch's edits recomputed (edited tensors: identical bytes after the same float32 math and cast);
3. logits on fixed prompts: the baked model against the base model with the patch attached as
   hooks, one model at a time (only the logits of the three prompts are kept between them), in the
   checkpoint's own dtype unless ``--dtype`` says otherwise. Under ``--sequential`` each model runs
   layer by layer from its shards (the onloading of `patcher.collect.layerwise`): the peak is one
   decoder layer, the embeddings and head, and the prompts' hidden states, so a model larger than
   memory is verified too; ``--device-map`` places each model with accelerate instead.
   The bound depends on the dtype the check runs in. float32: ``max(1e-4, 2e-5 * max|logit|)``:
   folding an edit rounds each weight once (6e-8 relative), and deep models amplify that. Half
   precision (float32 compute on half weights, or half compute): the folded weights are rounded to
   8 (bfloat16) or 11 (float16) mantissa bits and, in half compute, every activation too, so the
   bound is ``HALF_BOUND`` times the dtype's unit roundoff times the largest logit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..collect.layerwise import LayerwiseModel, layerwise_of, load_placed
from ..core.errors import PatcherError
from ..core.models import resolve_device, torch_dtype
from ..core.placement import Placement
from ..edits.patch import Patch
from ..io.checkpoint import Checkpoint, sha256_file, tensor_bytes
from ..io.model_files import resolve_model
from ..io.record import read_record
from .writer import added_chunks, edited_chunks, plan_bake

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that",
    "She told him exactly what she thought of",
]


@dataclass
class VerifyResult:
    bad_files: list[str] = field(default_factory=list)
    bad_tensors: list[str] = field(default_factory=list)
    max_abs_diff: float = float("nan")
    tolerance: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.bad_files and not self.bad_tensors and self.max_abs_diff <= self.tolerance


def _fixed_inputs(folder: Path, vocab_size: int) -> dict[str, torch.Tensor]:
    """Tokenised fixed prompts when the model ships a tokenizer, else fixed random token ids."""
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        ids = [tok(p)["input_ids"][:16] for p in PROMPTS]
        if all(ids) and max(max(i) for i in ids) < vocab_size:
            return {"input_ids": torch.tensor([i + [i[-1]] * (16 - len(i)) for i in ids])}
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab_size, (3, 16), generator=gen)}


STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
HALF_BOUND = 5.0  # multiples of the half dtype's unit roundoff, relative to the largest logit


def stored_dtype(ckpt: Checkpoint) -> str:
    """The dtype most of a checkpoint's floating-point bytes are stored in."""
    count: dict[str, int] = {}
    for t in ckpt.tensors():
        if t.dtype in STORED:
            count[STORED[t.dtype]] = count.get(STORED[t.dtype], 0) + t.nbytes
    return max(count, key=count.__getitem__) if count else "float32"


def logit_tolerance(scale: float, compute: str, stored: str) -> float:
    """The bound of the logits check (see the module docstring)."""
    half = stored if stored != "float32" else compute
    if half == "float32":
        return max(1e-4, 2e-5 * scale)
    return HALF_BOUND * UNIT_ROUNDOFF[half] * scale


def _logits(folder: Path, patch: Patch | None, inputs: torch.Tensor, dtype: str, placement: Placement) -> torch.Tensor:
    """Float32 logits of ``inputs`` under the model in ``folder`` (``patch`` attached as hooks),
    placed as ``placement`` says; nothing of the model outlives the call."""
    with torch.inference_mode():
        if placement.sequential:
            skeleton = LayerwiseModel.open(folder, torch_dtype(dtype), resolve_device(placement.device),
                                           hidden_max_bytes=placement.hidden_max_bytes)
            lw = layerwise_of(skeleton)
            with (patch or Patch([])).hooked(skeleton):
                store = lw.layer_passes([(inputs, None, None)], desc="verify (layer by layer)")
                try:
                    return lw.logits(inputs, store.get(0)).float().cpu()
                finally:
                    store.close()
        model, _ = load_placed(folder, placement, dtype, tokenizer=False)
        from ..core.models import input_device

        with (patch or Patch([])).hooked(model):
            return model(input_ids=inputs.to(input_device(model)), use_cache=False).logits.float().cpu()


def max_logit_diff(base_folder: Path, patch: Patch, baked_folder: Path, placement: Placement | None = None,
                   dtype: str | None = None) -> tuple[float, float]:
    """(max |hooked base logits - baked logits|, max |logit|) on fixed prompts, one model at a time
    in ``dtype`` (default: the baked checkpoint's), placed as ``placement`` says."""
    placement = placement or Placement()
    dtype = dtype or placement.dtype or stored_dtype(Checkpoint.open(baked_folder))
    config = Checkpoint.open(base_folder).config
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    inputs = _fixed_inputs(base_folder, int(vocab))["input_ids"]
    expected = _logits(base_folder, patch, inputs, dtype, placement)
    got = _logits(baked_folder, None, inputs, dtype, placement)
    return float((expected - got).abs().max()), float(expected.abs().max())


UNLISTED = ("patch.json", "README.md")  # the record itself, and the model card (see the module docstring)


def check_files(out: str | Path) -> list[str]:
    """File-level verification (no base model needed): the names of files that are missing, changed,
    or present but not in the record, plus ``patch_sha256`` when the patch in the folder does not
    hash to the recorded value. `push` refuses a folder for which this is not empty."""
    out = Path(out)
    record = read_record(out)
    files = record["bake"]["files"]
    bad = []
    for rel, digest in files.items():
        path = out / rel
        if not path.is_file() or path.is_symlink() or sha256_file(path) != digest:
            bad.append(rel)
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        hidden = any(part.startswith(".") for part in p.relative_to(out).parts)  # never uploaded or loaded (.git, .cache)
        if (p.is_file() or p.is_symlink()) and not hidden and rel not in files and rel not in UNLISTED:
            bad.append(f"{rel} (not in the record)")
    try:
        ok = Patch.load(out).hash() == record["bake"]["patch_sha256"]
    except PatcherError:
        ok = False
    if not ok:
        bad.append("patch_sha256")
    return bad


def base_folder(out: Path, base: dict, override: str | Path | None = None) -> Path:
    """Where the recorded base model is: ``override`` (``verify --base``), the Hub id or short name,
    or the local path recorded relative to the output."""
    if override is not None:
        folder, _ = resolve_model(str(override))
        return folder
    if base.get("model"):
        folder, _ = resolve_model(base["model"], base.get("revision"))
        return folder
    local = Path(base["local_path"])
    folder = local if local.is_absolute() else out / local
    if not folder.is_dir():
        raise PatcherError(f"the base model recorded as {base['local_path']} (relative to {out}) is not there: pass it with --base FOLDER")
    return folder


def verify(out: str | Path, logits: bool = True, base: str | Path | None = None, placement: Placement | None = None) -> VerifyResult:
    """Every check of the module docstring; ``placement`` places the two models of the logits check."""
    out = Path(out)
    placement = placement or Placement()
    record = read_record(out)
    result = VerifyResult()
    result.bad_files = check_files(out)
    base_dir = base_folder(out, record["bake"]["base"], base)
    base_ckpt = Checkpoint.open(base_dir)
    if base_ckpt.fingerprint() != record["bake"]["base"]["fingerprint"]:
        raise PatcherError(f"the base model at {base_dir} is not the one baked (its shard headers differ): pass the right one with --base")
    if "patch_sha256" in result.bad_files:
        return result  # the edits cannot be trusted: nothing to recompute the tensors from
    patch = Patch.load(out)
    plan = plan_bake(patch, base_ckpt, untie=record["bake"]["untied_embeddings"])
    baked = Checkpoint.open(out)
    base_map, baked_map = base_ckpt.tensor_map(), baked.tensor_map()
    for name, info in baked_map.items():
        source = base_map.get(name) or plan.new_tensors.get(name) or plan.added.get(name)
        if source is None:
            result.bad_tensors.append(name)
            continue
        if name in plan.added:  # a zero bias the bake added for a config switch, with the patch's shift
            expected = b"".join(bytes(c) for c in added_chunks(source, name, plan.edits_by_tensor.get(name, [])))
        elif name in plan.edits_by_tensor:
            expected = b"".join(bytes(c) for c in edited_chunks(base_ckpt, source, name, plan.edits_by_tensor[name]))
        else:
            expected = bytes(tensor_bytes(base_ckpt.read(source)))
        if bytes(tensor_bytes(baked.read(info))) != expected:
            result.bad_tensors.append(name)
    result.bad_tensors += sorted((set(base_map) | set(plan.added)) - set(baked_map))
    config = baked.config
    result.bad_tensors += [f"config.json: {key} is not true" for key in plan.switches if config.get(key) is not True]
    if logits:
        stored = stored_dtype(baked)
        compute = placement.dtype or stored
        diff, scale = max_logit_diff(base_dir, patch, out, placement, compute)
        result.max_abs_diff, result.tolerance = diff, logit_tolerance(scale, compute, stored)
    else:
        result.max_abs_diff, result.tolerance = 0.0, 0.0
    return result
