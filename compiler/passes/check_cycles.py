"""A directed cycle must pass through an edge with `delay >= 1`; one that does not is an algebraic
loop (each node would need its own output as input within the same step) and is an error naming it.
"""

from __future__ import annotations

import networkx as nx

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.passes.contract import contract


@contract(requires=(), provides=())
def check_cycles(ir: IR) -> list[Diagnostic]:
    instant = nx.DiGraph()
    first_edge: dict[tuple[str, str], int] = {}
    for u, v, data in ir.spec_edges():
        if (
            data["delay"] == 0
            and data["kind"] != "feedback"  # `check_feedback` asks for its delay, which breaks it
            and ir.graph.nodes[u]["role"] == "node"
            and ir.graph.nodes[v]["role"] == "node"
        ):
            instant.add_edge(u, v)
            first_edge.setdefault((u, v), data["index"])
    found: list[Diagnostic] = []
    for component in nx.strongly_connected_components(instant):
        sub = instant.subgraph(component)
        if len(component) == 1 and not sub.number_of_edges():
            continue
        start = min(component, key=lambda v: list(ir.graph.nodes).index(v))
        cycle = nx.find_cycle(sub, source=start)
        names = [ir.graph.nodes[u]["name"] for u, _ in cycle] + [
            ir.graph.nodes[cycle[0][0]]["name"]
        ]
        index = min(first_edge[e] for e in cycle)
        found.append(
            ir.error(
                ("edges", index),
                f"these edges form a loop with no delay: {' -> '.join(names)}",
                "add `delay: 1` to one edge of this cycle (it then reads the previous feedback step)",
            )
        )
    return found
