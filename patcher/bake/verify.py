"""Prove a baked folder is exactly base + patch.

Three checks, each able to fail on its own:
1. every file listed in ``patch.json`` still has its recorded sha256;
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


def verify(out: str | Path, logits: bool = True) -> VerifyResult:
    out = Path(out)
    record = read_record(out)
    result = VerifyResult()
    for rel, digest in record["bake"]["files"].items():
        path = out / rel
        if not path.is_file() or sha256_file(path) != digest:
            result.bad_files.append(rel)
    base_folder, _ = resolve_model(record["bake"]["base"]["model"], record["bake"]["base"].get("revision"))
    base = Checkpoint.open(base_folder)
    if base.fingerprint() != record["bake"]["base"]["fingerprint"]:
        raise PatcherError(f"the base model at {base_folder} changed since the bake (its shard headers differ): verify needs the same base")
    patch = Patch.load(out)
    plan = plan_bake(patch, base, untie=record["bake"]["untied_embeddings"])
    baked = Checkpoint.open(out)
    base_map, baked_map = base.tensor_map(), baked.tensor_map()
    for name, info in baked_map.items():
        source = base_map.get(name) or plan.new_tensors.get(name) or plan.added.get(name)
        if source is None:
            result.bad_tensors.append(name)
            continue
        if name in plan.added:  # a zero bias the bake added for a config switch, with the patch's shift
            expected = b"".join(bytes(c) for c in added_chunks(source, name, plan.edits_by_tensor.get(name, [])))
        elif name in plan.edits_by_tensor:
            expected = b"".join(bytes(c) for c in edited_chunks(base, source, name, plan.edits_by_tensor[name]))
        else:
            expected = bytes(tensor_bytes(base.read(source)))
        if bytes(tensor_bytes(baked.read(info))) != expected:
            result.bad_tensors.append(name)
    result.bad_tensors += sorted((set(base_map) | set(plan.added)) - set(baked_map))
    config = baked.config
    result.bad_tensors += [f"config.json: {key} is not true" for key in plan.switches if config.get(key) is not True]
    if logits:
        diff, scale = max_logit_diff(base_folder, patch, out)
        half = any(t.dtype != "F32" for t in baked.tensors())
        result.max_abs_diff, result.tolerance = diff, (2e-2 * scale if half else max(1e-4, 2e-5 * scale))
    else:
        result.max_abs_diff, result.tolerance = 0.0, 0.0
    return result
