"""Models and devices: dtype names, device names, accelerate device maps, and loading a local model
folder with its tokenizer.

Every layer that runs a model gets it from here, so a dtype, a device or a device map has one
spelling and one error message everywhere. Where a folder comes from (the embedded default, the
Hub) is `patcher.io.model_files`; this module only reads local folders.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from .errors import PatcherError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
MAX_MEMORY_HELP = "write DEVICE=SIZE pairs separated by commas, e.g. --max-memory 0=70GiB,1=70GiB,cpu=100GiB"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name, or a one-line error listing the names."""
    if name not in DTYPES:
        raise PatcherError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PatcherError(f"device {device!r} requested but no CUDA GPU is visible: use --device cpu")
    if device != "cpu" and not device.startswith(("cuda", "mps")):
        raise PatcherError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto")
    return device


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def parse_max_memory(spec: str | None) -> dict[int | str, int] | None:
    """``"0=70GiB,cpu=100GiB"`` -> ``{0: bytes, "cpu": bytes}``; every GPU index must be visible."""
    if spec is None or not spec.strip():
        return None
    out: dict[int | str, int] = {}
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise PatcherError(f"--max-memory {spec!r}: {part.strip()!r} is not DEVICE=SIZE; {MAX_MEMORY_HELP}")
        try:
            size = parse_size(value)
        except ValueError:
            raise PatcherError(f"--max-memory {spec!r}: size {value.strip()!r} is not a size like 70GiB, 500MB or 1e9 bytes; {MAX_MEMORY_HELP}") from None
        if key == "cpu":
            out["cpu"] = size
            continue
        index = key.removeprefix("cuda:")
        if not index.isdigit():
            raise PatcherError(f"--max-memory {spec!r}: unknown device {key!r}: use a GPU index (0, 1, ...) or cpu; {MAX_MEMORY_HELP}")
        if int(index) >= n_gpu:
            seen = f"GPUs 0-{n_gpu - 1} are visible" if n_gpu else "no CUDA GPU is visible"
            raise PatcherError(f"--max-memory names GPU {index}, which does not exist ({seen}): list only visible GPUs, or give only cpu=SIZE")
        out[int(index)] = size
    return out


def device_map_kwargs(device_map: str, max_memory: str | None) -> dict[str, Any]:
    """``device_map`` and ``max_memory`` for ``from_pretrained`` (accelerate's placement over the
    visible GPUs, then CPU memory, then disk), checked: a bad value is a PatcherError."""
    kw: dict[str, Any] = {}
    dm = device_map.strip()
    if dm in DEVICE_MAPS:
        kw["device_map"] = dm
    else:
        try:
            kw["device_map"] = {"": resolve_device(dm)}
        except PatcherError:
            raise PatcherError(f"--device-map {device_map!r}: use {', '.join(DEVICE_MAPS)}, or one device (cpu, cuda:N)") from None
        if dm.startswith("cuda:") and int(dm.split(":")[1] or 0) >= torch.cuda.device_count():
            raise PatcherError(f"--device-map {device_map!r}: GPU {dm.split(':')[1]} does not exist ({torch.cuda.device_count()} visible): pick a visible GPU")
    mm = parse_max_memory(max_memory)
    if mm is not None:
        if dm in DEVICE_MAPS and "cpu" not in mm:
            mm["cpu"] = _total_ram()
        kw["max_memory"] = mm
    return kw


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def _load_with_device_map(folder: Path, dtype: torch.dtype, device_map: str, max_memory: str | None, trust_remote_code: bool,
                          offload_folder: str | Path | None = None) -> Any:
    """``from_pretrained`` across devices; a temporary offload folder (none given) is removed with
    the model, inside a given one patcher makes its own temporary folder, removed the same way."""
    from transformers import AutoModelForCausalLM

    kw = device_map_kwargs(device_map, max_memory)
    if offload_folder is not None:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    kw["offload_folder"] = tempfile.mkdtemp(prefix="patcher-offload-", dir=offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    except (ValueError, RuntimeError) as exc:
        shutil.rmtree(kw["offload_folder"], ignore_errors=True)
        raise PatcherError(f"loading with --device-map {device_map} failed ({str(exc).splitlines()[0][:200]}): check --max-memory") from None
    weakref.finalize(model, shutil.rmtree, kw["offload_folder"], True)
    return model.eval()


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its first placed module under an accelerate device
    map (a CPU- or disk-offloaded module takes its inputs on the CPU), else its parameters' device."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        first = next(iter(placed.values()))
        if isinstance(first, int):
            return torch.device(f"cuda:{first}")
        return torch.device("cpu" if first in ("cpu", "disk") else first)
    return next(model.parameters()).device


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer with a pad token (its eos token when it has none): every batch here pads."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise PatcherError(f"the tokenizer of {folder} has neither a pad nor an eos token: add a pad token to it")
        tok.pad_token = tok.eos_token
    return tok


def load_model(folder: Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
               device_map: str | None = None, max_memory: str | None = None, offload_folder: str | Path | None = None,
               tokenizer: bool = True) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with a pad token) from a local folder; with ``device_map``
    (``auto``, ...) accelerate places it over GPUs, CPU and disk (``offload_folder``) within ``max_memory``.
    ``tokenizer=False``: no tokenizer (None), for a check that feeds token ids."""
    from transformers import AutoModelForCausalLM

    torch_type = torch_dtype(dtype)
    try:
        if device_map:
            model = _load_with_device_map(folder, torch_type, device_map, max_memory, trust_remote_code, offload_folder)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_type, trust_remote_code=trust_remote_code)
            model = model.to(resolve_device(device)).eval()
        tok = load_tokenizer(folder, trust_remote_code) if tokenizer else None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PatcherError(f"cannot load {folder} as a causal LM with its tokenizer ({first}): give a model folder with tokenizer files") from None
    return model, tok
