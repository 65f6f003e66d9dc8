"""SAEs as users have them (`patcher.io.sae_files`): small SAEs written by the test in each layout (SAELens
folder, Gemma Scope params.npz, plain safetensors, each of them on a local Hub endpoint) give the
same SAE and the same edits; width, hook point and layer mismatches are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compute, context, hub_env, paired_data, serve, tiny_model
from safetensors.torch import save_file

from patcher.core.errors import PatcherError
from patcher.io.sae_files import read_sae

D, WIDTH, N_LAYERS = 32, 12, 2  # the tiny Llama's hidden size and depth


def weights(jumprelu: bool = False, d: int = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(d, WIDTH, generator=g), "W_dec": torch.randn(WIDTH, d, generator=g),
         "b_enc": torch.randn(WIDTH, generator=g) * 0.1, "b_dec": torch.randn(d, generator=g) * 0.1}
    if jumprelu:
        t["threshold"] = torch.rand(WIDTH, generator=g) * 0.5
    return t


def saelens(folder: Path, hook: str = "blocks.1.hook_resid_post", jumprelu: bool = False, d: int = D, **cfg: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights(jumprelu, d), str(folder / "sae_weights.safetensors"))
    base = {"d_in": d, "d_sae": WIDTH, "hook_name": hook, "architecture": "jumprelu" if jumprelu else "standard",
            "apply_b_dec_to_input": not jumprelu, "model_name": "tiny"}
    (folder / "cfg.json").write_text(json.dumps(base | cfg))
    return folder


def gemma_scope(root: Path, layer: int = 1) -> Path:
    file = root / f"layer_{layer}/width_16k/average_l0_5/params.npz"
    file.parent.mkdir(parents=True)
    np.savez(file, **{k: v.numpy() for k, v in weights(jumprelu=True).items()})
    return file


def test_every_layout_reads_the_same_sae(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file(weights(), str(plain))
    folder = saelens(tmp_path / "saelens")
    a, b = read_sae(plain, D, N_LAYERS), read_sae(folder, D, N_LAYERS)
    assert a.layer is None and b.layer == 1 and b.width == WIDTH
    x = torch.randn(5, D)
    assert torch.equal(a.W_dec, b.W_dec) and torch.allclose(a.encode(x), b.encode(x))
    # JumpReLU: SAELens with a threshold and Gemma Scope's npz agree, and the threshold gates
    jl, gs = read_sae(saelens(tmp_path / "jumprelu", jumprelu=True), D, N_LAYERS), read_sae(gemma_scope(tmp_path / "gs"), D, N_LAYERS)
    assert gs.layer == 1 and gs.threshold is not None and torch.allclose(jl.encode(x), gs.encode(x))
    pre = x @ gs.W_enc + gs.b_enc
    assert torch.equal(gs.encode(x) > 0, pre > gs.threshold)
    # hook_resid_pre of layer 2 is the residual stream after layer 1
    assert read_sae(saelens(tmp_path / "pre", hook="blocks.2.hook_resid_pre"), D, 3).layer == 1


def test_saelens_folder_sets_the_layer_and_gives_the_same_edits(tmp_path: Path) -> None:
    model, data = tiny_model("llama"), paired_data()
    ctx = context(model, data)
    plain = tmp_path / "plain.safetensors"
    save_file(weights(), str(plain))
    folder = saelens(tmp_path / "saelens")
    by_cfg = compute("project", ctx, direction="sae", sae_path=str(folder), sae_features=[0, 3], layers=[0, 1])
    by_recipe = compute("project", ctx, direction="sae", sae_path=str(plain), sae_layer=1, sae_features=[0, 3], layers=[0, 1])
    assert by_cfg.provenance["sae"]["sae_layer"] == 1
    for e, f in zip(by_cfg.edits, by_recipe.edits):
        assert torch.allclose(e.basis, f.basis)
    with pytest.raises(PatcherError, match="sae_layer = 0 but the SAE .* reads the residual stream after layer 1: set sae_layer = 1"):
        compute("project", ctx, direction="sae", sae_path=str(folder), sae_layer=0, sae_features=[0], layers=[0, 1])


@pytest.mark.parametrize(("layout", "message"), [
    (lambda p: saelens(p, d=64), "reads 64-dim activations but the model's hidden size is 32"),
    (lambda p: saelens(p, hook="blocks.1.hook_mlp_out"), "reads hook 'blocks.1.hook_mlp_out'; only the residual stream"),
    (lambda p: saelens(p, hook="blocks.7.hook_resid_post"), "after layer 7, but the model has 2 layers"),
    (lambda p: saelens(p, d_sae=99), "cfg.json says d_sae = 99 but the weights have 12"),
    (lambda p: saelens(p, architecture="topk"), "architecture 'topk' is not supported"),
    (lambda p: gemma_scope(p, layer=9), "after layer 9, but the model has 2 layers"),
], ids=["width", "hook", "layer", "cfg-width", "arch", "gemma-scope-layer"])
def test_mismatch_refused_in_one_line(tmp_path: Path, layout, message: str) -> None:
    path = layout(tmp_path / "sae")
    with pytest.raises(PatcherError, match=message) as e:
        read_sae(path, D, N_LAYERS)
    assert "\n" not in str(e.value)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "layer_1" / "params.npz"
    file.parent.mkdir()
    np.savez(file, W_enc=np.array([{"evil": 1}], dtype=object), W_dec=np.zeros((2, 2)), b_enc=np.zeros(2), b_dec=np.zeros(2))
    with pytest.raises(PatcherError, match="pickled objects are refused"):
        read_sae(file, D, N_LAYERS)


def test_hub_paths_for_each_layout(tmp_path: Path) -> None:
    """hf://OWNER/NAME@REV/path for a SAELens folder, a Gemma Scope npz and a plain file, served by
    a local endpoint that speaks the Hub's file API."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    folder = saelens(tmp_path / "src/blocks.1.hook_resid_post")
    npz = gemma_scope(tmp_path / "src/gs")
    save_file(weights(), str(tmp_path / "src/plain.safetensors"))
    files = {("model", "someone/saes", rev, "blocks.1.hook_resid_post/cfg.json"): (folder / "cfg.json").read_bytes(),
             ("model", "someone/saes", rev, "blocks.1.hook_resid_post/sae_weights.safetensors"): (folder / "sae_weights.safetensors").read_bytes(),
             ("model", "someone/saes", rev, "layer_1/width_16k/average_l0_5/params.npz"): npz.read_bytes(),
             ("model", "someone/saes", rev, "plain.safetensors"): (tmp_path / "src/plain.safetensors").read_bytes()}
    paths = [f"hf://someone/saes@{rev}/blocks.1.hook_resid_post", f"hf://someone/saes@{rev}/layer_1/width_16k/average_l0_5/params.npz",
             f"hf://someone/saes@{rev}/plain.safetensors"]
    code = ("import json, sys; from patcher.io.sae_files import read_sae; "
            "print(json.dumps([[s.layer, s.width, s.threshold is not None, float(s.W_dec.sum())] for s in (read_sae(p, 32, 2) for p in sys.argv[1:])]))")
    with serve(files) as (endpoint, log):
        env = hub_env(endpoint, str(tmp_path / "hf")) | {"PYTHONPATH": str(Path(__file__).parents[1])}
        p = subprocess.run([sys.executable, "-c", code, *paths], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    dec = float(weights()["W_dec"].sum())
    assert [g[:3] for g in got] == [[1, WIDTH, False], [1, WIDTH, True], [None, WIDTH, False]]
    assert all(abs(g[3] - dec) < 1e-3 for g in got)
