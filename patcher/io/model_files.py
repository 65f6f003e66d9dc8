"""Where a model's files come from: the embedded default, a local folder, or the Hugging Face Hub
(safetensors, json and tokenizer files only: pickled checkpoints are never downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.embedded import EMBEDDED, embedded_model_path
from ..core.errors import PatcherError

HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_model(spec: str, revision: str | None = None) -> tuple[Path, dict[str, Any]]:
    """A model argument -> (local folder, provenance). ``spec`` is an embedded model's short name
    (``smollm2-135m``, the default, or ``gemma3-270m``), a local folder, or a Hub id (downloaded as
    safetensors, json and tokenizer files only)."""
    if spec in EMBEDDED:
        return embedded_model_path(name=spec), {"model": spec, "source": EMBEDDED[spec].source}
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not path.is_dir():
            raise PatcherError(f"model {spec!r} not found: pass an existing folder, a Hub id (owner/name), or an embedded model ({', '.join(EMBEDDED)})")
        return path, {"model": str(path.resolve())}
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(spec, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many network and auth error types
        raise PatcherError(f"cannot download {spec!r} from the Hugging Face Hub ({type(exc).__name__}): check the id, the network, or pass a local folder") from None
    return folder, {"model": spec, "revision": folder.name}
