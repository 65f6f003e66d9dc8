"""Safetensors checkpoints read lazily and written atomically.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor), then raw bytes. `Checkpoint` parses only the headers (like mergekit's
``ShardedTensorIndex``), so opening a 40B model costs milliseconds, and it checks that every byte
range lies inside its file, which catches truncated shards before anything is written.

`ShardWriter` writes one output shard tensor by tensor: untouched tensors are copied as raw bytes
and never decoded; edited tensors arrive as bytes already cast back to their stored dtype. Every
piece is hashed (sha256) between its read and its write, while it is in the CPU cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import PatcherError
from .record import plain_name, read_json_object

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLED_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
# Files copied from the source model into the output: configs and tokenizer, never pickles or weights.
# The model's own code (``.py``) is copied only with --trust-remote-code.
SIDECAR_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")
CODE_SUFFIX = ".py"
LICENSE_FILES = ("LICENSE", "LICENSE.md", "NOTICE", "NOTICE.md", "GEMMA_TERMS.html")  # copied beside the weights too
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    start: int  # absolute byte offset in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardHeader:
    name: str
    size: int
    data_start: int
    metadata: dict[str, str] | None
    tensors: tuple[TensorInfo, ...]  # in file order


def _header_fault(path: Path, fault: str) -> PatcherError:
    return PatcherError(f"{path} has a damaged safetensors header ({fault}): re-download or re-save the model; patcher writes nothing from it")


def read_shard_header(path: Path) -> ShardHeader:
    """Parse one safetensors header and validate all of it before anything is written: the header
    is a JSON object; every entry has a known dtype, a shape of non-negative integers and integer
    offsets with 0 <= begin <= end; its byte length is prod(shape) * itemsize; the byte ranges,
    sorted, start at 0, touch without gap or overlap and end exactly at the end of the file (as the
    format requires). A checkpoint that breaks any of these would be copied into a silently
    corrupt output, because the copy path trusts the header."""
    size = path.stat().st_size
    fix = f"re-download or re-save the model; {path.name} is damaged"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise PatcherError(f"{path} is truncated (no safetensors header): {fix}")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise PatcherError(f"{path} has a corrupt safetensors header (length {n} for a {size}-byte file): {fix}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PatcherError(f"{path} has a corrupt safetensors header (not JSON): {fix}") from None
    if not isinstance(header, dict):
        raise _header_fault(path, "not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise _header_fault(path, "__metadata__ is not a table of strings")
    data_start = 8 + n
    tensors = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _header_fault(path, f"entry {name!r} should hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise _header_fault(path, f"tensor {name} has unknown dtype {dtype!r}; known: {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _header_fault(path, f"tensor {name} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise _header_fault(path, f"tensor {name} has data_offsets {offsets!r}, not two integers")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise _header_fault(path, f"tensor {name} has byte range [{begin}, {end})")
        want = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != want:
            raise _header_fault(path, f"tensor {name} has {end - begin} bytes, but shape {shape} of {dtype} needs {want}")
        t = TensorInfo(name, dtype, tuple(shape), path.name, data_start + begin, data_start + end)
        if t.end > size:
            raise PatcherError(f"{path} is truncated: tensor {name} ends at byte {t.end}, the file has {size}: {fix}")
        tensors.append(t)
    tensors.sort(key=lambda t: (t.start, t.end))
    pos = data_start
    for t in tensors:
        if t.start != pos:
            fault = f"tensor {t.name} overlaps the one before it" if t.start < pos else f"a gap of {t.start - pos} bytes before tensor {t.name}"
            raise _header_fault(path, fault)
        pos = t.end
    if pos != size:
        raise _header_fault(path, f"{size - pos} bytes after the last tensor")
    return ShardHeader(path.name, size, data_start, metadata, tuple(tensors))


@dataclass(frozen=True)
class Checkpoint:
    """A local model folder: its config, and the headers of its safetensors shards."""

    folder: Path
    config: dict[str, Any]
    shards: dict[str, ShardHeader]
    index: dict[str, Any] | None

    @classmethod
    def open(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise PatcherError(f"model folder {folder} does not exist: pass a local folder, a Hub id, or `smollm2-135m`")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise PatcherError(f"{folder} has no config.json: point --model at a Hugging Face model folder")
        config = read_json_object(config_path, "re-download the model or repair its config.json")
        index = None
        if (folder / INDEX_NAME).is_file():
            index = read_json_object(folder / INDEX_NAME, "re-download the model or delete the index of a one-file model")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise PatcherError(f"{folder / INDEX_NAME} has no weight_map of tensor names to shard files: re-download the model")
            shard_names = sorted(set(weight_map.values()))
            for s in shard_names:
                plain_name(s, folder / INDEX_NAME)
                if not (folder / s).is_file():
                    raise PatcherError(f"{folder / INDEX_NAME} names shard {s}, which is missing: re-download the model")
        elif (folder / SINGLE_NAME).is_file():
            shard_names = [SINGLE_NAME]
        else:
            pickled = [p for p in PICKLED_NAMES if (folder / p).exists()] + [p.name for p in folder.glob("*.bin")]
            if pickled:
                raise PatcherError(
                    f"{folder} holds only pickled weights ({pickled[0]}); patcher never unpickles weights: convert with "
                    "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)` in a trusted environment"
                )
            raise PatcherError(f"{folder} holds no model.safetensors or {INDEX_NAME}: is it a model folder?")
        shards = {s: read_shard_header(folder / s) for s in shard_names}
        ckpt = cls(folder, config, shards, index)
        if index is not None:
            names = {t.name: t.shard for t in ckpt.tensors()}
            for name, shard in index.get("weight_map", {}).items():
                if names.get(name) != shard:
                    raise PatcherError(f"{folder / INDEX_NAME} maps {name} to {shard}, which does not hold it: re-download the model")
        return ckpt

    def tensors(self) -> Iterator[TensorInfo]:
        for s in self.shards.values():
            yield from s.tensors

    def tensor_map(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors()}

    def read(self, info: TensorInfo) -> torch.Tensor:
        """One tensor, read from disk into its stored dtype."""
        buf = bytearray(info.nbytes)
        with open(self.folder / info.shard, "rb") as f:
            f.seek(info.start)
            f.readinto(buf)
        if not buf:
            return torch.empty(info.shape, dtype=SAFETENSORS_DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[info.dtype]).reshape(info.shape)

    def read_blocks(self, info: TensorInfo, block_bytes: int) -> Iterator[torch.Tensor]:
        """A 2-D tensor's rows, read in blocks of about ``block_bytes`` into one reused buffer:
        each block is valid until the next is read. Streaming an edit through cache-sized blocks
        is several times faster than converting a whole tensor (no page faults, no large temporaries)."""
        rows = info.shape[0]
        row_bytes = info.nbytes // rows
        step = max(1, block_bytes // row_bytes)
        buf = torch.empty((min(step, rows), *info.shape[1:]), dtype=SAFETENSORS_DTYPES[info.dtype])
        with open(self.folder / info.shard, "rb", buffering=0) as f:
            for r in range(0, rows, step):
                block = buf[: min(step, rows - r)]
                view = tensor_bytes(block)
                if os.preadv(f.fileno(), [view], info.start + r * row_bytes) != view.nbytes:
                    raise PatcherError(f"{self.folder / info.shard} ended inside {info.name}: was it changed during the bake?")
                yield block

    def fingerprint(self) -> str:
        """sha256 over every shard's header and size: identifies tensor names, shapes, dtypes and
        layout without reading the weights (a full content hash would double the bake time)."""
        h = hashlib.sha256()
        for name, s in sorted(self.shards.items()):
            h.update(f"{name}:{s.size}:".encode())
            with open(self.folder / name, "rb") as f:
                h.update(f.read(s.data_start))
        return h.hexdigest()

    def sidecar_files(self, code: bool = False) -> list[Path]:
        """Config, generation config and tokenizer files to copy beside the output weights; the
        model's own Python files (``*.py``) only with ``code`` (``--trust-remote-code``)."""
        skip = {INDEX_NAME, "patch.json", "patcher-embedded.json"}
        suffixes = SIDECAR_SUFFIXES + ((CODE_SUFFIX,) if code else ())
        return sorted(
            p for p in self.folder.iterdir()
            if p.is_file() and (p.suffix in suffixes or p.name in LICENSE_FILES) and p.name not in skip and not p.name.startswith(".")
        )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them (no copy when the tensor
    is already contiguous on the CPU)."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def has_nonfinite(raw: memoryview | torch.Tensor, dtype: str) -> bool:
    """Whether raw little-endian values of safetensors ``dtype`` hold a NaN or an infinity. One
    min/max pass (NaN propagates through both; a sum could overflow), about a tenth of the cost of
    the sha256 every byte already goes through; float8 by bit pattern."""
    if dtype not in FLOAT_DTYPES:
        return False
    t = raw if isinstance(raw, torch.Tensor) else torch.frombuffer(raw, dtype=torch.uint8)
    if t.numel() == 0:
        return False
    if dtype == "F8_E4M3":  # no infinities; NaN is S.1111.111
        return bool(t.view(torch.uint8).bitwise_and(0x7F).eq(0x7F).any())
    if dtype == "F8_E5M2":  # exponent all ones: inf or NaN
        return bool(t.view(torch.uint8).bitwise_and(0x7C).eq(0x7C).any())
    lo, hi = torch.aminmax(t.view(SAFETENSORS_DTYPES[dtype]))
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))


class NonFinite(PatcherError):
    """A source tensor holds NaN or inf."""


class ShardWriter:
    """Writes one safetensors file tensor by tensor, in header order, hashing every byte it writes.

    Untouched tensors are copied from ``source`` as raw bytes (consecutive tensors merge into one
    span) through one small buffer: each piece is read, hashed while it sits in the CPU cache, and
    written, so the bytes are never decoded and the sha256 costs no second read. Edited tensors
    arrive as chunks of bytes. One writer belongs to one thread; `bake` runs shards in parallel."""

    PIECE = 1 << 20

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, str, tuple[int, ...], int]],
        metadata: dict[str, str] | None,
        source: Path | None = None,
        check_finite: bool = True,
    ):
        """``entries``: (name, dtype, shape, nbytes) in the order the tensors will be written;
        ``source``: the shard that `copy_range` copies from; ``check_finite``: refuse (`NonFinite`)
        a copied float tensor holding NaN or inf, naming it."""
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
        self.path = path
        self._expected = [(name, nbytes) for name, _, _, nbytes in entries]
        self._src = open(source, "rb", buffering=0) if source is not None else None
        try:
            self._f = open(path, "wb", buffering=0)
        except BaseException:
            if self._src is not None:
                self._src.close()
            raise
        self._sha = hashlib.sha256()
        self._buf = memoryview(bytearray(self.PIECE))
        self._span: list[int] | None = None  # [start, end) of source bytes not copied yet
        self._check = check_finite
        self._segments: list[tuple[int, int, str, str]] = []  # (start, end, dtype, name) of the span's float tensors
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _emit(self, data: memoryview | bytes) -> None:
        self._flush_span()
        view = memoryview(data).cast("B")
        self._sha.update(view)
        while view.nbytes:
            n = self._f.write(view)
            view = view[n:]

    def _next(self, name: str, nbytes: int) -> None:
        want = self._expected.pop(0) if self._expected else None
        if want != (name, nbytes):
            raise RuntimeError(f"shard writer expected {want}, got {(name, nbytes)}")

    def write_bytes(self, name: str, nbytes: int, chunks: Iterable[memoryview]) -> None:
        """Write one tensor's ``nbytes`` raw bytes, arriving in order as ``chunks`` (each written
        before the next is asked for, so a producer may reuse one buffer)."""
        self._next(name, nbytes)
        written = 0
        for chunk in chunks:
            self._emit(chunk)
            written += chunk.nbytes
        if written != nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, the header says {nbytes}")

    def copy_range(self, name: str, start: int, nbytes: int, dtype: str = "") -> None:
        """Copy a tensor's raw bytes (``nbytes`` from offset ``start`` of the source shard) without
        decoding them; a float ``dtype`` has them checked for NaN and inf on the way."""
        if self._src is None:
            raise RuntimeError("shard writer has no source file to copy from")
        self._next(name, nbytes)
        if self._span is not None and self._span[1] == start:
            self._span[1] += nbytes
        else:
            self._flush_span()
            self._span = [start, start + nbytes]
        if self._check and dtype in FLOAT_DTYPES and nbytes:
            self._segments.append((start, start + nbytes, dtype, name))

    def _flush_span(self) -> None:
        if self._span is None:
            return
        start, end = self._span
        segments, self._segments = self._segments, []
        self._span = None
        seg = 0
        while start < end:
            stop = min(start + self.PIECE, end)
            while seg < len(segments) and segments[seg][1] <= start:
                seg += 1
            if seg < len(segments) and segments[seg][0] < stop < segments[seg][1]:  # end the piece on a whole element
                s0, _, dtype, _ = segments[seg]
                item = SAFETENSORS_DTYPES[dtype].itemsize
                stop = max(start + item, stop - (stop - s0) % item)
            piece = self._buf[: stop - start]
            n = os.preadv(self._src.fileno(), [piece], start)
            if n != piece.nbytes:
                raise PatcherError(f"source shard ended at byte {start + max(n, 0)}, expected {end}: was it changed during the bake?")
            j = seg
            while j < len(segments) and segments[j][0] < stop:
                s0, s1, dtype, name = segments[j]
                lo, hi = max(s0, start), min(s1, stop)
                if has_nonfinite(piece[lo - start : hi - start], dtype):
                    raise NonFinite(name)
                j += 1
            self._emit(piece)
            start = stop

    def close(self) -> str:
        """Finish the file; returns its sha256."""
        if self._expected:
            raise RuntimeError(f"shard writer closed with {len(self._expected)} tensors unwritten")
        self._flush_span()
        self.abort()
        return self._sha.hexdigest()

    def abort(self) -> None:
        """Close the files without finishing (the caller discards the output)."""
        self._f.close()
        if self._src is not None:
            self._src.close()


def sha256_inputs(paths: list[Path]) -> dict[str, str]:
    """sha256 of each input a provenance record names: a file by its name (absolute) or its path as
    given (relative); a folder (e.g. a SAELens SAE) file by file, as ``folder/relative/name``."""
    out: dict[str, str] = {}
    for p in paths:
        name = p.name if p.is_absolute() else str(p)
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                out[f"{name}/{f.relative_to(p).as_posix()}"] = sha256_file(f)
        else:
            out[name] = sha256_file(p)
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(ShardWriter.PIECE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
