"""Shared fixtures: the real SmolLM2-135M (converted once into the user cache) and data paths."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded default model as a float32 safetensors folder (converted on first use, ~25 s)."""
    pytest.importorskip("gguf", reason="converting the embedded model needs the gguf package")
    from patcher.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the public data folder {SHARED_DATA} is absent (it sits beside the checkout)")
    return SHARED_DATA
