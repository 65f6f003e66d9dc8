"""AffineOutputs (per-unit ``scale * z + shift``, the folded transport map): bake = intervene on every
family with a bias slot, the config switches that add slots, refusals where there is none, and
outputs that load with plain ``from_pretrained`` with no missing or unexpected keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, FAMILIES, assert_bake_equals_hooks, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from patcher import AffineOutputs, Patch, PatcherError, bake, verify
from patcher.core.arch import arch_for, num_layers

NO_SLOT = {"mistral", "qwen2", "phi3"}  # no bias on any MLP or attention output, and no switch adding one


def slot_modules(model: torch.nn.Module) -> list[str]:
    """Every MLP / attention output module of the model that has a bias or a switch adding one."""
    arch = arch_for(model.config)
    mods = dict(model.named_modules())
    out = []
    for i in range(num_layers(model.config)):
        for m in arch.mlp_unit_modules(i) + [arch.module("attn_out", i)]:
            if getattr(mods[m], "bias", None) is not None or arch.bias_switch(m):
                out.append(m)
    return out


def affine_edits(model: torch.nn.Module, modules: list[str], seed: int = 1) -> list[AffineOutputs]:
    arch = arch_for(model.config)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    edits = []
    for m in modules:
        units = params[f"{m}.weight"].shape[0 if arch.layout == "linear" else 1]
        edits.append(AffineOutputs(m, arch.layout, scale=0.5 + torch.rand(units, generator=gen), shift=0.3 * torch.randn(units, generator=gen)))
    return edits


def test_slots_per_family() -> None:
    """The families the issue names: which have a slot, and where."""
    slots = {f: slot_modules(tiny_model(f)) for f in FAMILIES}
    assert {f for f, s in slots.items() if not s} == NO_SLOT
    assert all("mlp" not in m for f in ("qwen3", "olmo", "gemma2", "gemma3_text") for m in slots[f])  # attention_bias only
    assert any("down_proj" in m for m in slots["llama"]) and any("dense_4h_to_h" in m for m in slots["falcon"])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_SLOT])
def test_switch_adds_the_declared_biases(family: str) -> None:
    """Each declared switch, turned on in the config, gives exactly the declared modules a bias in
    transformers' own modeling code (so the zero biases bake writes are the keys it expects)."""
    arch = arch_for(CONFIGS[family]())
    for key, rels in arch.bias_switches:
        cfg = CONFIGS[family]()
        setattr(cfg, key, True)
        model = AutoModelForCausalLM.from_config(cfg)
        before = {n for n, _ in AutoModelForCausalLM.from_config(CONFIGS[family]()).named_parameters()}
        new = {n for n, _ in model.named_parameters()} - before
        expected = {f"{arch.layer(i)}.{r}.bias" for i in range(num_layers(cfg)) for r in rels} - before
        assert new == expected, (key, sorted(new ^ expected))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_SLOT])
def test_affine_bake_equals_intervene(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    patch = Patch(affine_edits(model, slot_modules(model)))
    patch.save(tmp_path / "patch")
    loaded = Patch.load(tmp_path / "patch")
    assert loaded.hash() == patch.hash()
    base_dir = save_tiny(family, tmp_path / "base")
    assert_bake_equals_hooks(base_dir, loaded, tmp_path / "out")
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    record = json.loads((tmp_path / "out/patch.json").read_text())["bake"]
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert all(config[k] is True for k in record["config_switches"])
    if family in ("gpt2",):
        assert not record["config_switches"] and not record["added_tensors"]
    if family in ("llama", "falcon", "qwen3"):
        assert record["config_switches"] and record["added_tensors"]
    result = verify(tmp_path / "out")
    assert result.ok, result


def test_verify_catches_a_switch_turned_off(tmp_path: Path) -> None:
    model = tiny_model("llama")
    base_dir = save_tiny("llama", tmp_path / "base")
    bake(Patch(affine_edits(model, ["model.layers.0.mlp.down_proj"])), base_dir, tmp_path / "out")
    cfg_path = tmp_path / "out/config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"mlp_bias": False}))
    result = verify(tmp_path / "out", logits=False)
    assert not result.ok and "config.json" in result.bad_files


@pytest.mark.parametrize("family", sorted(NO_SLOT))
def test_refused_without_a_slot(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    arch = arch_for(model.config)
    base_dir = save_tiny(family, tmp_path / "base")
    edits = affine_edits(model, [arch.module("mlp_out", 0)])
    with pytest.raises(PatcherError, match="no config switch") as err:
        bake(Patch(edits), base_dir, tmp_path / "out")
    assert "\n" not in str(err.value) and f"no MLP or attention output of {arch.family}" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_refusal_names_the_modules_that_work(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    base_dir = save_tiny("qwen3", tmp_path / "base")
    with pytest.raises(PatcherError, match=r"modules with a bias slot here: attn_out\)$"):
        bake(Patch(affine_edits(model, ["model.layers.0.mlp.down_proj"])), base_dir, tmp_path / "out")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_post_norm_scale_folds_into_the_gain(family: str, tmp_path: Path) -> None:
    """ω folds into Gemma's stored ``g - 1``; a shift after a post-norm has no slot and is refused."""
    model = tiny_model(family)
    arch = arch_for(model.config)
    gen = torch.Generator().manual_seed(0)
    h = model.config.hidden_size
    edits = [AffineOutputs(arch.module(r, i), "norm", scale=0.5 + torch.rand(h, generator=gen), shift=torch.zeros(h), norm_offset=1.0)
             for i in range(num_layers(model.config)) for r in ("mlp_out_norm", "attn_out_norm")]
    base_dir = save_tiny(family, tmp_path / "base")
    assert_bake_equals_hooks(base_dir, Patch(edits), tmp_path / "out")
    assert verify(tmp_path / "out").ok
    shifted = AffineOutputs(edits[0].module, "norm", scale=edits[0].scale, shift=torch.full((h,), 0.1), norm_offset=1.0)
    with pytest.raises(PatcherError, match="no bias slot"):
        bake(Patch([shifted]), base_dir, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_added_biases_in_a_sharded_checkpoint(tmp_path: Path) -> None:
    """Zero biases land in their weight's shard and in the index, so a sharded output loads too."""
    model = tiny_model("llama")
    base_dir = save_tiny("llama", tmp_path / "base", max_shard_size="20KB")
    assert_bake_equals_hooks(base_dir, Patch(affine_edits(model, slot_modules(model))), tmp_path / "out")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.layers.1.self_attn.q_proj.bias"] == index["model.layers.1.self_attn.q_proj.weight"]
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert verify(tmp_path / "out").ok
