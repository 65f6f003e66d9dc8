"""Upload of a baked output folder to the Hugging Face Hub, in one commit.

The token is never read, printed or logged here: ``huggingface_hub`` finds it (``HF_TOKEN`` or the
login cache) and sends it as a header. Error messages from the client are masked in case one ever
quotes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bake.verify import check_files
from ..core.errors import PatcherError
from ..io.record import read_record
from .card import (
    CARD_NAME,
    EVAL_NAME,
    HUB_ID,
    base_label,
    base_model_id,
    load_eval,
    recipe_name,
    write_card,
)

IGNORE = [".*", "*/.*"]  # hidden files and folders (.git, .cache, staging folders) are never uploaded


def upload_plan(folder: str | Path) -> list[tuple[str, int]]:
    """(path in repo, size in bytes) of every file `push` uploads."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p.stat().st_size))
    return out


def _known_token() -> str | None:
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return os.environ.get("HF_TOKEN")


def mask_token(text: str, token: str | None = None) -> str:
    """``text`` with any Hugging Face token (the one in use, or anything shaped like one) masked."""
    token = token or _known_token()
    if token:
        text = text.replace(token, "hf_***")
    return re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", text)


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]
    message: str
    dry_run: bool
    card_written: bool = False
    commit_url: str | None = None
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def commit_message(meta: dict[str, Any]) -> str:
    recipe = recipe_name(meta) or "unnamed recipe"
    base = base_model_id(meta["bake"].get("base") or {}) or Path(base_label(meta["bake"].get("base") or {})).name
    return f"patcher: {recipe} recipe baked into {base}"


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None, dry_run: bool = False) -> PushResult:
    """Upload a baked folder to ``repo_id`` in one commit (creating the repo if needed). Writes the
    model card first when the folder has none (with ``eval.json`` from the folder if present). A dry
    run lists the files and touches no network."""
    folder = Path(folder)
    if not HUB_ID.match(repo_id):
        raise PatcherError(f"repo id {repo_id!r} should look like owner/name")
    meta = read_record(folder)
    bad = check_files(folder)
    if bad:
        raise PatcherError(f"{folder} fails verification ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): nothing was uploaded; "
                           "re-bake it, or run `patcher verify` to see every mismatch")
    card_written = False
    if not (folder / CARD_NAME).is_file():
        report = load_eval(folder / EVAL_NAME) if (folder / EVAL_NAME).is_file() else None
        write_card(folder, report, repo_id)
        card_written = True
    files = upload_plan(folder)
    message = commit_message(meta)
    result = PushResult(repo_id, files, message, dry_run, card_written, revision=revision)
    if dry_run:
        return result
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                 commit_message=message, ignore_patterns=IGNORE)
    except Exception as e:  # noqa: BLE001 - the hub client raises many HTTP and auth error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PatcherError(mask_token(f"upload to {repo_id} failed ({type(e).__name__}: {first}): check the repo id, your login "
                                      "(`hf auth login` or HF_TOKEN) and the network")) from None
    result.commit_url = getattr(info, "commit_url", None) or str(info)
    return result
