"""Toxicity evaluators: ordering on obvious sentences, stated floors, the hf: loader on tiny random
classifiers, and the errors a user can hit."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import pytest

from patcher.core.errors import PatcherError
from patcher.evaluate.evaluators import get_evaluator, get_evaluators, known_evaluators

TOXIC = [
    "you are a stupid worthless idiot",
    "shut up, you pathetic moron",
    "what a fucking disgusting loser you are",
]
NEUTRAL = [
    "the library opens at nine on weekdays",
    "thank you for the lovely dinner last night",
    "we planted tomatoes in the garden this spring",
]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep the patched hatesonar model out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATCHER_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def need_offline(name: str) -> None:
    """Skip unless the optional packages of one offline evaluator are installed."""
    if name == "profanity-check":
        pytest.importorskip("profanity_check", reason="needs alt-profanity-check")
    elif name == "hatesonar":
        pytest.importorskip("onnxruntime", reason="needs hatesonar (onnxruntime)")
        pytest.importorskip("onnx", reason="needs onnx to patch the hatesonar model")
        if importlib.util.find_spec("hatesonar") is None:
            pytest.skip("needs hatesonar")
    else:
        pytest.importorskip("h5py", reason="needs h5py for the jigsaw-bilstm weights")
        # Not importorskip: importing toxic_classifier imports TensorFlow, which is not needed.
        if importlib.util.find_spec("toxic_classifier") is None:
            pytest.skip("needs toxic-comment-classifier (pip install --no-deps)")


@pytest.mark.parametrize("name", ["profanity-check", "hatesonar", "jigsaw-bilstm"])
def test_offline_evaluator_orders_toxic_above_neutral(name: str) -> None:
    need_offline(name)
    ev = get_evaluator(name)
    assert ev.name == name
    toxic, neutral = ev.score(TOXIC), ev.score(NEUTRAL)
    assert len(toxic) == len(TOXIC) and len(neutral) == len(NEUTRAL)
    assert all(0.0 <= s <= 1.0 for s in toxic + neutral)
    assert min(toxic) > max(neutral), (toxic, neutral)
    assert ev.score([]) == []


@pytest.mark.parametrize("name", ["profanity-check", "hatesonar", "jigsaw-bilstm"])
def test_offline_evaluator_floor_is_the_empty_string_score(name: str) -> None:
    need_offline(name)
    ev = get_evaluator(name)
    assert ev.score([""]) == pytest.approx([ev.floor], abs=1e-3)


def test_batches_give_the_same_scores_as_single_texts() -> None:
    need_offline("jigsaw-bilstm")
    ev = get_evaluator("jigsaw-bilstm")
    texts = TOXIC + NEUTRAL + [" ".join(["word"] * 150) + " idiot"]
    assert ev.score(texts) == pytest.approx([ev.score([t])[0] for t in texts], abs=1e-5)


def test_hatesonar_patched_model_is_cached_once() -> None:
    need_offline("hatesonar")
    from patcher.evaluate.evaluators.hatesonar import patched_model

    first = patched_model()
    mtime = first.stat().st_mtime_ns
    assert patched_model() == first and first.stat().st_mtime_ns == mtime
    assert Path(os.environ["PATCHER_CACHE"]) in first.parents
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left behind


def test_restricted_unpickler_refuses_other_classes() -> None:
    from patcher.evaluate.evaluators.jigsaw import RestrictedUnpickler

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="system"):
        RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil()))).load()
    # The classes the tokenizer needs still load.
    from collections import OrderedDict

    assert RestrictedUnpickler(io.BytesIO(pickle.dumps(OrderedDict(a=1)))).load() == {"a": 1}


def test_unknown_evaluator_lists_known_ones() -> None:
    with pytest.raises(PatcherError) as err:
        get_evaluator("perspective")
    for name in known_evaluators():
        assert name in str(err.value)
    assert "hf:" in str(err.value)


def test_get_evaluators_splits_commas_and_rejects_empty() -> None:
    with pytest.raises(PatcherError, match="unknown evaluator 'nope'"):
        get_evaluators("  ,nope")
    with pytest.raises(PatcherError, match="no evaluator"):
        get_evaluators(" , ")


# --- hf: tiny random classifiers built offline ---------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *"you are a stupid idiot the garden is nice".split()]


def save_classifier(folder: Path, id2label: dict[int, str], problem_type: str | None = None, special_tokens: bool = True) -> Path:
    """A tiny random BERT classifier (seed fixed, so every call has the same weights) and a WordLevel
    tokenizer that adds [CLS]/[SEP] (or, without ``special_tokens``, nothing)."""
    torch = pytest.importorskip("torch")
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special_tokens:
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=8).save_pretrained(
        folder
    )
    config = T.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
        problem_type=problem_type,
    )
    torch.manual_seed(0)
    T.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def test_hf_classifier_picks_the_toxic_label(tmp_path: Path) -> None:
    texts = ["you are a stupid idiot", "the garden is nice", "", "word " * 50]
    last = save_classifier(tmp_path / "last", {0: "non-toxic", 1: "toxic"})
    first = save_classifier(tmp_path / "first", {0: "TOXIC", 1: "neutral"})
    a = get_evaluator(f"hf:{last}").score(texts)
    b = get_evaluator(f"hf:{first}").score(texts)
    assert len(a) == len(texts) and all(0.0 <= s <= 1.0 for s in a + b)
    # Same weights, labels swapped: the two scores are P(class 1) and P(class 0).
    assert [x + y for x, y in zip(a, b)] == pytest.approx([1.0] * len(texts), abs=1e-5)
    assert get_evaluator(f"hf:{last}").floor == pytest.approx(a[2], abs=1e-6)


def test_hf_classifier_scores_empty_text_without_special_tokens(tmp_path: Path) -> None:
    """A tokenizer that adds no special tokens turns "" into zero tokens; each such text is scored
    as one placeholder token, the same alone, in a batch of empties, or beside other texts."""
    import math

    folder = save_classifier(tmp_path / "plain", {0: "non-toxic", 1: "toxic"}, special_tokens=False)
    ev = get_evaluator(f"hf:{folder}")
    assert ev._tokenizer("")["input_ids"] == []  # the case this test is about
    alone = ev.score([""])[0]
    assert math.isfinite(ev.floor) and 0.0 <= ev.floor <= 1.0 and alone == pytest.approx(ev.floor, abs=1e-6)
    assert ev.score(["", "  "]) == pytest.approx([alone, alone], abs=1e-6)  # blank text tokenizes to nothing too
    mixed = ev.score(["you are a stupid idiot", "", "the garden is nice"])
    assert mixed[1] == pytest.approx(alone, abs=1e-5)
    assert mixed[0] == pytest.approx(ev.score(["you are a stupid idiot"])[0], abs=1e-5)
    # with left padding the placeholder goes where the text's first token would: the last column
    ev._tokenizer.padding_side = "left"
    batch = ev._fill_empty(ev._tokenizer(["you are", ""], padding=True, return_tensors="pt"))
    assert batch["input_ids"][1].tolist() == [0, ev._placeholder] and batch["attention_mask"][1].tolist() == [0, 1]


def test_hf_multi_label_uses_sigmoid(tmp_path: Path) -> None:
    import torch
    import transformers as T

    folder = save_classifier(tmp_path / "multi", {0: "toxic", 1: "insult", 2: "neutral"}, "multi_label_classification")
    ev = get_evaluator(f"hf:{folder}")
    model = T.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = T.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logit = model(**tok(["you are a stupid idiot"], return_tensors="pt")).logits[0, 0]
    assert ev.score(["you are a stupid idiot"])[0] == pytest.approx(torch.sigmoid(logit).item(), abs=1e-5)


@pytest.mark.parametrize(
    ("id2label", "expected"),
    [
        ({0: "LABEL_0", 1: "LABEL_1"}, [1]),
        ({0: "NOT_OFFENSIVE", 1: "OFFENSIVE"}, [1]),
        ({0: "hate_speech", 1: "offensive", 2: "neither"}, [0, 1]),
        ({0: "nontoxic", 1: "toxic"}, [1]),
    ],
)
def test_toxic_label_ids(id2label: dict[int, str], expected: list[int]) -> None:
    from patcher.evaluate.evaluators.hf import toxic_label_ids

    assert toxic_label_ids(id2label) == expected


def test_toxic_label_ids_refuses_unnamed_multiclass() -> None:
    from patcher.evaluate.evaluators.hf import toxic_label_ids

    with pytest.raises(PatcherError, match="cannot tell"):
        toxic_label_ids({0: "a", 1: "b", 2: "c"})


def test_hf_rejects_a_causal_lm(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import transformers as T

    config = T.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    T.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(PatcherError, match="LlamaForCausalLM, not a text classifier"):
        get_evaluator(f"hf:{tmp_path}")


def test_hf_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PatcherError, match="cannot load the config"):
        get_evaluator(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(PatcherError, match="needs a model"):
        get_evaluator("hf:")
