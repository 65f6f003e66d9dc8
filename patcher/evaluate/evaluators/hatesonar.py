"""``hatesonar``: TF-IDF + logistic regression of PyPI ``hatesonar``, shipped as an ONNX model.

Why a patched copy: the ONNX graph lower-cases text with a ``StringNormalizer`` node that names no
locale, and onnxruntime then builds the C++ locale ``en_US.UTF-8``; on machines without that locale
(most containers) creating the session fails. The fix changes nothing but that node: a copy of the
model whose normalizer names ``C.UTF-8`` (built into glibc since 2.35, shipped by Debian-based
systems before) is written once into the user cache and run with onnxruntime. The tokenizer that
follows keeps only ``[a-zA-Z0-9_]+`` tokens, so the locale cannot change which tokens are counted
for ASCII text.

Caveat: the model was trained on the Davidson et al. (2017) hate-speech tweets, so it must never be
scored on that data set (its scores there are training-set scores).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np

from ...core.embedded import cache_root
from ...core.errors import PatcherError
from ...io.atomic import write_bytes
from .registry import EVALUATORS

INSTALL = "pip install hatesonar==0.1.0 onnx"
LOCALE = "C.UTF-8"
NEITHER = 2  # class ids of the model: 0 hate speech, 1 offensive language, 2 neither


def shipped_model() -> Path:
    """The ONNX file inside the installed ``hatesonar`` package, found without importing it."""
    spec = importlib.util.find_spec("hatesonar")
    if spec is None or spec.origin is None:
        raise PatcherError(f"the hatesonar evaluator needs the package hatesonar: run `{INSTALL}`")
    path = Path(spec.origin).parent / "model" / "model.onnx"
    if not path.is_file():
        raise PatcherError(f"{path} is missing: run `pip install --force-reinstall hatesonar==0.1.0`")
    return path


def patched_model() -> Path:
    """The shipped model with a ``C.UTF-8`` normalizer, from the cache or written there atomically.

    The file name carries a hash of the shipped model, so upgrading ``hatesonar`` makes a new copy
    instead of reusing a stale one."""
    source = shipped_model()
    data = source.read_bytes()
    target = cache_root() / "evaluators" / f"hatesonar-{hashlib.sha256(data).hexdigest()[:16]}-{LOCALE}.onnx"
    if target.is_file():
        return target
    try:
        import onnx
    except ImportError:
        raise PatcherError(f"patching the hatesonar model needs the package onnx: run `{INSTALL}`") from None
    model = onnx.load_model_from_string(data)
    for node in model.graph.node:
        if node.op_type == "StringNormalizer":
            kept = [a for a in node.attribute if a.name != "locale"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("locale", LOCALE)])
    return write_bytes(target, model.SerializeToString())


@EVALUATORS.register("hatesonar")
class HateSonar:
    """P(hate speech) + P(offensive language) = 1 - P(neither).

    ``floor`` is the empty string's score: with no known word only the intercepts speak, so text
    made only of words outside its vocabulary scores the same (tests check the constant)."""

    name = "hatesonar"
    floor = 0.324962
    batch_size = 1024

    def __init__(self, device: str = "cpu") -> None:  # runs on the CPU whatever the device
        try:
            import onnxruntime as ort
        except ImportError:
            raise PatcherError(f"the hatesonar evaluator needs onnxruntime: run `{INSTALL}`") from None
        self._session = ort.InferenceSession(str(patched_model()), providers=["CPUExecutionProvider"])

    def score(self, texts: list[str]) -> list[float]:
        """1 - P(neither) per text, in batches of ``batch_size``."""
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = np.array(texts[start : start + self.batch_size], dtype=object)
            (probs,) = self._session.run(["output_probability"], {"text": batch})
            scores.extend(1.0 - float(p[NEITHER]) for p in probs)
        return scores
