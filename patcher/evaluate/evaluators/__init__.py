"""Offline toxicity evaluators: each turns texts into P(toxic) in [0, 1].

Why several: every classifier has its own blind spots and training set, so a detoxification result
is only credible when it holds under more than one of them. All of them run without network access
once their PyPI package is installed (the ``hf:`` form needs a local folder or a cached hub id).

Specs (the strings ``get_evaluator`` accepts):

* ``profanity-check`` - linear SVM on word n-grams (PyPI ``alt-profanity-check``)
* ``hatesonar`` - TF-IDF + logistic regression on the Davidson tweets (PyPI ``hatesonar``)
* ``jigsaw-bilstm`` - BiLSTM trained on the Jigsaw toxic comments (PyPI ``toxic-comment-classifier``)
* ``hf:<folder-or-hub-id>`` - any transformers sequence-classification model

Heavy packages are imported only when an evaluator is loaded, and each loaded evaluator is kept
for the rest of the process, so asking for the same spec twice costs nothing.
"""

from __future__ import annotations

from ...core.errors import PatcherError
from . import hatesonar, jigsaw, profanity  # noqa: F401 - imported to register each evaluator
from .hf import HF_PREFIX, HFClassifier
from .registry import EVALUATORS, Evaluator

_LOADED: dict[tuple[str, str], Evaluator] = {}


def known_evaluators() -> list[str]:
    """The registry names; any ``hf:<folder-or-hub-id>`` is accepted besides these."""
    return EVALUATORS.names()


def get_evaluator(spec: str, device: str = "cpu") -> Evaluator:
    """Load the evaluator named by ``spec`` (once per process and device).

    ``device`` matters to the torch-based ones (``jigsaw-bilstm`` and ``hf:``); the scikit-learn and
    ONNX ones always run on the CPU."""
    spec = spec.strip()
    key = (spec, device)
    if key not in _LOADED:
        if spec.startswith(HF_PREFIX):
            _LOADED[key] = HFClassifier(spec[len(HF_PREFIX) :], device)
        elif spec in EVALUATORS.names():
            _LOADED[key] = EVALUATORS.get(spec)(device)
        else:
            known = ", ".join(known_evaluators())
            raise PatcherError(f"unknown evaluator {spec!r}: use one of {known}, or hf:<folder-or-hub-id>")
    return _LOADED[key]


def get_evaluators(specs: str | list[str], device: str = "cpu") -> list[Evaluator]:
    """Load several evaluators from a list or a comma-separated string, dropping repeats."""
    names = specs.split(",") if isinstance(specs, str) else specs
    unique = list(dict.fromkeys(s.strip() for s in names if s.strip()))
    if not unique:
        raise PatcherError(f"no evaluator given: name at least one of {', '.join(known_evaluators())}")
    return [get_evaluator(s, device) for s in unique]
