"""Every output must depend on an input; a node that reaches no output is reported as a warning."""

from __future__ import annotations

import networkx as nx

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.passes.contract import contract


@contract(requires=(), provides=())
def check_reachability(ir: IR) -> list[Diagnostic]:
    if (
        ir.withheld.graph
        or ir.vertices("unknown")
        or (
            len(ir.spec.inputs) > 1 and any(d["spec"].input is None for _, d in ir.vertices("node"))
        )
    ):
        return []  # dangling names are check_references' errors, and withheld parts the
        # document's: reachability would only echo them
    graph = ir.graph
    inputs = [v for v, _ in ir.vertices("input")]
    live: set[str] = set()
    for v in inputs:
        live |= nx.descendants(graph, v)
    found: list[Diagnostic] = []
    for vertex, data in ir.vertices("output"):
        if vertex not in live:
            found.append(
                ir.error(
                    (*data["path"], "from"),
                    f"output `{data['name']}` does not depend on any input",
                    "its nodes read no input (`input: []`) and receive no message from a node that does",
                )
            )
    feeding: set[str] = set()
    for vertex, _ in ir.vertices("output"):
        feeding |= nx.ancestors(graph, vertex)
    for vertex, data in ir.vertices("node"):
        if vertex not in feeding:
            found.append(
                ir.warning(
                    data["path"],
                    f"node `{data['name']}` feeds no output, so its weights would never be trained",
                    "read it from an output, send an edge from it, or remove it",
                )
            )
    return found
