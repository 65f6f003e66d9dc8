"""Linear-AcT / Mean-AcT (`patcher.methods.transport`): the sorted least-squares fit against a direct
computation, the 1-D transport of known Gaussians, causal estimation against a hand-rolled
layer-by-layer reference (whole-model passes, one per stage), causal vs simultaneous, the
``--sequential`` engine, bake = intervene of the method's patch, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_bake_equals_hooks, compute, context, paired_data, save_tiny, save_tiny_with_tokenizer, tiny_model, tiny_tokenizer

from patcher import AffineOutputs, Patch, PatcherError, verify
from patcher.collect.collector import Collector
from patcher.collect.parallel import ParallelCollect
from patcher.collect.statistics import PooledValues
from patcher.core.arch import arch_for, num_layers
from patcher.core.placement import Placement
from patcher.methods import StepContext, get_method
from patcher.methods.transport import TransportSettings, fit_maps, stages
from patcher.recipe.settings import build


def test_fit_equals_direct_least_squares() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 6, generator=gen) * torch.tensor([1.0, 2, 0.1, 5, 1, 3]) + torch.tensor([0.0, 1, -2, 3, 0, 10])
    labels = torch.tensor([1] * 37 + [0] * 33)[torch.randperm(70, generator=gen)]
    x[labels == 1] = x[labels == 1] * 1.7 + 0.4  # the toxic side differs in spread and location
    w, b = fit_maps(x, labels, "linear")
    a_all, b_all = x[labels == 1].double().numpy(), x[labels == 0].double().numpy()
    n = min(len(a_all), len(b_all))  # equal counts: the first n of each side
    for j in range(x.shape[1]):
        slope, intercept = np.polyfit(np.sort(a_all[:n, j]), np.sort(b_all[:n, j]), 1)
        assert abs(w[j].item() - slope) < 1e-5 and abs(b[j].item() - intercept) < 1e-4
    w0, b0 = fit_maps(x, labels, "mean")
    assert torch.equal(w0, torch.ones(6))
    assert torch.allclose(b0.double(), torch.from_numpy(b_all[:n].mean(0) - a_all[:n].mean(0)), atol=1e-5)


def test_transport_of_known_gaussians() -> None:
    """A ~ N(2, 3^2) onto B ~ N(-1, 0.5^2): the optimal map is z -> (0.5/3)(z - 2) - 1."""
    gen = torch.Generator().manual_seed(1)
    n = 50_000
    a, b = 2 + 3 * torch.randn(n, 1, generator=gen), -1 + 0.5 * torch.randn(n, 1, generator=gen)
    x, labels = torch.cat([a, b]), torch.tensor([1] * n + [0] * n)
    w, beta = fit_maps(x, labels, "linear")
    assert abs(w.item() - 0.5 / 3) < 0.005 and abs(beta.item() - (-1 - 2 * 0.5 / 3)) < 0.02
    moved = w * a + beta
    assert abs(moved.mean().item() + 1) < 0.02 and abs(moved.std().item() - 0.5) < 0.01
    _, shift = fit_maps(x, labels, "mean")
    assert abs(shift.item() + 3) < 0.05


def _settings(**kw) -> TransportSettings:
    m = get_method("transport")
    return build(m.settings, kw, "test", "step")


def reference_causal(model: torch.nn.Module, data, roles: tuple[str, ...], mode: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The definition, by brute force: for each layer and each role in forward order, one
    whole-model pass with every map fitted so far attached as hooks."""
    arch = arch_for(model.config)
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i in range(num_layers(model.config)):
        for group in stages(arch, i, roles):
            stat = PooledValues([(m, "output") for m in group], how="mean")
            prior = Patch([AffineOutputs(m, arch.layout, scale=w, shift=b) for m, (w, b) in maps.items()])
            Collector(model, tiny_tokenizer(), batch_size=16, max_tokens=32).run([stat], data.texts, data.labels, patch=prior)
            for m in group:
                maps[m] = fit_maps(*stat.matrix(m), mode)
    return maps


def _close(a: dict, b: dict, tol: float = 1e-4) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[m][k], b[m][k], rtol=tol, atol=tol) for m in a for k in (0, 1))


@pytest.mark.parametrize("family, roles", [("llama", ("attn_out", "mlp_out")), ("gemma2", ("attn_out",)), ("falcon", ("mlp_in", "mlp_out")),
                                           ("gpt2", ("mlp_out",)), ("gpt_neox", ("attn_out",))])
def test_causal_equals_layer_by_layer_reference(family: str, roles: tuple[str, ...]) -> None:
    model = tiny_model(family)
    data = paired_data()
    m = get_method("transport")
    causal = m.collect(context(model, data), _settings(modules=list(roles))).maps
    simultaneous = m.collect(context(model, data), _settings(modules=list(roles), causal=False)).maps
    assert _close(causal, reference_causal(model, data, roles, "linear"))
    first = stages(arch_for(model.config), 0, roles)[0]
    assert all(torch.allclose(causal[x][0], simultaneous[x][0], atol=1e-5) for x in first)  # nothing upstream of it
    diff = max(float((causal[x][1] - simultaneous[x][1]).abs().max()) for x in causal)
    assert diff > 1e-3, "causal estimation should see the earlier maps"


def test_causal_mean_mode_equals_reference() -> None:
    model, data = tiny_model("qwen3"), paired_data()
    got = get_method("transport").collect(context(model, data), _settings(mode="mean", modules=["attn_out"])).maps
    assert _close(got, reference_causal(model, data, ("attn_out",), "mean"))


def test_sequential_engine_gives_the_same_maps(tmp_path: Path) -> None:
    from patcher.collect.layerwise import load_layerwise

    folder = save_tiny_with_tokenizer("llama", tmp_path / "m")
    data = paired_data()
    settings = _settings(modules=["attn_out", "mlp_out"])
    resident = get_method("transport").collect(context(tiny_model("llama")), settings).maps
    skeleton, tok = load_layerwise(folder)
    collector = Collector(skeleton, tok, batch_size=16, max_tokens=32, options=ParallelCollect(Placement(sequential=True, checkpoint_every=0)))
    layered = get_method("transport").collect(StepContext(skeleton, tok, collector, data, Patch([])), settings).maps
    assert _close(resident, layered, 1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "falcon"])
def test_method_patch_bakes_equal_to_hooks(family: str, tmp_path: Path) -> None:
    model = tiny_model(family)
    roles = ["mlp_out"] if family not in ("gemma3_text",) else ["attn_out"]
    patch = compute("transport", context(model), modules=roles, strength=0.7)
    assert patch.edits and all(isinstance(e, AffineOutputs) for e in patch.edits)
    base_dir = save_tiny(family, tmp_path / "base")
    assert_bake_equals_hooks(base_dir, patch, tmp_path / "out")
    assert verify(tmp_path / "out").ok


def test_strength_scales_the_fitted_map() -> None:
    model = tiny_model("llama")
    m = get_method("transport")
    ctx = context(model)
    stats = m.collect(ctx, _settings())
    full, half, none = (m.build(ctx, stats, _settings(strength=s)) for s in (1.0, 0.5, 0.0))
    for e1, eh, e0 in zip(full.edits, half.edits, none.edits):
        assert torch.allclose(eh.scale, 0.5 + 0.5 * e1.scale) and torch.allclose(eh.shift, 0.5 * e1.shift)
        assert torch.equal(e0.scale, torch.ones_like(e0.scale)) and not e0.shift.any()
    assert m.build_only() == frozenset({"strength"})


def test_refusals() -> None:
    with pytest.raises(PatcherError, match="no bias slot for mlp_out.*no MLP or attention output of mistral"):
        get_method("transport").collect(context(tiny_model("mistral")), _settings())
    with pytest.raises(PatcherError, match="roles with a bias slot here: attn_out"):
        get_method("transport").collect(context(tiny_model("gemma2")), _settings(modules=["mlp_out"]))
    with pytest.raises(PatcherError, match="post-norm"):
        _settings(modules=["mlp_out_norm"])
    with pytest.raises(PatcherError, match="mode"):
        _settings(mode="gaussian")
    with pytest.raises(PatcherError, match=r"strength = 1.5 should be in \[0, 1\]"):
        _settings(strength=1.5)


@pytest.mark.parametrize("sequential", [False, True])
def test_cli_run_bakes_a_loadable_checkpoint(sequential: bool, tmp_path: Path) -> None:
    """`patcher run` with a transport step on a Llama without MLP biases: the output turns on
    ``mlp_bias``, loads with plain from_pretrained (no missing or unexpected keys) and verifies;
    ``--sequential`` gives the same patch."""
    import json

    from click.testing import CliRunner
    from helpers import write_recipe
    from transformers import AutoModelForCausalLM

    from patcher.cli import main
    from patcher.edits.patch import Patch as P

    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    recipe.write_text(recipe.read_text().replace('method = "aura"', 'method = "transport"\nmodules = ["mlp_out", "attn_out"]\nstrength = 0.8'))
    r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), *(["--sequential"] if sequential else [])])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out/config.json").read_text())["mlp_bias"] is True
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert verify(tmp_path / "out").ok
    if sequential:
        r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "whole")])
        assert r.exit_code == 0, r.output
        a, b = P.load(tmp_path / "out"), P.load(tmp_path / "whole")
        assert all(torch.allclose(x.scale, y.scale, atol=1e-5) and torch.allclose(x.shift, y.shift, atol=1e-5) for x, y in zip(a.edits, b.edits))


@pytest.mark.parametrize("name", ["transport-linear", "transport-mean"])
def test_shipped_recipes_parse(name: str) -> None:
    from patcher.recipe.loader import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / f"recipes/{name}.toml")
    step = recipe.steps[0]
    s = build(get_method(step.method).settings, step.settings, name, "step[1]")
    assert s.causal and s.modules == ("mlp_out",) and recipe.check.max_ppl_increase == 0.05
