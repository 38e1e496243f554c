"""The package layering of docs/ARCHITECTURE.md, checked on the source: what each
package may import, no import cycle between modules, and no module importing
another's private (underscore) names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bus", "gateway", "workers", "clawbus")
# clawbus/ holds the commands and, beside them, the few modules every process
# uses; those are all bus, gateway and workers may import from it.
FOUNDATION = {"clawbus.config", "clawbus.logs", "clawbus.prom", "clawbus.gcstats",
              "clawbus.deadline", "clawbus.tracing", "clawbus.spans", "clawbus.telemetry"}
MAY_IMPORT = {
    "bus": {"bus"},
    "gateway": {"gateway", "bus"},
    "workers": {"workers", "bus"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import of ours,
    lazy ones inside functions included."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, list[str], int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            # `from pkg import module` imports the module
            modules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out += [(m, [], node.lineno) for m in modules]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not modules:
                out.append((target, rest, node.lineno))
    return [(m, n, line) for m, n, line in out if m.split(".")[0] in PACKAGES]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _resolve(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_what_each_package_may_import(package: str) -> None:
    wrong = []
    for name, imports in GRAPH.items():
        if name.split(".")[0] != package:
            continue
        for target, _, line in imports:
            top = target.split(".")[0]
            if top in MAY_IMPORT[package] or _resolve(target) in FOUNDATION:
                continue
            wrong.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_foundation_imports_nothing_of_ours_but_itself() -> None:
    wrong = [f"{name} imports {target}" for name in FOUNDATION
             for target, _, _ in GRAPH[name] if _resolve(target) not in FOUNDATION]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names() -> None:
    wrong = [f"{MODULES[name].relative_to(ROOT)}:{line} takes {n} from {target}"
             for name, imports in GRAPH.items() for target, names, line in imports
             for n in names if n.startswith("_") and _resolve(target) != name]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    edges = {name: {r for t, _, _ in imports if (r := _resolve(t)) and r != name}
             for name, imports in GRAPH.items()}
    # A package's __init__ re-exporting its modules is not a cycle of modules.
    for name, targets in edges.items():
        if (ROOT / name.replace(".", "/") / "__init__.py").exists():
            targets.difference_update({t for t in targets if t.startswith(name + ".")})
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, set())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_the_tree() -> None:
    """(So the tests above cannot pass by reading nothing.)"""
    assert {"bus.connection", "gateway.runs", "workers.worker", "clawbus.main"} <= set(MODULES)
    assert any(t == "bus.connection" for t, _, _ in GRAPH["bus.leases"])
    assert any(t == "gateway.app" for t, _, _ in GRAPH["clawbus.main"])  # a lazy import


def test_a_worker_without_agent_tools_never_imports_the_mcp_sdk() -> None:
    """The MCP SDK (~100 modules, ~15 MiB of a worker's memory) is imported only by
    a worker whose agents have MCP servers (workers/worker.py)."""
    code = ("import sys, workers.worker, workers.main, clawbus.main; "
            "print([m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"
