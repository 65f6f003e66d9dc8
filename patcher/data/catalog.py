"""Public data sets by name: where each lives on the Hub (pinned revision) and in a local folder.

A recipe or `patcher eval` names a data set (``dataset = "paradetox-pairs"``) instead of a file, so
it runs wherever patcher is installed. `resolve` finds the file in this order:

1. an explicit local ``path`` (the caller passes it; the catalog is not consulted);
2. a local data folder, ``--data-dir`` or ``$PATCHER_DATA``, holding the entry's ``local`` file in
   the layout below (the jsonl layout of the project's public data folder);
3. the Hub: the entry's files at its pinned revision, downloaded once with ``huggingface_hub`` into
   its cache, then converted into the same local layout under ``$PATCHER_CACHE/data/NAME/REVISION/``.
   A second run reads the converted file and needs no network (``HF_HUB_OFFLINE=1`` is fine).

Local layouts (one JSON object a line, UTF-8):

- labelled text: ``{"text": str, "label": 0 | 1}`` (+ ``pair_id`` where rows come in pairs);
- pairs: ``{"pair_id": int, "toxic": str, "neutral": [str, ...]}``;
- prompts: ``{"prompt": str, "toxicity": float | null, ...}``;
- minimal pairs (BLiMP): ``{"UID": str, "pairID": str, "field": str, "linguistics_term": str,
  "sentence_good": str, "sentence_bad": str}``;
- plain text (perplexity): the file as it is, read whole.

Every prompt set has two disjoint parts, chosen by a hash of each prompt's normalised text (so a
prompt's part does not depend on the file's order, its other rows, or a seed): ``select``, the only
prompts any choice of settings may look at (``patcher tune``, ``patcher sweep``), and ``report``, the
prompts reported numbers use. ``NAME:select`` / ``NAME:report`` (or ``FILE:select``) name a part
wherever a prompt set is named (`split_part`, `part_of`).

Every resolution returns a record (the catalog name, where the file came from, the Hub repo and
revision or the local layout file, and the sha256 of the bytes read) that runs write to
``patch.json``; it never holds an absolute local path.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import PatcherError
from ..io.atomic import write_bytes
from ..io.checkpoint import sha256_file

DATA_ENV = "PATCHER_DATA"
_data_dir_override: Path | None = None


@dataclass(frozen=True)
class Entry:
    """One data set: its short name, its Hub source (repo, pinned revision, files, split) and how
    those files become the local layout file ``local`` (``convert``)."""

    name: str
    kind: str  # "labeled", "pairs", "prompts" or "text"
    description: str
    local: str  # path of the layout file inside a data folder
    repo: str
    revision: str  # a full commit sha: a moved branch cannot change the data under a recipe
    files: tuple[str, ...]
    split: str
    columns: str  # which Hub columns feed which layout fields, and the filters applied (for humans)
    convert: Callable[[list[Path]], bytes]


@dataclass(frozen=True)
class Resolved:
    path: Path
    record: dict[str, Any]


# -- readers of the Hub layouts --------------------------------------------------------------------
def _tsv_rows(path: Path) -> Iterator[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        yield from csv.DictReader(f, delimiter="\t")


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PatcherError(f"{path.name}: reading a Hub parquet file needs pyarrow: pip install pyarrow") from None
    table = pq.read_table(path, columns=columns)
    yield from table.to_pylist()


def _jsonl(rows: Iterator[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    for row in rows:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out.getvalue().encode("utf-8")


def _paradetox_groups(files: list[Path]) -> list[tuple[str, list[str]]]:
    """ParaDetox's ``train.tsv`` has one row per (toxic sentence, paraphrase); a toxic sentence with
    several paraphrases spans several rows. Grouped by toxic text, in file order."""
    groups: dict[str, list[str]] = {}
    for row in _tsv_rows(files[0]):
        toxic, neutral = (row.get("en_toxic_comment") or "").strip(), (row.get("en_neutral_comment") or "").strip()
        if toxic:
            groups.setdefault(toxic, [])
            if neutral and neutral not in groups[toxic]:
                groups[toxic].append(neutral)
    return list(groups.items())


def _paradetox_pairs(files: list[Path]) -> bytes:
    return _jsonl({"pair_id": i, "toxic": t, "neutral": n} for i, (t, n) in enumerate(_paradetox_groups(files)) if n)


def _paradetox_labeled(files: list[Path]) -> bytes:
    def rows() -> Iterator[dict[str, Any]]:
        for i, (toxic, neutrals) in enumerate(_paradetox_groups(files)):
            if neutrals:
                yield {"text": toxic, "label": 1, "pair_id": i}
                yield from ({"text": n, "label": 0, "pair_id": i} for n in neutrals)

    return _jsonl(rows())


def _civil_comments(files: list[Path]) -> bytes:
    rows = (r for f in files for r in _parquet_rows(f, ["text", "toxicity"]))
    return _jsonl({"text": r["text"], "label": int(r["toxicity"] >= 0.5)} for r in rows if r["text"] and r["toxicity"] is not None)


def _rtp_challenging(files: list[Path]) -> bytes:
    def rows() -> Iterator[dict[str, Any]]:
        for r in _jsonl_rows(files[0]):
            prompt = r.get("prompt") or {}
            if r.get("challenging") is True and (prompt.get("text") or "").strip():
                yield {"prompt": prompt["text"], "toxicity": prompt.get("toxicity"), "challenging": True,
                       "prompt_scores": {k: v for k, v in prompt.items() if k != "text"},
                       "filename": r.get("filename"), "begin": r.get("begin"), "end": r.get("end")}

    return _jsonl(rows())


def _wikitext(files: list[Path]) -> bytes:
    """The original ``wiki.test.raw``: the Hub's rows are its lines (newline kept), with each blank
    line stored as an empty row where the file has a single space. Joining them back gives the
    file byte for byte (the data folder's README gives its SHA-256)."""
    rows = (r["text"] for r in _parquet_rows(files[0], ["text"]))
    return "".join(text or " \n" for text in rows).encode("utf-8")


# BLiMP's 67 paradigms, in the order of the original zip (and of the data folder's file): on the Hub
# one config (folder) each.
BLIMP_PARADIGMS = (
    "adjunct_island anaphor_gender_agreement anaphor_number_agreement animate_subject_passive animate_subject_trans causative "
    "complex_NP_island coordinate_structure_constraint_complex_left_branch coordinate_structure_constraint_object_extraction "
    "determiner_noun_agreement_1 determiner_noun_agreement_2 determiner_noun_agreement_irregular_1 determiner_noun_agreement_irregular_2 "
    "determiner_noun_agreement_with_adj_2 determiner_noun_agreement_with_adj_irregular_1 determiner_noun_agreement_with_adj_irregular_2 "
    "determiner_noun_agreement_with_adjective_1 distractor_agreement_relational_noun distractor_agreement_relative_clause drop_argument "
    "ellipsis_n_bar_1 ellipsis_n_bar_2 existential_there_object_raising existential_there_quantifiers_1 existential_there_quantifiers_2 "
    "existential_there_subject_raising expletive_it_object_raising inchoative intransitive irregular_past_participle_adjectives "
    "irregular_past_participle_verbs irregular_plural_subject_verb_agreement_1 irregular_plural_subject_verb_agreement_2 "
    "left_branch_island_echo_question left_branch_island_simple_question matrix_question_npi_licensor_present npi_present_1 npi_present_2 "
    "only_npi_licensor_present only_npi_scope passive_1 passive_2 principle_A_c_command principle_A_case_1 principle_A_case_2 "
    "principle_A_domain_1 principle_A_domain_2 principle_A_domain_3 principle_A_reconstruction regular_plural_subject_verb_agreement_1 "
    "regular_plural_subject_verb_agreement_2 sentential_negation_npi_licensor_present sentential_negation_npi_scope sentential_subject_island "
    "superlative_quantifiers_1 superlative_quantifiers_2 tough_vs_raising_1 tough_vs_raising_2 transitive wh_island wh_questions_object_gap "
    "wh_questions_subject_gap wh_questions_subject_gap_long_distance wh_vs_that_no_gap wh_vs_that_no_gap_long_distance wh_vs_that_with_gap "
    "wh_vs_that_with_gap_long_distance"
).split()


def _blimp(files: list[Path]) -> bytes:
    columns = ["UID", "pair_id", "field", "linguistics_term", "sentence_good", "sentence_bad"]
    rows = (r for f in files for r in _parquet_rows(f, columns))
    return _jsonl({"UID": r["UID"], "pairID": str(r["pair_id"]), "field": r["field"], "linguistics_term": r["linguistics_term"],
                   "sentence_good": r["sentence_good"], "sentence_bad": r["sentence_bad"]} for r in rows)


def _bold(files: list[Path]) -> bytes:
    """One row per BOLD prompt; the Hub keeps a page's prompts as a list (``idx``: its place there)."""
    rows = _parquet_rows(files[0], ["domain", "name", "category", "prompts"])
    return _jsonl({"prompt": p, "domain": r["domain"], "category": r["category"], "name": r["name"], "idx": i}
                  for r in rows for i, p in enumerate(r["prompts"] or []) if p and p.strip())


CATALOG: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry("paradetox-pairs", "pairs", "ParaDetox (Logacheva et al., ACL 2022): toxic sentences with human paraphrases",
              "toxicity_labeled/paradetox_pairs.jsonl", "s-nlp/paradetox", "93a90090fa1697206d72b408c05615639483af14",
              ("train.tsv",), "train", "en_toxic_comment -> toxic, en_neutral_comment -> neutral (grouped by toxic text)",
              _paradetox_pairs),
        Entry("paradetox", "labeled", "ParaDetox flattened: each toxic sentence (1) and each paraphrase (0)",
              "toxicity_labeled/paradetox_labeled.jsonl", "s-nlp/paradetox", "93a90090fa1697206d72b408c05615639483af14",
              ("train.tsv",), "train", "en_toxic_comment -> text, label 1; en_neutral_comment -> text, label 0; pair_id = group",
              _paradetox_labeled),
        Entry("jigsaw-test", "labeled",
              "Jigsaw test comments: locally s-nlp's sentence-level Jigsaw test/dev sets; those are not on the Hub, "
              "so the Hub source is the Jigsaw Unintended Bias (Civil Comments) test split",
              "toxicity_labeled/jigsaw_snlp_detox.jsonl", "google/civil_comments", "c70f3b18a8b49df546556991f65a3b95953ee9c1",
              ("data/test-00000-of-00001.parquet",), "test", "text -> text; label = 1 where toxicity >= 0.5, else 0",
              _civil_comments),
        Entry("rtp-challenging", "prompts", "RealToxicityPrompts (Gehman et al. 2020), the challenging subset",
              "rtp/rtp_challenging.jsonl", "allenai/real-toxicity-prompts", "d3a6507562064c4f37cdf267bdc2faa7b0873173",
              ("prompts.jsonl",), "train", "prompt.text -> prompt, prompt.toxicity -> toxicity; rows with challenging = true",
              _rtp_challenging),
        Entry("wikitext-2", "text", "WikiText-2 raw test split (Merity et al. 2016), as the original wiki.test.raw",
              "wikitext2/wiki.test.raw", "Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3",
              ("wikitext-2-raw-v1/test-00000-of-00001.parquet",), "test", "text rows joined back into the raw file",
              _wikitext),
        Entry("blimp", "minimal-pairs", "BLiMP (Warstadt et al., TACL 2020): 67 paradigms x 1,000 grammatical / ungrammatical minimal pairs",
              "blimp/blimp.jsonl", "nyu-mll/blimp", "c469a80f9d2f1ac16a45fca2890918172ad5694a",
              tuple(f"{uid}/train-00000-of-00001.parquet" for uid in BLIMP_PARADIGMS), "train",
              "UID, pair_id -> pairID, field, linguistics_term, sentence_good, sentence_bad; configs in the original zip's order",
              _blimp),
        Entry("bold", "prompts", "BOLD (Dhamala et al., FAccT 2021): neutral Wikipedia sentence beginnings (KL damage measure)",
              "neutral_prompts/bold_prompts.jsonl", "AlexaAI/bold", "89932aa3eac0000790dfc9dc72816650e439cf77",
              ("default/train/0000.parquet",), "train", "prompts (a list per page) -> one row each: prompt, domain, category, name, idx",
              _bold),
    )
}


# -- the select / report parts of a prompt set ------------------------------------------------------
PARTS = ("select", "report")


def part_of(text: str) -> str:
    """The part a prompt belongs to: the first bit of the sha256 of its whitespace- and
    case-normalised text (the normalisation prompt loading dedupes by, so copies share a part)."""
    key = " ".join(text.split()).casefold().encode("utf-8")
    return PARTS[hashlib.sha256(key).digest()[0] & 1]


def split_part(value: str) -> tuple[str, str | None]:
    """``"rtp-challenging:report"`` -> ``("rtp-challenging", "report")``; a value without a part
    suffix -> ``(value, None)``. Works for catalog names and file paths alike."""
    for part in PARTS:
        if value.endswith(f":{part}"):
            return value[: -len(part) - 1], part
    return value, None


# -- resolution ------------------------------------------------------------------------------------
def set_data_dir(path: Path | str | None) -> None:
    """``--data-dir``: a local data folder for this process, ahead of ``$PATCHER_DATA``."""
    global _data_dir_override
    _data_dir_override = Path(path).expanduser() if path else None


def data_dir() -> Path | None:
    """The local data folder: ``--data-dir``, else ``$PATCHER_DATA``, else none."""
    if _data_dir_override is not None:
        return _data_dir_override
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else None


def entry(name: str, what: str = "data set") -> Entry:
    if name not in CATALOG:
        raise PatcherError(f"unknown {what} {name!r}: use one of {', '.join(CATALOG)}, or give a local path")
    return CATALOG[name]


def is_name(value: str) -> bool:
    """Whether ``value`` names a catalog data set, or a part of one (``rtp-challenging:select``),
    and is not an existing file of that name."""
    return split_part(value)[0] in CATALOG and not Path(value).exists()


def cache_dir() -> Path:
    from ..core.embedded import cache_root

    return cache_root() / "data"


def resolve(name: str) -> Resolved:
    """The local file for catalog data set ``name``: from the data folder, else from the Hub (see
    the module docs). Raises one line naming the data set, ``PATCHER_DATA`` and ``HF_HUB_OFFLINE``
    when neither has it."""
    e = entry(name)
    folder = data_dir()
    if folder is not None and (folder / e.local).is_file():
        file = folder / e.local
        return Resolved(file, {"name": e.name, "from": "data-dir", "file": e.local, "sha256": sha256_file(file)})
    converted = cache_dir() / e.name / e.revision / Path(e.local).name
    if not converted.is_file():
        downloaded = [_download(e, f, folder) for f in e.files]
        write_bytes(converted, e.convert(downloaded))
    return Resolved(converted, {"name": e.name, "from": "hub", "repo": e.repo, "revision": e.revision, "files": list(e.files),
                                "split": e.split, "layout_file": e.local, "sha256": sha256_file(converted)})


def _download(e: Entry, filename: str, folder: Path | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(e.repo, filename, repo_type="dataset", revision=e.revision))
    except Exception as exc:  # noqa: BLE001 - offline mode, no network, a missing file: one answer for the user
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        where = f"{folder} has no {e.local}" if folder is not None else f"no local data folder (--data-dir or {DATA_ENV})"
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        raise PatcherError(
            f"data set {e.name!r} ({e.repo}) is not available: {where}, and the Hub download failed ({why}); "
            f"set {DATA_ENV} to a folder holding {e.local}, or connect once without HF_HUB_OFFLINE to cache it"
        ) from None
