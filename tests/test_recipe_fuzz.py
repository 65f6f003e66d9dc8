"""Recipe fuzzing: the shipped recipes with mutated keys, types and values, 500 examples. Loading a
recipe and validating every step's settings (and its [eval] table) either succeeds or raises a
`PatcherError` with one line of text: never a traceback, never a generic catch-all."""

from __future__ import annotations

import json
import math
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="recipe fuzzing needs hypothesis (the dev extra installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from patcher.core.errors import PatcherError  # noqa: E402
from patcher.recipe.loader import load_recipe  # noqa: E402
from patcher.workflows.run import eval_settings, step_settings  # noqa: E402

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
SHIPPED = [(p.name, tomllib.loads(p.read_text())) for p in RECIPES]
def _all_keys(x: Any, out: set[str]) -> set[str]:
    if isinstance(x, dict):
        for k, v in x.items():
            out.add(k)
            _all_keys(v, out)
    elif isinstance(x, list):
        for v in x:
            _all_keys(v, out)
    return out


# Keys the recipes and settings know, so that mutations also hit real names with wrong values.
KNOWN_KEYS = sorted(_all_keys([raw for _, raw in SHIPPED], set()) | {"trust_remote_code", "padding_side", "ppl_window", "ppl_tokens",
                                                                       "batch_size", "enabled", "preset", "prompts", "samples", "revision"})


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(raw: dict[str, Any]) -> str:
    """Any dict of TOML values as a TOML document (tables inline, quoted keys)."""
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in raw.items())


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "middle", "left", "all", "1-3", "0,1", "aura", "project", "scale", "circuit", "float8", "../../etc/passwd",
                     "/etc/passwd", "hf://datasets/x/y/z.jsonl", "auto", "nan"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KNOWN_KEYS), inner, max_size=3)),
                      max_leaves=6)


def _paths(x: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (container path, key) in a nested dict/list."""
    out = []
    if isinstance(x, dict):
        for k, v in x.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out.append((*prefix, i))
            out += _paths(v, (*prefix, i))
    return out


def _container(raw: Any, path: tuple) -> Any:
    for p in path[:-1]:
        raw = raw[p]
    return raw


@st.composite
def mutated_recipe(draw: Any) -> dict[str, Any]:
    name, raw = draw(st.sampled_from(SHIPPED))
    raw = json.loads(json.dumps(raw))  # a deep copy
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(raw)
        op = draw(st.sampled_from(["replace", "delete", "add", "rename"]))
        if not paths or op == "add":
            targets = [()] + [p for p in paths if isinstance(_get(raw, p), dict)]
            where = draw(st.sampled_from(targets))
            table = _get(raw, where) if where else raw
            if isinstance(table, dict):
                table[draw(st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=8)))] = draw(values)
            continue
        path = draw(st.sampled_from(paths))
        parent = _container(raw, path)
        key = path[-1]
        if op == "replace":
            parent[key] = draw(values)
        elif op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(KNOWN_KEYS))] = parent.pop(key)
    return raw


def _get(raw: Any, path: tuple) -> Any:
    for p in path:
        raw = raw[p]
    return raw


WORKDIR = Path(tempfile.mkdtemp(prefix="patcher-fuzz-"))
(WORKDIR / "recipes").mkdir(exist_ok=True)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated_recipe())
def test_mutated_recipes_fail_in_one_line_or_load(raw: dict[str, Any]) -> None:
    path = WORKDIR / "recipes" / "fuzz.toml"
    path.write_text(to_toml(raw))
    try:
        recipe = load_recipe(path)
        step_settings(recipe)
        eval_settings(recipe)
    except PatcherError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message


def test_serializer_round_trips_every_shipped_recipe() -> None:
    """The fuzz writes recipes with its own TOML writer: it must reproduce each shipped recipe."""
    assert SHIPPED
    for _, raw in SHIPPED:
        assert tomllib.loads(to_toml(raw)) == raw


def test_fuzz_reaches_validation() -> None:
    """Some mutations are refused by the settings checks (not only by the TOML parser)."""
    raw = json.loads(json.dumps(SHIPPED[0][1]))
    raw.setdefault("collect", {})["batch_size"] = 0
    path = WORKDIR / "recipes" / "zero.toml"
    path.write_text(to_toml(raw))
    with pytest.raises(PatcherError, match="batch_size = 0 should be at least 1"):
        load_recipe(path)
