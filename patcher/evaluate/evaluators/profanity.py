"""``profanity-check``: the linear SVM of PyPI ``alt-profanity-check`` (calibrated probabilities).

Why it is here: it is tiny, fast and keyed on profane words, so it catches the most blatant
failures of a detoxified model at almost no cost. It knows nothing about insults without swear
words or about context, so it is a floor check, not a judge.
"""

from __future__ import annotations

from ...core.errors import PatcherError
from .registry import EVALUATORS

INSTALL = "pip install alt-profanity-check==1.9.1"


@EVALUATORS.register("profanity-check")
class ProfanityCheck:
    """P(profane) from ``profanity_check.predict_prob``.

    ``floor`` is the empty string's score with the pinned alt-profanity-check (tests check it)."""

    name = "profanity-check"
    floor = 0.036376
    batch_size = 1024

    def __init__(self, device: str = "cpu") -> None:  # runs on the CPU whatever the device
        try:
            # Importing the package unpickles its model with joblib (about 1 s).
            from profanity_check import predict_prob
        except ImportError as e:
            raise PatcherError(
                f"the profanity-check evaluator needs alt-profanity-check ({e}): run `{INSTALL}` "
                "(it pins scikit-learn==1.9.1 and joblib==1.6.0)"
            ) from None
        self._predict_prob = predict_prob

    def score(self, texts: list[str]) -> list[float]:
        """P(profane) per text, in batches of ``batch_size``."""
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            probs = self._predict_prob(texts[start : start + self.batch_size])
            scores.extend(float(p) for p in probs)
        return scores
