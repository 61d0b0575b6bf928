"""Each node kind's own rules: its `check` hook on every node of the kind, and the whole-graph
checks it brings (`graph_checks`: a gear's trains, a companion's attachment), for every kind
registered, since an edge kind that belongs to one (`mesh`) can be misused without it."""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.language.kinds import KINDS
from compiler.passes.contract import contract


@contract(requires=("nodes.settings", "nodes.width"), provides=())
def check_kinds(ir: IR) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for vertex, data in ir.vertices("node"):
        found.extend(KINDS.get(data["kind"]).check(ir, vertex))
    for node_kind in KINDS:
        if _whole_graph_withheld(ir, node_kind.name):
            continue
        for check in node_kind.graph_checks:
            found.extend(check(ir))
    return found


def _whole_graph_withheld(ir: IR, kind_name: str) -> bool:
    """A kind's whole-graph rules (a gear train, a companion's host) read every node of the kind
    and every edge: with one of them withheld they could only report its absence."""
    withheld = ir.withheld
    kinds = withheld.node_kinds
    return withheld.any("edges") or kind_name in kinds or bool(kinds - {k.name for k in KINDS})


@contract(requires=("nodes.settings", "nodes.width"), provides=())
def apply_kind_transforms(ir: IR) -> IR:
    """The whole-graph transforms kinds bring (`graph_transforms`: a gear's velocities), after
    every check has passed."""
    for node_kind in KINDS:
        for transform in node_kind.graph_transforms:
            ir = transform(ir)
    return ir
