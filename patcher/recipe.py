"""Recipes: declarative TOML files parsed into typed settings.

One dataclass per table gives every value one name in the file, the CLI and the code. Unknown keys,
wrong types and bad values are refused with the key and its line in the file. Relative paths are
resolved against the recipe file's folder, so a recipe runs from any working directory.

    name = "aura"
    [model]                  # optional; --model overrides
    id = "smollm2-135m"
    [data]                   # the labelled toxic (1) / non-toxic (0) text every step uses by default
    dataset = "paradetox"    # a catalog name (patcher.catalog), or path = "my/file.jsonl"
    n_per_class = 500
    [collect]
    batch_size = 32
    [check]                  # perplexity before/after on a text slice, and the budget
    max_ppl_increase = 0.5
    [[step]]                 # one or more; each later step sees the earlier steps' edits
    method = "aura"
    modules = ["mlp_in", "mlp_out"]
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PatcherError


@dataclass(frozen=True)
class ModelSettings:
    id: str = "smollm2-135m"
    revision: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    untie: bool = False  # allow edits on tied embeddings: the output writes a separate lm_head.weight


@dataclass(frozen=True)
class DataSettings:
    path: str = ""  # a local file; wins over ``dataset``
    dataset: str = ""  # a catalog name (`patcher.catalog`): the data folder, else the Hub
    text_field: str = "text"
    label_field: str = "label"
    n_per_class: int = 500
    max_tokens: int = 64
    match_lengths: bool = True
    dedupe: bool = True
    seed: int = 0
    pairs: bool = False  # the file holds contrastive pairs {"toxic": ..., "neutral": [...]}: n_per_class pairs


@dataclass(frozen=True)
class CollectSettings:
    batch_size: int = 32
    padding_side: str = "right"
    skip_first: bool = True


@dataclass(frozen=True)
class CheckSettings:
    ppl_text: str = ""  # a local text file; wins over ``ppl_dataset``
    ppl_dataset: str = ""  # a catalog name, e.g. "wikitext-2"
    ppl_tokens: int = 4096
    ppl_window: int = 512
    max_ppl_increase: float = 1.0  # relative: 0.1 allows +10%


@dataclass(frozen=True)
class Step:
    method: str
    settings: dict[str, Any]
    data: DataSettings | None
    line: int


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    model: ModelSettings
    data: DataSettings
    collect: CollectSettings
    check: CheckSettings
    steps: tuple[Step, ...]
    eval: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def _line_of(text: str, key: str, after: int = 0) -> int:
    """1-based line of ``key =`` (or ``[key]``) at or after line ``after``; 0 when not found."""
    pattern = re.compile(rf"^\s*(\[+\s*)?{re.escape(key)}\b")
    for n, line in enumerate(text.splitlines()[after:], start=after + 1):
        if pattern.match(line):
            return n
    return 0


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}" if line else str(path)


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, list) and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    return isinstance(value, origin or hint)


def build(cls: type, table: dict[str, Any], where: str, section: str) -> Any:
    """A settings dataclass from a TOML table, refusing unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise PatcherError(f"{where}: unknown key {section}.{unknown[0]}; known keys: {', '.join(sorted(known))}")
    for key, value in table.items():
        if not _matches(value, hints[key]):
            raise PatcherError(f"{where}: {section}.{key} = {value!r} should be of type {hints[key]}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**kwargs)


def _resolve(base: Path, p: str) -> str:
    if not p or "://" in p or Path(p).is_absolute():
        return p
    return str((base / p).resolve())


def _check_name(name: str, where: str) -> None:
    """Refuse an unknown catalog name when the recipe is read, not when the data is needed."""
    from .catalog import entry

    if name:
        try:
            entry(name)
        except PatcherError as e:
            raise PatcherError(f"{where}: {e}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PatcherError(f"recipe {path} not found: pass a TOML file such as recipes/aura.toml")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PatcherError(f"{path}: not valid TOML ({exc})") from None
    top = {"name", "model", "data", "collect", "check", "step", "eval", "description"}
    for key in raw:
        if key not in top:
            raise PatcherError(f"{_where(path, _line_of(text, key))}: unknown top-level key {key!r}; known: {', '.join(sorted(top))}")

    def section(cls: type, key: str) -> Any:
        return build(cls, raw.get(key, {}), _where(path, _line_of(text, key)), key)

    base = path.parent
    model = section(ModelSettings, "model")
    data = section(DataSettings, "data")
    data = dataclasses.replace(data, path=_resolve(base, data.path))
    _check_name(data.dataset, _where(path, _line_of(text, "dataset")))
    check = section(CheckSettings, "check")
    check = dataclasses.replace(check, ppl_text=_resolve(base, check.ppl_text))
    _check_name(check.ppl_dataset, _where(path, _line_of(text, "ppl_dataset")))
    steps_raw = raw.get("step", [])
    if not isinstance(steps_raw, list) or not steps_raw:
        raise PatcherError(f"{path}: a recipe needs at least one [[step]] table with a method")
    steps, after = [], 0
    for i, s in enumerate(steps_raw):
        line = _line_of(text, "[[step]]".strip("[]"), after)
        after = line
        if "method" not in s:
            raise PatcherError(f"{_where(path, line)}: step {i + 1} has no method key")
        s = dict(s)
        step_data = None
        if "data" in s:
            own = s.pop("data")
            inherited = dataclasses.asdict(data)
            if isinstance(own, dict) and "dataset" in own and "path" not in own:
                inherited["path"] = ""  # the step names its own data set: the recipe's file is not it
            step_data = build(DataSettings, inherited | own, _where(path, line), f"step[{i + 1}].data")
            step_data = dataclasses.replace(step_data, path=_resolve(base, step_data.path))
            _check_name(step_data.dataset, _where(path, line))
        s = {k: _resolve(base, v) if k.endswith("_path") and isinstance(v, str) else v for k, v in s.items()}
        steps.append(Step(s.pop("method"), s, step_data, line))
    return Recipe(path, raw.get("name", path.stem), model, data, section(CollectSettings, "collect"), check, tuple(steps), raw.get("eval", {}), text)
