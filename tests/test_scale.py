"""Scaling: layer-by-layer statistics equal whole-model ones (every family, a prior patch, left
padding, disk-spilled hidden states, perplexity); 2-process data-parallel equals one process; a run
killed mid-collection resumes to the same patch; device-map values are checked; `patcher plan`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import FAMILIES, save_tiny_with_tokenizer, write_recipe

from patcher.cli import main
from patcher.collect.collector import Collector
from patcher.collect.layerwise import layerwise_of, layerwise_perplexity, load_layerwise
from patcher.collect.parallel import ParallelCollect
from patcher.collect.statistics import PooledValues
from patcher.core.arch import arch_for, num_layers
from patcher.core.errors import PatcherError
from patcher.core.models import load_model, parse_max_memory
from patcher.core.placement import Placement
from patcher.edits.edit import ScaleOutputs
from patcher.edits.patch import Patch

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["you are a total idiot!", "hello there", "what a lovely day it is today, friends", "go away, fool", "ok",
         "thanks a lot", "the river runs by the old mill", "shut up, moron", "a"]
LABELS = [1, 0, 0, 1, 0, 1, 0, 1, 0]


def _stats(config) -> list:
    arch = arch_for(config)
    n = num_layers(config)
    units = [m for i in range(n) for m in arch.mlp_unit_modules(i)]
    return [
        PooledValues([(m, "output") for m in units], how="max"),
        # Falcon's layers return a tuple, which Collector hooks do not take apart
        PooledValues([(arch.layer(i), "output") for i in range(n) if config.model_type != "falcon"]
                     + [(arch.module("attn_out", i), "output") for i in range(n)], how="mean"),
        PooledValues([(arch.module("mlp_out", i), "input") for i in range(n)], how="mean"),
    ]


def _prior(config) -> Patch:
    """An earlier step's edit: scale the units of layer 0's MLP output."""
    arch = arch_for(config)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    factors = torch.linspace(0.2, 1.0, hidden)
    return Patch([ScaleOutputs(arch.module("mlp_out", 0), arch.layout, factors=factors)])


def _collect(model, tok, config, sequential: bool, side: str = "right", batch_size: int = 4) -> list:
    stats = _stats(config)
    c = Collector(model, tok, batch_size=batch_size, max_tokens=24, padding_side=side)
    if sequential:
        c.options = ParallelCollect(Placement(sequential=True, checkpoint_every=0))
    c.run(stats, TEXTS, LABELS, patch=_prior(config))
    return stats


def _assert_same(a: list, b: list, atol: float = 1e-5) -> None:
    for sa, sb in zip(a, b):
        for m in sa.values:
            xa, ya = sa.matrix(m)
            xb, yb = sb.matrix(m)
            assert torch.equal(ya, yb), m
            assert torch.allclose(xa, xb, atol=atol, rtol=0), (m, (xa - xb).abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_equals_whole_model(family: str, tmp_path: Path) -> None:
    folder = save_tiny_with_tokenizer(family, tmp_path / "m")
    model, tok = load_model(folder)
    skeleton, _ = load_layerwise(folder)
    side = "left" if family in ("llama", "gpt2", "falcon") else "right"
    whole = _collect(model, tok, model.config, sequential=False, side=side)
    seq = _collect(skeleton, tok, skeleton.config, sequential=True, side=side)
    _assert_same(whole, seq)
    # no layer weights stay resident
    assert all(p.device.type == "meta" for n, p in skeleton.named_parameters() if p.ndim >= 2 and ".0." in n)


def test_sequential_hidden_states_on_disk_and_perplexity(tmp_path: Path) -> None:
    folder = save_tiny_with_tokenizer("qwen3", tmp_path / "m", dtype=torch.bfloat16)
    model, tok = load_model(folder)
    skeleton, _ = load_layerwise(folder, hidden_max_bytes=0)  # everything spills to the temp file
    _assert_same(_collect(model, tok, model.config, False), _collect(skeleton, tok, skeleton.config, True))
    from patcher.evaluate.perplexity import perplexity

    ids = torch.randint(4, 90, (150,))
    lw = layerwise_of(skeleton)
    assert abs(perplexity(model, ids, window=64, stride=32) - layerwise_perplexity(lw, ids, window=64, stride=32)) < 1e-4


def test_dropping_the_skeleton_frees_the_engine_without_the_cycle_collector(tmp_path: Path) -> None:
    """The engine holds embeddings and head: they must go when the caller drops the skeleton (run's
    perplexity check and verify load a second model right after), with no gc.collect() in between."""
    import gc
    import weakref

    folder = save_tiny_with_tokenizer("qwen3", tmp_path / "m")
    skeleton, _ = load_layerwise(folder)
    engine = weakref.ref(layerwise_of(skeleton))
    embeddings = weakref.ref(skeleton.get_input_embeddings().weight)
    gc.disable()
    try:
        del skeleton
        assert engine() is None and embeddings() is None
    finally:
        gc.enable()


@pytest.mark.slow
def test_sequential_equals_whole_model_smollm2(smollm2: Path) -> None:
    model, tok = load_model(smollm2)
    skeleton, _ = load_layerwise(smollm2)
    arch = arch_for(model.config)
    mods = [m for i in range(num_layers(model.config)) for m in arch.mlp_unit_modules(i)]
    out = []
    for m, seq in ((model, False), (skeleton, True)):
        stat = PooledValues([(x, "output") for x in mods])
        c = Collector(m, tok, batch_size=4, max_tokens=24)
        if seq:
            c.options = ParallelCollect(Placement(sequential=True, checkpoint_every=0))
        c.run([stat], TEXTS, LABELS)
        out.append([stat])
    _assert_same(*out)


# -- the CLI: sequential run, device maps, data-parallel, resume ------------------------------------------
def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _patch_bytes(folder: Path) -> tuple[bytes, list]:
    meta = json.loads((folder / "patch.json").read_text())
    return (folder / "patch.safetensors").read_bytes(), meta["edits"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(tmp, recipe, reference patch folder from a plain single-process compute)."""
    tmp = tmp_path_factory.mktemp("scale")
    model = save_tiny_with_tokenizer("llama", tmp / "base")
    recipe = write_recipe(tmp, model)
    r = _cli("compute", recipe, "--out", tmp / "ref", "--checkpoint-every", 0)
    assert r.exit_code == 0, r.output
    return tmp, recipe, tmp / "ref"


def test_sequential_run_and_device_map_give_the_same_patch(setup: tuple[Path, Path, Path]) -> None:
    tmp, recipe, ref = setup
    r = _cli("run", recipe, "--out", tmp / "seq", "--sequential")
    assert r.exit_code == 0, r.output
    assert _patch_bytes(ref)[1] == json.loads((tmp / "seq/patch.json").read_text())["edits"]
    assert not (tmp / "seq.collect-state").exists()
    assert _cli("run", recipe, "--out", tmp / "whole").exit_code == 0
    checks = [json.loads((tmp / name / "patch.json").read_text())["check"] for name in ("seq", "whole")]
    for key in ("ppl_before", "ppl_after"):
        assert abs(checks[0][key] - checks[1][key]) < 1e-4 * checks[1][key], (key, checks)
    r = _cli("compute", recipe, "--out", tmp / "dm", "--device-map", "auto", "--max-memory", "cpu=8GiB")
    assert r.exit_code == 0, r.output
    assert _patch_bytes(tmp / "dm") == _patch_bytes(ref)
    # a 20 KB CPU budget sends every weight to accelerate's disk offload
    r = _cli("compute", recipe, "--out", tmp / "disk", "--device-map", "auto", "--max-memory", "cpu=20KB")
    assert r.exit_code == 0, r.output
    assert _patch_bytes(tmp / "disk") == _patch_bytes(ref)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device-map", "auto", "--max-memory", "0=70GiB,cpu=100GiB"], "GPU 0, which does not exist"),
        (["--device-map", "auto", "--max-memory", "cpu=lots"], "size 'lots' is not a size"),
        (["--device-map", "auto", "--max-memory", "70GiB"], "is not DEVICE=SIZE"),
        (["--device-map", "auto", "--max-memory", "tpu=1GiB"], "unknown device 'tpu'"),
        (["--device-map", "cuda:3"], "--device-map 'cuda:3'"),
        (["--device-map", "nowhere"], "use auto, balanced"),
        (["--max-memory", "cpu=1GiB"], "--max-memory needs --device-map"),
        (["--sequential", "--device-map", "auto"], "exclude each other"),
    ],
)
def test_bad_device_map_or_max_memory(setup: tuple[Path, Path, Path], args: list[str], message: str) -> None:
    if torch.cuda.is_available() and "GPU 0" in message:
        pytest.skip("a GPU is visible")
    tmp, recipe, _ = setup
    r = _cli("compute", recipe, "--out", tmp / "never", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp / "never").exists()


def test_parse_max_memory() -> None:
    assert parse_max_memory("cpu=1.5GiB") == {"cpu": int(1.5 * 2**30)}
    assert parse_max_memory("cpu=500MB") == {"cpu": 500 * 10**6}
    with pytest.raises(PatcherError, match="e.g. --max-memory 0=70GiB"):
        parse_max_memory("cpu:1GiB")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_two_process_data_parallel_equals_single_process(setup: tuple[Path, Path, Path]) -> None:
    tmp, recipe, ref = setup
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "patcher.cli", "compute", str(recipe), "--out", str(tmp / "dp"),
           "--batch-size", "4"]
    p = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank 0 of 2 takes 5 of the 10 batches" in p.stderr and "merging the statistics of 2 processes" in p.stderr, p.stderr
    single = _cli("compute", recipe, "--out", tmp / "single4", "--batch-size", 4)
    assert single.exit_code == 0, single.output
    assert _patch_bytes(tmp / "dp") == _patch_bytes(tmp / "single4")
    assert not (tmp / "dp.collect-state").exists()


SLOW_COMPUTE = """
import sys, time
from patcher.collect.statistics import PooledValues
observe = PooledValues.observe
def slow(self, module, acts, batch):
    if module == self.watches[0][0]:
        time.sleep(0.4)
    observe(self, module, acts, batch)
PooledValues.observe = slow
from patcher.cli import main
main(sys.argv[1:])
"""


def test_resume_after_kill_equals_uninterrupted_run(setup: tuple[Path, Path, Path]) -> None:
    tmp, recipe, ref = setup
    out, state = tmp / "killed", tmp / "killed.collect-state"
    script = tmp / "slow.py"
    script.write_text(SLOW_COMPUTE)
    cmd = [sys.executable, str(script), "compute", str(recipe), "--out", str(out), "--batch-size", "4", "--checkpoint-every", "1"]
    p = subprocess.Popen(cmd, cwd=tmp, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = state / "c00-r0of1" / "meta.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and p.poll() is None:
            if meta.is_file() and json.loads(meta.read_text())["done"] >= 3:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the run finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    done = json.loads(meta.read_text())["done"]
    assert 3 <= done < 10 and not out.exists()
    r = _cli("compute", recipe, "--out", out, "--batch-size", 4, "--checkpoint-every", 1, "--resume")
    assert r.exit_code == 0, r.output
    assert f"resumed after {done} batches" in r.output
    uninterrupted = _cli("compute", recipe, "--out", tmp / "whole4", "--batch-size", 4)
    assert uninterrupted.exit_code == 0
    assert _patch_bytes(out) == _patch_bytes(tmp / "whole4")
    assert not state.exists()


def test_resume_refuses_state_of_another_run(setup: tuple[Path, Path, Path]) -> None:
    tmp, recipe, _ = setup
    folder = tmp / "other.collect-state" / "c00-r0of1"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"key": "0" * 64, "parts": [], "done": 1}))
    r = _cli("compute", recipe, "--out", tmp / "other", "--resume")
    assert r.exit_code == 2 and "made by another recipe" in r.output, r.output


def test_plan_prints_memory_from_config(setup: tuple[Path, Path, Path]) -> None:
    tmp, _, _ = setup
    r = _cli("plan", "--model", tmp / "base", "--texts", 1000, "--max-tokens", 64, "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert "per layer" in r.output and "hidden states" in r.output and "AURA pooled values" in r.output
    # llama tiny: hidden 32 -> 1000 x 64 x 32 x 4 B (float32) = 8.19 MB
    assert "8.19 MB" in r.output, r.output
    r = _cli("plan", "--model", "llama-2-70b")
    assert r.exit_code == 0 and "--sequential" in r.output, r.output
