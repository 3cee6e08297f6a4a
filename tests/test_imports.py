"""The package's modules import each other without cycles.

An import made inside a function hides a cycle from Python (it runs after both
modules exist) but not from the design: the modules still depend on each other.
So every import counts here, at module level or inside a function; only those
under ``if TYPE_CHECKING:`` (never run) are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The installed package's layout (pyproject's package-dir): facecap.flows is the folder flows/, etc.
PACKAGE_DIRS = {"facecap": "facecap", "facecap.flows": "flows", "facecap.tasks": "tasks",
                "facecap.models": "models", "facecap.quality": "quality"}
# Cycles tolerated for now, each by the modules it runs through.


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every .py file of the installed package."""
    modules: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [package, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            # A sub-folder of facecap/ that pyproject maps elsewhere is not this package's.
            modules.setdefault(name, path)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, wherever it is, except in the body of ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module `name` is, or is inside of (facecap.x.y.attr -> facecap.x.y)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def dependencies(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    deps: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from facecap.x import y`: y may be a submodule (an edge to it) or a name in facecap.x.
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin
                       for alias in node.names]
        for target in targets:
            owner = _owner(target, modules)
            if owner is not None and owner != name:
                deps.add(owner)
    return deps


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: dependencies(name, path, modules) for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or not (Tarjan's algorithm); only groups of several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def shortest_cycle(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import path from `start` back to itself (breadth-first), `start` at both ends."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in no cycle of {sorted(component)}")


def find_cycles(graph: dict[str, set[str]], component: set[str]) -> list[list[str]]:
    """A shortest cycle through each module of a group, each cycle once (starting at its first module by name)."""
    cycles: dict[tuple[str, ...], None] = {}
    for start in sorted(component):
        cycle = shortest_cycle(start, component, graph)[:-1]
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]
        cycles.setdefault((*cycle, cycle[0]), None)
    return [list(c) for c in cycles]


def test_walks_the_whole_package():
    graph = import_graph()
    for name in ("facecap.cli", "facecap.runner", "facecap.flows.curate", "facecap.stages.ingest",
                 "facecap.quality.checks"):
        assert name in graph
    assert "facecap.runner" in graph["facecap.flows.curate"]


def test_counts_imports_inside_functions_and_resolves_submodules(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\n"
                   "from facecap import storage\n"
                   "from .b import thing\n"
                   "if TYPE_CHECKING:\n    from facecap.c import C\n"
                   "def f():\n    import facecap.d.e\n")
    modules = {name: Path("x.py") for name in
               ("facecap", "facecap.storage", "facecap.a", "facecap.a.mod", "facecap.a.b", "facecap.c",
                "facecap.d", "facecap.d.e")}
    assert dependencies("facecap.a.mod", src, modules) == {"facecap.storage", "facecap.a.b", "facecap.d.e"}


def test_finds_every_cycle_with_its_path():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"b"}, "e": {"a"}}
    (component,) = strongly_connected(graph)
    assert component == {"a", "b", "c", "d"}
    assert find_cycles(graph, component) == [["a", "b", "c", "a"], ["b", "d", "b"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = [" -> ".join(cycle) for component in strongly_connected(graph) for cycle in find_cycles(graph, component)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_layers():
    """Readers below records and stages, shard types a leaf, stages unaware of the runner that feeds them."""
    graph = import_graph()
    above_sources = ("facecap.stages", "facecap.runner", "facecap.records", "facecap.shards")
    for name in graph:
        if name == "facecap.sources" or name.startswith("facecap.sources."):
            wrong = {m for m in _reachable(graph, name) if m.startswith(above_sources)}
            assert not wrong, f"{name} imports {sorted(wrong)}"
    assert _reachable(graph, "facecap.shards") <= {"facecap", "facecap.sources", "facecap.sources.spec",
                                                   "facecap.storage"}
    assert not {"facecap.runner", "facecap.records"} & _reachable(graph, "facecap.stages.base")
