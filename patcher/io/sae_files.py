"""Sparse autoencoders as users have them, for ``direction = "sae"`` (`patcher.methods.project`).

``sae_path`` may name:

- a SAELens folder: ``cfg.json`` (``d_in``, ``d_sae``, ``hook_name`` such as
  ``blocks.12.hook_resid_post``, ``architecture``, ``apply_b_dec_to_input``) beside
  ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec``,
  and ``threshold`` for JumpReLU); the hook point and layer come from ``cfg.json``;
- a Gemma Scope ``params.npz`` (the same five arrays; read with ``allow_pickle=False``); its layer
  comes from the ``layer_N`` folder it sits in, and it reads the residual stream;
- a plain safetensors file with those tensors (the layer then comes from the recipe's ``sae_layer``);
- any of these on the Hub: ``hf://OWNER/NAME[@REVISION]/path/in/repo`` (a folder or a file),
  downloaded with ``huggingface_hub`` into its cache.

Only the residual stream is supported: ``hook_resid_post`` of layer N, or ``hook_resid_pre`` of
layer N (the residual after layer N - 1). Width (``d_in``), hook point and layer are checked against
the model, each with a one-line error.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import PatcherError

_HF = re.compile(r"hf://(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>[^/\s]+))?(?:/(?P<path>\S*))?")
_HOOK = re.compile(r"blocks\.(?P<layer>\d+)\.hook_resid_(?P<where>pre|post)$")
_GEMMA_SCOPE_LAYER = re.compile(r"layer_(\d+)")
KEYS = ("W_enc", "W_dec", "b_enc", "b_dec")


@dataclass
class SAE:
    """A sparse autoencoder in the common layout: ``f = act((x - b_dec) @ W_enc + b_enc)``,
    ``x_hat = f @ W_dec + b_dec``. JumpReLU SAEs (a ``threshold`` tensor, Gemma Scope) do not
    subtract ``b_dec`` from the input."""

    W_enc: torch.Tensor
    W_dec: torch.Tensor
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    threshold: torch.Tensor | None = None
    path: str = ""
    layer: int | None = None
    b_dec_in: bool | None = None  # subtract b_dec from the input (SAELens' apply_b_dec_to_input); None: not for JumpReLU, else yes

    @property
    def width(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_enc.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.b_dec_in if self.b_dec_in is not None else self.threshold is None:
            x = x - self.b_dec.to(x)
        pre = x @ self.W_enc.to(x) + self.b_enc.to(x)
        if self.threshold is not None:
            return pre * (pre > self.threshold.to(x))
        return torch.relu(pre)


def read_sae(path: str | Path, d_model: int, n_layers: int | None = None) -> SAE:
    """The SAE at ``path`` (any layout above) as an `SAE`, checked against a
    model with hidden size ``d_model`` and ``n_layers`` decoder layers."""
    shown = str(path)
    file, cfg = _locate(shown)
    if file.suffix == ".npz":
        tensors, layer, b_dec_in = _read_npz(file), _gemma_scope_layer(file), False
    else:
        if file.suffix != ".safetensors":
            raise PatcherError(f"SAE {shown}: only safetensors and .npz (no pickles) are read; give a SAELens folder, a params.npz or a .safetensors file")
        from safetensors.torch import load_file

        tensors = {k: v.float() for k, v in load_file(str(file)).items()}
        layer, b_dec_in = _cfg_layer(cfg, shown, n_layers) if cfg is not None else (None, None)
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise PatcherError(f"SAE {shown} lacks {', '.join(missing)}: expected W_enc [d_model, d_sae], W_dec [d_sae, d_model], b_enc, b_dec")
    w_enc, w_dec = tensors["W_enc"], tensors["W_dec"]
    if w_enc.ndim != 2 or w_dec.ndim != 2 or w_dec.shape != (w_enc.shape[1], w_enc.shape[0]):
        raise PatcherError(f"SAE {shown}: W_enc {list(w_enc.shape)} and W_dec {list(w_dec.shape)} should be [d_model, d_sae] and [d_sae, d_model]")
    if cfg is not None:
        for key, have in (("d_in", w_enc.shape[0]), ("d_sae", w_enc.shape[1])):
            if key in cfg and int(cfg[key]) != have:
                raise PatcherError(f"SAE {shown}: cfg.json says {key} = {cfg[key]} but the weights have {have}; the folder mixes two SAEs")
    if w_enc.shape[0] != d_model:
        raise PatcherError(f"SAE {shown} reads {w_enc.shape[0]}-dim activations but the model's hidden size is {d_model}: "
                           "it was trained on another model; use an SAE for this model's residual stream")
    if layer is not None and n_layers is not None and not 0 <= layer < n_layers:
        raise PatcherError(f"SAE {shown} reads the residual stream after layer {layer}, but the model has {n_layers} layers (0-{n_layers - 1}): "
                           "it was trained on another model")
    thr = tensors.get("threshold")
    return SAE(w_enc, w_dec, tensors["b_enc"], tensors["b_dec"], thr, shown, layer, b_dec_in)


def _locate(shown: str) -> tuple[Path, dict[str, Any] | None]:
    """(weights file, cfg.json contents or None) for a local or ``hf://`` path."""
    if shown.startswith("hf://"):
        return _download(shown)
    path = Path(shown).expanduser()
    if path.is_dir():
        if (path / "params.npz").is_file():
            return path / "params.npz", None
        cands = [path / "sae_weights.safetensors"] if (path / "sae_weights.safetensors").is_file() else sorted(path.glob("*.safetensors"))
        if len(cands) != 1:
            raise PatcherError(f"SAE folder {shown} should hold sae_weights.safetensors (SAELens), params.npz (Gemma Scope) or one .safetensors file "
                               f"(found {len(cands)} .safetensors): pass the file itself")
        path = cands[0]
    if not path.is_file():
        raise PatcherError(f"SAE {shown} not found: sae_path names a SAELens folder, a params.npz, a .safetensors file or hf://OWNER/NAME/path")
    cfg_file = path.parent / "cfg.json"
    return path, _read_cfg(cfg_file, shown) if path.suffix == ".safetensors" and cfg_file.is_file() else None


def _download(url: str) -> tuple[Path, dict[str, Any] | None]:
    m = _HF.fullmatch(url)
    if m is None:
        raise PatcherError(f"{url}: write a Hub SAE as hf://OWNER/NAME[@REVISION]/path/to/folder-or-file")
    from huggingface_hub import hf_hub_download

    repo, revision, inner = m["repo"], m["revision"], (m["path"] or "").strip("/")

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo, f"{inner}/{name}".lstrip("/") if name else inner, revision=revision))

    try:
        if inner.endswith((".npz", ".safetensors")):
            file = get("")
            if file.suffix == ".safetensors":
                try:
                    return file, _read_cfg(Path(hf_hub_download(repo, posixpath.join(posixpath.dirname(inner), "cfg.json"), revision=revision)), url)
                except Exception:  # noqa: BLE001 - a plain safetensors file has no cfg.json beside it
                    return file, None
            return file, None
        try:
            cfg_file = get("cfg.json")
        except Exception:  # noqa: BLE001 - no cfg.json: a Gemma Scope folder
            return get("params.npz"), None
        return get("sae_weights.safetensors"), _read_cfg(cfg_file, url)
    except PatcherError:
        raise
    except Exception as e:  # noqa: BLE001 - network, offline mode, missing file: one line for the user
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise PatcherError(f"{url}: download failed ({type(e).__name__}: {first}); check the repo and path, or download it and pass the local folder") from None


def _read_cfg(file: Path, shown: str) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PatcherError(f"SAE {shown}: cfg.json is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(cfg, dict):
        raise PatcherError(f"SAE {shown}: cfg.json should hold an object")
    return cfg


def _cfg_layer(cfg: dict[str, Any], shown: str, n_layers: int | None) -> tuple[int | None, bool | None]:
    """(layer whose output the SAE reads, whether it subtracts b_dec from its input) from a SAELens
    cfg.json; hook points other than the residual stream and architectures patcher cannot encode
    with are refused."""
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "jumprelu"):
        raise PatcherError(f"SAE {shown}: architecture {arch!r} is not supported; use a standard (ReLU) or JumpReLU SAE")
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    layer = None
    if hook:
        m = _HOOK.search(str(hook))
        if m is None:
            raise PatcherError(f"SAE {shown} reads hook {hook!r}; only the residual stream (blocks.N.hook_resid_post / hook_resid_pre) is supported")
        layer = int(m["layer"]) - (1 if m["where"] == "pre" else 0)
        if layer < 0:
            raise PatcherError(f"SAE {shown} reads {hook!r}, the embeddings before layer 0; patcher edits what layers write: use an SAE on a later layer")
    elif cfg.get("hook_layer") is not None:
        layer = int(cfg["hook_layer"])
    b_dec_in = cfg.get("apply_b_dec_to_input")
    return layer, None if b_dec_in is None else bool(b_dec_in)


def _read_npz(file: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.asarray(z[k], dtype=np.float32)) for k in z.files}
    except ValueError as e:
        raise PatcherError(f"SAE {file}: {e}; only plain arrays are read (pickled objects are refused)") from None


def _gemma_scope_layer(file: Path) -> int | None:
    """Gemma Scope keeps each SAE at ``layer_N/width_W/average_l0_K/params.npz``."""
    for part in reversed(file.parts):
        m = _GEMMA_SCOPE_LAYER.fullmatch(part)
        if m:
            return int(m[1])
    return None
