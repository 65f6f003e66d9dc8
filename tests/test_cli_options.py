"""The option groups of cli.py (issue 23: no command function over 8 parameters): the flags stay a
contract (same names, defaults and help text), each group hands its command ONE typed object built
from exactly the flags given, and a bad value inside a group is one line with exit status 2."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import patcher.evaluate.report as report_module
import patcher.workflows.run as run_module
import patcher.workflows.sae as sae_module
import patcher.workflows.sweep as sweep_module
import patcher.workflows.tune as tune_module
from patcher.cli import main
from patcher.collect.sae_fit import TrainSettings
from patcher.core.errors import PatcherError
from patcher.evaluate.report import EvalSettings
from patcher.recipe.settings import help_of
from patcher.workflows.sae import TextWindows
from patcher.workflows.tune import TuneOptions

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "aura.toml")

# Each reshaped command's own flags (placement flags: tests/test_placement.py), as before the groups.
FLAGS = {
    "run": {"--model", "--out", "--batch-size", "--force", "--overwrite", "--no-eval", "--gguf", "--allow-nonfinite", "--trust-remote-code"},
    "eval": {"--baseline", "--prompts", "--n-prompts", "--samples", "--max-new-tokens", "--evaluators", "--seed", "--json", "--plot", "--preset",
             "--ppl-tokens", "--blimp", "--kl-prompts", "--batch-size"},
    "sweep": {"--set", "--model", "--out", "--max-ppl-increase", "--compare", "--n-prompts", "--samples", "--evaluators", "--trust-remote-code"},
    "tune": {"--model", "--max-ppl-increase", "--trials", "--timeout", "--study", "--seed", "--out", "--candidates", "--eval-n-prompts",
             "--evaluators", "--overwrite"},
    "sae train": {"--model", "--layers", "--out", "--tokens", "--context", "--expansion", "--l1", "--steps", "--batch", "--lr", "--seed",
                  "--overwrite", "--trust-remote-code"},
}


def command(name: str) -> Any:
    cmd = main
    for part in name.split():
        cmd = cmd.commands[part]
    return cmd


def flags(name: str) -> dict[str, Any]:
    return {o: p for p in command(name).params for o in p.opts if o.startswith("--")}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_every_flag_is_still_there(name: str) -> None:
    assert FLAGS[name] <= set(flags(name)), FLAGS[name] - set(flags(name))


def test_a_generated_flag_has_its_fields_help() -> None:
    for name, cls, fields in [("tune", TuneOptions, ["trials", "timeout", "seed", "eval_n_prompts", "evaluators"]),
                              ("sae train", TrainSettings, ["expansion", "l1", "steps", "batch", "lr", "seed"]),
                              ("sae train", TextWindows, ["tokens", "context"]),
                              ("eval", EvalSettings, ["prompts", "n_prompts", "samples", "evaluators", "blimp", "kl_prompts", "preset"])]:
        for field in fields:
            assert flags(name)["--" + field.replace("_", "-")].help == help_of(cls, field) + ".", (name, field)
    assert flags("tune")["--study"].help == help_of(TuneOptions, "study_path") + "."
    assert help_of(TuneOptions, "evaluators") == help_of(EvalSettings, "evaluators")


def capture(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> dict[str, Any]:
    """Replace ``module.name`` by a stand-in that records its arguments and stops the command."""
    seen: dict[str, Any] = {}

    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, args=args)
        raise PatcherError("stopped by the test")

    monkeypatch.setattr(module, name, fake)
    return seen


def invoke(*args: str) -> str:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 2, r.output
    return r.output


def test_tune_receives_one_tune_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = capture(monkeypatch, tune_module, "tune")
    invoke("tune", RECIPE, "--out", str(tmp_path / "t.toml"), "--max-ppl-increase", "0.1")
    assert TuneOptions(**{k: seen[k] for k in ("max_ppl_increase", "trials", "timeout", "study_path", "seed", "candidates", "eval_n_prompts",
                                                "evaluators")}) == TuneOptions(max_ppl_increase=0.1)
    invoke("tune", RECIPE, "--out", str(tmp_path / "t.toml"), "--max-ppl-increase", "0.05", "--trials", "3", "--timeout", "9.5",
           "--study", str(tmp_path / "s.db"), "--seed", "4", "--candidates", "0", "--eval-n-prompts", "7", "--evaluators", " hatesonar, profanity-check,")
    assert (seen["max_ppl_increase"], seen["trials"], seen["timeout"], seen["study_path"], seen["seed"]) == (0.05, 3, 9.5, tmp_path / "s.db", 4)
    assert (seen["candidates"], seen["eval_n_prompts"], seen["evaluators"]) == (0, 7, ("hatesonar", "profanity-check"))
    assert seen["out"] == tmp_path / "t.toml" and seen["overwrite"] is False


def test_tune_options_are_checked_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    capture(monkeypatch, tune_module, "tune")
    out = invoke("tune", RECIPE, "--out", str(tmp_path / "t.toml"), "--max-ppl-increase", "0")
    assert out.strip().splitlines() == ["patcher: error: --max-ppl-increase, --trials and --timeout must be positive"]


def test_eval_receives_one_eval_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = capture(monkeypatch, report_module, "evaluate")
    invoke("eval", "some-model")
    assert seen["settings"] == EvalSettings.from_preset("rtp")
    invoke("eval", "some-model", "--preset", "quick", "--n-prompts", "7", "--samples", "2", "--max-new-tokens", "5", "--evaluators", "hatesonar",
           "--seed", "3", "--prompts", "p.jsonl", "--ppl-tokens", "0", "--blimp", "10", "--kl-prompts", "4", "--dtype", "bfloat16")
    assert seen["settings"] == EvalSettings.from_preset("quick", n_prompts=7, samples=2, max_new_tokens=5, evaluators="hatesonar", seed=3,
                                                        prompts="p.jsonl", ppl_tokens=0, blimp=10, kl_prompts=4, dtype="bfloat16")
    out = invoke("eval", "some-model", "--evaluators", "")
    assert out.strip().splitlines() == ["patcher: error: bad eval settings: name at least one evaluator"]


def test_sweep_receives_quick_settings_and_its_pick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = capture(monkeypatch, sweep_module, "sweep")
    invoke("sweep", RECIPE, "--set", "strength=0.5,1", "--out", str(tmp_path / "sw"), "--samples", "3", "--max-ppl-increase", "0.1",
           "--compare", f"aura={tmp_path / 'e.json'}")
    assert seen["eval_settings"] == EvalSettings.from_preset("quick", samples=3)
    assert seen["max_ppl_increase"] == 0.1 and seen["references"] == {"aura": tmp_path / "e.json"}
    out = invoke("sweep", RECIPE, "--set", "strength=0.5,1", "--compare", "no-equals-sign")
    assert "--compare 'no-equals-sign': write LABEL=PATH_TO_eval.json" in out


def test_run_receives_its_switches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = capture(monkeypatch, run_module, "run")
    invoke("run", RECIPE, "--out", str(tmp_path / "o"))
    assert {k: seen[k] for k in ("force", "overwrite", "run_eval", "allow_nonfinite", "gguf")} == {
        "force": False, "overwrite": False, "run_eval": True, "allow_nonfinite": False, "gguf": None}
    invoke("run", RECIPE, "--out", str(tmp_path / "o"), "--force", "--overwrite", "--no-eval", "--allow-nonfinite", "--gguf", "q8_0")
    assert {k: seen[k] for k in ("force", "overwrite", "run_eval", "allow_nonfinite", "gguf")} == {
        "force": True, "overwrite": True, "run_eval": False, "allow_nonfinite": True, "gguf": "q8_0"}


def test_sae_train_receives_text_windows_and_train_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = capture(monkeypatch, sae_module, "train")
    invoke("sae", "train", "--model", "m", "--layers", "1", "--out", str(tmp_path / "s"))
    assert (seen["text"], seen["settings"]) == (TextWindows(), TrainSettings())
    invoke("sae", "train", "--model", "m", "--layers", "1", "--out", str(tmp_path / "s"), "--tokens", "2048", "--context", "16", "--expansion", "2",
           "--l1", "1.5", "--steps", "3", "--batch", "64", "--lr", "0.01", "--seed", "7")
    assert seen["text"] == TextWindows(tokens=2048, context=16)
    assert seen["settings"] == dataclasses.replace(TrainSettings(), expansion=2, l1=1.5, steps=3, batch=64, lr=0.01, seed=7)
    r = CliRunner().invoke(main, ["sae", "train", "--model", "m", "--layers", "1", "--out", str(tmp_path / "s"), "--lr", "0"])
    assert r.exit_code == 2 and "--lr" in r.output  # the field's exclusive minimum, as a click range
