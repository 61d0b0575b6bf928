"""Give every input, node, output and the message bus a width.

* A node without a width takes the width of the input it reads, if that input declares one.
* A tokens input without a width takes its readers' width when they agree, else the widest
  (narrower readers get a learned projection).
* An output's read width is the sum of its sources' widths (they are concatenated, never added:
  adding streams of different widths was a bug of the original sketch: docs/designs.md, design 000).
* The message bus is `defaults.message.width`, else the widest node.
"""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.kinds import KINDS
from compiler.passes.contract import contract


@contract(
    requires=("nodes.settings",),
    provides=("nodes.width", "inputs.width", "outputs.width", "facts.bus_width"),
)
def infer_widths(ir: IR) -> IR:
    graph = ir.graph.copy()
    nodes = graph.nodes
    for vertex, data in ir.vertices("node"):
        settings = data["settings"]
        width = (
            settings["width"]
            if settings is not None
            else KINDS.get(data["kind"]).declared_width(data["spec"])
        )
        if width is None:
            declared = [
                nodes[u]["spec"].width
                for u in graph.predecessors(vertex)
                if nodes[u]["role"] == "input"
            ]
            declared = [w for w in declared if w is not None]
            if declared:
                width = max(declared)
        nodes[vertex]["width"] = width
    for vertex, data in ir.vertices("input"):
        width = data["spec"].width
        if width is None:
            readers = [
                nodes[v]["width"] for v in graph.successors(vertex) if nodes[v]["role"] == "node"
            ]
            readers = [w for w in readers if w is not None]
            width = max(readers) if readers else None
        nodes[vertex]["width"] = width
    for vertex, _ in ir.vertices("output"):
        widths = [
            nodes[u]["width"]
            for u, _, d in graph.in_edges(vertex, data=True)
            if nodes[u]["role"] == "node"
        ]
        nodes[vertex]["width"] = sum(widths) if widths and None not in widths else None
    node_widths = [d["width"] for _, d in ir.with_graph(graph).vertices("node") if d["width"]] or [
        0
    ]
    bus = ir.spec.defaults.message.width or max(node_widths)
    return ir.with_graph(graph).with_facts(bus_width=bus)
