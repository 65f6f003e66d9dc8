"""Typed settings from TOML tables: every settings class is a dataclass, and `build` turns a table into
one, refusing unknown keys and wrong types by name. The same classes feed the CLI's flags, so a
value has one name and one help text in the recipe, on the command line and in the code."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from ..core.errors import PatcherError


def matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, list) and all(matches(v, typing.get_args(hint)[0]) for v in value)
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
        if not matches(value, hints[key]):
            raise PatcherError(f"{where}: {section}.{key} = {value!r} should be of type {hints[key]}")
    for f in dataclasses.fields(cls):
        if f.name in table:
            check_value(f, table[f.name], where, section)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return cls(**kwargs)


def check_value(f: dataclasses.Field, value: Any, where: str, section: str) -> None:
    """A field's declared bounds (``minimum``) and ``choices``, refused by name with what is allowed."""
    low, choices = f.metadata.get("minimum"), f.metadata.get("choices")
    if low is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= low:
        raise PatcherError(f"{where}: {section}.{f.name} = {value!r} should be at least {low}")
    if choices is not None and value not in choices:
        raise PatcherError(f"{where}: {section}.{f.name} = {value!r} should be one of {', '.join(map(repr, choices))}")


def setting(default: Any = dataclasses.MISSING, *, help: str, build_only: bool = False, default_factory: Any = dataclasses.MISSING,  # noqa: A002
            minimum: float | None = None, choices: tuple[Any, ...] | None = None) -> Any:
    """A settings field with its help text (shown by the CLI flags generated from it) and, for a
    method's settings, whether it is ``build_only``: it changes how statistics become a patch but
    never what is collected, so a sweep or a tune over it reuses one collection. ``minimum`` and
    ``choices`` bound its value: `build` refuses a value outside them with the key and the line
    (a batch size of 0 or a padding side of "middle" never reaches the code)."""
    meta = {"help": help, "build_only": build_only, "minimum": minimum, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(cls: type, name: str) -> str:
    """The help text of settings field ``name`` of ``cls``."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def build_only_fields(cls: type) -> frozenset[str]:
    """The fields of settings class ``cls`` marked ``build_only``."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("build_only"))
