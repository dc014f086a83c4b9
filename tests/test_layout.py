"""The layout keeps imports one way: no two packages import each other, directly or round a circle.

The map (docs/architecture.md, "Layout"): cli -> stacks -> process -> admin -> dataplane -> controlplane ->
observability -> config, and router_client below the gateway. Imports under TYPE_CHECKING count too:
a module that needs its caller's type takes a protocol or the few values it uses instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("gateway", "router_client", "replicas")


def unit_of(module: str) -> str:
    """The package a module belongs to: gateway.<sub> for the gateway's packages, else its top-level name."""
    parts = module.split(".")
    if parts[0] == "gateway" and len(parts) > 1:
        return "gateway." + parts[1]
    return parts[0]


def import_graph() -> dict[str, dict[str, set[str]]]:
    """unit -> imported unit -> the modules that import it (for the failure message)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for top in TOP:
        for path in (ROOT / top).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            unit = unit_of(module)
            for node in ast.walk(ast.parse(path.read_text())):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in TOP and unit_of(name) != unit and name != "gateway":
                        graph.setdefault(unit, {}).setdefault(unit_of(name), set()).add(module)
    return graph


def find_cycle(graph: dict[str, dict[str, set[str]]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in list(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        steps = [f"{a} -> {b} (in {', '.join(sorted(graph[a][b]))})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between packages:\n  " + "\n  ".join(steps))


def test_data_plane_depends_only_on_what_lies_below_it():
    below = {"gateway.config", "gateway.controlplane", "gateway.observability", "router_client"}
    graph = import_graph()
    assert set(graph.get("gateway.dataplane", {})) <= below, graph["gateway.dataplane"]
    assert set(graph.get("gateway.controlplane", {})) <= {"gateway.config", "router_client"} | {"gateway.observability"}
    assert set(graph.get("router_client", {})) == set()


def module_graph() -> dict[str, dict[str, int]]:
    """module -> imported module (of our packages) -> line, TYPE_CHECKING imports included."""
    graph: dict[str, dict[str, int]] = {}
    modules = set()
    paths = [path for top in TOP for path in (ROOT / top).rglob("*.py")]
    for path in paths:
        modules.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    for path in paths:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                if name in modules and name != module:
                    edges.setdefault(name, node.lineno)
    return graph


def test_no_import_cycle_between_modules():
    """No module imports itself round a circle, inside a package too (the data path's modules among them)."""
    graph = module_graph()
    cycle = find_cycle({module: {k: set() for k in edges} for module, edges in graph.items()})
    if cycle:
        steps = [f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between modules:\n  " + "\n  ".join(steps))
