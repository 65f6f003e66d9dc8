"""The package's layering (docs/design.md): every import, including those inside functions, goes
to the same layer or a lower one, the import graph has no cycle, and no module imports another
module's private (underscore) name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import patcher

ROOT = Path(patcher.__file__).parent
# lowest first; a module may import its own layer and the ones before it
LAYERS = ["core", "io", "recipe", "data", "edits", "collect", "methods", "bake", "evaluate", "publish", "workflows", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """Rank of a module's layer; the top-level ``patcher`` package (the public API facade) is above all."""
    parts = module.split(".")
    if len(parts) == 1:
        return len(LAYERS)
    return LAYERS.index(parts[1])


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import statement in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "patcher" or target.startswith("patcher."):
                names = [a.name for a in node.names]
                # `from .pkg import submodule` imports the submodule
                subs = [n for n in names if (ROOT.parent / Path(*target.split("."), n)).with_suffix(".py").is_file()
                        or (ROOT.parent / Path(*target.split("."), n) / "__init__.py").is_file()]
                for n in subs:
                    out.append((f"{target}.{n}", [], node.lineno))
                rest = [n for n in names if n not in subs]
                if rest or not subs:
                    out.append((target, rest, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("patcher")]
    return out


FILES = sorted(ROOT.rglob("*.py"))
GRAPH = {module_name(f): imports(f) for f in FILES}


def test_every_module_is_in_a_layer() -> None:
    for name in GRAPH:
        assert name == "patcher" or name.split(".")[1] in LAYERS, f"{name} is in no layer: add its folder to docs/design.md and LAYERS"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module: str) -> None:
    for target, _, line in GRAPH[module]:
        assert target in GRAPH, f"{module}:{line} imports {target}, which does not exist"
        assert layer_of(target) <= layer_of(module), f"{module}:{line} imports {target}, a higher layer"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_private_name_from_another_module(module: str) -> None:
    for target, names, line in GRAPH[module]:
        private = [n for n in names if n.startswith("_")]
        assert target == module or not private, f"{module}:{line} imports private {private} from {target}"


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target, _, _ in GRAPH.get(node, []):
            if target == node:
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [node, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target, path + [target])
        state[node] = 2

    for m in GRAPH:
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    """The checks above can fail: an upward, a private and a cyclic import are all caught."""
    pkg = tmp_path / "patcher"
    (pkg / "core").mkdir(parents=True)
    (pkg / "io").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from ..io.b import _g\n")
    (pkg / "io" / "b.py").write_text("from ..core.a import f\n")
    global ROOT
    saved = ROOT
    ROOT = pkg
    try:
        found = imports(pkg / "core" / "a.py")
    finally:
        ROOT = saved
    assert found == [("patcher.io.b", ["_g"], 2)]
    assert layer_of("patcher.io.b") > layer_of("patcher.core.a")
