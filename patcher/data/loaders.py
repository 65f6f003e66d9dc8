"""Concept sets (toxic vs non-toxic texts) and prompt sets, read from local files or the Hub.

Sources: ``.jsonl`` (one JSON object a line), ``.csv`` / ``.tsv`` (with a header row), ``.txt``
(one text a line; its label comes from ``label=``), each given as a path (relative paths are read
from the current directory) or as ``hf://datasets/OWNER/NAME[@REVISION]/path/in/repo.ext``, which
is downloaded with ``huggingface_hub``.

Sampling is seeded and depends only on the texts, not on their order in the file: every text gets a
key hashed from (seed, normalised text), and a sample is the texts with the smallest keys.

Length matching exists because length is a confound. In ParaDetox the toxic sentences average 14.4
SmolLM2 tokens against 11.1 for their paraphrases, so token length alone tells the classes apart
(AUROC 0.69), and max-pooling over tokens rewards length: with unmatched sets most units looked
"toxic". So when a tokenizer is given, the non-toxic sample is drawn to match the toxic sample's
token lengths, and ``summary()`` reports the length AUROC that remains.

A tokenizer is anything with ``encode(text, add_special_tokens=False) -> list[int]`` and, to cut
texts to ``max_tokens``, ``decode(ids) -> str``; Hugging Face tokenizers qualify.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..core.auroc import auroc
from ..core.errors import PatcherError
from ..io.checkpoint import sha256_file
from ..recipe.loader import CheckSettings, DataSettings
from .catalog import PARTS, part_of, resolve

_HF_URL = re.compile(r"hf://datasets/(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>[^/\s]+))?/(?P<file>[^\s]+)")
_SUFFIXES = (".jsonl", ".csv", ".tsv", ".txt")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class LabeledSet:
    """A concept set: texts with label 1 (toxic) or 0 (non-toxic). ``pair_ids`` ties a toxic text to
    its paraphrase where the source pairs them; ``token_lengths`` is known when a tokenizer was
    given (after truncation to ``max_tokens``)."""

    texts: list[str]
    labels: list[int]
    source: str
    pair_ids: list[int] | None = None
    token_lengths: list[int] | None = None

    def summary(self) -> dict:
        """Counts per class and, when token lengths are known, mean length per class and the AUROC
        of length alone at telling the classes apart (0.5 means length carries no signal)."""
        out: dict[str, Any] = {
            "source": self.source,
            "n_toxic": sum(self.labels),
            "n_non_toxic": len(self.labels) - sum(self.labels),
            "mean_tokens_toxic": None,
            "mean_tokens_non_toxic": None,
            "length_auroc": None,
        }
        if self.token_lengths is not None:
            for key, cls in (("mean_tokens_toxic", 1), ("mean_tokens_non_toxic", 0)):
                lengths = [n for n, y in zip(self.token_lengths, self.labels) if y == cls]
                out[key] = sum(lengths) / len(lengths)
            out["length_auroc"] = _lengths_auroc(self.token_lengths, self.labels)
        return out


@dataclass(frozen=True)
class PromptSet:
    """Prompts to generate from; ``scores`` holds each prompt's own toxicity where the file has it
    (None for a row whose score is null, and no list when no row has one). ``lines`` are the
    prompts' line numbers in the file (1-based; a csv row's last line) and ``sha256`` is the file's."""

    prompts: list[str]
    scores: list[float | None] | None
    source: str
    lines: list[int] = field(default_factory=list)
    sha256: str = ""


@dataclass(frozen=True)
class _Item:
    text: str
    label: int
    pair_id: int | None = None


# -- public loaders --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabeledOptions:
    """`load_labeled`'s options (its docstring says what each does)."""

    text_field: str = "text"
    label_field: str = "label"
    label: int | Sequence[int | None] | None = None
    pair_field: str = "pair_id"
    n_per_class: int | None = None
    seed: int = 0
    dedupe: bool = True
    balance: bool = True
    tokenizer: Tokenizer | None = None
    max_tokens: int | None = 64
    match_lengths: bool = True


@dataclass(frozen=True)
class PairsOptions:
    """`load_pairs`'s options (its docstring says what each does)."""

    toxic_field: str = "toxic"
    neutral_field: str = "neutral"
    pair_field: str = "pair_id"
    n: int | None = None
    seed: int = 0
    dedupe: bool = True
    tokenizer: Tokenizer | None = None
    max_tokens: int | None = 64


def load_labeled(path: str | Sequence[str], **options: Any) -> LabeledSet:
    """A concept set from one file, or from several (e.g. ``["toxic.txt", "clean.txt"]`` with
    ``label=[1, 0]``); ``options`` are `LabeledOptions`.

    ``label`` gives every text of a file one label instead of reading ``label_field``; a ``.txt``
    file needs it. ``pair_field`` is carried into ``pair_ids`` when every row has it. Blank texts
    are skipped. ``dedupe`` drops repeats of a whitespace- and case-normalised text, and drops a
    text entirely when its copies disagree on the label. ``balance`` draws the same number from each
    class (at most ``n_per_class``); without it each class keeps up to ``n_per_class``. With a
    tokenizer, texts are cut to ``max_tokens`` tokens and, if ``match_lengths``, the non-toxic
    sample matches the toxic sample's token lengths (or the reverse when toxic texts are the more
    numerous; see the module docs).
    """
    o = LabeledOptions(**options)
    text_field, label_field, label, pair_field, n_per_class, seed = o.text_field, o.label_field, o.label, o.pair_field, o.n_per_class, o.seed
    dedupe, balance, tokenizer, max_tokens, match_lengths = o.dedupe, o.balance, o.tokenizer, o.max_tokens, o.match_lengths
    paths = [path] if isinstance(path, str) else list(path)
    per_path = list(label) if isinstance(label, Sequence) else [label] * len(paths)
    if len(per_path) != len(paths):
        raise PatcherError(f"label={label} gives {len(per_path)} labels for {len(paths)} files; give one label per file")
    _check_count("n_per_class", n_per_class)
    if tokenizer is not None and match_lengths and not balance:
        raise PatcherError("match_lengths needs balance=True (one non-toxic text per toxic one); pass match_lengths=False")
    items: list[_Item] = []
    for p, lab in zip(paths, per_path):
        items += _read_labeled(p, text_field, label_field, lab, pair_field)
    source = " + ".join(paths)
    if dedupe:
        items = _dedupe(items)
    _check_both_classes(items, source, label_field)
    match_with = tokenizer if match_lengths else None
    chosen = [items[i] for i in _sample_labeled(items, n_per_class, seed, balance, match_with, max_tokens)]
    return _labeled_set(chosen, source, tokenizer, max_tokens)


def load_pairs(path: str, **options: Any) -> LabeledSet:
    """A concept set of contrastive pairs: each toxic text (label 1) and its first non-blank
    paraphrase (label 0), sharing a pair id (``pair_field``, else the row's position), adjacent in
    the result. Pairs share content, so no length matching is done; ``summary()`` still reports the
    length AUROC. ``dedupe`` drops a pair whose paraphrase equals its toxic text, or whose either
    text already appeared (normalised). ``n`` caps the number of pairs. ``options`` are `PairsOptions`."""
    o = PairsOptions(**options)
    toxic_field, neutral_field, pair_field, n, seed, dedupe, tokenizer, max_tokens = (
        o.toxic_field, o.neutral_field, o.pair_field, o.n, o.seed, o.dedupe, o.tokenizer, o.max_tokens)
    _check_count("n", n)
    file = _resolve(path)
    records = list(_records(file, path, toxic_field))
    first = records[0][1] if records else {}
    pairs: list[tuple[_Item, _Item]] = []
    for index, (line, rec) in enumerate(records):
        toxic = _text(rec, toxic_field, path, line, first, "toxic_field")
        neutral = _first_paraphrase(_field(rec, neutral_field, path, line, first, "neutral_field"), path, line, neutral_field)
        if toxic.strip() and neutral:
            pid = _number_field(rec, pair_field, path, line, first, int) if pair_field in first else index
            pairs.append((_Item(toxic, 1, pid), _Item(neutral, 0, pid)))
    if not pairs:
        raise PatcherError(f"{path}: no pair with a non-blank '{toxic_field}' and '{neutral_field}'; check the fields or the file")
    if dedupe:
        pairs = _dedupe_pairs(pairs)
    pairs = sorted(pairs, key=lambda pair: _order_key(seed, pair[0].text))[:n]
    return _labeled_set([item for pair in pairs for item in pair], path, tokenizer, max_tokens)


def load_prompts(
    path: str | Path,
    *,
    field: str = "prompt",
    score_field: str | None = "toxicity",
    n: int | None = None,
    seed: int = 0,
    dedupe: bool = True,
    file_order: bool = False,
    part: str | None = None,
) -> PromptSet:
    """Prompts from a file, kept verbatim (BOLD's trailing spaces included). A ``field`` that holds
    an object is read as RealToxicityPrompts' own layout, ``{"text": ..., "toxicity": ...}``. Scores
    come from ``score_field`` when the first row has it, and every row must then have it (null
    allowed). With ``n``, a seeded sample of at most ``n``; prompts come back in the seeded order,
    or in file order with ``file_order``. ``part`` keeps only the prompts of one part, ``select`` or
    ``report`` (`patcher.data.catalog.part_of`), before the sample is drawn."""
    _check_count("n", n)
    if part is not None and part not in PARTS:
        raise PatcherError(f"unknown prompt part {part!r}: use one of {', '.join(PARTS)}")
    path = str(path)
    file = _resolve(path)
    records = list(_records(file, path, field))
    if not records:
        raise PatcherError(f"{path}: no prompts in the file; give a file with one prompt per row")
    first = _flat_prompt(records[0][1], field)
    with_scores = score_field is not None and score_field in first
    rows: list[tuple[str, float | None, int]] = []
    for line, rec in records:
        rec = _flat_prompt(rec, field)
        prompt = _text(rec, field, path, line, first, "field")
        if prompt.strip():
            score = None
            if with_scores and (score_field not in rec or rec[score_field] is not None):  # missing: an error; null: no score
                score = _number_field(rec, score_field, path, line, first, float)  # type: ignore[arg-type]
            rows.append((prompt, score, line))
    if dedupe:
        first_copies: dict[str, tuple[str, float | None, int]] = {}
        for row in rows:
            first_copies.setdefault(_normalise(row[0]), row)
        rows = list(first_copies.values())
    if part is not None:
        rows = [row for row in rows if part_of(row[0]) == part]
    rows = sorted(rows, key=lambda row: _order_key(seed, row[0]))[:n]
    if file_order:
        rows.sort(key=lambda row: row[2])
    if not rows:
        raise PatcherError(f"{path}: every '{field}' is blank; give a file with non-empty prompts")
    scores = [s for _, s, _ in rows] if with_scores and any(s is not None for _, s, _ in rows) else None
    source = f"{path}:{part}" if part else path
    return PromptSet([p for p, _, _ in rows], scores, source, [line for _, _, line in rows], sha256_file(file))


def _flat_prompt(rec: dict, field: str) -> dict:
    """A RealToxicityPrompts row, ``{field: {"text": ..., "toxicity": ...}}``, with the inner
    object's values lifted into the row (the text under ``field``); other rows as they are."""
    inner = rec.get(field)
    if isinstance(inner, dict) and "text" in inner:
        return rec | {k: v for k, v in inner.items() if k != "text"} | {field: inner["text"]}
    return rec


def length_auroc(labeled: LabeledSet, tokenizer: Tokenizer) -> float:
    """AUROC of token length alone at telling toxic from non-toxic: the confound to keep near 0.5."""
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in labeled.texts]
    return _lengths_auroc(lengths, labeled.labels)


# -- reading ---------------------------------------------------------------------------------------


def _resolve(path: str) -> Path:
    """A local file for ``path``: the file itself, or the Hub file downloaded to the HF cache."""
    if path.startswith("hf://"):
        return _download(path)
    file = Path(path).expanduser()
    if not file.is_file():
        raise PatcherError(f"{path}: no such file (looked for {file.resolve()}); check the path")
    return file


def _download(url: str) -> Path:
    match = _HF_URL.fullmatch(url)
    if match is None:
        raise PatcherError(f"{url}: not a Hub dataset file; write it as hf://datasets/OWNER/NAME[@REVISION]/path/in/repo.jsonl")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    try:
        local = hf_hub_download(match["repo"], match["file"], repo_type="dataset", revision=match["revision"])
    except (OSError, HFValidationError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PatcherError(
            f"{url}: download failed ({type(e).__name__}: {first_line}); check the URL and network access, "
            "or download the file and pass its local path"
        ) from e
    return Path(local)


def _records(file: Path, shown: str, txt_field: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each row; a ``.txt`` line becomes ``{txt_field: line}``."""
    suffix = file.suffix.lower()
    if suffix not in _SUFFIXES:
        raise PatcherError(f"{shown}: unsupported file type '{suffix}'; use one of {', '.join(_SUFFIXES)}")
    try:
        with file.open(encoding="utf-8-sig", newline="" if suffix in (".csv", ".tsv") else None) as f:
            if suffix == ".jsonl":
                yield from _jsonl_records(f, shown)
            elif suffix == ".txt":
                yield from ((i, {txt_field: line.rstrip("\r\n")}) for i, line in enumerate(f, 1) if line.strip())
            else:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                yield from ((reader.line_num, row) for row in reader)
    except UnicodeDecodeError as e:
        raise PatcherError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8") from e


def _jsonl_records(lines: Iterator[str], shown: str) -> Iterator[tuple[int, dict]]:
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PatcherError(f"{shown}:{i}: not valid JSON ({e.msg}); fix or remove that line") from e
        if not isinstance(rec, dict):
            raise PatcherError(f"{shown}:{i}: expected a JSON object per line, got {type(rec).__name__}; fix that line")
        yield i, rec


def _read_labeled(path: str, text_field: str, label_field: str, label: int | None, pair_field: str) -> list[_Item]:
    file = _resolve(path)
    if file.suffix.lower() == ".txt" and label is None:
        raise PatcherError(f"{path}: a .txt file holds no labels; pass label=1 (toxic) or label=0 (non-toxic) for it")
    if label is not None and label not in (0, 1):
        raise PatcherError(f"label={label!r} for {path}; a label is 1 (toxic) or 0 (non-toxic)")
    records = list(_records(file, path, text_field))
    first = records[0][1] if records else {}
    has_ids = pair_field in first
    items = []
    for line, rec in records:
        text = _text(rec, text_field, path, line, first, "text_field")
        if text.strip():
            y = label if label is not None else _label(_field(rec, label_field, path, line, first, "label_field"), path, line, label_field)
            items.append(_Item(text, y, _number_field(rec, pair_field, path, line, first, int) if has_ids else None))
    if not items:
        raise PatcherError(f"{path}: no texts (field '{text_field}' blank or no rows); give a file with texts of both classes")
    return items


def _field(rec: dict, field: str, shown: str, line: int, first: dict, option: str) -> Any:
    """``rec[field]``; a missing field names the fields the first row does have."""
    if field not in rec:
        fields = [k for k in first if k is not None]  # csv puts surplus cells under None
        raise PatcherError(f"{shown}:{line}: no field '{field}' (the first row has {fields}); pass {option}=<one of them>")
    if rec[field] is None:
        raise PatcherError(f"{shown}:{line}: field '{field}' is empty; fill it in or remove the row")
    return rec[field]


def _text(rec: dict, field: str, shown: str, line: int, first: dict, option: str) -> str:
    value = _field(rec, field, shown, line, first, option)
    if not isinstance(value, str):
        raise PatcherError(f"{shown}:{line}: field '{field}' holds {type(value).__name__}, not text; point {option} at a text field")
    return value


def _label(value: Any, shown: str, line: int, field: str) -> int:
    """0 or 1 from the forms files use: 0/1, true/false, "0"/"1"."""
    if isinstance(value, str):
        value = value.strip()
    if value in (0, 1, "0", "1"):
        return int(value)
    raise PatcherError(f"{shown}:{line}: field '{field}' is {value!r}, expected 0 (non-toxic) or 1 (toxic); fix the row or pass label_field=")


# What a numeric field means, per type: the option that names it, and what the error expects.
_NUMBER_FIELDS: dict[type, tuple[str, str]] = {
    int: ("pair_field", "an integer id; fix the row"),
    float: ("score_field", "a number; fix the row or pass score_field=None"),
}


def _number_field(rec: dict, field: str, shown: str, line: int, first: dict, cast: type[int] | type[float]) -> Any:
    option, expected = _NUMBER_FIELDS[cast]
    value = _field(rec, field, shown, line, first, option)
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise PatcherError(f"{shown}:{line}: field '{field}' is {value!r}, expected {expected}") from None


def _first_paraphrase(value: Any, shown: str, line: int, field: str) -> str:
    """The first non-blank paraphrase of a field that holds one text or a list of them."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise PatcherError(f"{shown}:{line}: field '{field}' must be a text or a list of texts; fix the row or pass neutral_field=")
    return next((t for t in texts if t.strip()), "")


# -- selection -------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def _order_key(seed: int, text: str) -> bytes:
    """A seeded pseudo-random key per text, so samples depend on the texts and not on file order."""
    return hashlib.blake2b(f"{seed}\x00{_normalise(text)}".encode(), digest_size=8).digest()


def _check_count(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise PatcherError(f"{name}={value}; give a positive count, or None for all")


def _dedupe(items: list[_Item]) -> list[_Item]:
    """First copy of each normalised text; a text whose copies disagree on the label is dropped,
    since it cannot teach the difference between the classes."""
    labels: dict[str, set[int]] = defaultdict(set)
    for item in items:
        labels[_normalise(item.text)].add(item.label)
    out, seen = [], set()
    for item in items:
        key = _normalise(item.text)
        if key not in seen and len(labels[key]) == 1:
            out.append(item)
        seen.add(key)
    return out


def _dedupe_pairs(pairs: list[tuple[_Item, _Item]]) -> list[tuple[_Item, _Item]]:
    out, seen = [], set()
    for toxic, neutral in pairs:
        keys = {_normalise(toxic.text), _normalise(neutral.text)}
        if len(keys) == 2 and not keys & seen:
            out.append((toxic, neutral))
        seen |= keys
    return out


def _check_both_classes(items: list[_Item], source: str, label_field: str) -> None:
    present = {item.label for item in items}
    if len(present) < 2:
        (only,) = present
        raise PatcherError(
            f"{source}: all {len(items)} texts have label {only} (field '{label_field}'); a concept set needs toxic (1) "
            "and non-toxic (0) texts: use a file with both, or add a file of the other class with label=[1, 0]"
        )


def _sample_labeled(
    items: list[_Item], n_per_class: int | None, seed: int, balance: bool, match_with: Tokenizer | None, max_tokens: int | None
) -> list[int]:
    """Indices of the chosen items, in seeded order. When matching lengths (``match_with`` given),
    the class with fewer texts (ParaDetox: the toxic one) is sampled first and the other, having
    more to choose from, is drawn to match it; only those texts are tokenized."""
    order = sorted(range(len(items)), key=lambda i: _order_key(seed, items[i].text))
    toxic = [i for i in order if items[i].label == 1]
    clean = [i for i in order if items[i].label == 0]
    if not balance:
        chosen = toxic[:n_per_class] + clean[:n_per_class]
    elif match_with is not None:
        smaller, larger = sorted((toxic, clean), key=len)
        n = min(len(smaller), n_per_class or len(smaller))
        lengths = {i: _cut(items[i], match_with, max_tokens)[1] for i in smaller[:n] + larger}
        chosen = smaller[:n] + _match_lengths(smaller[:n], larger, lengths)
    else:
        n = min(len(toxic), len(clean), n_per_class or len(toxic))
        chosen = toxic[:n] + clean[:n]
    rank = {i: r for r, i in enumerate(order)}
    return sorted(chosen, key=rank.__getitem__)


def _match_lengths(targets: list[int], pool: list[int], lengths: dict[int, int]) -> list[int]:
    """One pool item per target, without replacement, of the same token length where the pool has
    one left, else of the nearest length. Exact matches are made first so that fallbacks do not use
    up lengths that later targets need; among equally near fallbacks, the side that pulls the
    running length difference back towards zero wins. ``pool`` is in seeded order, so the seed
    decides among texts of equal length."""
    by_length: dict[int, deque[int]] = defaultdict(deque)
    for i in pool:
        by_length[lengths[i]].append(i)
    chosen, unmatched = [], []
    for t in targets:
        bucket = by_length.get(lengths[t])
        if bucket:
            chosen.append(bucket.popleft())
        else:
            unmatched.append(t)
    drift = 0  # sum of (chosen length - target length) over the fallbacks so far
    for t in unmatched:
        target = lengths[t]
        best = min((n for n, b in by_length.items() if b), key=lambda n: (abs(n - target), (n > target) == (drift > 0)))
        chosen.append(by_length[best].popleft())
        drift += best - target
    return chosen


def _labeled_set(items: list[_Item], source: str, tokenizer: Tokenizer | None, max_tokens: int | None) -> LabeledSet:
    """The set of ``items``; with a tokenizer, texts longer than ``max_tokens`` tokens are cut to
    that many and every text's token count (after the cut) is recorded."""
    lengths = None
    if tokenizer is not None:
        cut = [_cut(item, tokenizer, max_tokens) for item in items]
        items, lengths = [item for item, _ in cut], [n for _, n in cut]
    pair_ids = [item.pair_id for item in items]
    return LabeledSet(
        texts=[item.text for item in items],
        labels=[item.label for item in items],
        source=source,
        pair_ids=pair_ids if all(p is not None for p in pair_ids) else None,  # type: ignore[arg-type]
        token_lengths=lengths,
    )


def _cut(item: _Item, tokenizer: Tokenizer, max_tokens: int | None) -> tuple[_Item, int]:
    """The item with its text cut to ``max_tokens`` tokens, and its token count after the cut."""
    ids = tokenizer.encode(item.text, add_special_tokens=False)
    if max_tokens is None or len(ids) <= max_tokens:
        return item, len(ids)
    return _Item(tokenizer.decode(ids[:max_tokens]), item.label, item.pair_id), max_tokens


def _lengths_auroc(lengths: list[int], labels: list[int]) -> float:
    return float(auroc(torch.tensor(lengths, dtype=torch.float64), torch.tensor(labels)))


def data_source(settings: DataSettings) -> tuple[str, dict[str, Any]]:
    """The file a [data] table reads and the record of where it came from: its ``path``, else its
    catalog ``dataset`` (data folder, else the Hub; `patcher.data.catalog`)."""
    if settings.path:
        if "://" not in settings.path:
            _resolve(settings.path)  # a missing local file is refused while the plan is made, before any model loads
        return settings.path, {"from": "path", "file": Path(settings.path).name}
    if not settings.dataset:
        raise PatcherError("the recipe's [data] table needs a dataset (a catalog name such as \"paradetox\") or a path to labelled toxic/non-toxic text")
    found = resolve(settings.dataset)
    return str(found.path), found.record


def ppl_source(check: CheckSettings) -> tuple[str, dict[str, Any]] | None:
    """The perplexity text of a [check] table (``ppl_text``, else ``ppl_dataset``) and its record; None without one."""
    if check.ppl_text:
        return check.ppl_text, {"from": "path", "file": Path(check.ppl_text).name}
    if not check.ppl_dataset:
        return None
    found = resolve(check.ppl_dataset)
    return str(found.path), found.record


def load_data(settings: DataSettings, tokenizer: Any) -> LabeledSet:
    """The labelled set a recipe's ``[data]`` table (or a step's own ``data``) describes."""
    path, _ = data_source(settings)
    if settings.pairs:
        return load_pairs(path, n=settings.n_per_class, seed=settings.seed, dedupe=settings.dedupe,
                          tokenizer=tokenizer, max_tokens=settings.max_tokens)
    return load_labeled(
        path,
        text_field=settings.text_field,
        label_field=settings.label_field,
        n_per_class=settings.n_per_class,
        seed=settings.seed,
        dedupe=settings.dedupe,
        tokenizer=tokenizer,
        max_tokens=settings.max_tokens,
        match_lengths=settings.match_lengths,
    )
