"""Where the public data sets live on this machine: ``$PATCHER_DATA``, else a data folder found
beside the working directory or the checkout."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.errors import PatcherError


def shared_data_dir() -> Path | None:
    """The public data folder: ``$PATCHER_DATA``, else a ``shared/data`` folder beside the working
    directory, the checkout, or one of their parents."""
    env = os.environ.get("PATCHER_DATA")
    if env:
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for d in (start, *start.parents):
            if (d / "shared" / "data" / "README.md").is_file():
                return d / "shared" / "data"
    return None


def default_data_file(rel: str, what: str, flag: str) -> Path:
    root = shared_data_dir()
    if root is None or not (root / rel).is_file():
        raise PatcherError(f"cannot find the default {what} ({rel} under shared/data, or $PATCHER_DATA): pass {flag}")
    return root / rel
