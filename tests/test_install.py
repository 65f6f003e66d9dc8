"""`pip install -e .[eval]` alone: what it cannot bring (two packages installed without their own
requirements) is named in one line with the one command that adds it, the same command everywhere,
and the install script installs exactly those versions."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

from patcher.core.errors import PatcherError
from patcher.core.extras import NO_DEPS, NO_DEPS_COMMAND

ROOT = Path(__file__).parents[1]


def _hide(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


def test_missing_jigsaw_weights_name_the_one_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from patcher.evaluate.evaluators import jigsaw

    _hide(monkeypatch, "toxic_classifier")
    with pytest.raises(PatcherError) as e:
        jigsaw.package_dir()
    assert NO_DEPS_COMMAND in str(e.value) and "\n" not in str(e.value)


def test_missing_embedded_model_names_the_one_command(monkeypatch: pytest.MonkeyPatch) -> None:
    from patcher.core import embedded

    _hide(monkeypatch, embedded.GGUF_PACKAGE)
    with pytest.raises(PatcherError) as e:
        embedded.gguf_path()
    assert NO_DEPS_COMMAND in str(e.value) and "\n" not in str(e.value)


def test_eval_extra_and_install_script_cover_the_default_evaluators() -> None:
    extra = " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["eval"])
    for package in ("alt-profanity-check", "hatesonar", "onnx", "h5py"):  # profanity-check, hatesonar, jigsaw-bilstm's reader
        assert package in extra
    script = (ROOT / "scripts/install.sh").read_text()
    for name, version in NO_DEPS.items():
        assert f'"{name}=={version}"' in script and name not in extra
