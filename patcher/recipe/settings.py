"""Typed settings from TOML tables: every settings class is a dataclass, and `build` turns a table into
one, refusing unknown keys and wrong types by name. The same classes feed the CLI's flags, so a
value has one name and one help text in the recipe, on the command line and in the code."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
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


def build(cls: type, table: dict[str, Any], where: str, section: str, key_at: Callable[[str], str] | None = None) -> Any:
    """A settings dataclass from a TOML table, refusing unknown keys, wrong types and values outside
    a field's declared bounds by name. ``key_at(key)``, when given, says where a key is (the
    recipe's file:line of that key) for errors about one value; else ``where``."""
    at = key_at or (lambda key: where)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise PatcherError(f"{where}: unknown key {section}.{unknown[0]}; known keys: {', '.join(sorted(known))}")
    for key, value in table.items():
        if not matches(value, hints[key]):
            raise PatcherError(f"{at(key)}: {section}.{key} = {value!r} should be of type {hints[key]}")
    for f in dataclasses.fields(cls):
        if f.name in table:
            check_value(f, table[f.name], at(f.name), section)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        return cls(**kwargs)
    except PatcherError as e:  # a rule between fields (`Checked.rules`): said with the table's line
        raise PatcherError(f"{where}: {section}: {e}") from None


def check_value(f: dataclasses.Field, value: Any, where: str, section: str) -> None:
    """A field's declared bounds (``minimum``, ``maximum`` and their exclusive forms) and ``choices``
    (for a list: a non-empty list of them), refused by name with what is allowed."""
    meta = f.metadata
    at = f"{where}: {section + '.' if section else ''}{f.name} = {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, lo_open = (meta["exclusive_minimum"], True) if meta.get("exclusive_minimum") is not None else (meta.get("minimum"), False)
        hi, hi_open = (meta["exclusive_maximum"], True) if meta.get("exclusive_maximum") is not None else (meta.get("maximum"), False)
        low_ok = lo is None or (value > lo if lo_open else value >= lo)
        high_ok = hi is None or (value < hi if hi_open else value <= hi)
        if not (low_ok and high_ok):
            if lo is not None and hi is not None:
                raise PatcherError(f"{at} should be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
            if lo is not None:
                raise PatcherError(f"{at} should be {'above' if lo_open else 'at least'} {lo:g}")
            raise PatcherError(f"{at} should be {'below' if hi_open else 'at most'} {hi:g}")
    choices = meta.get("choices")
    if choices is not None:
        if isinstance(value, (list, tuple)):
            if not value or any(v not in choices for v in value):
                raise PatcherError(f"{at} should be a non-empty list of {', '.join(map(repr, choices))}")
        elif value not in choices:
            raise PatcherError(f"{at} should be one of {', '.join(map(repr, choices))}")


DECLARATIONS = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum", "choices", "no_edit", "tune")


def setting(default: Any = dataclasses.MISSING, *, help: str, build_only: bool = False, default_factory: Any = dataclasses.MISSING,  # noqa: A002
            **declared: Any) -> Any:
    """A settings field that declares everything about itself: its help text (shown by the CLI flags
    generated from it); for a method's settings, whether it is ``build_only`` (it changes how
    statistics become a patch but never what is collected, so a sweep or a tune over it reuses one
    collection); and ``declared``:

    * bounds: ``minimum``, ``maximum``, ``exclusive_minimum``, ``exclusive_maximum``, ``choices``
      (for a list field: a non-empty list of them), which `build` checks with the key and the
      recipe's line and `Checked` on construction;
    * for a strength-like setting, ``no_edit`` (the value that edits nothing) and ``tune``
      (``(low, high, grid)``: the range `patcher tune` searches when the recipe names none), so a
      new method is tunable by its fields alone."""
    unknown = sorted(set(declared) - set(DECLARATIONS))
    if unknown:
        raise TypeError(f"setting() got unknown declarations {unknown}; known: {', '.join(DECLARATIONS)}")
    if ("no_edit" in declared) != ("tune" in declared):
        raise TypeError("a strength-like setting declares both no_edit and tune")
    meta = {"help": help, "build_only": build_only} | {k: declared.get(k) for k in DECLARATIONS}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Checked:
    """Base of a settings dataclass: constructing one checks every field's declared bounds, then the
    class's own `rules` (what no single field can say, such as "meandiff needs k = 1"). A recipe's
    values were checked with their line before (`build`); this catches values set in code."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check_value(f, getattr(self, f.name), getattr(type(self), "method_name", type(self).__name__), "")
        self.rules()

    def rules(self) -> None:
        """Rules between fields; raise `PatcherError` naming them."""


def tune_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The strength-like fields of settings class ``cls`` (declared with ``no_edit`` and ``tune``), by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("tune") is not None}


def help_of(cls: type, name: str) -> str:
    """The help text of settings field ``name`` of ``cls``."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def build_only_fields(cls: type) -> frozenset[str]:
    """The fields of settings class ``cls`` marked ``build_only``."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("build_only"))
