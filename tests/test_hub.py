"""Model card and `patcher push`: the card's YAML and content, the dry run, and a real upload
against a local HTTP server that plays the Hub (HF_ENDPOINT), with the token kept out of all output."""

from __future__ import annotations

import base64
import gzip
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import save_tiny_with_tokenizer, tiny_model

from patcher import Patch, ScaleOutputs, bake
from patcher.cli import main
from patcher.core.arch import arch_for
from patcher.publish.card import base_model_id, front_matter, render_card, write_card
from patcher.publish.push import upload_plan

TOKEN = "hf_patcherTESTtokenDoNotLeak0123456789"
REPO = "someone/tiny-detox"
RECIPE_TEXT = 'name = "aura"\n[data]\npath = "/x/shared/data/toxicity_labeled/paradetox_labeled.jsonl"\n[[step]]\nmethod = "aura"\n'



@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A baked tiny Llama whose base folder carries a README with a license."""
    root = tmp_path_factory.mktemp("hub")
    base = save_tiny_with_tokenizer("llama", root / "base")
    (base / "README.md").write_text("---\nlicense: mit\ntags: [tiny]\n---\n# tiny base\n")
    model = tiny_model("llama")
    arch = arch_for(model.config)
    gen = torch.Generator().manual_seed(0)
    edits = [ScaleOutputs(arch.module("mlp_out", i), arch.layout, factors=torch.rand(32, generator=gen)) for i in range(2)]
    record = {"recipe": {"path": "recipes/aura.toml", "name": "aura", "text": RECIPE_TEXT}}
    return bake(Patch(edits, {"method": "aura", "recipe": "aura"}), base, root / "out", record=record)


def _report(baked: Path) -> dict:
    """A small before/after report from the real evaluation code (tiny model, fake evaluator)."""
    from patcher.evaluate.report import EvalSettings, evaluate

    class Fake:
        name, floor = "fake-tox", 0.0

        def score(self, texts: list[str]) -> list[float]:
            return [min(1.0, t.count("x") / 3) for t in texts]

    prompts = baked.parent / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "toxicity": t}) for p, t in [("you are", 0.8), ("the sky", 0.1), ("hello", 0.6)]))
    settings = EvalSettings.from_preset("quick", prompts=str(prompts), n_prompts=0, samples=2, max_new_tokens=4, ppl_tokens=0, bootstrap=50)
    return evaluate(baked, baseline=baked.parent / "base", settings=settings, evaluators=[Fake()], batch_size=4).to_json()


def test_card_front_matter_and_content(baked: Path) -> None:
    report = _report(baked)
    path = write_card(baked, report, repo_id=REPO)
    text = path.read_text()
    assert text.startswith("---\n")
    fm = yaml.safe_load(text.split("---\n")[1])
    assert fm == front_matter(text)
    assert fm["license"] == "mit"  # inherited from the base folder's README
    assert "base_model" not in fm  # a local folder is not a Hub id
    assert fm["tags"] == ["patcher", "detoxification", "aura"]
    assert fm["datasets"] == ["s-nlp/paradetox"]
    assert fm["library_name"] == "transformers"
    meta = json.loads((baked / "patch.json").read_text())
    for name, digest in meta["bake"]["files"].items():
        assert f"`{name}`" in text and digest in text  # every file hash
    assert meta["bake"]["patch_sha256"] in text
    assert "recipe `aura`" in text and "| layer | edits | units changed |" in text
    assert "fake-tox" in text and "| metric | evaluator | base | patched | change |" in text and "floor 0" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in text and "trust_remote_code" in text


def test_card_base_model_and_license_from_record(baked: Path, tmp_path: Path) -> None:
    assert base_model_id({"model": "smollm2-135m"}) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id({"model": "Qwen/Qwen2.5-0.5B"}) == "Qwen/Qwen2.5-0.5B"
    assert base_model_id({"model": "/cache/hub/models--org--name/snapshots/abc123"}) == "org/name"
    assert base_model_id({"model": str(baked)}) is None
    meta = json.loads((baked / "patch.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in baked.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(baked)).parent.mkdir(parents=True, exist_ok=True)
            (copy / p.relative_to(baked)).write_bytes(p.read_bytes())
    meta["bake"]["base"]["model"] = "smollm2-135m"
    (copy / "patch.json").write_text(json.dumps(meta))
    fm = front_matter(render_card(copy, None))
    assert fm["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and fm["license"] == "apache-2.0"
    meta["bake"]["base"]["model"] = str(tmp_path / "no-such-base")
    (copy / "patch.json").write_text(json.dumps(meta))
    fm = front_matter(render_card(copy, None))
    assert fm["license"] == "other" and "base_model" not in fm


def test_gemma_terms_travel_with_the_weights(tmp_path: Path) -> None:
    """A base folder carrying the Gemma Terms of Use (as the gemma3-270m conversion leaves it): the
    bake copies the file, `verify` hashes cover it, and the card names the terms and the license."""
    base = save_tiny_with_tokenizer("gemma3_text", tmp_path / "base")
    (base / "GEMMA_TERMS.html").write_text("<html>Gemma Terms of Use</html>")
    arch = arch_for(tiny_model("gemma3_text").config)
    out = bake(Patch([ScaleOutputs(arch.module("mlp_out", 0), arch.layout, factors=torch.full((32,), 0.5))], {"method": "aura"}),
               base, tmp_path / "out")
    assert (out / "GEMMA_TERMS.html").read_text() == "<html>Gemma Terms of Use</html>"
    assert "GEMMA_TERMS.html" in json.loads((out / "patch.json").read_text())["bake"]["files"]
    card = render_card(out, None)
    assert front_matter(card)["license"] == "gemma"
    assert "[Gemma Terms of Use](https://ai.google.dev/gemma/terms)" in card and "`GEMMA_TERMS.html`" in card
    assert base_model_id({"model": "gemma3-270m"}) == "google/gemma-3-270m"


def test_card_needs_a_baked_folder(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["card", str(tmp_path)])
    assert r.exit_code == 2 and "holds no patch.json" in r.output


def test_push_dry_run_lists_every_file_without_network(baked: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def refuse(*a, **k):
        raise AssertionError("the dry run touched the Hub client")

    for name in ("create_repo", "upload_folder", "create_branch", "create_commit"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, refuse)
    (baked / ".cache").mkdir(exist_ok=True)
    (baked / ".cache" / "junk").write_text("not uploaded")
    r = CliRunner().invoke(main, ["push", str(baked), REPO, "--dry-run"])
    assert r.exit_code == 0, r.output
    expected = [p for p in baked.rglob("*") if p.is_file() and ".cache" not in p.parts]
    assert (baked / "README.md") in expected  # a card exists (written now, or by the card test)
    for p in expected:
        rel = p.relative_to(baked).as_posix()
        line = next(ln for ln in r.output.splitlines() if ln.startswith(rel + " "))
        assert line.split()[-1] == str(p.stat().st_size)
    assert "junk" not in r.output and "would upload" in r.output and "aura" in r.output
    assert len(upload_plan(baked)) == len(expected)


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub's HTTP API for create_repo + upload_folder: every file is declared a
    regular (non-LFS) file, so the whole upload arrives in the commit request."""

    log: list[dict] = []

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.log.append({"method": "GET", "path": self.path, "auth": self.headers.get("authorization")})
        self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.headers.get("content-encoding") == "gzip":
            raw = gzip.decompress(raw)
        entry = {"method": "POST", "path": self.path, "auth": self.headers.get("authorization"), "body": raw}
        self.log.append(entry)
        host = f"http://{self.headers['host']}"
        if self.path == "/api/repos/create":
            body = json.loads(raw)
            self._reply(200, {"url": f"{host}/{body['organization']}/{body['name']}", "name": f"{body['organization']}/{body['name']}"})
        elif self.path == "/api/validate-yaml":
            self._reply(200, {"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(raw)["files"]
            self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        elif "/commit/" in self.path:
            self._reply(200, {"commitUrl": f"{host}/{REPO}/commit/0123abcd", "commitOid": "0123abcd" * 5})
        elif "/branch/" in self.path:
            self._reply(200, {})
        else:
            self._reply(404, {"error": "not found"})


@pytest.fixture()
def fake_hub():
    FakeHub.log = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", FakeHub.log
    server.shutdown()
    server.server_close()


def test_push_uploads_one_commit_to_local_endpoint(baked: Path, fake_hub, tmp_path: Path) -> None:
    endpoint, log = fake_hub
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_VERBOSITY": "debug", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    cmd = [sys.executable, "-c", "from patcher.cli import main; main()", "push", str(baked), REPO, "--private", "--revision", "detox"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert TOKEN not in p.stdout + p.stderr  # even at debug verbosity
    paths = [e["path"] for e in log if e["method"] == "POST"]
    assert paths[0] == "/api/repos/create"
    create = json.loads(log[0]["body"])
    assert create["name"] == "tiny-detox" and create["organization"] == "someone" and create.get("private", create.get("visibility") == "private")
    assert any(p_ == f"/api/models/{REPO}/branch/detox" for p_ in paths)
    commits = [e for e in log if "/commit/" in e["path"]]
    assert len(commits) == 1 and commits[0]["path"] == f"/api/models/{REPO}/commit/detox"
    lines = [json.loads(x) for x in commits[0]["body"].decode().splitlines() if x.strip()]
    header = next(x["value"] for x in lines if x["key"] == "header")
    assert "aura" in header["summary"]
    sent = {x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"}
    assert sorted(sent) == sorted(rel for rel, _ in upload_plan(baked))
    assert sent["patch.json"] == (baked / "patch.json").read_bytes()
    assert all(e["auth"] == f"Bearer {TOKEN}" for e in log if e["method"] == "POST")  # the token was used, only as a header
    assert "commit:" in p.stdout


def test_push_failure_masks_token(baked: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    cmd = [sys.executable, "-c", "from patcher.cli import main; main()", "push", str(baked), REPO]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "upload to someone/tiny-detox failed" in p.stderr
    assert TOKEN not in p.stdout + p.stderr
