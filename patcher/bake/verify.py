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
3. logits on fixed prompts: the baked model loaded with plain ``from_pretrained`` against the base
   model with the patch attached as hooks. For float32 checkpoints the bound is
   ``max(1e-4, 2e-5 * max|logit|)``: folding an edit rounds each weight once (6e-8 relative), and
   deep models amplify that (a 1e-7 relative rescale of SmolLM2-135M's down projections alone moves
   its logits by 7.4e-5, max |logit| 32). For half precision the baked weights are rounded to 8 or
   11 mantissa bits, so the bound is 2e-2 of the largest logit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import PatcherError
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


def max_logit_diff(base_folder: Path, patch: Patch, baked_folder: Path) -> tuple[float, float]:
    """(max |hooked base logits - baked logits|, max |logit|) on fixed prompts, float32."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    baked = AutoModelForCausalLM.from_pretrained(baked_folder, dtype=torch.float32).eval()
    inputs = _fixed_inputs(base_folder, base.config.vocab_size)
    with torch.no_grad(), patch.hooked(base):
        expected = base(**inputs).logits
    with torch.no_grad():
        got = baked(**inputs).logits
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


def verify(out: str | Path, logits: bool = True, base: str | Path | None = None) -> VerifyResult:
    out = Path(out)
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
        diff, scale = max_logit_diff(base_dir, patch, out)
        half = any(t.dtype != "F32" for t in baked.tensors())
        result.max_abs_diff, result.tolerance = diff, (2e-2 * scale if half else max(1e-4, 2e-5 * scale))
    else:
        result.max_abs_diff, result.tolerance = 0.0, 0.0
    return result
