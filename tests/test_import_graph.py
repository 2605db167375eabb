"""The packages of tuner/ form layers: no package imports, directly or through others, one that imports it.

Every import counts (module level, inside functions, under TYPE_CHECKING), read with ast, not run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tuner"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> modules it imports, package -> packages it imports); a package is tuner.X."""
    modules = _modules()
    by_module = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    by_package: dict[str, set[str]] = {}
    for name, targets in by_module.items():
        package = ".".join(name.split(".")[:2])
        by_package.setdefault(package, set()).update(".".join(t.split(".")[:2]) for t in targets)
        by_package[package].discard(package)
    return by_module, by_package


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_package_imports_one_that_imports_it():
    _, packages = _graphs()
    assert {"tuner.study", "tuner.report", "tuner.tracking", "tuner.loadgen"} <= set(packages)
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages) or [])


def test_no_module_imports_one_that_imports_it():
    modules, _ = _graphs()
    assert "tuner.loadgen.metrics" in modules["tuner.loadgen.replay"]
    assert find_cycle(modules) is None, " -> ".join(find_cycle(modules) or [])


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
