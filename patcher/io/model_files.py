"""Where a model's files come from: the embedded default, a local folder, or the Hugging Face Hub
(safetensors, json and tokenizer files only: pickled checkpoints are never downloaded, and the
model's own Python files only with ``--trust-remote-code``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.embedded import EMBEDDED, embedded_model_path
from ..core.errors import PatcherError
from .record import read_json_object

# Explicit names and suffixes: a bare ``tokenizer*`` would also match ``tokenizer*.py``.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
CODE_PATTERNS = ["*.py"]


def resolve_model(spec: str, revision: str | None = None, trust_remote_code: bool = False) -> tuple[Path, dict[str, Any]]:
    """A model argument -> (local folder, provenance). ``spec`` is an embedded model's short name
    (``smollm2-135m``, the default, or ``gemma3-270m``), a local folder, or a Hub id (downloaded as safetensors, json and tokenizer files only;
    ``*.py`` too with ``trust_remote_code``). A local folder's provenance is ``local_path`` (made
    relative to the output when recorded); its config.json must be a JSON object."""
    if spec in EMBEDDED:
        return embedded_model_path(name=spec), {"model": spec, "source": EMBEDDED[spec].source}
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        if not path.is_dir():
            raise PatcherError(f"model {spec!r} not found: pass an existing folder, a Hub id (owner/name), or an embedded model ({', '.join(EMBEDDED)})")
        if (path / "config.json").is_file():
            read_json_object(path / "config.json", "re-download the model or repair its config.json")
        return path, {"local_path": str(path.resolve())}
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (CODE_PATTERNS if trust_remote_code else [])
    try:
        folder = Path(snapshot_download(spec, revision=revision, allow_patterns=patterns, ignore_patterns=None if trust_remote_code else CODE_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - the hub client raises many network and auth error types
        raise PatcherError(f"cannot download {spec!r} from the Hugging Face Hub ({type(exc).__name__}): check the id, the network, or pass a local folder") from None
    return folder, {"model": spec, "revision": folder.name}
