"""Plain-text tables for the terminal: every command prints its results through `render`."""

from __future__ import annotations

from collections.abc import Sequence


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str | None = None) -> str:
    """Columns padded to their widest cell; numbers right-aligned ("-", a number that does not apply,
    aligned with them)."""
    cells = [[_fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] == "-" for r in rows) and bool(rows) for i in range(len(headers))]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [title] if title else []
    out += [line(list(headers)), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)
