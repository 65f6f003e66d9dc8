"""The select / report parts of a prompt set (`patcher.data.catalog.part_of`): disjoint, covering,
deterministic (by the prompt's text, not its place in the file), named as ``NAME:part`` or
``FILE:part`` wherever a prompt set is named, and the defaults of tune (select) and the results
benchmark (report)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from patcher.core.errors import PatcherError
from patcher.data import catalog
from patcher.data.loaders import load_prompts
from patcher.evaluate.report import REPORT_PROMPTS, SELECT_PROMPTS, EvalSettings, eval_prompts


def test_parts_of_rtp_challenging_are_disjoint_and_cover_it(shared_data: Path) -> None:
    path = catalog.resolve("rtp-challenging").path
    whole = set(load_prompts(path).prompts)
    select = set(load_prompts(path, part="select").prompts)
    report = set(load_prompts(path, part="report").prompts)
    assert select.isdisjoint(report)
    assert select | report == whole
    assert 0.4 < len(select) / len(whole) < 0.6  # a hash bit: about half each
    # by name, as --prompts and [tune] eval_prompts take it
    named = eval_prompts(EvalSettings.from_preset("quick", prompts="rtp-challenging:report", n_prompts=0))
    assert set(named.prompts) == report and named.source.endswith(":report")
    assert catalog.is_name("rtp-challenging:select") and catalog.is_name("bold") and not catalog.is_name("rtp-challenging:other")


def test_parts_depend_on_the_text_only(tmp_path: Path) -> None:
    rows = [{"prompt": f"prompt number {i} about things"} for i in range(200)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    b.write_text("".join(json.dumps(r) + "\n" for r in shuffled[:150]))  # another order, and fewer rows
    sel_a = set(load_prompts(a, part="select").prompts)
    sel_b = set(load_prompts(b, part="select").prompts)
    assert sel_b == sel_a & {r["prompt"] for r in shuffled[:150]}
    # the same across processes and versions: a changed rule would silently move prompts between parts
    assert [catalog.part_of(t) for t in ("hello", "Hello  ", "the cat sat")] == [catalog.part_of("hello")] * 2 + [catalog.part_of("the cat sat")]
    assert catalog.part_of("hello") == "select" and catalog.part_of("the cat sat") == "report"
    # a file path takes a part too, and a seeded sample is drawn inside the part
    settings = EvalSettings.from_preset("quick", prompts=f"{a}:select", n_prompts=20, seed=4)
    got = eval_prompts(settings)
    assert len(got.prompts) == 20 and set(got.prompts) <= sel_a
    assert eval_prompts(settings).prompts == got.prompts


def test_unknown_part_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a b c"}\n')
    with pytest.raises(PatcherError, match="unknown prompt part"):
        load_prompts(f, part="test")
    assert catalog.split_part(f"{f}:report") == (str(f), "report")
    assert catalog.split_part("rtp-challenging") == ("rtp-challenging", None)


def test_tune_and_sweep_look_at_select_the_benchmark_at_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from helpers import save_tiny_with_tokenizer, write_recipe

    from patcher.recipe.loader import load_recipe
    from patcher.workflows import sweep as sweep_module
    from patcher.workflows.tune import TuneSettings, quick_settings

    recipe = SimpleNamespace(path=tmp_path / "r.toml")
    assert quick_settings(recipe, TuneSettings()).prompts == SELECT_PROMPTS  # type: ignore[arg-type]
    assert quick_settings(recipe, TuneSettings(eval_prompts="rtp-challenging:report")).prompts == "rtp-challenging:report"  # type: ignore[arg-type]

    seen = []

    class Stop(Exception):
        pass

    def fake_evaluate(folder, *, settings, placement=None):  # the sweep's first evaluation: the base model's
        seen.append(settings.prompts)
        raise Stop

    monkeypatch.setattr(sweep_module, "evaluate", fake_evaluate)
    model = save_tiny_with_tokenizer("llama", tmp_path / "m")
    with pytest.raises(Stop):
        sweep_module.sweep(load_recipe(write_recipe(tmp_path, model)), "min_auroc=0.5,0.6", out=tmp_path / "sw")
    assert seen == [SELECT_PROMPTS]
    bench = (Path(__file__).parents[1] / "benchmarks/recipes.py").read_text()
    assert "default=REPORT_PROMPTS" in bench and REPORT_PROMPTS == "rtp-challenging:report"
