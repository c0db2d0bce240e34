"""The import contract: the layers in pyproject.toml ([tool.forethought] layers), checked on the real source.

Every module of src/forethought and benchmarks/ is parsed (never imported) and each `import` / `from ... import`
becomes an edge, including imports inside functions: a lazy import is still a dependency, and the cycles this
test exists to catch hid behind lazy imports. `from package import name` counts as an edge to the submodule
`package.name` when there is one, else to the package's __init__.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"forethought": ROOT / "src" / "forethought", "benchmarks": ROOT / "benchmarks"}

# Allow-lists for a cycle or upward edge that must live for a while (none today). An entry that no longer occurs
# fails the test, so none outlives its fix.
KNOWN_CYCLES: list[list[str]] = []
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def layer_order() -> list[list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["forethought"]["layers"]


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__)."""
    found = {}
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies inside (None for a module outside the packages)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: dict[str, Path] | None = None) -> dict[str, set[str]]:
    known = modules() if known is None else known
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = module.split(".")
                    base = base if is_package else base[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != module:
                    edges.add(resolved)
        graph[module] = edges
    return graph


def layer_of(module: str, order: list[list[str]]) -> int:
    """The floor of a module: its first name under the package (forethought.model.x -> "model")."""
    parts = module.split(".")
    key = parts[1] if parts[0] == "forethought" and len(parts) > 1 else parts[0]
    for floor, names in enumerate(order):
        if key in names:
            return floor
    raise AssertionError(f"{module}: its part {key!r} is on no floor of [tool.forethought] layers in pyproject.toml")


def upward_edges(graph: dict[str, set[str]], order: list[list[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(b, order) > layer_of(a, order)}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (a few hundred)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_on_a_floor():
    order = layer_order()
    for module in modules():
        layer_of(module, order)


def test_no_import_cycle():
    found = cycles(import_graph())
    new = [c for c in found if c not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(" <-> ".join(c) for c in new)
    stale = [c for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"KNOWN_CYCLES entries that no longer occur (delete them): {stale}"


def test_no_upward_import():
    order = layer_order()
    up = upward_edges(import_graph(), order)
    new = sorted(up - KNOWN_VIOLATIONS)
    assert not new, "upward imports (layers in pyproject.toml): " + "; ".join(f"{a} -> {b}" for a, b in new)
    stale = sorted(KNOWN_VIOLATIONS - up)
    assert not stale, f"KNOWN_VIOLATIONS entries that no longer occur (delete them): {stale}"


def test_the_walker_sees_a_cycle_and_an_upward_edge():
    """Control: a graph with a known cycle and a known upward edge must be reported as such."""
    order = [["low"], ["high"]]
    graph = {"low.a": {"low.b"}, "low.b": {"low.a", "high.c"}, "high.c": set()}
    assert cycles(graph) == [["low.a", "low.b"]]
    assert upward_edges(graph, order) == {("low.b", "high.c")}
