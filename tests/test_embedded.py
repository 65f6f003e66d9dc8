"""The embedded default model: a damaged conversion cache is detected and rebuilt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from patcher.core.embedded import _is_complete, embedded_model_path, gguf_path
from patcher.io.checkpoint import Checkpoint


@pytest.mark.slow
def test_damaged_cache_is_rebuilt(smollm2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache" / "models" / smollm2.name
    shutil.copytree(smollm2, cache)
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    assert embedded_model_path() == cache  # intact: reused as is
    weights = cache / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert not _is_complete(cache, gguf_path())
    rebuilt = embedded_model_path()
    assert rebuilt == cache and _is_complete(cache, gguf_path())
    assert Checkpoint.open(rebuilt).tensor_map()["model.norm.weight"].shape == (576,)


def test_marker_for_another_gguf_is_not_trusted(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="the embedded model needs the gguf package")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "patcher-embedded.json").write_text('{"gguf_size": 1, "gguf_mtime": 1, "files": {"config.json": 2}}')
    assert not _is_complete(folder, gguf_path())
