"""No function in patcher/ takes more than 8 parameters (issue 23): related options travel as one
typed object (`Plan`, `BakeOptions`, `TuneOptions`, ...), or as ``**options`` turned into one at the
top. The click command callbacks in cli.py too: their option groups (`placement_options`,
`settings_options`, `eval_options`) hand each command one typed object per group."""

from __future__ import annotations

import ast
from pathlib import Path

import patcher

ROOT = Path(patcher.__file__).parent
LIMIT = 8


def count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args] + [x.arg for x in a.kwonlyargs]
    n = len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)
    return n + (a.vararg is not None) + (a.kwarg is not None)


def test_no_function_takes_more_than_eight_parameters() -> None:
    over = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and count(node) > LIMIT:
                over.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name} ({count(node)})")
    assert not over, "functions over 8 parameters: " + "; ".join(over)


def test_the_count_counts() -> None:
    fn = ast.parse("def f(self, a, b=1, *c, d, e=2, **f): pass").body[0]
    assert count(fn) == 6  # type: ignore[arg-type]


def test_tune_is_a_package_of_small_modules() -> None:
    """`workflows/tune/`: the space, the proxy, the search, the pick and the result each in its own
    module, none over 300 lines."""
    folder = ROOT / "workflows" / "tune"
    sizes = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert {"__init__.py", "space.py", "proxy.py", "search.py", "pick.py", "result.py"} <= set(sizes)
    assert max(sizes.values()) <= 300, sizes
