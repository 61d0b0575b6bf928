"""The layout shows the pipeline: no import circles among `compiler/` and `runtime/` (imports
inside functions and under `TYPE_CHECKING` count), `runtime/` never imports the compiler, and
the language layer imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from tests.conftest import ROOT

PACKAGES = ("compiler", "runtime")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> nx.DiGraph:
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph.add_edge(name, target)
    return graph


def test_there_are_no_import_circles():
    graph = imports()
    # a package's __init__ re-exporting its modules is not a circle of ideas: drop those edges
    # from a module to its own package's __init__ only
    circles = [c for c in nx.simple_cycles(graph) if len(c) > 1]
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c + c[:1]) for c in circles)


def test_the_runtime_never_imports_the_compiler():
    upward = [
        (a, b) for a, b in imports().edges if a.startswith("runtime") and b.startswith("compiler")
    ]
    assert upward == []


def test_the_language_imports_nothing_above_it():
    above = [
        (a, b)
        for a, b in imports().edges
        if a.startswith("compiler.language") and not b.startswith("compiler.language")
    ]
    assert above == []


def test_passes_do_not_import_kinds_or_tools():
    upward = [
        (a, b)
        for a, b in imports().edges
        if a.startswith("compiler.passes")
        and (
            b.startswith("compiler.kinds")
            or b.startswith("compiler.tools")
            or b == "compiler.components"
        )
    ]
    assert upward == []
