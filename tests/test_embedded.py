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


@pytest.mark.slow
def test_gemma3_conversion_and_damaged_cache(gemma3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second embedded model: converted into the cache with its license terms beside the weights;
    a damaged copy (a truncated weight file, then a missing terms file) is detected and rebuilt."""
    import json

    from patcher.core.embedded import EMBEDDED, source_files

    info = json.loads((gemma3 / "config.json").read_text())
    assert (info["model_type"], info["num_hidden_layers"], info["hidden_size"], info["vocab_size"]) == ("gemma3_text", 18, 640, 262144)
    assert info.get("tie_word_embeddings", True) and "quantization_config" not in info
    assert "Gemma Terms of Use" in (gemma3 / "GEMMA_TERMS.html").read_text(encoding="utf-8", errors="replace")
    cache = tmp_path / "cache" / "models" / gemma3.name
    shutil.copytree(gemma3, cache)
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    assert embedded_model_path(name="gemma3-270m") == cache  # intact: reused as is
    sources = source_files("gemma3-270m")
    (cache / "GEMMA_TERMS.html").unlink()
    assert not _is_complete(cache, sources)
    weights = cache / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    assert not _is_complete(cache, sources)
    assert not _is_complete(cache, gguf_path())  # a SmolLM2 marker check never accepts it either
    rebuilt = embedded_model_path(name="gemma3-270m")
    assert rebuilt == cache and _is_complete(cache, sources)
    tensors = Checkpoint.open(rebuilt).tensor_map()
    assert tensors["model.embed_tokens.weight"].shape == (262144, 640) and "lm_head.weight" not in tensors
    assert (rebuilt / EMBEDDED["gemma3-270m"].terms_file).is_file()
    assert not list((tmp_path / "cache" / "models").glob(".*"))  # no staging folder left behind
