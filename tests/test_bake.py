"""Bake = intervene: a baked checkpoint equals the base model with the patch's hooks, on every
architecture and for every edit type; plus dtype, sharding, tied embeddings and refusals."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import FAMILIES, assert_bake_equals_hooks, save_tiny, tiny_model
from safetensors import safe_open

from patcher import (
    Patch,
    PatcherError,
    ProjectOutputs,
    ScaleInputs,
    ScaleOutputs,
    ZeroHeads,
    ZeroNeurons,
    bake,
    verify,
)
from patcher.cli import main
from patcher.core.arch import arch_for, head_layout, num_layers
from patcher.edits.edit import orthonormal

EDIT_KINDS = ["scale_outputs", "scale_inputs", "project_outputs", "zero_heads", "zero_neurons"]


def make_edits(model: torch.nn.Module, kind: str, seed: int = 1) -> list:
    """Edits of one kind on both layers of a tiny model, with random parameters."""
    arch = arch_for(model.config)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = head_layout(model.config)
    edits = []

    def shape(m: str) -> tuple[int, ...]:
        return tuple(params[f"{m}.weight"].shape)

    def out_units(m: str) -> int:
        return shape(m)[0 if arch.layout == "linear" else 1]

    def in_units(m: str) -> int:
        return shape(m)[1 if arch.layout == "linear" else 0]

    for i in range(num_layers(model.config)):
        mlp_in, mlp_out, attn_out = arch.mlp_unit_modules(i)[0], arch.module("mlp_out", i), arch.module("attn_out", i)
        if kind == "scale_outputs":
            for m in (mlp_in, mlp_out):
                edits.append(ScaleOutputs(m, arch.layout, factors=torch.rand(out_units(m), generator=gen)))
        elif kind == "scale_inputs":
            edits.append(ScaleInputs(mlp_out, arch.layout, factors=torch.rand(in_units(mlp_out), generator=gen)))
        elif kind == "project_outputs":
            for m in (mlp_out, attn_out):
                basis = orthonormal(torch.randn(out_units(m), 2, generator=gen))
                edits.append(ProjectOutputs(m, arch.layout, basis=basis, strength=0.8))
        elif kind == "zero_heads":
            edits.append(ZeroHeads.build(attn_out, [i % heads], heads, head_dim, arch.layout))
        elif kind == "zero_neurons":
            edits.append(ZeroNeurons.build(mlp_out, [0, 3, 5 + i], in_units(mlp_out), arch.layout))
    return edits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_bake_equals_intervene(family: str, kind: str, tmp_path: Path) -> None:
    base_dir = save_tiny(family, tmp_path / "base")
    patch = Patch(make_edits(tiny_model(family), kind))
    assert_bake_equals_hooks(base_dir, patch, tmp_path / "out")


@pytest.mark.parametrize("family", FAMILIES)
def test_composed_patch_and_verify(family: str, tmp_path: Path) -> None:
    """All edit types at once, saved and reloaded, then `verify` on the output."""
    model = tiny_model(family)
    patch = Patch([e for k in EDIT_KINDS for e in make_edits(model, k)], {"method": "test"})
    patch.save(tmp_path / "patch")
    loaded = Patch.load(tmp_path / "patch")
    assert loaded.hash() == patch.hash()
    base_dir = save_tiny(family, tmp_path / "base")
    assert_bake_equals_hooks(base_dir, loaded, tmp_path / "out")
    result = verify(tmp_path / "out")
    assert result.ok and result.max_abs_diff <= 1e-4


def test_edits_sharing_a_tensor_save_and_bake(tmp_path: Path) -> None:
    """One direction projected out of a layer's attention and MLP outputs (a projection step with
    blocks = ["attn_out", "mlp_out"]) gives two edits holding the same tensor objects: the patch
    saves (safetensors refuses shared memory), reloads to the same hash and bakes as the hooks act."""
    model = tiny_model("llama")
    arch = arch_for(model.config)
    hidden = model.config.hidden_size
    basis = orthonormal(torch.randn(hidden, 1, generator=torch.Generator().manual_seed(0)))
    other = torch.randn(hidden, 1, generator=torch.Generator().manual_seed(1))
    write = basis + 0.3 * (other - basis @ (basis.T @ other))  # an oblique eraser: basis^T write = 1
    edits = [ProjectOutputs(arch.module(b, i), arch.layout, basis=basis, strength=0.7, write=write)
             for i in range(num_layers(model.config)) for b in ("attn_out", "mlp_out")]
    patch = Patch(edits, {"method": "test"})
    patch.save(tmp_path / "patch")
    loaded = Patch.load(tmp_path / "patch")
    assert loaded.hash() == patch.hash() and len(loaded.edits) == len(edits)
    assert_bake_equals_hooks(save_tiny("llama", tmp_path / "base"), loaded, tmp_path / "out")


def test_compose_is_sequential(tmp_path: Path) -> None:
    model = tiny_model("llama")
    a, b = Patch(make_edits(model, "project_outputs")), Patch(make_edits(model, "scale_outputs"))
    both = a.compose(b)
    assert len(both.edits) == len(a.edits) + len(b.edits)
    base_dir = save_tiny("llama", tmp_path / "base")
    assert_bake_equals_hooks(base_dir, both, tmp_path / "out")


def test_bf16_kept_and_untouched_bytes_identical(tmp_path: Path) -> None:
    base_dir = save_tiny("llama", tmp_path / "base", dtype=torch.bfloat16)
    patch = Patch(make_edits(tiny_model("llama"), "scale_outputs"))
    bake(patch, base_dir, tmp_path / "out")
    touched = set(patch.touched_tensors())
    with safe_open(base_dir / "model.safetensors", "pt") as src, safe_open(tmp_path / "out/model.safetensors", "pt") as dst:
        assert set(src.keys()) == set(dst.keys())
        for k in src.keys():
            a, b = src.get_tensor(k), dst.get_tensor(k)
            assert b.dtype == torch.bfloat16
            same = torch.equal(a.view(torch.int16), b.view(torch.int16))
            assert same == (k not in touched), k
    r = verify(tmp_path / "out")
    assert r.ok, r


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # Linear rows and Conv1D rows differ in meaning
@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_streamed_blocks_equal_whole_tensor_edit(family: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks (a few rows each) give the bytes of editing the whole tensor in float32."""
    monkeypatch.setattr(importlib.import_module("patcher.bake.writer"), "BLOCK_BYTES", 100)
    base_dir = save_tiny(family, tmp_path / "base", dtype=torch.bfloat16)
    patch = Patch(make_edits(tiny_model(family), kind))
    bake(patch, base_dir, tmp_path / "out")
    with safe_open(base_dir / "model.safetensors", "pt") as src, safe_open(tmp_path / "out/model.safetensors", "pt") as dst:
        for edit in patch.edits:
            expected = edit.apply_weight(src.get_tensor(edit.weight_name).float()).bfloat16()
            assert torch.equal(dst.get_tensor(edit.weight_name).view(torch.int16), expected.view(torch.int16)), edit.weight_name


def test_sharded_roundtrip_with_index(tmp_path: Path) -> None:
    base_dir = save_tiny("qwen2", tmp_path / "base", max_shard_size="20KB")
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    patch = Patch(make_edits(tiny_model("qwen2"), "project_outputs"))
    assert_bake_equals_hooks(base_dir, patch, tmp_path / "out")
    out_index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == index["weight_map"]
    assert verify(tmp_path / "out").ok


def _embed_projection(family: str) -> Patch:
    model = tiny_model(family)
    arch = arch_for(model.config)
    basis = orthonormal(torch.randn(model.config.hidden_size, 1))
    return Patch([ProjectOutputs(arch.embed, "embedding", basis=basis, strength=1.0)])


def test_tied_embedding_refused_without_untie(tmp_path: Path) -> None:
    base_dir = save_tiny("gemma2", tmp_path / "base")
    with pytest.raises(PatcherError, match="--untie"):
        bake(_embed_projection("gemma2"), base_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_embedding_untied_explicitly(tmp_path: Path) -> None:
    base_dir = save_tiny("gemma2", tmp_path / "base")
    patch = _embed_projection("gemma2")
    assert_bake_equals_hooks(base_dir, patch, tmp_path / "out", untie=True)
    cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    with safe_open(tmp_path / "out/model.safetensors", "pt") as f, safe_open(base_dir / "model.safetensors", "pt") as src:
        assert torch.equal(f.get_tensor("lm_head.weight"), src.get_tensor("model.embed_tokens.weight"))
    assert verify(tmp_path / "out").ok


# -- refusals ----------------------------------------------------------------------------------


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


@pytest.fixture()
def llama_case(tmp_path: Path) -> tuple[Path, Path]:
    base_dir = save_tiny("llama", tmp_path / "base")
    Patch(make_edits(tiny_model("llama"), "scale_outputs")).save(tmp_path / "patch")
    return base_dir, tmp_path / "patch"


def _expect_refusal(args: list[str], message: str, out: Path) -> None:
    code, output = _cli(*args)
    assert code == 2, output
    assert message in output
    assert len(output.strip().splitlines()) == 1, output
    assert not out.exists()


def test_cli_bake_inspect_verify(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, patch_dir = llama_case
    code, output = _cli("bake", str(patch_dir), "--model", str(base_dir), "--out", str(tmp_path / "out"))
    assert code == 0, output
    code, output = _cli("inspect", str(tmp_path / "out"))
    assert code == 0 and "model.layers.1.mlp.down_proj" in output and "scale_outputs" in output
    code, output = _cli("verify", str(tmp_path / "out"))
    assert code == 0 and "verify: OK" in output, output


def test_verify_detects_tampering(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, patch_dir = llama_case
    out = tmp_path / "out"
    bake(Patch.load(patch_dir), base_dir, out)
    # Re-save the weights with one tensor changed: the file hash, the tensor check and the logits all move.
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] += 0.01
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    code, output = _cli("verify", str(out))
    assert code == 1
    assert "MISMATCH model.safetensors" in output and "model.layers.0.mlp.up_proj.weight" in output


def test_refuse_missing_model(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    _, patch_dir = llama_case
    _expect_refusal(["bake", str(patch_dir), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "not found", tmp_path / "o")


def test_refuse_pickled_only(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, patch_dir = llama_case
    (base_dir / "model.safetensors").rename(base_dir / "pytorch_model.bin")
    _expect_refusal(["bake", str(patch_dir), "--model", str(base_dir), "--out", str(tmp_path / "o")], "pickled", tmp_path / "o")


def test_refuse_truncated_shard(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, patch_dir = llama_case
    f = base_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _expect_refusal(["bake", str(patch_dir), "--model", str(base_dir), "--out", str(tmp_path / "o")], "truncated", tmp_path / "o")


def test_refuse_corrupt_header(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, patch_dir = llama_case
    f = base_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!!\x01"
    f.write_bytes(bytes(data))
    _expect_refusal(["bake", str(patch_dir), "--model", str(base_dir), "--out", str(tmp_path / "o")], "corrupt", tmp_path / "o")


def test_refuse_index_naming_missing_shard(tmp_path: Path) -> None:
    base_dir = save_tiny("llama", tmp_path / "base", max_shard_size="20KB")
    Patch(make_edits(tiny_model("llama"), "scale_outputs")).save(tmp_path / "patch")
    next(base_dir.glob("model-0000*.safetensors")).unlink()
    _expect_refusal(["bake", str(tmp_path / "patch"), "--model", str(base_dir), "--out", str(tmp_path / "o")], "missing", tmp_path / "o")


def test_refuse_unknown_architecture(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, patch_dir = llama_case
    cfg = json.loads((base_dir / "config.json").read_text()) | {"model_type": "mamba"}
    (base_dir / "config.json").write_text(json.dumps(cfg))
    _expect_refusal(["bake", str(patch_dir), "--model", str(base_dir), "--out", str(tmp_path / "o")], "one Architecture entry", tmp_path / "o")


@pytest.mark.parametrize(
    "edit, message",
    [
        (ScaleOutputs("model.layers.9.mlp.down_proj", factors=torch.ones(32)), "does not hold"),
        (ScaleOutputs("model.layers.0.mlp.down_proj", factors=torch.ones(7)), "7 factors"),
        (ScaleOutputs("model.layers.0.mlp.down_proj", factors=torch.tensor([float("nan")] * 32)), "NaN or inf"),
        (ScaleInputs("model.layers.0.mlp.down_proj", factors=torch.full((48,), float("inf"))), "NaN or inf"),
    ],
)
def test_refuse_bad_patch(llama_case: tuple[Path, Path], tmp_path: Path, edit, message: str) -> None:
    base_dir, _ = llama_case
    Patch([edit]).save(tmp_path / "bad")
    _expect_refusal(["bake", str(tmp_path / "bad"), "--model", str(base_dir), "--out", str(tmp_path / "o")], message, tmp_path / "o")


def test_refuse_existing_output_unless_overwrite(llama_case: tuple[Path, Path], tmp_path: Path) -> None:
    base_dir, patch_dir = llama_case
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, output = _cli("bake", str(patch_dir), "--model", str(base_dir), "--out", str(out))
    assert code == 2 and "--overwrite" in output and (out / "keep.txt").exists()
    code, output = _cli("bake", str(patch_dir), "--model", str(base_dir), "--out", str(out), "--overwrite")
    assert code == 2 and "only a folder patcher wrote" in output and (out / "keep.txt").exists()  # not patcher's: kept
    code, output = _cli("bake", str(patch_dir), "--model", str(base_dir), "--out", str(tmp_path / "mine"))
    assert code == 0, output
    (tmp_path / "mine" / "keep.txt").write_text("x")
    code, output = _cli("bake", str(patch_dir), "--model", str(base_dir), "--out", str(tmp_path / "mine"), "--overwrite")
    assert code == 0 and not (tmp_path / "mine" / "keep.txt").exists() and (tmp_path / "mine" / "model.safetensors").exists()


def test_refuse_output_inside_source(llama_case: tuple[Path, Path]) -> None:
    base_dir, patch_dir = llama_case
    before = sorted(p.name for p in base_dir.iterdir())
    _expect_refusal(["bake", str(patch_dir), "--model", str(base_dir), "--out", str(base_dir / "out")], "inside the source", base_dir / "out")
    assert sorted(p.name for p in base_dir.iterdir()) == before


def test_killed_bake_leaves_no_output(tmp_path: Path) -> None:
    """SIGKILL in the middle of a bake: the output folder never appears."""
    base_dir = save_tiny("llama", tmp_path / "base")
    Patch(make_edits(tiny_model("llama"), "scale_outputs")).save(tmp_path / "patch")
    out = tmp_path / "out"
    script = (
        "import time, patcher.io.checkpoint as c\n"

        "def slow(self, *a):\n"
        "    print('writing', flush=True); time.sleep(30)\n"
        "c.ShardWriter.write_bytes = slow\n"
        "from patcher.cli import main\n"
        f"main(['bake', r'{tmp_path / 'patch'}', '--model', r'{base_dir}', '--out', r'{out}'])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")], "a partial sibling is expected"


@pytest.mark.slow
def test_real_model_bake_equals_intervene(smollm2: Path, tmp_path: Path) -> None:
    """SmolLM2-135M: a patch on every layer's MLP down projection and attention output."""
    cfg = json.loads((smollm2 / "config.json").read_text())
    arch = arch_for(cfg)
    gen = torch.Generator().manual_seed(0)
    edits = []
    for i in range(num_layers(cfg)):
        edits.append(ScaleOutputs(arch.module("mlp_out", i), factors=0.5 + torch.rand(cfg["hidden_size"], generator=gen)))
        basis = orthonormal(torch.randn(cfg["hidden_size"], 2, generator=gen))
        edits.append(ProjectOutputs(arch.module("attn_out", i), basis=basis, strength=0.5))
    patch = Patch(edits)
    bake(patch, smollm2, tmp_path / "out")
    r = verify(tmp_path / "out")
    assert not r.bad_files and not r.bad_tensors
    assert r.ok and r.max_abs_diff <= 1e-3, r.max_abs_diff
