"""Trust: patcher never loses, corrupts or leaks a user's model.

Every fault a careless user or an attacker can build (outputs on top of inputs, damaged safetensors
headers, non-finite weights, malformed JSON, hand-edited patches, bad recipe values, disk full,
read-only and immutable places) is run through the CLI against tiny models, and each case asserts:
a non-zero exit, one line ``patcher: error: ...``, no output, no leftovers beside it, and every
input (model, patch, recipe, data) byte-for-byte unchanged (the tree hash, checked by a fixture
after every test that writes). Then: kill -9 at random moments of a multi-shard bake, two writers
racing for one output, stale leftovers, verify and push against tampering, and remote code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import save_tiny_with_tokenizer, write_recipe
from tqdm.std import tqdm

from patcher import Patch, ScaleOutputs
from patcher.bake.verify import check_files
from patcher.cli import main

DOWN0 = "model.layers.0.mlp.down_proj"
# No tqdm monitor thread: the kill and race tests fork this process, and a thread holding a lock
# at the fork would leave the child waiting on it forever.
tqdm.monitor_interval = 0


# -- the world every case starts from ---------------------------------------------------------------
def tree_hash(folder: Path) -> str:
    """sha256 over every path, file content and symlink target under ``folder``."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            h.update(f"L {rel} {os.readlink(p)}\n".encode())
        elif p.is_file():
            h.update(f"F {rel} ".encode() + hashlib.sha256(p.read_bytes()).digest())
        else:
            h.update(f"D {rel}\n".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def proto(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs built once: a tiny Llama with a tokenizer, a patch on it, a recipe and its data."""
    root = tmp_path_factory.mktemp("proto")
    base = save_tiny_with_tokenizer("llama", root / "base")
    gen = torch.Generator().manual_seed(0)
    Patch([ScaleOutputs(DOWN0, factors=0.5 + torch.rand(32, generator=gen))], {"method": "test"}).save(root / "patch")
    (root / "recipe").mkdir()
    write_recipe(root / "recipe", base)
    return root


@dataclass
class World:
    """One test's copy of the inputs (``inp``) and the folder outputs go to (``work``)."""

    inp: Path
    work: Path
    sealed: str = ""

    @property
    def base(self) -> Path:
        return self.inp / "base"

    @property
    def patch(self) -> Path:
        return self.inp / "patch"

    @property
    def recipe(self) -> Path:
        return self.inp / "recipe" / "recipe.toml"

    @property
    def out(self) -> Path:
        return self.work / "out"

    def seal(self) -> None:
        """Record the inputs' tree hash: from here on patcher may not change them (the fixture
        checks after the test). A test that damages an input on purpose seals after doing so."""
        self.sealed = tree_hash(self.inp)


@pytest.fixture
def world(proto: Path, tmp_path: Path) -> Iterator[World]:
    inp = tmp_path / "in"
    shutil.copytree(proto, inp, symlinks=True)
    recipe = inp / "recipe" / "recipe.toml"  # point the copied recipe at the copied model
    recipe.write_text(recipe.read_text().replace(str(proto / "base"), str(inp / "base")))
    work = tmp_path / "work"
    work.mkdir()
    w = World(inp, work)
    w.seal()
    yield w
    assert tree_hash(w.inp) == w.sealed, "a command modified its inputs (source model, patch, recipe or data)"


def cli(*args: object) -> tuple[int, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback is a failure of its own
    return r.exit_code, r.output


def screen_lines(output: str) -> list[str]:
    """The non-empty lines a terminal would show: a progress bar redraws its line after each carriage
    return, and a bar cleared on failure leaves nothing."""
    return [shown for line in output.split("\n") if (shown := line.rsplit("\r", 1)[-1].strip())]


def assert_refused(w: World, args: list[object], message: str, *, out: Path | None = None) -> str:
    """The contract for every fault: exit 2, one line naming the problem, no output, no leftovers,
    inputs unchanged."""
    out = out if out is not None else w.out
    before_inputs = tree_hash(w.inp)
    before_work = sorted(p.name for p in w.work.iterdir())
    existed = out.exists()
    before_out = tree_hash(out) if out.is_dir() else None
    code, output = cli(*args)
    lines = screen_lines(output)
    assert code == 2, output
    assert len(lines) == 1 and lines[0].startswith("patcher: error: "), output
    assert message.lower() in lines[0].lower(), lines[0]
    assert tree_hash(w.inp) == before_inputs, "an input was modified"
    assert sorted(p.name for p in w.work.iterdir()) == before_work, "leftovers beside the output"
    assert out.exists() == existed
    if before_out is not None:
        assert tree_hash(out) == before_out
    return lines[0]


# -- safetensors surgery --------------------------------------------------------------------------
def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def edit_header(fn: Callable[[dict], None]) -> Callable[[World], None]:
    def setup(w: World) -> None:
        f = w.base / "model.safetensors"
        header, data = read_st(f)
        fn(header)
        write_st(f, header, data)

    return setup


def _first_two(header: dict) -> tuple[dict, dict]:
    ordered = sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    return ordered[0], ordered[1]


def _overlap(h: dict) -> None:
    a, b = _first_two(h)
    b["data_offsets"] = [b["data_offsets"][0] - 4, b["data_offsets"][1] - 4]


def _negative(h: dict) -> None:
    a, _ = _first_two(h)
    a["data_offsets"] = [-4, a["data_offsets"][1] - 4]


def _reversed(h: dict) -> None:
    a, _ = _first_two(h)
    a["data_offsets"] = [a["data_offsets"][1], a["data_offsets"][0]]


def _shape(h: dict) -> None:
    h["model.norm.weight"]["shape"] = [16]


def _dtype(h: dict) -> None:
    h["model.norm.weight"]["dtype"] = "F31"


def _dtype_size(h: dict) -> None:
    h["model.norm.weight"]["dtype"] = "F16"


def _gap(h: dict) -> None:
    for v in h.values():
        if isinstance(v, dict) and "data_offsets" in v:
            v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]


def _shape_negative(h: dict) -> None:
    h["model.norm.weight"]["shape"] = [-32]


def _shape_float(h: dict) -> None:
    h["model.norm.weight"]["shape"] = [32.0]


def _metadata(h: dict) -> None:
    h["__metadata__"] = {"format": 1}


def _missing_offsets(h: dict) -> None:
    del h["model.norm.weight"]["data_offsets"]


def _extra_key(h: dict) -> None:
    h["model.norm.weight"]["offset"] = 0


def trailing_bytes(w: World) -> None:
    with open(w.base / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)


def header_not_object(w: World) -> None:
    _, data = read_st(w.base / "model.safetensors")
    raw = b"[1, 2, 3]     "
    raw += b" " * (-len(raw) % 8)
    (w.base / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def poke(tensor: str, value: float) -> Callable[[World], None]:
    """Write ``value`` into the first element of a float32 tensor of the source."""

    def setup(w: World) -> None:
        f = w.base / "model.safetensors"
        header, data = read_st(f)
        start = header[tensor]["data_offsets"][0]
        data = data[:start] + struct.pack("<f", value) + data[start + 4 :]
        write_st(f, header, data)

    return setup


def write_file(rel: str, text: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.inp / rel).write_text(text)

    return setup


def index_file(content: object) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.base / "model.safetensors.index.json").write_text(content if isinstance(content, str) else json.dumps(content))

    return setup


def patch_json(change: Callable[[dict], None]) -> Callable[[World], None]:
    def setup(w: World) -> None:
        f = w.patch / "patch.json"
        meta = json.loads(f.read_text())
        change(meta)
        f.write_text(json.dumps(meta))

    return setup


def recipe_sub(old: str, new: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        text = w.recipe.read_text()
        assert old in text, old
        w.recipe.write_text(text.replace(old, new))

    return setup


def recipe_add(text: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        w.recipe.write_text(text + "\n" + w.recipe.read_text())

    return setup


def recipe_append(text: str) -> Callable[[World], None]:
    """``text`` after the recipe's last line (tables such as ``[tune]`` go last)."""
    def setup(w: World) -> None:
        w.recipe.write_text(w.recipe.read_text() + "\n" + text)

    return setup


def _collect_not_table(w: World) -> None:
    text = w.recipe.read_text().replace("[collect]\nbatch_size = 8\n", "")
    w.recipe.write_text("collect = 3\n" + text)


def link(name: str, target: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.work / name).symlink_to(w.inp / target)

    return setup


def mkdir_with(name: str, file: str = "keep.txt") -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.work / name).mkdir()
        (w.work / name / file).write_text("the user's")

    return setup


def nothing(w: World) -> None:
    return None


def _baked(w: World) -> None:
    """A baked folder among the inputs: `export` reads it and may only add its own files to it."""
    from patcher.bake.writer import bake

    bake(Patch.load(w.patch), w.base, w.inp / "baked")


def _baked_with(name: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        _baked(w)
        (w.inp / "baked" / name).write_text("the user's own file\n")

    return setup


def _baked_tampered(w: World) -> None:
    _baked(w)
    with open(w.inp / "baked" / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))


def export_args(*extra: str) -> Callable[[World], list[object]]:
    def args(w: World) -> list[object]:
        return ["export", w.inp / "baked", *[e.format(work=w.work, inp=w.inp) for e in extra]]

    return args


def bake_args(out: str = "work/out", *extra: str) -> Callable[[World], list[object]]:
    def args(w: World) -> list[object]:
        return ["bake", w.patch, "--model", w.base, "--out", w.inp.parent / out, *extra]

    return args


def recipe_args(cmd: str, out: str = "work/out", *extra: str) -> Callable[[World], list[object]]:
    def args(w: World) -> list[object]:
        return [cmd, w.recipe, "--out", w.inp.parent / out, *extra]

    return args


LONG = "x" * 300

# (id, setup, command line, words the one-line error must hold)
FAULTS: list[tuple[str, Callable[[World], None], Callable[[World], list[object]], str]] = [
    # 1. outputs on top of inputs, whatever --overwrite says
    ("bake-out-is-source", nothing, bake_args("in/base", "--overwrite"), "is the source model"),
    ("bake-out-inside-source", nothing, bake_args("in/base/sub"), "sits inside the source model"),
    ("bake-out-contains-source", nothing, bake_args("in", "--overwrite"), "contains the source model"),
    ("bake-out-is-patch", nothing, bake_args("in/patch", "--overwrite"), "is the input"),
    ("bake-out-inside-patch", nothing, bake_args("in/patch/x"), "sits inside the input"),
    ("bake-out-symlink-to-source", link("ln", "base"), bake_args("work/ln", "--overwrite"), "symlinks resolved"),
    ("bake-out-inside-symlink", link("ln", "base"), bake_args("work/ln/sub"), "sits inside the source model"),
    ("bake-overwrite-foreign-folder", mkdir_with("out"), bake_args("work/out", "--overwrite"), "only a folder patcher wrote"),
    ("bake-existing-no-overwrite", mkdir_with("out"), bake_args(), "already exists"),
    ("bake-out-is-a-file", lambda w: (w.work / "out").write_text("x"), bake_args("work/out", "--overwrite"), "not a folder"),
    ("bake-300-char-name", nothing, bake_args(f"work/{LONG}"), "shorter --out"),
    ("compute-out-is-model", nothing, recipe_args("compute", "in/base", "--overwrite"), "is the source model"),
    ("compute-out-is-models-parent", nothing, recipe_args("compute", "in", "--overwrite"), "contains the source model"),
    ("compute-out-inside-model", nothing, recipe_args("compute", "in/base/p"), "sits inside the source model"),
    ("compute-out-contains-recipe", nothing, recipe_args("compute", "in/recipe", "--overwrite"), "contains the input"),
    ("compute-out-is-data", nothing, recipe_args("compute", "in/recipe/data.jsonl", "--overwrite"), "is the input"),
    ("compute-out-via-symlink", link("ln", "base"), recipe_args("compute", "work/ln/p"), "sits inside the source model"),
    ("compute-300-char-name", nothing, recipe_args("compute", f"work/{LONG}"), "shorter --out"),
    ("run-out-is-model", nothing, recipe_args("run", "in/base", "--overwrite"), "is the source model"),
    ("run-out-contains-recipe", nothing, recipe_args("run", "in/recipe", "--overwrite"), "contains the input"),
    ("run-out-is-ppl-text", nothing, recipe_args("run", "in/recipe/ppl.txt", "--overwrite"), "is the input"),
    ("run-overwrite-foreign-folder", mkdir_with("out"), recipe_args("run", "work/out", "--overwrite"), "only a folder patcher wrote"),
    ("sweep-out-is-model", nothing, lambda w: ["sweep", w.recipe, "--set", "min_auroc=0.5", "--out", w.base], "is the source model"),
    ("sweep-foreign-folder", mkdir_with("out"), lambda w: ["sweep", w.recipe, "--set", "min_auroc=0.5", "--out", w.out], "only a folder patcher wrote"),
    ("eval-json-inside-model", nothing, lambda w: ["eval", w.base, "--json", w.base / "eval.json"], "sits inside the input"),
    ("eval-plot-is-prompts", nothing, lambda w: ["eval", w.base, "--prompts", w.recipe.parent / "ppl.txt", "--plot", w.recipe.parent / "ppl.txt"], "is the input"),
    ("localize-json-is-recipe", nothing, lambda w: ["localize", w.recipe, "--json", w.recipe], "is the input"),
    ("card-on-a-model-folder", nothing, lambda w: ["card", w.base], "holds no patch.json"),
    ("sae-train-out-is-model", nothing, lambda w: ["sae", "train", "--model", w.base, "--layers", "1", "--out", w.base, "--overwrite"], "is the source model"),
    ("sae-train-out-inside-model", nothing, lambda w: ["sae", "train", "--model", w.base, "--layers", "1", "--out", w.base / "s"], "sits inside the source model"),
    ("sae-train-out-in-data-dir", nothing, lambda w: ["sae", "train", "--model", w.base, "--layers", "1", "--data-dir", w.recipe.parent,
                                                       "--out", w.recipe.parent / "s"], "sits inside the input"),
    ("sae-train-foreign-folder", mkdir_with("out"), lambda w: ["sae", "train", "--model", w.base, "--layers", "1", "--out", w.out, "--overwrite"],
     "only a folder patcher wrote"),
    ("sae-train-existing-no-overwrite", mkdir_with("out"), lambda w: ["sae", "train", "--model", w.base, "--layers", "1", "--out", w.out], "already exists"),
    ("sae-train-layer-out-of-range", nothing, lambda w: ["sae", "train", "--model", w.base, "--layers", "7", "--out", w.out], "out of range"),
    ("sae-train-layers-not-numbers", nothing, lambda w: ["sae", "train", "--model", w.base, "--layers", "x", "--out", w.out], "give layer numbers"),
    ("sae-train-300-char-name", nothing, lambda w: ["sae", "train", "--model", w.base, "--layers", "1", "--out", w.work / LONG], "shorter --out"),
    ("sae-train-sequential", nothing, lambda w: ["sae", "train", "--model", w.base, "--layers", "1", "--out", w.out, "--sequential"],
     "cannot run with --sequential"),
    # 2. damaged safetensors headers and non-finite weights
    ("header-overlap", edit_header(_overlap), bake_args(), "overlaps"),
    ("header-negative-offset", edit_header(_negative), bake_args(), "byte range"),
    ("header-begin-after-end", edit_header(_reversed), bake_args(), "byte range"),
    ("header-shape-vs-bytes", edit_header(_shape), bake_args(), "needs"),
    ("header-unknown-dtype", edit_header(_dtype), bake_args(), "unknown dtype"),
    ("header-dtype-vs-bytes", edit_header(_dtype_size), bake_args(), "needs"),
    ("header-gap", edit_header(_gap), bake_args(), "gap"),
    ("header-trailing-bytes", trailing_bytes, bake_args(), "after the last tensor"),
    ("header-negative-dim", edit_header(_shape_negative), bake_args(), "non-negative integers"),
    ("header-float-dim", edit_header(_shape_float), bake_args(), "non-negative integers"),
    ("header-metadata-types", edit_header(_metadata), bake_args(), "__metadata__"),
    ("header-missing-offsets", edit_header(_missing_offsets), bake_args(), "data_offsets"),
    ("header-extra-key", edit_header(_extra_key), bake_args(), "exactly dtype"),
    ("header-not-object", header_not_object, bake_args(), "not a json object"),
    ("inf-in-untouched-tensor", poke("model.norm.weight", float("inf")), bake_args(), "model.norm.weight"),
    ("nan-in-untouched-tensor", poke("model.layers.1.input_layernorm.weight", float("nan")), bake_args(), "--allow-nonfinite"),
    ("nan-in-edited-tensor", poke(f"{DOWN0}.weight", float("nan")), bake_args(), "source checkpoint is damaged"),
    ("inf-in-edited-tensor-with-flag", poke(f"{DOWN0}.weight", float("-inf")), bake_args("work/out", "--allow-nonfinite"), f"{DOWN0}.weight"),
    # 3. malformed JSON
    ("config-not-json", write_file("base/config.json", "{not json"), bake_args(), "config.json is not valid JSON"),
    ("config-is-a-list", write_file("base/config.json", "[]"), bake_args(), "should hold a JSON object"),
    ("config-not-json-run", write_file("base/config.json", "{"), recipe_args("run"), "config.json is not valid JSON"),
    ("index-not-json", index_file("{"), bake_args(), "model.safetensors.index.json is not valid JSON"),
    ("index-no-weight-map", index_file({"weight_map": [1]}), bake_args(), "no weight_map"),
    ("index-shard-path", index_file({"weight_map": {"model.norm.weight": "../../etc/passwd"}}), bake_args(), "not a plain name"),
    ("patch-json-not-json", write_file("patch/patch.json", "{"), bake_args(), "not valid JSON"),
    ("patch-json-list", write_file("patch/patch.json", "[]"), bake_args(), "should hold a JSON object"),
    ("patch-edits-not-list", patch_json(lambda m: m.update(edits={"a": 1})), bake_args(), "edits is not a list"),
    ("patch-tensor-file-absolute", patch_json(lambda m: m.update(tensor_file="/etc/passwd")), bake_args(), "not a plain name"),
    ("patch-tensor-file-parent", patch_json(lambda m: m.update(tensor_file="../base/model.safetensors")), bake_args(), "not a plain name"),
    ("patch-hand-edited", patch_json(lambda m: m["edits"][0].update(module="model.layers.1.mlp.down_proj")), bake_args(), "hash to"),
    ("patch-no-hash", patch_json(lambda m: m.pop("patch_sha256")), bake_args(), "records no patch_sha256"),
    ("patch-module-not-string", patch_json(lambda m: m["edits"][0].update(module=3)), bake_args(), "module name"),
    ("patch-unknown-edit", patch_json(lambda m: m["edits"][0].update(type="rm_rf")), bake_args(), "unknown edit type"),
    ("patch-params-not-object", patch_json(lambda m: m["edits"][0].update(params=[1])), bake_args(), "params object"),
    ("patch-unknown-param", patch_json(lambda m: m["edits"][0].update(params={"evil": 1})), bake_args(), "unknown fields"),
    ("patch-provenance-type", patch_json(lambda m: m.update(provenance=[1])), bake_args(), "provenance"),
    # 4. recipe values
    ("recipe-batch-size-0", recipe_sub("batch_size = 8", "batch_size = 0"), recipe_args("run"), "collect.batch_size = 0 should be at least 1"),
    ("recipe-ppl-window-0", recipe_sub("ppl_window = 64", "ppl_window = 0"), recipe_args("run"), "check.ppl_window = 0"),
    ("recipe-ppl-tokens-neg", recipe_sub("ppl_tokens = 256", "ppl_tokens = -1"), recipe_args("run"), "check.ppl_tokens = -1"),
    ("recipe-padding-middle", recipe_sub("batch_size = 8", 'batch_size = 8\npadding_side = "middle"'), recipe_args("compute"), "one of 'right', 'left'"),
    ("recipe-trust-remote-code", recipe_sub("[data]", "trust_remote_code = true\n\n[data]"), recipe_args("run"), "--trust-remote-code"),
    ("recipe-n-per-class-0", recipe_sub("n_per_class = 20", "n_per_class = 0"), recipe_args("compute"), "data.n_per_class = 0"),
    ("recipe-model-dtype", recipe_sub("[data]", 'dtype = "float8"\n\n[data]'), recipe_args("compute"), "model.dtype"),
    ("recipe-table-not-table", _collect_not_table, recipe_args("compute"), "collect should be a table"),
    ("recipe-method-not-string", recipe_sub('method = "aura"', "method = 5"), recipe_args("compute"), "a string"),
    ("recipe-name-not-string", recipe_sub('name = "t"', "name = 1"), recipe_args("compute"), "name = 1 should be a string"),
    # 5. GGUF export (patcher export DIR, run --gguf): the GGUF is a new file inside a baked folder
    ("export-bad-outtype", _baked, export_args("--outtype", "q4_k"), "--outtype 'q4_k' is not a GGUF type patcher writes"),
    ("export-ternary-outtype", _baked, export_args("--outtype", "tq1_0"), "choose one of f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1"),
    ("export-outside-folder", _baked, export_args("--gguf", "{work}/x.gguf"), "is written inside the output folder"),
    ("export-into-source-model", _baked, export_args("--gguf", "{inp}/base/x.gguf"), "is written inside the output folder"),
    ("export-parent-name", _baked, export_args("--gguf", "../x.gguf"), "is written inside the output folder"),
    ("export-hidden-name", _baked, export_args("--gguf", ".x.gguf"), "should end in .gguf and not start with a dot"),
    ("export-not-gguf-name", _baked, export_args("--gguf", "config.json"), "should end in .gguf"),
    ("export-existing-output", _baked_with("model-f16.gguf"), export_args(), "already exists: choose another --gguf name or pass --overwrite"),
    ("export-overwrite-foreign", _baked_with("model-f16.gguf"), export_args("--overwrite"), "replaces only a GGUF patcher exported"),
    ("export-foreign-modelfile", _baked_with("model-f16.Modelfile"), export_args(), "Modelfile already exists and patcher did not write it"),
    ("export-not-baked", _baked, lambda w: ["export", w.base], "holds no patch.json"),
    ("export-tampered-folder", _baked_tampered, export_args(), "fails verification (model.safetensors)"),
    ("run-gguf-bad-type", lambda w: None, recipe_args("run", "work/out", "--gguf", "q4_k"), "--gguf 'q4_k' is not a GGUF type"),
    ("export-block-type-existing-output", _baked_with("model-q4_0.gguf"), export_args("--outtype", "q4_0"), "already exists: choose another --gguf name"),
    ("export-block-type-tampered-folder", _baked_tampered, export_args("--outtype", "q5_1"), "fails verification (model.safetensors)"),
    # 6. patcher tune's data choices ([tune.step.N] data): refused with their line or file, nothing written
    ("tune-data-choice-missing-file", recipe_append('[tune]\n[tune.step.1]\ndata = [{ path = "data.jsonl" }, { path = "missing.jsonl" }]\n'),
     recipe_args("tune", "work/t.toml", "--max-ppl-increase", "0.05"), "missing.jsonl: no such file"),
    ("tune-data-choice-not-tables", recipe_append('[tune]\n[tune.step.1]\ndata = ["data.jsonl", "other.jsonl"]\n'),
     recipe_args("tune", "work/t.toml", "--max-ppl-increase", "0.05"), "tune.step.1.data should list two or more data tables"),
    ("tune-data-choice-unknown-key", recipe_append('[tune]\n[tune.step.1]\ndata = [{ path = "data.jsonl" }, { pth = "x.jsonl" }]\n'),
     recipe_args("tune", "work/t.toml", "--max-ppl-increase", "0.05"), "unknown key tune.step.1.data.pth"),
]


@pytest.mark.parametrize("case", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault(case: tuple, world: World) -> None:
    _, setup, args, message = case
    setup(world)
    world.seal()
    assert_refused(world, args(world), message)


def test_fault_count() -> None:
    """The issue asks for at least 60 distinct faults (the OS faults below add more)."""
    assert len({f[0] for f in FAULTS}) == len(FAULTS) >= 60


# -- operating-system faults: disk full, read-only, immutable ----------------------------------
def test_disk_full_mid_bake(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from patcher.io import checkpoint

    real = checkpoint.ShardWriter._emit
    calls = []

    def emit(self, data):  # the first piece fits, then the disk is full
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, data)

    monkeypatch.setattr(checkpoint.ShardWriter, "_emit", emit)
    line = assert_refused(world, bake_args()(world), "No space left on device")
    assert "free some space" in line and "nothing was written" in line


def test_read_only_location(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile as tf

    def mkdtemp(*a, dir=None, **k):  # noqa: A002 - tempfile's own name
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tf, "mkdtemp", mkdtemp)
    assert_refused(world, bake_args()(world), "read-only")


def test_permission_denied(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.mkdir

    def mkdir(path, *a, **k):
        if "denied" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert_refused(world, bake_args("work/denied/out")(world), "Permission denied", out=world.work / "denied" / "out")


def test_immutable_output_location(world: World) -> None:
    """A real immutable folder (chattr +i): even root cannot create the staging folder in it."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    place = world.work / "frozen"
    place.mkdir()
    if subprocess.run(["chattr", "+i", str(place)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem or user cannot set the immutable attribute")
    try:
        assert_refused(world, bake_args("work/frozen/out")(world), "not permitted", out=place / "out")
        assert list(place.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(place)], check=True)


# -- a bake that works is still checked end to end ------------------------------------------------
def test_good_bake_records_no_absolute_path_and_verifies_from_elsewhere(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = cli(*bake_args()(world))
    assert code == 0, output
    text = (world.out / "patch.json").read_text()
    assert str(tmp_path) not in text and json.loads(text)["bake"]["base"]["local_path"] == "../../in/base"
    monkeypatch.chdir(tmp_path.parent)  # the recorded path is relative to the output, not to the working folder
    code, output = cli("verify", world.out, "--no-logits")
    assert code == 0 and "verify: OK" in output, output
    moved = tmp_path / "moved-base"
    shutil.move(world.base, moved)
    world.seal()
    code, output = cli("verify", world.out, "--no-logits")
    assert code == 2 and "--base" in output
    code, output = cli("verify", world.out, "--no-logits", "--base", moved)
    assert code == 0 and "verify: OK" in output, output


# -- verify and push check every file, the patch hash and the record --------------------------------
@pytest.fixture
def baked(world: World) -> Path:
    code, output = cli(*bake_args()(world))
    assert code == 0, output
    return world.out


@pytest.mark.parametrize("tamper, expected", [
    (lambda o: (o / "modeling_evil.py").write_text("import os"), "modeling_evil.py (not in the record)"),
    (lambda o: (o / "pytorch_model.bin").write_bytes(b"pickle"), "pytorch_model.bin (not in the record)"),
    (lambda o: (o / "patcher" / "extra.safetensors").write_bytes(b"x"), "patcher/extra.safetensors (not in the record)"),
    (lambda o: (o / "config.json").write_text("{}"), "config.json"),
    (lambda o: _drop_entry_and_swap(o, "tokenizer.json"), "tokenizer.json (not in the record)"),
    (lambda o: _hand_edit_patch(o), "patch_sha256"),
], ids=["added-py", "added-bin", "added-in-subfolder", "changed-file", "swapped-and-unlisted", "patch-hash"])
def test_verify_and_push_refuse_tampering(baked: Path, world: World, tamper, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_files(baked) == []
    tamper(baked)
    assert expected in check_files(baked)
    code, output = cli("verify", baked, "--no-logits")
    assert code == 1 and "verify: FAILED" in output and expected in output, output
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("push reached the Hub client")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    for extra in ([], ["--dry-run"]):
        before = tree_hash(baked)
        code, output = cli("push", baked, "someone/x", *extra)
        assert code == 2 and "fails verification" in output and len(output.strip().splitlines()) == 1, output
        assert tree_hash(baked) == before  # no card written into a folder that failed


def _drop_entry_and_swap(out: Path, name: str) -> None:
    meta = json.loads((out / "patch.json").read_text())
    del meta["bake"]["files"][name]
    (out / "patch.json").write_text(json.dumps(meta))
    (out / name).write_text('{"swapped": true}')


def _hand_edit_patch(out: Path) -> None:
    meta = json.loads((out / "patch.json").read_text())
    meta["edits"][0]["module"] = "model.layers.1.mlp.down_proj"
    (out / "patch.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["bake"].update(files=["model.safetensors"]), "bake.files"),
    (lambda m: m["bake"]["files"].update({"/etc/passwd": "0" * 64}), "not a plain name"),
    (lambda m: m["bake"].update(patch_sha256=5), "patch_sha256"),
    (lambda m: m["bake"].update(untied_embeddings="no"), "untied_embeddings"),
    (lambda m: m["bake"]["base"].pop("fingerprint"), "fingerprint"),
    (lambda m: m.update(bake=[]), "bake is not an object"),
], ids=["files-list", "files-absolute", "hash-type", "untied-type", "no-fingerprint", "bake-list"])
@pytest.mark.parametrize("command", [["verify", "--no-logits"], ["card"], ["push", "--dry-run"]])
def test_ill_typed_record_is_one_line(baked: Path, change, message: str, command: list[str]) -> None:
    f = baked / "patch.json"
    meta = json.loads(f.read_text())
    change(meta)
    f.write_text(json.dumps(meta))
    args = [command[0], baked, *(["someone/x"] if command[0] == "push" else []), *command[1:]]
    code, output = cli(*args)
    assert code == 2 and message in output and len(output.strip().splitlines()) == 1, output
    assert not (baked / "README.md").exists()


# -- leftovers: stale partial folders and collection state ------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_partial_and_old_folders_removed_by_next_run(world: World) -> None:
    pid = dead_pid()
    for name in (f".out.partial-{pid}-abc", f".out.old-{pid}-def"):
        (world.work / name).mkdir()
        (world.work / name / "model.safetensors").write_bytes(b"x" * 1000)
    code, output = cli(*bake_args()(world))
    assert code == 0, output
    assert output.count(f"left by process {pid} (no longer running)") == 2
    assert sorted(p.name for p in world.work.iterdir()) == ["out"]


def test_collection_state_of_dead_process_removed_and_said(world: World) -> None:
    state = world.work / "out.collect-state"
    (state / "c00-r0of1").mkdir(parents=True)
    (state / "owner.json").write_text(json.dumps({"pid": dead_pid()}))
    (state / "c00-r0of1" / "meta.json").write_text(json.dumps({"key": "other", "parts": [], "done": 3}))
    code, output = cli("compute", world.recipe, "--out", world.out)
    assert code == 0, output
    assert "removed the collection state" in output and "no longer running" in output
    assert sorted(p.name for p in world.work.iterdir()) == ["out"]


def test_collection_state_of_live_process_refused(world: World) -> None:
    state = world.work / "out.collect-state"
    state.mkdir()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (state / "owner.json").write_text(json.dumps({"pid": sleeper.pid}))
        code, output = cli("compute", world.recipe, "--out", world.out)
        assert code == 2 and f"pid {sleeper.pid}" in output and not world.out.exists()
        assert (state / "owner.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_failed_run_removes_state_it_cannot_resume(world: World) -> None:
    """The perplexity gate fails after the collection finished: the state is removed, and said so."""
    text = world.recipe.read_text().replace("max_ppl_increase = 100.0", "max_ppl_increase = -0.99")
    world.recipe.write_text(text)
    world.seal()
    code, output = cli("run", world.recipe, "--out", world.out, "--checkpoint-every", "1")
    assert code == 2 and "over the recipe's budget" in output
    assert "removed the collection state" in output
    assert list(world.work.iterdir()) == []


def test_collection_cut_short_keeps_state_for_resume(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from patcher.collect import resume

    real = resume.CollectState.save
    saves = []

    def save(self, *a, **k):
        saves.append(1)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.folder))
        return real(self, *a, **k)

    monkeypatch.setattr(resume.CollectState, "save", save)
    code, output = cli("compute", world.recipe, "--out", world.out, "--checkpoint-every", "1")
    assert code == 2 and "No space left" in output
    assert "kept the collection state" in output and "--resume" in output
    assert sorted(p.name for p in world.work.iterdir()) == ["out.collect-state"]
    monkeypatch.setattr(resume.CollectState, "save", real)
    code, output = cli("compute", world.recipe, "--out", world.out, "--checkpoint-every", "1", "--resume")
    assert code == 0 and "resumed after 1 batches" in output, output
    assert sorted(p.name for p in world.work.iterdir()) == ["out"]


# -- kill -9 at random moments of a multi-shard bake ------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llama in 8 shards (big enough that a bake takes a measurable time) and a patch."""
    root = tmp_path_factory.mktemp("sharded")
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "base", max_shard_size="2MB")
    gen = torch.Generator().manual_seed(1)
    edits = [ScaleOutputs(f"model.layers.{i}.mlp.{m}", factors=torch.rand(n, generator=gen))
             for i in range(4) for m, n in (("down_proj", 256), ("up_proj", 1024))]
    Patch(edits).save(root / "patch")
    return root / "base", root / "patch"


def _bake_in_child(args: list[str], err: Path | None = None) -> int:
    """Fork; the child runs the CLI (this process has patcher imported: no start-up cost) and
    exits with its status. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if err is not None:  # pytest has replaced sys.stderr: the child writes to its own file
                sys.stdout = sys.stderr = open(err, "w", buffering=1)  # noqa: SIM115 - the child exits below
            main(args, standalone_mode=False)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - the child must never return into pytest
            code = 3
        finally:
            os._exit(code)
    return pid


def test_kill_9_at_random_moments(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    base, patch = sharded
    assert len(list(base.glob("model-*.safetensors"))) >= 8
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code, output = cli("-q", "bake", patch, "--model", base, "--out", tmp_path / "timing")
    span = time.perf_counter() - t0
    assert code == 0, output
    shutil.rmtree(tmp_path / "timing")
    rng = random.Random(0)
    before = tree_hash(base)
    outcomes = {"killed before publishing": 0, "finished": 0}
    for _ in range(20):
        pid = _bake_in_child(["-q", "bake", str(patch), "--model", str(base), "--out", str(out), "--overwrite"])
        time.sleep(rng.uniform(0, span * 1.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # never a partial output: either absent or complete and verified
        if out.exists():
            assert check_files(out) == []
        outcomes["finished" if out.exists() else "killed before publishing"] += 1
        # the next run on the same output removes what the killed one left, and says so
        partials = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
        outcomes["left partial folders"] = outcomes.get("left partial folders", 0) + bool(partials)
        code, output = cli("-q", "bake", patch, "--model", base, "--out", out, "--overwrite")
        assert code == 0, output
        assert output.count("no longer running") == len(partials)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "leftovers after the next run"
        assert check_files(out) == []
        shutil.rmtree(out)
    assert tree_hash(base) == before
    assert outcomes["killed before publishing"] > 0 and outcomes["left partial folders"] > 0, outcomes


# -- two writers, one output ---------------------------------------------------------------------
def test_concurrent_writers_one_wins_the_other_says_so(sharded: tuple[Path, Path], tmp_path: Path) -> None:
    """Both bakes pass the early check (no output yet) and finish their staging folder before
    either publishes (a barrier holds them): exactly one publishes, the other exits 2 and says why."""
    import multiprocessing

    from patcher.io import folders

    base, patch = sharded
    other = tmp_path / "patch2"
    p2 = Patch.load(patch)
    p2.edits = p2.edits[:1]
    p2.save(other)
    out = tmp_path / "out"
    barrier = multiprocessing.get_context("fork").Barrier(2)
    real = folders.move_into_place

    def wait_then_move(*a, **k):
        barrier.wait(timeout=60)
        return real(*a, **k)

    folders.move_into_place = wait_then_move
    try:
        pids = [_bake_in_child(["-q", "bake", str(p), "--model", str(base), "--out", str(out)], tmp_path / f"err{i}.txt")
                for i, p in enumerate((patch, other))]
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    finally:
        folders.move_into_place = real
    assert sorted(codes) == [0, 2], codes
    loser = codes.index(2)
    err = (tmp_path / f"err{loser}.txt").read_text()
    assert "appeared while this run was writing it" in err and "--overwrite" in err
    winner = (patch, other)[codes.index(0)]
    assert check_files(out) == [] and Patch.load(out).hash() == Patch.load(winner).hash()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_lock_fallback_refuses_a_folder_that_appeared(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is missing (ENOSYS) the parent-folder lock decides, with the same result."""
    from patcher.bake import writer
    from patcher.io import folders

    def no_renameat2(src, dst):
        raise OSError(errno.ENOSYS, "renameat2 not available")

    real = writer.write_bake

    def racing_write(patch, prep, tmp, out, **k):  # another writer publishes while this one writes
        real(patch, prep, tmp, out, **k)
        shutil.copytree(tmp, out)

    monkeypatch.setattr(folders, "_renameat2", no_renameat2)
    monkeypatch.setattr(writer, "write_bake", racing_write)
    code, output = cli(*bake_args()(world))
    assert code == 2 and "appeared while this run was writing it" in output
    assert sorted(p.name for p in world.work.iterdir()) == ["out"]  # the other writer's output, intact
    assert check_files(world.out) == []


# -- remote code -----------------------------------------------------------------------------------
def test_py_files_copied_only_with_trust_remote_code(world: World) -> None:
    (world.base / "modeling_custom.py").write_text("print('code ran')\n")
    world.seal()
    code, output = cli(*bake_args()(world))
    assert code == 0, output
    assert not list(world.out.glob("*.py"))
    code, output = cli(*bake_args("work/trusted", "--trust-remote-code")(world))
    assert code == 0, output
    assert (world.work / "trusted" / "modeling_custom.py").is_file()
    assert check_files(world.work / "trusted") == []


def test_hub_patterns_never_match_python_files() -> None:
    from fnmatch import fnmatch

    from patcher.io.model_files import HUB_PATTERNS

    for name in ("tokenizer.py", "tokenization_evil.py", "tokenizer_config.py", "modeling_x.py", "pytorch_model.bin", "model.pt"):
        assert not any(fnmatch(name, p) for p in HUB_PATTERNS), name
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "model-00001-of-00002.safetensors", "merges.txt"):
        assert any(fnmatch(name, p) for p in HUB_PATTERNS), name


def test_trust_remote_code_reaches_the_loader_only_from_the_flag(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from patcher.collect import layerwise

    seen = []

    def fake_load(folder, dtype, device, trust_remote_code=False, **k):
        seen.append(trust_remote_code)
        raise OSError(errno.EIO, "stop here", str(folder))

    monkeypatch.setattr(layerwise, "load_model", fake_load)  # what every model-loading command calls (through load_placed)
    for flag in ([], ["--trust-remote-code"]):
        code, output = cli("compute", world.recipe, "--out", world.out, "--checkpoint-every", "0", *flag)
        assert code == 2 and "stop here" in output
    assert seen == [False, True]


# -- the package itself ----------------------------------------------------------------------------
PACKAGE = Path(__file__).resolve().parents[1] / "patcher"


EMITTERS = {"print", "echo", "secho", "debug", "info", "warning", "error", "exception", "critical", "warn", "write"}
SECRETS = {"environ", "getenv", "get_token", "_known_token", "token", "hf_token"}


def findings(src: str, where: str) -> list[str]:
    """Grep-style over one module's syntax tree: print / echo / log calls that mention a token or
    the environment, and trust_remote_code set True by default or by a literal argument."""
    import ast

    bad = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call):
            fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fn in EMITTERS:
                for arg in [*node.args, *(k.value for k in node.keywords)]:
                    for sub in ast.walk(arg):
                        name = sub.id if isinstance(sub, ast.Name) else sub.attr if isinstance(sub, ast.Attribute) else ""
                        if name.lower() in SECRETS:
                            bad.append(f"{where}:{node.lineno} {fn}(... {name} ...)")
            for k in node.keywords:
                if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True:
                    bad.append(f"{where}:{node.lineno} trust_remote_code=True")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args
            defaults = [None] * (len(args) - len(node.args.defaults)) + list(node.args.defaults)
            pairs = list(zip(args, defaults)) + list(zip(node.args.kwonlyargs, node.args.kw_defaults))
            for a, d in pairs:
                if a.arg == "trust_remote_code" and isinstance(d, ast.Constant) and d.value is not False:
                    bad.append(f"{where}:{node.lineno} def {node.name}(trust_remote_code={d.value})")
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "trust_remote_code":
            if node.value is not None and "True" in ast.unparse(node.value):
                bad.append(f"{where}:{node.lineno} trust_remote_code default True")
    return bad


def test_no_token_printed_and_no_trusting_default() -> None:
    bad = [f for path in sorted(PACKAGE.rglob("*.py")) for f in findings(path.read_text(), str(path.relative_to(PACKAGE)))]
    assert len(list(PACKAGE.rglob("*.py"))) > 40
    assert bad == []


@pytest.mark.parametrize("planted", [
    "import os\nprint(os.environ['HF_TOKEN'])\n",
    "import logging\nlog = logging.getLogger()\ndef f(token):\n    log.info('using %s', token)\n",
    "import click\nfrom huggingface_hub import get_token\nclick.echo(get_token())\n",
    "def load(folder, trust_remote_code=True):\n    pass\n",
    "def load(folder, *, trust_remote_code=True):\n    pass\n",
    "m.from_pretrained(p, trust_remote_code=True)\n",
    "class S:\n    trust_remote_code: bool = setting(True, help='x')\n",
])
def test_the_grep_finds_what_it_looks_for(planted: str) -> None:
    """The check above can fail: each planted leak or trusting default is found."""
    assert findings(planted, "planted")


def test_shards_and_base_untouched_by_every_successful_command(world: World) -> None:
    """compute, bake, verify, card and a dry-run push, one after the other: the inputs stay as they were."""
    before = tree_hash(world.inp)
    assert cli("compute", world.recipe, "--out", world.work / "p")[0] == 0
    assert cli("bake", world.work / "p", "--model", world.base, "--out", world.out)[0] == 0
    assert cli("verify", world.out, "--no-logits")[0] == 0
    assert cli("card", world.out)[0] == 0
    code, output = cli("push", world.out, "someone/x", "--dry-run")
    assert code == 0, output
    assert tree_hash(world.inp) == before
    assert str(world.inp) not in (world.out / "README.md").read_text()


def test_relative_paths_never_rewrite_a_path_twice(tmp_path: Path) -> None:
    """An absolute path that also ends a relative path already in the record (the base model's
    ``local_path`` beside the recipe's model id) is rewritten once, where it starts a word."""
    from patcher.io.record import relative_paths

    base = str((tmp_path / "cache" / "model").resolve())
    out = tmp_path / "runs" / "out"
    rel = relative_paths({"id": base, "local_path": "../../cache/model", "text": f'id = "{base}"'}, out)
    assert rel == {"id": "../../cache/model", "local_path": "../../cache/model", "text": 'id = "../../cache/model"'}


def test_relative_paths_rewrite_a_path_only_inside_a_sentence(tmp_path: Path) -> None:
    """A local path that appears only inside a message (a recipe refused with 'SAE /home/me/saes/x
    reads 576-dim ...', kept in a results file) is published relative too; fractions, URLs and paths
    whose top folder does not exist on this machine are left alone."""
    from patcher.io.record import relative_paths

    sae = tmp_path / "saes" / "m" / "layer-12"
    out = tmp_path / "results"
    msg = f"SAE {sae} reads 576-dim activations. Also {sae}."
    got = relative_paths({"refused": msg, "n": "1/16 of https://hf.co/a/b and /no-such-top-folder/x/y"}, out)
    assert got["refused"] == "SAE ../saes/m/layer-12 reads 576-dim activations. Also ../saes/m/layer-12."
    assert got["n"] == "1/16 of https://hf.co/a/b and /no-such-top-folder/x/y"
    assert str(tmp_path) not in json.dumps(got)
