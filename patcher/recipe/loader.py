"""Recipes: declarative TOML files parsed into typed settings.

One dataclass per table gives every value one name in the file, the CLI and the code. Unknown keys,
wrong types and bad values are refused with the key and its line in the file. Relative paths are
resolved against the recipe file's folder, so a recipe runs from any working directory.

    name = "aura"
    [model]                  # optional; --model overrides
    id = "smollm2-135m"
    [data]                   # the labelled toxic (1) / non-toxic (0) text every step uses by default
    dataset = "paradetox"    # a catalog name (patcher.data.catalog), or path = "my/file.jsonl"
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import PatcherError
from .settings import build, setting


@dataclass(frozen=True)
class ModelSettings:
    id: str = setting("smollm2-135m", help="Model: local folder, Hub id, or an embedded model (smollm2-135m, gemma3-270m)")
    revision: str | None = setting(None, help="Hub revision (branch, tag or commit) to pin")
    dtype: str = setting("float32", help="Dtype the model runs in while collecting: float32, bfloat16, float16",
                         choices=("float32", "bfloat16", "float16"))
    trust_remote_code: bool = setting(False, help="Run the model's own code: only --trust-remote-code on the command line sets it, a recipe may not")
    untie: bool = setting(False, help="Allow edits on tied embeddings: the output writes a separate lm_head.weight")


@dataclass(frozen=True)
class DataSettings:
    path: str = setting("", help="A local file of labelled toxic (1) / non-toxic (0) text (.jsonl, .csv, .txt); wins over dataset")
    dataset: str = setting("", help='A catalog name (patcher.data.catalog, e.g. "paradetox"): the data folder, else the Hub')
    text_field: str = setting("text", help="Field holding the text")
    label_field: str = setting("label", help="Field holding the label (1 toxic, 0 non-toxic)")
    n_per_class: int = setting(500, help="Sentences per class (pairs with pairs = true)", minimum=1)
    max_tokens: int = setting(64, help="Tokens per sentence (longer ones are cut)", minimum=1)
    match_lengths: bool = setting(True, help="Draw the non-toxic sample to match the toxic one's token lengths")
    dedupe: bool = setting(True, help="Drop duplicate texts")
    seed: int = setting(0, help="Seed of the sample")
    pairs: bool = setting(False, help='The file holds contrastive pairs {"toxic": ..., "neutral": [...]}: n_per_class pairs')


@dataclass(frozen=True)
class CollectSettings:
    batch_size: int = setting(32, help="Sentences per forward pass while collecting statistics", minimum=1)
    padding_side: str = setting("right", help="Pad batches on the right or the left (statistics do not depend on it)", choices=("right", "left"))
    skip_first: bool = setting(True, help="Leave the first real token (the attention sink) out of pooled statistics")


@dataclass(frozen=True)
class CheckSettings:
    ppl_text: str = setting("", help="A local text file whose perplexity is checked before and after; wins over ppl_dataset")
    ppl_dataset: str = setting("", help='A catalog name for that text, e.g. "wikitext-2"')
    ppl_tokens: int = setting(4096, help="Tokens of that text used for the check", minimum=2)
    ppl_window: int = setting(512, help="Perplexity window (and stride) in tokens", minimum=2)
    max_ppl_increase: float = setting(1.0, help="Budget: the largest relative rise allowed (0.05 = +5%)")
    max_blimp_drop: float = setting(0.0, help="Budget: the most BLiMP accuracy points the patch may cost, on the first blimp_pairs pairs of each paradigm (0 = no BLiMP gate)")
    blimp_pairs: int = setting(20, help="BLiMP pairs per paradigm the BLiMP gate measures", minimum=1)
    max_kl: float = setting(0.0, help="Budget: the largest mean KL(base || patched), nats per token, on kl_prompts BOLD prompts (0 = no KL gate)")
    kl_prompts: int = setting(50, help="BOLD neutral prompts (seeded sample) the KL gate measures", minimum=1)


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
    tune: dict[str, Any] = field(default_factory=dict)  # the [tune] table as written (`patcher tune` reads it)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # what the command line changed, by table

    def override(self, table: str, **values: Any) -> Recipe:
        """This recipe with ``values`` set in ``table`` (``model``, ``data``, ``collect``, ``check``);
        None values are ignored. The changes are remembered, so the record of a run says which
        settings came from the command line."""
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return self
        current = getattr(self, table)
        updated = build(type(current), dataclasses.asdict(current) | values, "command line", table)
        merged = self.overrides | {table: self.overrides.get(table, {}) | values}
        return dataclasses.replace(self, **{table: updated}, overrides=merged)

    def effective_settings(self, step_settings: list[Any]) -> dict[str, Any]:
        """Every setting the run used (the file, its defaults and the command-line overrides), with
        each step's settings as built by its method: what ``patch.json`` records."""
        tables = {t: dataclasses.asdict(getattr(self, t)) for t in ("model", "data", "collect", "check")}
        steps = []
        for step, built in zip(self.steps, step_settings):
            entry = {"method": step.method} | dataclasses.asdict(built)
            if step.data is not None:
                entry["data"] = dataclasses.asdict(step.data)
            steps.append(entry)
        return tables | {"step": steps, "overrides": self.overrides}


def line_of(text: str, key: str, after: int = 0) -> int:
    """1-based line of ``key =`` (or ``[key]``) at or after line ``after``; 0 when not found."""
    pattern = re.compile(rf"^\s*(\[+\s*)?{re.escape(key)}\b")
    for n, line in enumerate(text.splitlines()[after:], start=after + 1):
        if pattern.match(line):
            return n
    return 0


def where(path: Path, line: int) -> str:
    return f"{path}:{line}" if line else str(path)


def resolve_path(base: Path, p: str) -> str:
    if not p or "://" in p or Path(p).is_absolute():
        return p
    return str((base / p).resolve())


def data_table(data: DataSettings, own: dict[str, Any], base: Path, at: str, section: str) -> DataSettings:
    """A data table that names only what differs from the recipe's ``[data]`` (a step's ``data``,
    ``[tune.proxy]``): the rest is inherited, except the file when the table names its own data set."""
    inherited = dataclasses.asdict(data)
    if "dataset" in own and "path" not in own:
        inherited["path"] = ""  # the table names its own data set: the recipe's file is not it
    built = build(DataSettings, inherited | own, at, section)
    return dataclasses.replace(built, path=resolve_path(base, built.path))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PatcherError(f"recipe {path} not found: pass a TOML file such as recipes/aura.toml")
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PatcherError(f"{path}: not valid TOML ({exc})") from None
    top = {"name", "model", "data", "collect", "check", "step", "eval", "tune", "description"}
    for key in raw:
        if key not in top:
            raise PatcherError(f"{where(path, line_of(text, key))}: unknown top-level key {key!r}; known: {', '.join(sorted(top))}")

    def section(cls: type, key: str) -> Any:
        table = raw.get(key, {})
        if not isinstance(table, dict):
            raise PatcherError(f"{where(path, line_of(text, key))}: {key} should be a table ([{key}]), not {type(table).__name__}")
        return build(cls, table, where(path, line_of(text, key)), key)

    for key in ("name", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise PatcherError(f"{where(path, line_of(text, key))}: {key} = {raw[key]!r} should be a string")
    if not isinstance(raw.get("eval", {}), dict):
        raise PatcherError(f"{where(path, line_of(text, 'eval'))}: eval should be a table ([eval]) of evaluation settings")

    base = path.parent
    model_table = raw.get("model", {})
    if isinstance(model_table, dict) and model_table.get("trust_remote_code") is not False and "trust_remote_code" in model_table:
        raise PatcherError(f"{where(path, line_of(text, 'trust_remote_code'))}: a recipe may not set model.trust_remote_code (a shared recipe "
                           "would run a model's own code): remove it, and pass --trust-remote-code on the command line if you trust that model")
    model = section(ModelSettings, "model")
    data = section(DataSettings, "data")
    data = dataclasses.replace(data, path=resolve_path(base, data.path))
    check = section(CheckSettings, "check")
    check = dataclasses.replace(check, ppl_text=resolve_path(base, check.ppl_text))
    steps_raw = raw.get("step", [])
    if not isinstance(steps_raw, list) or not steps_raw or not all(isinstance(s, dict) for s in steps_raw):
        raise PatcherError(f"{path}: a recipe needs at least one [[step]] table with a method (step should be [[step]] tables)")
    steps, after = [], 0
    for i, s in enumerate(steps_raw):
        line = line_of(text, "[[step]]".strip("[]"), after)
        after = line
        if not isinstance(s.get("method"), str):
            raise PatcherError(f"{where(path, line)}: step {i + 1} needs method = \"NAME\" (a string), e.g. method = \"aura\"")
        s = dict(s)
        step_data = None
        if "data" in s:
            if not isinstance(s["data"], dict):
                raise PatcherError(f"{where(path, line)}: step[{i + 1}].data should be a table of data settings")
            step_data = data_table(data, s.pop("data"), base, where(path, line), f"step[{i + 1}].data")
        s = {k: resolve_path(base, v) if k.endswith("_path") and isinstance(v, str) else v for k, v in s.items()}
        steps.append(Step(s.pop("method"), s, step_data, line))
    return Recipe(path, raw.get("name", path.stem), model, data, section(CollectSettings, "collect"), check, tuple(steps), raw.get("eval", {}), text,
                  raw.get("tune", {}))
