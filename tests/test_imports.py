"""The import graph of ``autocomp``: no cycle, and each module imports only its own layer or the layers below it
(the contracts in ``pyproject.toml``, CONTRIBUTING.md "Imports point down")."""

from __future__ import annotations

import grimp
from importlinter.cli import lint_imports

from tests.conftest import ROOT


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_cycle():
    graph = grimp.build_graph("autocomp")
    assert len(graph.modules) > 40  # every module of the package, function-level imports included
    assert cycles(graph) == []


def test_a_cycle_is_found():  # the check above can fail
    graph = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")]:
        graph.add_import(importer=a, imported=b)
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_each_module_imports_only_its_layer_or_the_layers_below(monkeypatch):
    monkeypatch.chdir(ROOT)  # the contracts in pyproject.toml
    assert lint_imports() == 0
