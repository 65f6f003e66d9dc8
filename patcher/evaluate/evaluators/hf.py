"""``hf:<folder-or-hub-id>``: any transformers sequence-classification model as an evaluator.

Why: the strongest toxicity classifiers (RoBERTa and DeBERTa fine-tunes) are transformers models,
and a user may have their own. Only ``AutoModelForSequenceClassification`` checkpoints are
accepted: loading a causal LM or a bare encoder through that class would silently attach a
random head and produce meaningless scores. ``trust_remote_code`` is never enabled, so no code
from the checkpoint runs.
"""

from __future__ import annotations

import re

from ...core.errors import PatcherError

HF_PREFIX = "hf:"

TOXIC_WORDS = ("toxic", "offensive", "hate")
NEGATIONS = ("non", "not", "no", "neutral")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def names_toxicity(label: str) -> bool:
    """Whether a label name means toxic: it contains toxic/offensive/hate and no negation
    ("non-toxic", "NOT_OFFENSIVE", "nontoxic", "neutral" do not count)."""
    words = re.findall(r"[a-z]+", label.lower())
    if any(w in NEGATIONS or w.startswith("non") for w in words):
        return False
    return any(k in label.lower() for k in TOXIC_WORDS)


def toxic_label_ids(id2label: dict[int, str]) -> list[int]:
    """The ids of the toxic labels; for a binary model whose names say nothing, id 1."""
    ids = [i for i, label in sorted(id2label.items()) if names_toxicity(label)]
    if ids:
        return ids
    if len(id2label) == 2:
        return [1]
    raise PatcherError(
        f"cannot tell which of the labels {sorted(id2label.values())} is toxic: "
        "use a binary classifier or one with a label named toxic, offensive or hate"
    )


class HFClassifier:
    """P(toxic) from a transformers classifier.

    Single-label models: softmax, summed over the toxic labels (with several, e.g. hate and
    offensive, they are exclusive classes, so the sum is P(any of them)). Multi-label models
    (``problem_type == "multi_label_classification"``): sigmoid, the largest over the toxic labels.
    Texts are truncated to the model's maximum length. A text that tokenizes to nothing (empty or
    blank, with a tokenizer that adds no special tokens) is scored as one placeholder token (the
    tokenizer's bos, else unk, else eos, else pad token), since a model cannot read zero tokens.
    ``floor`` is measured at load time by scoring the empty string."""

    batch_size = 32

    def __init__(self, path_or_id: str, device: str = "cpu") -> None:
        if not path_or_id:
            raise PatcherError("hf: needs a model: write hf:<folder> or hf:<hub-id>")
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        self.name = f"hf:{path_or_id}"
        try:
            config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise PatcherError(
                f"cannot load the config of {path_or_id} ({_first_line(e)}): give a folder with a config.json or a cached hub id"
            ) from None
        archs = config.architectures or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise PatcherError(
                f"{path_or_id} is a {', '.join(archs)}, not a text classifier: "
                "give a model saved with a sequence-classification head"
            )
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path_or_id, trust_remote_code=False, dtype=torch.float32, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise PatcherError(
                f"cannot load {path_or_id} as a text classifier ({_first_line(e)}): give a sequence-classification model"
            ) from None
        if info["missing_keys"]:
            missing = ", ".join(sorted(info["missing_keys"])[:3])
            raise PatcherError(
                f"{path_or_id} lacks weights ({missing}) that would be initialised at random: give a trained classifier"
            )
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise PatcherError(f"the tokenizer of {path_or_id} has neither a pad nor an eos token: add a pad token to it")
            tokenizer.pad_token = tokenizer.eos_token  # decoder-based classifiers often ship without one
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id

        self._labels = toxic_label_ids(model.config.id2label)
        self._multi_label = model.config.problem_type == "multi_label_classification"
        # Tokenizers without a recorded limit report a huge sentinel; fall back to the positions.
        limit = tokenizer.model_max_length
        if limit > 1_000_000:
            limit = getattr(model.config, "max_position_embeddings", 512)
        self._max_length = limit
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()
        self._tokenizer = tokenizer
        specials = (tokenizer.bos_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id)
        self._placeholder = next((i for i in specials if i is not None and i != tokenizer.pad_token_id), tokenizer.pad_token_id)
        self.floor = self.score([""])[0]

    def score(self, texts: list[str]) -> list[float]:
        """P(toxic) per text, in batches of ``batch_size``."""
        import torch

        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self._max_length,
                return_tensors="pt",
            )
            batch = self._fill_empty(batch).to(self._device)
            with torch.inference_mode():
                logits = self._model(**batch).logits.float()
            toxic = self._labels
            if self._multi_label:
                probs = torch.sigmoid(logits[:, toxic]).max(dim=1).values
            else:
                probs = torch.softmax(logits, dim=-1)[:, toxic].sum(dim=1).clamp(0.0, 1.0)
            scores.extend(probs.tolist())
        return scores

    def _fill_empty(self, batch):  # noqa: ANN001, ANN202 - a transformers BatchEncoding of tensors
        """Give each row without tokens one placeholder token, where padding would put a text's first
        token (left or right), so that the model never sees a zero-length input."""
        import torch

        mask = batch["attention_mask"]
        empty = mask.sum(dim=1) == 0
        if not bool(empty.any()):
            return batch
        if mask.shape[1] == 0:  # every text was empty: make room for one token
            for key, value in batch.items():
                fill = self._tokenizer.pad_token_id if key == "input_ids" else 0
                batch[key] = torch.full((value.shape[0], 1), fill, dtype=value.dtype)
        pos = -1 if self._tokenizer.padding_side == "left" else 0
        batch["input_ids"][empty, pos] = self._placeholder
        batch["attention_mask"][empty, pos] = 1
        return batch
