"""The layering of docs/design.md §7 holds: packages import only from lower floors, nothing imports in a cycle,
no private name crosses a package, and importing a package loads nothing above it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lily_ssm"
# Floor by package (lily_ssm.<package>, or a top-level module); a module may import from its own floor
# and below, never above. Within a floor the package graph must stay acyclic.
FLOORS = [
    ["utils", "version"],
    ["ops"],
    ["modules"],
    ["tuners"],
    ["data", "models", "persistence"],
    ["config"],
    ["train", "evaluation", "ablation", "analysis", "interop"],
    ["quickstart", "env", "cli"],
]
FLOOR = {package: level for level, packages in enumerate(FLOORS) for package in packages}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Import statements that run (those under ``if TYPE_CHECKING:`` do not)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(child) for child in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def _edges() -> list[tuple[str, str, list[str]]]:
    """``(importer, imported module, names)`` for every import of lily_ssm inside lily_ssm (lazy ones too)."""
    modules = _modules()
    edges = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges += [(name, alias.name, []) for alias in node.names if alias.name.startswith("lily_ssm")]
                continue
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            if not target.startswith("lily_ssm"):
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                edges.append((name, candidate if candidate in modules else target,
                              [] if candidate in modules else [alias.name]))
    return edges


def _package(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "<root>"


def test_every_package_has_a_floor():
    packages = {_package(m) for m in _modules()} - {"<root>"}
    assert packages <= set(FLOOR), f"packages without a floor in docs/design.md §7: {sorted(packages - set(FLOOR))}"


def test_no_import_points_up():
    upward = [f"{a} -> {b}" for a, b, _ in _edges()
              if _package(a) != "<root>" and FLOOR[_package(b)] > FLOOR[_package(a)]]
    assert not upward, "imports that point up a floor:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path, or None (depth-first search)."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            found = visit(nxt, [*path, node]) if nxt not in state else None
            if found:
                return found
        state[node] = 2
        return None

    return next((c for node in list(graph) if node not in state and (c := visit(node, []))), None)


def test_no_cycles_between_modules_or_packages():
    modules: dict[str, set[str]] = {}
    packages: dict[str, set[str]] = {}
    for a, b, _ in _edges():
        modules.setdefault(a, set()).add(b)
        if _package(a) != _package(b) and "<root>" not in (_package(a), _package(b)):
            packages.setdefault(_package(a), set()).add(_package(b))
    assert _cycle(modules) is None, f"module cycle: {' -> '.join(_cycle(modules))}"
    assert _cycle(packages) is None, f"package cycle: {' -> '.join(_cycle(packages))}"


def test_no_private_name_crosses_a_package():
    crossing = [f"{a} imports {', '.join(names)} from {b}" for a, b, names in _edges()
                if _package(a) != _package(b) and any(n.startswith("_") and not n.endswith("__") for n in names)]
    private_attributes = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "hasattr", "setattr"):
                key = node.args[1] if len(node.args) > 1 else None
                if isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("_lily"):
                    private_attributes.append(f"{name}: {ast.unparse(node)}")
    assert not crossing and not private_attributes, "\n".join(crossing + private_attributes)


@pytest.mark.parametrize("package", sorted(FLOOR))
def test_importing_a_package_loads_nothing_above_it(package):
    code = (f"import importlib, json, sys; importlib.import_module('lily_ssm.{package}'); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lily_ssm.'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.splitlines()[-1])
    above = [m for m in loaded if FLOOR.get(_package(m), -1) > FLOOR[package]]
    assert not above, f"importing lily_ssm.{package} loaded {above}"
