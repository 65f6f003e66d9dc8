"""One placement option group on every command that runs a model (issue 24): the flags come from
`Placement`'s fields, every placement gives the same results on tiny models, and what cannot run
under a placement is refused in one line naming what works instead."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import save_tiny, save_tiny_with_tokenizer, tiny_model, write_recipe
from safetensors.torch import load_file, save_file
from test_bake import make_edits

from patcher.bake.verify import logit_tolerance, max_logit_diff, verify
from patcher.bake.writer import bake
from patcher.cli import main
from patcher.core.errors import PatcherError
from patcher.core.placement import COLLECT_ONLY, Placement, kv_cache_bytes
from patcher.edits.patch import Patch
from patcher.io.checkpoint import sha256_file

MODEL_COMMANDS = ["run", "compute", "verify", "eval", "sweep", "tune", "localize", "plan"]
COLLECTING = {"run", "compute"}


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.output


def _options(command: str) -> dict[str, str]:
    cmd = main.commands[command]
    return {p.opts[0]: p.help for p in cmd.params if p.opts and p.opts[0].startswith("--")}


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_model_command_has_the_one_option_group(command: str) -> None:
    """Same flags, same help text (the field's) on every command; --resume / --checkpoint-every only
    where statistics are collected."""
    opts = _options(command)
    for f in dataclasses.fields(Placement):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata[COLLECT_ONLY] and command not in COLLECTING:
            assert flag not in opts
            continue
        assert flag in opts, (command, flag)
        assert opts[flag] == f.metadata["help"] + ".", (command, flag)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_memory="cpu=1GiB"), "--max-memory needs --device-map"),
    (dict(offload_folder="x"), "--offload-folder needs --device-map"),
    (dict(device_map="cpu", sequential=True), "exclude each other"),
    (dict(hidden_max_gib=-1.0), "--hidden-max-gib must be at least 0"),
    (dict(checkpoint_every=-1), "--checkpoint-every must be at least 0"),
    (dict(dtype="int8"), "--dtype 'int8': use one of"),
    (dict(device_map="nowhere"), "--device-map 'nowhere'"),
])
def test_placement_refuses_bad_combinations(kwargs: dict, message: str) -> None:
    with pytest.raises(PatcherError, match=message):
        Placement(**kwargs)


def test_cli_placement_errors_are_one_line(tmp_path: Path) -> None:
    code, out = _cli("verify", str(tmp_path), "--max-memory", "cpu=1GiB")
    assert code == 2 and out.strip().splitlines() == ["patcher: error: --max-memory needs --device-map (e.g. --device-map auto --max-memory 0=70GiB,cpu=100GiB)"]


def test_kv_reserve_comes_out_of_the_budget() -> None:
    cfg = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 3}
    assert kv_cache_bytes(cfg, 4, 10, "bfloat16") == 2 * 3 * 2 * 8 * 2 * 4 * 10
    p = Placement(device_map="auto", max_memory="cpu=1MB").reserve(400_000)
    assert p.max_memory == "cpu=600000B"
    with pytest.raises(PatcherError, match="less than the"):
        Placement(device_map="auto", max_memory="cpu=1MB").reserve(2_000_000)


# -- verify in bounded memory ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def baked_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    base = save_tiny_with_tokenizer("llama", root / "base")
    edits = make_edits(tiny_model("llama"), "scale_outputs") + make_edits(tiny_model("llama"), "project_outputs")
    bake(Patch(edits), base, root / "out")
    return base, root / "out"


def _tamper(out: Path, dest: Path) -> Path:
    """A copy of ``out`` with one tensor changed and the record's file hash updated to match: only the
    tensor check and the logits can see it."""
    import shutil

    shutil.copytree(out, dest)
    tensors = load_file(dest / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] += 0.05
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    record = json.loads((dest / "patch.json").read_text())
    record["bake"]["files"]["model.safetensors"] = sha256_file(dest / "model.safetensors")
    (dest / "patch.json").write_text(json.dumps(record))
    return dest


@pytest.mark.parametrize("flags", [[], ["--sequential"], ["--device-map", "cpu"], ["--dtype", "bfloat16"],
                                   ["--sequential", "--dtype", "bfloat16"]])
def test_verify_passes_on_a_correct_bake(baked_pair: tuple[Path, Path], flags: list[str]) -> None:
    _, out = baked_pair
    code, output = _cli("verify", str(out), *flags)
    assert code == 0 and "verify: OK" in output, output


@pytest.mark.parametrize("flags", [[], ["--sequential"]])
def test_verify_fails_on_a_changed_tensor(baked_pair: tuple[Path, Path], tmp_path: Path, flags: list[str]) -> None:
    base, out = baked_pair
    bad = _tamper(out, tmp_path / "bad")
    code, output = _cli("verify", str(bad), "--base", str(base), *flags)
    assert code == 1 and "verify: FAILED" in output, output
    assert "files: ok" in output and "model.layers.1.mlp.up_proj.weight" in output
    r = verify(bad, base=base, placement=Placement(sequential="--sequential" in flags))
    assert r.max_abs_diff > r.tolerance  # the logits see it too, not only the tensor check


def test_sequential_logits_equal_whole_model_logits(baked_pair: tuple[Path, Path]) -> None:
    """Layer by layer and whole, one model at a time: the same float32 logit difference."""
    base, out = baked_pair
    patch = Patch.load(out)
    whole = max_logit_diff(base, patch, out, Placement(), "float32")
    layered = max_logit_diff(base, patch, out, Placement(sequential=True), "float32")
    assert whole[1] == pytest.approx(layered[1], rel=1e-5)
    assert abs(whole[0] - layered[0]) < 1e-5 and layered[0] <= logit_tolerance(layered[1], "float32", "float32")


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "falcon", "qwen3"])
def test_verify_sequential_on_other_families(family: str, tmp_path: Path) -> None:
    base = save_tiny(family, tmp_path / "base", dtype=torch.bfloat16)
    bake(Patch(make_edits(tiny_model(family), "scale_outputs")), base, tmp_path / "out")
    for placement in (Placement(), Placement(sequential=True)):
        r = verify(tmp_path / "out", placement=placement)
        assert r.ok, (family, placement, r)


# -- refusals ---------------------------------------------------------------------------------------
def test_circuit_refused_under_sequential(tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    recipe.write_text(recipe.read_text().replace('method = "aura"', 'method = "circuit"'))
    for command in ("compute", "run"):
        code, output = _cli(command, str(recipe), "--out", str(tmp_path / command), "--sequential")
        assert code == 2, output
        assert output.strip().splitlines() == [
            "patcher: error: step 1 (circuit: its backward pass needs the whole model) cannot run with --sequential: run without "
            "--sequential; for a model larger than memory use --device-map auto with --max-memory and --offload-folder"]
        assert not (tmp_path / command).exists()


def test_eval_tune_sweep_refuse_sequential(tmp_path: Path) -> None:
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = write_recipe(tmp_path, model)
    for args in (["eval", str(model), "--evaluators", "profanity-check"],
                 ["tune", str(recipe), "--max-ppl-increase", "0.1", "--out", str(tmp_path / "t.toml")],
                 ["sweep", str(recipe), "--set", "strength=0.5,1.0", "--out", str(tmp_path / "s")]):
        code, output = _cli(*args, "--sequential")
        assert code == 2, output
        line = output.strip().splitlines()
        assert len(line) == 1 and "cannot run with --sequential" in line[0] and "--device-map auto" in line[0], output
    assert not (tmp_path / "t.toml").exists() and not (tmp_path / "s").exists()


# -- every placement, the same results ------------------------------------------------------------------
PLACEMENTS = {
    "plain": [],
    "sequential": ["--sequential"],
    "device-map-cpu": ["--device-map", "cpu"],
    "max-memory-disk": ["--device-map", "auto", "--max-memory", "cpu=40KB", "--offload-folder", "OFFLOAD"],
}


def _flags(name: str, tmp_path: Path) -> list[str]:
    return [str(tmp_path / "offload") if f == "OFFLOAD" else f for f in PLACEMENTS[name]]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("placed")
    model = save_tiny_with_tokenizer("llama", root / "base")
    return model, write_recipe(root, model)


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_compute_and_run_same_patch_under_every_placement(case: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    model, recipe = case
    code, output = _cli("compute", str(recipe), "--out", str(tmp_path / "plain"))
    assert code == 0, output
    code, output = _cli("run", str(recipe), "--out", str(tmp_path / "run"), "--no-eval", *_flags(name, tmp_path))
    assert code == 0, output
    ref, got = load_file(tmp_path / "plain/patch.safetensors"), load_file(tmp_path / "run/patcher/patch.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5)
    code, output = _cli("verify", str(tmp_path / "run"), *_flags(name, tmp_path))
    assert code == 0 and "verify: OK" in output, output
    if name == "max-memory-disk":
        import gc

        gc.collect()
        assert (tmp_path / "offload").is_dir() and not any((tmp_path / "offload").iterdir())  # its temporary folder went with the model


@pytest.mark.parametrize("name", [n for n in PLACEMENTS if n != "sequential"])
def test_eval_same_report_under_every_placement(case: tuple[Path, Path], tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = case
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ["the cat", "you are", "a b"]) + "\n")
    (tmp_path / "ppl.txt").write_text("the river flows to the sea. " * 30)
    common = ["eval", str(model), "--prompts", str(tmp_path / "p.jsonl"), "--preset", "quick", "--n-prompts", "0", "--samples", "2",
              "--max-new-tokens", "4", "--evaluators", "profanity-check", "--ppl-tokens", "200", "--batch-size", "2"]
    monkeypatch.setenv("PATCHER_DATA", str(tmp_path))
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2/wiki.test.raw").write_text("the river flows to the sea. " * 30)
    code, output = _cli(*common, "--json", str(tmp_path / "ref.json"))
    assert code == 0, output
    code, output = _cli(*common, "--json", str(tmp_path / "got.json"), *_flags(name, tmp_path))
    assert code == 0, output
    ref, got = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "got.json").read_text())
    assert got["model"]["samples"] == ref["model"]["samples"]
    assert got["model"]["wikitext_perplexity"] == pytest.approx(ref["model"]["wikitext_perplexity"], rel=1e-5)


@pytest.mark.parametrize("name", ["sequential", "device-map-cpu"])
def test_localize_same_scores_under_placement(case: tuple[Path, Path], tmp_path: Path, name: str) -> None:
    _, recipe = case
    code, output = _cli("localize", str(recipe), "--json", str(tmp_path / "ref.json"))
    assert code == 0, output
    code, output = _cli("localize", str(recipe), "--json", str(tmp_path / "got.json"), *_flags(name, tmp_path))
    assert code == 0, output
    ref, got = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "got.json").read_text())
    assert ref.keys() == got.keys() and _close(ref, got)


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)  # type: ignore[union-attr]
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(a))  # type: ignore[operator]
    return a == b
