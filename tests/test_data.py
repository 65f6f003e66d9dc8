"""Loading concept and prompt sets: formats, seeded sampling, dedupe, balance, errors, length matching."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from patcher.core.embedded import cache_root
from patcher.core.errors import PatcherError
from patcher.data.loaders import (
    LabeledSet,
    length_auroc,
    load_labeled,
    load_pairs,
    load_prompts,
)


class WhitespaceTokenizer:
    """The tokenizer protocol at its smallest: one token per whitespace-separated word."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join("x" * i for i in ids)


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer when the converted model is cached, else the whitespace stand-in."""
    folder = cache_root() / "models" / "SmolLM2-135M-Instruct-f32"
    if not (folder / "tokenizer.json").is_file():
        return WhitespaceTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(n_toxic: int, n_clean: int) -> list[dict]:
    return [{"text": f"toxic text {i}", "label": 1} for i in range(n_toxic)] + [
        {"text": f"clean text {i}", "label": 0} for i in range(n_clean)
    ]


# -- formats ---------------------------------------------------------------------------------------


def test_jsonl(tmp_path):
    data = load_labeled(str(write_jsonl(tmp_path / "a.jsonl", rows(3, 4))))
    assert {(y, t) for y, t in zip(data.labels, data.texts) if y} == {(1, "toxic text 0"), (1, "toxic text 1"), (1, "toxic text 2")}
    assert all(t.startswith("clean") for t, y in zip(data.texts, data.labels) if y == 0)
    assert data.summary()["n_toxic"] == data.summary()["n_non_toxic"] == 3
    assert data.pair_ids is None and data.token_lengths is None


def test_csv_and_tsv_with_other_field_names(tmp_path):
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"a{suffix}"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["comment", "toxic"])
            writer.writerows([["you, idiot", "1"], ["nice day", "0"], ["hello there", "0"]])
        data = load_labeled(str(path), text_field="comment", label_field="toxic", balance=False)
        assert sorted(zip(data.texts, data.labels)) == [("hello there", 0), ("nice day", 0), ("you, idiot", 1)]


def test_txt_files_take_their_label_from_the_argument(tmp_path):
    (tmp_path / "toxic.txt").write_text("bad one\n\nbad two\n", encoding="utf-8")
    (tmp_path / "clean.txt").write_text("good one\ngood two\ngood three\n", encoding="utf-8")
    data = load_labeled([str(tmp_path / "toxic.txt"), str(tmp_path / "clean.txt")], label=[1, 0])
    assert sorted(zip(data.labels, data.texts))[2:] == [(1, "bad one"), (1, "bad two")]
    assert len(data.texts) == 4
    with pytest.raises(PatcherError, match=r"toxic\.txt: a \.txt file holds no labels; pass label="):
        load_labeled(str(tmp_path / "toxic.txt"))


def test_relative_paths_read_from_the_current_directory(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "a.jsonl", rows(2, 2))
    monkeypatch.chdir(tmp_path)
    assert len(load_labeled("a.jsonl").texts) == 4


def test_pair_ids_are_carried(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "bad", "label": 1, "pair_id": 7}, {"text": "good", "label": 0, "pair_id": 7}])
    assert load_labeled(str(path)).pair_ids == [7, 7]


# -- sampling --------------------------------------------------------------------------------------


def test_seeded_sample_is_deterministic_and_independent_of_file_order(tmp_path):
    data = rows(50, 80)
    a = load_labeled(str(write_jsonl(tmp_path / "a.jsonl", data)), n_per_class=10, seed=3)
    b = load_labeled(str(write_jsonl(tmp_path / "b.jsonl", data[::-1])), n_per_class=10, seed=3)
    c = load_labeled(str(tmp_path / "a.jsonl"), n_per_class=10, seed=4)
    assert a.texts == b.texts and a.labels == b.labels
    assert set(a.texts) != set(c.texts)


def test_dedupe_normalises_whitespace_and_case_and_drops_conflicts(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"text": "You  are AWFUL", "label": 1},
            {"text": "you are awful ", "label": 1},
            {"text": "hello", "label": 1},
            {"text": "Hello", "label": 0},  # both labels: dropped entirely
            {"text": "fine", "label": 0},
            {"text": "ok", "label": 0},
        ],
    )
    data = load_labeled(str(path), balance=False)
    assert sorted(data.texts) == ["You  are AWFUL", "fine", "ok"]
    assert len(load_labeled(str(path), balance=False, dedupe=False).texts) == 6


def test_balancing(tmp_path):
    path = str(write_jsonl(tmp_path / "a.jsonl", rows(5, 12)))
    assert load_labeled(path).summary()["n_non_toxic"] == 5
    summary = load_labeled(path, n_per_class=3).summary()
    assert (summary["n_toxic"], summary["n_non_toxic"]) == (3, 3)
    summary = load_labeled(path, balance=False, n_per_class=8).summary()
    assert (summary["n_toxic"], summary["n_non_toxic"]) == (5, 8)


def test_truncation_to_max_tokens(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a b c d e f", "label": 1}, {"text": "g h", "label": 0}])
    data = load_labeled(str(path), tokenizer=WhitespaceTokenizer(), max_tokens=4)
    assert sorted(data.token_lengths) == [2, 4]
    assert "x x x x" in data.texts


# -- errors ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(PatcherError, match=r"nope\.jsonl: no such file"):
        load_labeled(str(tmp_path / "nope.jsonl"))


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(PatcherError, match=r"e\.jsonl: no texts \(field 'text'"):
        load_labeled(str(tmp_path / "e.jsonl"))


def test_one_class(tmp_path):
    with pytest.raises(PatcherError, match=r"o\.jsonl: all 3 texts have label 1 \(field 'label'\)"):
        load_labeled(str(write_jsonl(tmp_path / "o.jsonl", rows(3, 0))))


def test_missing_field_names_the_fields_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"comment": "x", "label": 1}])
    with pytest.raises(PatcherError, match=r"m\.jsonl:1: no field 'text' \(the first row has \['comment', 'label'\]\); pass text_field="):
        load_labeled(str(path))
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": "x", "label": 1}, {"text": "y"}])
    with pytest.raises(PatcherError, match=r"n\.jsonl:2: no field 'label'"):
        load_labeled(str(path))


def test_unparseable_line(tmp_path):
    (tmp_path / "u.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(PatcherError, match=r"u\.jsonl:2: not valid JSON"):
        load_labeled(str(tmp_path / "u.jsonl"))


def test_bad_label_value(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "toxic"}])
    with pytest.raises(PatcherError, match=r"b\.jsonl:2: field 'label' is 'toxic', expected 0"):
        load_labeled(str(path))


def test_unsupported_suffix(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"")
    with pytest.raises(PatcherError, match="unsupported file type '.parquet'"):
        load_labeled(str(tmp_path / "a.parquet"))


# -- Hub -------------------------------------------------------------------------------------------


def test_hub_url_is_parsed_and_downloaded(tmp_path, monkeypatch):
    import huggingface_hub

    local = write_jsonl(tmp_path / "d.jsonl", rows(2, 2))
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(local)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    data = load_labeled("hf://datasets/someone/toxic-set@v1.0/data/train.jsonl")
    assert calls == [("someone/toxic-set", "data/train.jsonl", {"repo_type": "dataset", "revision": "v1.0"})]
    assert data.source == "hf://datasets/someone/toxic-set@v1.0/data/train.jsonl" and len(data.texts) == 4


def test_hub_network_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(PatcherError, match=r"hf://datasets/a/b/x\.jsonl: download failed \(LocalEntryNotFoundError"):
        load_prompts("hf://datasets/a/b/x.jsonl")
    with pytest.raises(PatcherError, match="write it as hf://datasets/OWNER/NAME"):
        load_prompts("hf://datasets/just-a-name")


# -- length matching -------------------------------------------------------------------------------


def test_length_matching_on_synthetic_data(tmp_path):
    """Toxic texts long, most clean texts short: matching picks the long clean ones."""
    data = [{"text": f"toxic {i} " + "w " * (5 + i % 6), "label": 1} for i in range(40)]
    data += [{"text": f"clean {i} " + "w " * (i % 12), "label": 0} for i in range(200)]
    path = str(write_jsonl(tmp_path / "a.jsonl", data))
    tok = WhitespaceTokenizer()
    matched = load_labeled(path, tokenizer=tok)
    assert matched.summary()["length_auroc"] == 0.5
    assert load_labeled(path, tokenizer=tok, match_lengths=False).summary()["length_auroc"] > 0.6
    with pytest.raises(PatcherError, match="match_lengths needs balance=True"):
        load_labeled(path, tokenizer=tok, balance=False)


@pytest.fixture(scope="module")
def paradetox(shared_data) -> str:
    return str(shared_data / "toxicity_labeled" / "paradetox_labeled.jsonl")


def test_length_matching_on_paradetox(paradetox, tokenizer):
    matched = load_labeled(paradetox, tokenizer=tokenizer, n_per_class=2000)
    unmatched = load_labeled(paradetox, tokenizer=tokenizer, n_per_class=2000, match_lengths=False)
    assert matched.summary()["length_auroc"] < 0.56
    assert unmatched.summary()["length_auroc"] > 0.6
    assert length_auroc(matched, tokenizer) == pytest.approx(matched.summary()["length_auroc"], abs=0.02)
    assert sorted(t for t, y in zip(matched.texts, matched.labels) if y) == sorted(
        t for t, y in zip(unmatched.texts, unmatched.labels) if y
    )  # the toxic sample is the same; only the non-toxic draw changes


def test_every_labeled_file_loads(shared_data):
    labeled = [p for p in (shared_data / "toxicity_labeled").glob("*.jsonl") if "pairs" not in p.name]
    for path in sorted(labeled) + [shared_data / "toxigen" / "toxigen_sentences.jsonl"]:
        summary = load_labeled(str(path), n_per_class=200).summary()
        assert summary["n_toxic"] == summary["n_non_toxic"] == 200, path


# -- pairs and prompts -----------------------------------------------------------------------------


def test_pairs(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"pair_id": 4, "toxic": "shut up idiot", "neutral": ["", "please be quiet"]},
            {"pair_id": 5, "toxic": "same", "neutral": ["Same"]},  # nothing to contrast: dropped
            {"pair_id": 6, "toxic": "damn it", "neutral": []},  # no paraphrase: dropped
            {"pair_id": 9, "toxic": "you suck", "neutral": "you are not good"},
        ],
    )
    data = load_pairs(str(path))
    assert isinstance(data, LabeledSet) and data.labels == [1, 0, 1, 0]
    pairs = {data.pair_ids[i]: (data.texts[i], data.texts[i + 1]) for i in (0, 2)}
    assert pairs == {4: ("shut up idiot", "please be quiet"), 9: ("you suck", "you are not good")}
    assert len(load_pairs(str(path), n=1).texts) == 2


def test_paradetox_pairs(shared_data):
    data = load_pairs(str(shared_data / "toxicity_labeled" / "paradetox_pairs.jsonl"), n=300, seed=1)
    assert len(data.texts) == 600 and data.labels[:2] == [1, 0] and data.pair_ids[0] == data.pair_ids[1]
    assert len(set(data.pair_ids)) == 300


def test_prompts(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "So I said ", "toxicity": 0.9}, {"prompt": "so i  said", "toxicity": 0.1}, {"prompt": "Then", "toxicity": 0.2}])
    prompts = load_prompts(str(path))
    assert sorted(zip(prompts.prompts, prompts.scores)) == [("So I said ", 0.9), ("Then", 0.2)]
    (tmp_path / "p.txt").write_text("first prompt \nsecond\n", encoding="utf-8")
    txt = load_prompts(str(tmp_path / "p.txt"))
    assert sorted(txt.prompts) == ["first prompt ", "second"] and txt.scores is None
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "a", "toxicity": 0.5}, {"prompt": "b"}])
    with pytest.raises(PatcherError, match=r"q\.jsonl:2: no field 'toxicity'.*score_field="):
        load_prompts(str(bad))


def test_prompts_rtp_layout_null_scores_file_order_and_hash(tmp_path):
    rows = [
        {"prompt": {"text": "nested one", "toxicity": 0.8}},
        {"prompt": {"text": "nested null", "toxicity": None}},
        {"prompt": "flat", "toxicity": 0.1},
    ] + [{"prompt": f"more {i}", "toxicity": None} for i in range(20)]
    path = write_jsonl(tmp_path / "rtp.jsonl", rows)
    p = load_prompts(str(path), file_order=True)
    assert p.prompts[:3] == ["nested one", "nested null", "flat"] and p.scores[:3] == [0.8, None, 0.1]
    assert p.lines == list(range(1, 24)) and p.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    seeded = load_prompts(str(path), n=5, seed=3)
    in_file = load_prompts(str(path), n=5, seed=3, file_order=True)
    assert sorted(seeded.prompts) == sorted(in_file.prompts) and in_file.lines == sorted(in_file.lines)
    nulls = write_jsonl(tmp_path / "nulls.jsonl", [{"prompt": "a", "toxicity": None}, {"prompt": "b", "toxicity": None}])
    assert load_prompts(str(nulls)).scores is None  # no prompt has a score


def test_real_prompt_files(shared_data):
    rtp = load_prompts(str(shared_data / "rtp" / "rtp_challenging.jsonl"), n=50)
    assert len(rtp.prompts) == 50 and all(0 <= s <= 1 for s in rtp.scores)
    assert rtp.prompts == load_prompts(str(shared_data / "rtp" / "rtp_challenging.jsonl"), n=50).prompts
    bold = load_prompts(str(shared_data / "neutral_prompts" / "bold_prompts.jsonl"), n=20)
    assert bold.scores is None and len(bold.prompts) == 20
