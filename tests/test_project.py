"""Projections (meandiff, probe, ProFS, SAE), neuron scaling and localisation on tiny models:
the projection removes the direction and nothing else, bake = intervene, the probe learns,
stacking after AURA, an SAE trained here, outlier handling, and refusals of bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from helpers import compute, context, paired_data, save_tiny, save_tiny_with_tokenizer, tiny_model, tiny_tokenizer
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from patcher import Patch, PatcherError, bake
from patcher.collect.localisation import localize, parse_layers
from patcher.core.arch import arch_for, residual_module, writer_module
from patcher.edits.edit import ProjectOutputs, ScaleInputs
from patcher.methods import get_method
from patcher.methods.project import ProjectSettings, estimate, frame, probe

TOXIC = ["idiot", "stupid", "moron", "fool", "jerk", "loser"]
NEUTRAL = ["friend", "garden", "morning", "river", "music", "window"]



def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def writer_outputs(model: torch.nn.Module, module: str, patch: Patch) -> torch.Tensor:
    got = []
    with patch.hooked(model):  # registered after the patch's hooks, so it sees the edited output
        handle = dict(model.named_modules())[module].register_forward_hook(lambda m, a, out: got.append(out.detach()))
        try:
            logits(model)
        finally:
            handle.remove()
    return got[0].reshape(-1, got[0].shape[-1])


def assert_bake_equals_hooks(family: str, patch: Patch, tmp_path: Path, untie: bool = False) -> None:
    """Baked checkpoint == base model with the patch's hooks (1e-5), the patch changes the logits,
    and it survives a save/load round trip."""
    base_dir = save_tiny(family, tmp_path / "base")
    bake(patch, base_dir, tmp_path / "out", untie=untie)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with patch.hooked(base):
        expected = logits(base)
    assert (expected - logits(base)).abs().max() > 1e-4
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval())
    assert (expected - got).abs().max() <= 1e-5
    assert Patch.load(patch.save(tmp_path / "patch")).hash() == patch.hash()


# -- the projection removes the direction, and only it -------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_projection_removes_direction_and_keeps_complement(family: str) -> None:
    model = tiny_model(family)
    arch = arch_for(model.config)
    ctx = context(model)
    patch = compute("project", ctx, direction="meandiff", blocks=["mlp_out", "attn_out"], strength=1.0)
    assert len(patch.edits) == 4
    stat = get_method("project").collect(ctx, ProjectSettings(blocks=("mlp_out", "attn_out")))["pooled"]
    params = dict(model.named_parameters())
    for e in patch.edits:
        assert isinstance(e, ProjectOutputs)
        i, block = int(e.module.split(".")[-3]), "mlp_out" if "mlp" in e.module else "attn_out"
        x, y = stat.matrix(writer_module(arch, block, i))
        d, _ = estimate(x, y, None, ProjectSettings(), "test")  # the residual direction, [d_model, 1]
        # what the block writes (post-norm for Gemma) has no component along d once edited
        out = writer_outputs(model, writer_module(arch, block, i), patch)
        before = writer_outputs(model, writer_module(arch, block, i), Patch([]))
        assert (out @ d).abs().max() <= 1e-5 * out.norm(dim=1).max()
        assert (before @ d).abs().max() > 1e-3 * before.norm(dim=1).max()
        # the weight face: d^T W' = 0 for the plain layouts; the orthogonal complement is untouched
        w = params[e.weight_name].detach()
        w2 = e.apply_weight(w)
        u = e.basis
        if arch.layout == "linear":
            keep = torch.eye(u.shape[0]) - u @ u.T
            assert torch.allclose(keep @ w2, keep @ w, atol=1e-6)
            if arch.mlp_out_norm is None:
                assert (d.T @ w2).abs().max() < 1e-5
        else:  # Conv1D: [in, out]
            keep = torch.eye(u.shape[0]) - u @ u.T
            assert torch.allclose(w2 @ keep, w @ keep, atol=1e-6)
            assert (w2 @ d).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_whitened_erase_removes_the_read_out_and_bakes(family: str, tmp_path: Path) -> None:
    """erase = "whitened": nothing is left along the read direction U, the correction goes along
    V = S U (U^T S U)^-1 (not U), and the baked checkpoint equals the hooked base."""
    model = tiny_model(family)
    patch = compute("project", context(model), direction="meandiff", blocks=["mlp_out", "attn_out"], outliers="whiten", erase="whitened")
    for e in patch.edits:
        assert e.write.shape == e.basis.shape and not torch.allclose(e.write, e.basis, atol=1e-3)
        assert torch.allclose(e.basis.T @ e.write, torch.eye(1), atol=1e-4)
        out = writer_outputs(model, e.module, patch)  # the projection's own output (before any Gemma norm)
        assert (out @ e.basis).abs().max() <= 1e-4 * out.norm(dim=1).max()
    assert_bake_equals_hooks(family, patch, tmp_path)


def test_oblique_write_that_does_not_remove_the_basis_is_refused() -> None:
    u = torch.tensor([[1.0], [0.0]])
    with pytest.raises(PatcherError, match="identity"):
        ProjectOutputs("m", basis=u, write=torch.tensor([[0.5], [1.0]])).check((2, 3))


def test_strength_zero_is_identity_and_half_keeps_half() -> None:
    model = tiny_model("llama")
    ctx = context(model)
    full = compute("project", ctx, direction="meandiff", strength=1.0)
    half = compute("project", ctx, direction="meandiff", strength=0.5)
    e1, e2 = full.edits[0], half.edits[0]
    w = dict(model.named_parameters())[e1.weight_name].detach()
    u = e1.basis
    assert torch.allclose(u.T @ e2.apply_weight(w), 0.5 * (u.T @ w), atol=1e-5)


# -- bake = intervene -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "falcon"])
def test_bake_equals_intervene_for_new_edits(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    ctx = context(model)
    # Falcon's decoder layers return a tuple, which the collector cannot watch: ProFS on the blocks' outputs there
    source = "block" if family == "falcon" else "residual"
    patch = compute("project", ctx, direction="profs", paired=True, k=2, blocks=["mlp_out", "attn_out"], strength=0.9, source=source)
    patch = patch.compose(compute("project", ctx, direction="probe", k=1, layers="1-1", outliers="whiten"))
    patch = patch.compose(compute("scale", ctx, top_n=5, factor=0.0))
    assert any(isinstance(e, ScaleInputs) for e in patch.edits)
    assert_bake_equals_hooks(family, patch, tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_embedding_projection(family: str, tmp_path: Path) -> None:
    """``embed = true``: the embeddings stop writing the direction; a tied model is refused unless untied,
    and once untied the output head keeps the original matrix and bake = intervene."""
    model = tiny_model(family)
    arch = arch_for(model.config)
    patch = compute("project", context(model), direction="meandiff", layers="0-0", embed=True)
    first = patch.edits[0]
    assert isinstance(first, ProjectOutputs) and first.module == arch.embed and first.layout == "embedding"
    out = writer_outputs(model, arch.embed, patch)
    assert (out @ first.basis).abs().max() <= 1e-5 * out.norm(dim=1).max()
    tied = model.config.tie_word_embeddings
    assert_bake_equals_hooks(family, patch, tmp_path, untie=tied)
    baked = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    assert torch.equal(baked.get_output_embeddings().weight, base.get_output_embeddings().weight)
    if tied:
        with pytest.raises(PatcherError, match="untie"):
            bake(patch, tmp_path / "base", tmp_path / "refused")
        assert not (tmp_path / "refused").exists()


# -- the probe --------------------------------------------------------------------------------------------
def test_probe_beats_chance_on_separable_data() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 200, 24
    true = torch.randn(d, generator=g)
    true /= true.norm()
    labels = torch.tensor([0, 1] * (n // 2))
    x = torch.randn(n, d, generator=g) + 4.0 * labels[:, None].float() * true
    w, acc = probe(x.double(), labels, None, k=1, c=1.0, holdout=0.25, seed=0)
    assert acc[0] > 0.85
    assert abs(float(w[:, 0] @ true.double())) > 0.8
    shuffled = labels[torch.randperm(n, generator=g)]
    _, acc = probe(x.double(), shuffled, None, k=1, c=0.01, holdout=0.25, seed=0)
    assert acc[0] < 0.75  # no signal, no accuracy


def test_probe_method_records_accuracy() -> None:
    patch = compute("project", context(tiny_model("qwen2")), direction="probe", k=2, paired=True)
    accs = [r["probe_accuracy"] for r in patch.provenance["layers"]]
    assert all(len(a) == 2 for a in accs)
    assert max(a[0] for a in accs) > 0.5
    for e in patch.edits:
        assert torch.allclose(e.basis.T @ e.basis, torch.eye(2), atol=1e-5)


# -- outlier dimensions -------------------------------------------------------------------------------------
def test_outlier_handling_moves_the_direction_off_massive_dims() -> None:
    """States with 2 huge, noisy dimensions that differ a little between classes (as in SmolLM2)."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 32
    labels = torch.tensor([0, 1] * (n // 2))
    x = torch.randn(n, d, generator=g)
    x[:, :2] = 200 + 40 * torch.randn(n, 2, generator=g)
    x[:, :2] += 10 * labels[:, None]  # a large absolute shift on the massive dims
    x[:, 5] += 1.0 * labels  # the signal-to-noise carrier
    infos = {}
    for mode in ("keep", "exclude", "whiten"):
        u, info = estimate(x, labels, None, ProjectSettings(outliers=mode, n_outliers=2), mode)
        infos[mode] = (u, info)
    assert infos["keep"][1]["outlier_share"] > 0.9
    assert infos["exclude"][1]["outlier_share"] == 0 and infos["exclude"][0][:2].abs().max() == 0
    assert infos["whiten"][1]["outlier_share"] < 0.2 and infos["whiten"][1]["outlier_share_if_kept"] > 0.9
    assert abs(float(infos["whiten"][0][5, 0])) > 0.8


# -- stacking -------------------------------------------------------------------------------------------------
def test_stacking_aura_then_project_equals_hooks_in_order(tmp_path: Path) -> None:
    model = tiny_model("llama")
    data = paired_data()
    aura = compute("aura", context(model, data))
    project = compute("project", context(model, data, prior=aura), direction="meandiff", blocks=["mlp_out", "attn_out"])
    alone = compute("project", context(model, data), direction="meandiff", blocks=["mlp_out", "attn_out"])
    # the second step saw the model as AURA left it
    assert not torch.allclose(project.edits[0].basis, alone.edits[0].basis, atol=1e-4)
    both = aura.compose(project)
    assert [s["method"] for s in both.provenance["steps"]] == ["aura", "project"]
    base_dir = save_tiny("llama", tmp_path / "base")
    bake(both, base_dir, tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with aura.hooked(base), project.hooked(base):
        expected = logits(base)
    got = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval())
    assert (expected - got).abs().max() <= 1e-5


# -- SAE ----------------------------------------------------------------------------------------------------------
def train_sae(model: torch.nn.Module, data: SimpleNamespace, layer: int, width: int = 16, steps: int = 300) -> dict[str, torch.Tensor]:
    """A tiny ReLU SAE on the residual stream after ``layer`` (tokens after the sink)."""
    arch = arch_for(model.config)
    tok = tiny_tokenizer()
    acts = []
    handle = dict(model.named_modules())[residual_module(arch, layer)].register_forward_hook(lambda m, a, out: acts.append(out[0, 1:].detach()))
    with torch.no_grad():
        for t in data.texts:
            model(input_ids=torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]))
    handle.remove()
    x = torch.cat(acts)
    d = x.shape[1]
    torch.manual_seed(0)
    w_enc = torch.nn.Parameter(torch.randn(d, width) * 0.1)
    w_dec = torch.nn.Parameter(torch.randn(width, d) * 0.1)
    b_enc = torch.nn.Parameter(torch.zeros(width))
    b_dec = torch.nn.Parameter(x.mean(0).clone())
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=1e-2)
    first = last = None
    for _ in range(steps):
        f = torch.relu((x - b_dec) @ w_enc + b_enc)
        recon = ((f @ w_dec + b_dec - x) ** 2).sum(1).mean()
        loss = recon + 1e-3 * f.abs().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else recon.item()
        last = recon.item()
    assert last < 0.5 * first  # it learned something
    return {"W_enc": w_enc.detach(), "W_dec": w_dec.detach(), "b_enc": b_enc.detach(), "b_dec": b_dec.detach()}


def test_sae_directions(tmp_path: Path) -> None:
    model = tiny_model("llama")
    data = paired_data()
    sae = train_sae(model, data, layer=1)
    save_file(sae, str(tmp_path / "sae.safetensors"))
    ctx = context(model, data)
    picked = compute("project", ctx, direction="sae", sae_path=str(tmp_path / "sae.safetensors"), sae_layer=1, sae_top=2, layers=[0, 1])
    feats = picked.provenance["sae"]["features"]
    assert len(feats) == 2 and all(s > 0 for s in picked.provenance["sae"]["feature_scores"])
    given = compute("project", ctx, direction="sae", sae_path=str(tmp_path / "sae.safetensors"), sae_layer=1, sae_features=feats, layers=[0, 1])
    for p in (picked, given):
        assert len(p.edits) == 2
        for e in p.edits:
            dec = sae["W_dec"][feats].T  # [d_model, 2]: the basis spans exactly these decoder vectors
            assert (dec - e.basis @ (e.basis.T @ dec)).abs().max() < 1e-4
    # with outliers excluded the decoder vectors lose their largest dims
    ex = compute("project", ctx, direction="sae", sae_path=str(tmp_path / "sae.safetensors"), sae_layer=1, sae_features=feats,
                 layers=[1], outliers="exclude", n_outliers=3)
    stat = get_method("project").collect(ctx, ProjectSettings(source="residual", layers=(1,)))["pooled"]
    x, y = stat.matrix(residual_module(arch_for(model.config), 1))
    dims = frame(x, y, ProjectSettings(outliers="exclude", n_outliers=3)).outlier_dims
    assert ex.edits[0].basis[dims].abs().max() < 1e-6
    assert ex.provenance["layers"][0]["outlier_share"] == 0


def test_sae_width_mismatch_is_refused(tmp_path: Path) -> None:
    save_file({"W_enc": torch.randn(64, 8), "W_dec": torch.randn(8, 64), "b_enc": torch.zeros(8), "b_dec": torch.zeros(64)}, str(tmp_path / "sae.safetensors"))
    with pytest.raises(PatcherError, match="reads 64-dim activations but the model's hidden size is 32"):
        compute("project", context(tiny_model("llama")), direction="sae", sae_path=str(tmp_path / "sae.safetensors"), sae_top=1)
    save_file({"W_enc": torch.randn(32, 8), "W_dec": torch.randn(8, 32), "b_enc": torch.zeros(8), "b_dec": torch.zeros(32)}, str(tmp_path / "ok.safetensors"))
    with pytest.raises(PatcherError, match="feature 9 is out of range; the SAE has 8 features"):
        compute("project", context(tiny_model("llama")), direction="sae", sae_path=str(tmp_path / "ok.safetensors"), sae_features=[1, 9])


# -- bad input --------------------------------------------------------------------------------------------------
def test_layer_out_of_range_names_valid_range() -> None:
    with pytest.raises(PatcherError, match=r"layer 5 is out of range; valid layers are 0-1 \(the model has 2\)"):
        compute("project", context(tiny_model("llama")), layers=[0, 5])
    with pytest.raises(PatcherError, match="valid layers are 0-1"):
        compute("scale", context(tiny_model("llama")), layers="0-3")
    assert parse_layers("15-29", 30) == list(range(15, 30))
    assert parse_layers("50%-100%", 30) == list(range(15, 30)) and parse_layers("50%-100%", 18) == list(range(9, 18))
    assert parse_layers("0%-25%", 18) == [0, 1, 2, 3, 4]
    assert parse_layers("1,3, 5-6", 30) == [1, 3, 5, 6]
    assert parse_layers([2, 0], 30) == [0, 2]


def test_k_larger_than_the_data_allows() -> None:
    small = paired_data(n=6)
    with pytest.raises(PatcherError, match="k = 10 but ProFS on 6 pairs .* gives at most"):
        compute("project", context(tiny_model("llama"), small), direction="profs", paired=True, k=10)
    with pytest.raises(PatcherError, match="k = 40 probe directions but the data allows at most"):
        compute("project", context(tiny_model("llama"), small), direction="probe", k=40)
    with pytest.raises(PatcherError, match="meandiff gives one direction per layer"):
        ProjectSettings(direction="meandiff", k=2)
    with pytest.raises(PatcherError, match="profs needs paired"):
        ProjectSettings(direction="profs")


def test_paired_without_pair_ids_is_refused() -> None:
    data = paired_data()
    data.pair_ids = None
    with pytest.raises(PatcherError, match="paired = true needs data with pair ids"):
        compute("project", context(tiny_model("llama"), data), paired=True)


# -- scaling and localisation ------------------------------------------------------------------------------------
def test_scale_picks_neurons_that_fire_more_on_toxic_text() -> None:
    model = tiny_model("llama")
    ctx = context(model)
    patch = compute("scale", ctx, top_n=6, factor=0.25)
    loc = localize(model, ctx.collector, ctx.data, blocks=("mlp_out",))
    top = {(i, j) for i, j, _ in loc.top_neurons(6)}
    picked = {(r["layer"], j) for r in patch.provenance["layers"] for j in r["neurons"]}
    assert picked == top
    assert all(isinstance(e, ScaleInputs) and set(e.factors.unique().tolist()) <= {0.25, 1.0} for e in patch.edits)


def test_top_n_layers_follow_localisation() -> None:
    model = tiny_model("qwen2")
    ctx = context(model)
    patch = compute("project", ctx, top_n=1, blocks=["mlp_out", "attn_out"])
    loc = localize(model, ctx.collector, ctx.data, neurons=False)
    chosen = {(r["block"], r["layer"]) for r in patch.provenance["layers"]}
    assert chosen == {(b, loc.top_layers(b, 1)[0]) for b in ("mlp_out", "attn_out")}


def test_localize_scores_signal_not_noise() -> None:
    """Cross-fitting: shuffled labels score ~0; the real labels score higher."""
    model = tiny_model("llama")
    ctx = context(model, paired_data(n=40))
    real = localize(model, ctx.collector, ctx.data, paired=True)
    shuffled = paired_data(n=40)
    random.Random(1).shuffle(shuffled.labels)
    noise = localize(model, ctx.collector, shuffled)
    assert max(max(v) for v in real.blocks.values()) > max(max(v) for v in noise.blocks.values())
    assert max(abs(x) for v in noise.blocks.values() for x in v) < 1.0
    j = real.to_json()
    assert j["paired"] and j["n"] == {"pairs": 40} and set(j["neurons"]) == {"0", "1"}


def test_localize_cli_writes_table_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("patcher.data")
    from patcher.cli import main

    model = save_tiny_with_tokenizer("gemma2", tmp_path / "base")
    d = paired_data(n=30)
    rows = [{"text": t, "label": lab, "pair_id": p} for t, lab, p in zip(d.texts, d.labels, d.pair_ids)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "r.toml").write_text(f"""name = "t"
[model]
id = "{model}"
[data]
path = "data.jsonl"
n_per_class = 30
max_tokens = 32
match_lengths = false
[[step]]
method = "project"
paired = true
""")
    r = CliRunner().invoke(main, ["localize", str(tmp_path / "r.toml"), "--json", str(tmp_path / "loc.json"), "--plot", str(tmp_path / "loc.png")])
    assert r.exit_code == 0, r.output
    assert "attn_out d" in r.output and "mlp_out d" in r.output
    j = json.loads((tmp_path / "loc.json").read_text())
    assert len(j["blocks"]["mlp_out"]) == 2 and j["paired"]
    assert (tmp_path / "loc.png").stat().st_size > 1000


def test_per_layer_table_marks_a_missing_factor_not_nan() -> None:
    """A projection-only layer has no scale factor: the table says "-", never NaN (which would read
    as the numerical failure patcher guards against)."""
    u = torch.tensor([[1.0], [0.0]])
    patch = Patch([ProjectOutputs("model.layers.3.mlp.down_proj", basis=u),
                   ScaleInputs("model.layers.4.mlp.down_proj", factors=torch.tensor([1.0, 0.5, 0.0]))])
    rows = {r[0]: r for r in patch.per_layer()}
    assert rows[3][4] == "-" and rows[3][5] == 1
    assert rows[4][2:5] == [2, 3, pytest.approx(0.5)]
