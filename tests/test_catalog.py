"""Public data by name (`patcher.data.catalog`): each resolution order, and the Hub path for real: the
data sets' files in their Hub layouts (ParaDetox's train.tsv, Civil Comments' parquet, RTP's
prompts.jsonl, WikiText's parquet) served from a local endpoint that speaks the Hub's file API,
downloaded and cached by a recipe run, then reused with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import hub_env, save_tiny_with_tokenizer, serve

from patcher.core.errors import PatcherError
from patcher.data import catalog
from patcher.data.loaders import data_source
from patcher.recipe.loader import DataSettings, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.toml"))  # tuned/<model>/ too
EVAL_DEFAULTS = {"rtp-challenging", "wikitext-2"}  # what `patcher eval` reads when given no files


def shipped_names() -> set[str]:
    """Every catalog name the shipped recipes use, and the evaluation's defaults."""
    names = set(EVAL_DEFAULTS)
    for path in RECIPES:
        raw = tomllib.loads(path.read_text())
        names |= {raw.get("data", {}).get("dataset", ""), raw.get("check", {}).get("ppl_dataset", "")}
        names |= {s.get("data", {}).get("dataset", "") for s in raw.get("step", [])}
    return names - {""}


def _parquet(columns: dict[str, list]) -> bytes:
    pa = pytest.importorskip("pyarrow", reason="the Hub's parquet files need pyarrow")
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def _jsonl(path: Path, n: int) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def hub_layout_files(data: Path) -> dict[tuple[str, str, str, str], bytes]:
    """Small copies of each data set in the layout its Hub repository has (see its dataset card),
    built from the public data folder, keyed as the local Hub serves them."""
    files: dict[tuple[str, str, str, str], bytes] = {}

    def put(name: str, body: bytes) -> None:
        e = catalog.CATALOG[name]
        files[("dataset", e.repo, e.revision, e.files[0])] = body

    pairs = _jsonl(data / "toxicity_labeled/paradetox_pairs.jsonl", 150)
    tsv = ["en_toxic_comment\ten_neutral_comment"] + [f"{p['toxic']}\t{n}" for p in pairs for n in p["neutral"]]
    put("paradetox-pairs", ("\n".join(tsv) + "\n").encode())  # paradetox shares the file: same repo, revision, path
    jig = _jsonl(data / "toxicity_labeled/jigsaw_snlp_detox.jsonl", 20000)
    jig = [r for r in jig if r["label"] == 1][:100] + [r for r in jig if r["label"] == 0][:100]
    put("jigsaw-test", _parquet({"text": [r["text"] for r in jig], "toxicity": [0.8 if r["label"] else 0.1 for r in jig],
                                 "severe_toxicity": [0.0] * len(jig), "obscene": [0.0] * len(jig)}))
    rtp = [(r, True) for r in _jsonl(data / "rtp/rtp_challenging.jsonl", 30)] + [(r, False) for r in _jsonl(data / "rtp/rtp_nontoxic.jsonl", 10)]
    put("rtp-challenging", "".join(json.dumps({"filename": "x.txt", "begin": 0, "end": 1, "challenging": c,
                                               "prompt": {"text": r["prompt"], "toxicity": r["toxicity"]},
                                               "continuation": {"text": r["continuation"], "toxicity": None}}) + "\n" for r, c in rtp).encode())
    lines = (data / "wikitext2/wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    put("wikitext-2", _parquet({"text": ["" if line == " \n" else line for line in lines]}))  # blank lines are empty rows on the Hub
    return files


def _recipe(folder: Path, model: Path) -> Path:
    text = f'''name = "hub"
[model]
id = "{model}"
[data]
dataset = "paradetox-pairs"
pairs = true
n_per_class = 20
max_tokens = 32
[collect]
batch_size = 8
[check]
ppl_dataset = "wikitext-2"
ppl_tokens = 256
ppl_window = 64
max_ppl_increase = 100.0
[eval]
preset = "quick"
n_prompts = 3
samples = 1
max_new_tokens = 3
evaluators = ["profanity-check"]
ppl_tokens = 128
[[step]]
method = "aura"
[[step]]
method = "aura"
data = {{ dataset = "paradetox", pairs = false, match_lengths = false }}
[[step]]
method = "aura"
data = {{ dataset = "jigsaw-test", pairs = false, match_lengths = false }}
'''
    (folder / "hub.toml").write_text(text)
    return folder / "hub.toml"


def _patcher(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "patcher.cli", *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_recipe_downloads_from_hub_caches_and_reuses_offline(shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("profanity_check", reason="the recipe's [eval] here scores with alt-profanity-check")
    files = hub_layout_files(shared_data)
    model = save_tiny_with_tokenizer("llama", tmp_path / "base")
    recipe = _recipe(tmp_path, model)
    names = {"paradetox-pairs", "paradetox", "jigsaw-test", "wikitext-2", "rtp-challenging"}
    assert shipped_names() <= names, "a shipped recipe names a data set this test does not serve"
    work = tmp_path / "work"
    work.mkdir()
    root = Path(__file__).parents[1]
    with serve(files) as (endpoint, log):
        env = hub_env(endpoint, str(tmp_path / "hf")) | {"PATCHER_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(root)}
        p = _patcher(["run", str(recipe), "--out", "out1"], env, work)
        assert p.returncode == 0, p.stdout + p.stderr
        fetched = {path.split("/resolve/")[0].removeprefix("/datasets/") for method, path in log if method == "GET"}
        assert fetched == {catalog.CATALOG[n].repo for n in names}  # every data set came from the local Hub
        meta = json.loads((work / "out1/patch.json").read_text())
        sources = [d["dataset"] for d in meta["data"]] + [meta["check"]["ppl_source"]]
        assert [s["name"] for s in sources] == ["paradetox-pairs", "paradetox", "jigsaw-test", "wikitext-2"]
        for s in sources:
            e = catalog.CATALOG[s["name"]]
            assert s["from"] == "hub" and s["repo"] == e.repo and s["revision"] == e.revision and len(s["sha256"]) == 64
        assert str(tmp_path) not in json.dumps([meta["data"], meta["check"]])  # the data records hold no local absolute path
        # the Hub rows give back the original wiki.test.raw byte for byte
        wiki = tmp_path / "cache/data/wikitext-2" / catalog.CATALOG["wikitext-2"].revision / "wiki.test.raw"
        assert wiki.read_bytes() == (shared_data / "wikitext2/wiki.test.raw").read_bytes()
        report = json.loads((work / "out1/eval.json").read_text())  # the recipe's [eval]: default prompts and perplexity text
        assert report["prompts"]["count"] == 3 and report["runtime"]["ppl_text"] == "wikitext-2"
        # a second run, offline: everything comes from the cache, no request reaches the Hub
        before = len(log)
        offline = env | {"HF_HUB_OFFLINE": "1"}
        p = _patcher(["run", str(recipe), "--out", "out2"], offline, work)
        assert p.returncode == 0, p.stdout + p.stderr
        assert len(log) == before
        assert json.loads((work / "out2/patch.json").read_text())["data"] == meta["data"]
    # offline with neither a data folder nor a cache: one line naming the data set and both settings
    bare = hub_env("http://127.0.0.1:9", str(tmp_path / "hf-empty"), offline=True) | {"PATCHER_CACHE": str(tmp_path / "empty"), "PYTHONPATH": str(root)}
    p = _patcher(["run", str(recipe), "--out", "out3"], bare, work)
    assert p.returncode == 2 and not (work / "out3").exists()
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("patcher: error: data set '") and err.split("'")[1] in names
    assert "PATCHER_DATA" in err and "HF_HUB_OFFLINE" in err and "shared" not in err


# -- resolution order, no network ------------------------------------------------------------------
def _layout(folder: Path, name: str, body: str) -> Path:
    file = folder / catalog.CATALOG[name].local
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(body)
    return file


@pytest.fixture()
def clean_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("PATCHER_DATA", raising=False)
    monkeypatch.setenv("PATCHER_CACHE", str(tmp_path / "cache"))
    yield
    catalog.set_data_dir(None)


def test_explicit_path_wins(tmp_path: Path, clean_catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHER_DATA", str(tmp_path / "d"))
    _layout(tmp_path / "d", "paradetox", '{"text": "a", "label": 1}\n')
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "b", "label": 0}\n')
    path, record = data_source(DataSettings(path=str(mine), dataset="paradetox"))
    assert path == str(mine) and record == {"from": "path", "file": "mine.jsonl"}


def test_data_dir_flag_then_env(tmp_path: Path, clean_catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = _layout(tmp_path / "env", "paradetox", "env\n")
    flag_file = _layout(tmp_path / "flag", "paradetox", "flag\n")
    monkeypatch.setenv("PATCHER_DATA", str(tmp_path / "env"))
    found = catalog.resolve("paradetox")
    assert found.path == env_file and found.record["from"] == "data-dir" and found.record["file"] == "toxicity_labeled/paradetox_labeled.jsonl"
    catalog.set_data_dir(tmp_path / "flag")  # what --data-dir does: ahead of $PATCHER_DATA
    assert catalog.resolve("paradetox").path == flag_file


def test_data_dir_without_the_file_falls_back_to_the_hub_cache(tmp_path: Path, clean_catalog, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATCHER_DATA", str(tmp_path / "empty"))
    e = catalog.CATALOG["rtp-challenging"]
    cached = tmp_path / "cache/data" / e.name / e.revision / "rtp_challenging.jsonl"
    cached.parent.mkdir(parents=True)
    cached.write_text('{"prompt": "so", "toxicity": 0.9}\n')  # converted by an earlier download
    found = catalog.resolve("rtp-challenging")
    assert found.path == cached and found.record["from"] == "hub" and found.record["repo"] == "allenai/real-toxicity-prompts"


def test_data_dir_option_on_the_cli(tmp_path: Path, clean_catalog) -> None:
    """`patcher eval --data-dir` reads the default prompts and perplexity text from that folder."""
    from click.testing import CliRunner
    from helpers import save_tiny_with_tokenizer as save

    from patcher.cli import main

    folder = tmp_path / "data"
    _layout(folder, "rtp-challenging", "".join(json.dumps({"prompt": p, "toxicity": 0.9}) + "\n" for p in ["you are", "go away", "the sky"]))
    _layout(folder, "wikitext-2", " = a = \n the river flows . \n" * 30)
    model = save("llama", tmp_path / "m")
    pytest.importorskip("profanity_check", reason="the evaluation here scores with alt-profanity-check")
    r = CliRunner().invoke(main, ["eval", str(model), "--data-dir", str(folder), "--preset", "quick", "--n-prompts", "0", "--samples", "1",
                                  "--max-new-tokens", "2", "--evaluators", "profanity-check", "--ppl-tokens", "64", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["prompts"]["count"] == 3 and report["runtime"]["ppl_text"] == "wikitext-2"


def test_unknown_name_refused_before_the_model_loads(tmp_path: Path) -> None:
    """A misspelt catalog name is refused, with its line, when the recipe's settings are validated
    (the first thing `patcher run` and `patcher compute` do), before any model or data is read."""
    from patcher.workflows.run import step_settings

    (tmp_path / "r.toml").write_text('[data]\ndataset = "paradetoks"\n[[step]]\nmethod = "aura"\n')
    with pytest.raises(PatcherError, match=r"r.toml:2: unknown data set 'paradetoks': use one of paradetox-pairs, paradetox"):
        step_settings(load_recipe(tmp_path / "r.toml"))


def test_catalog_pins_full_revisions() -> None:
    for e in catalog.CATALOG.values():
        assert len(e.revision) == 40 and all(c in "0123456789abcdef" for c in e.revision), e.name
        assert "shared" not in e.local and e.files
