"""Capabilities instead of special cases: refuse what a part of the spec cannot honour.

Every node kind and component declares what it can take part in (`compiler.language.capabilities`).
At validate time this pass refuses an edge into a node that cannot receive messages, out of one
that cannot send, and a node on a feedback cycle that cannot iterate, each at the place written.
What the whole model supports (ONNX, torch.export, a fullgraph compile, FSDP, CUDA graphs) is
`model_capabilities`: the tools ask it before they start, so a missing operator is a located error
in a fraction of a second rather than a failure minutes into an export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx

from compiler.ir import IR
from compiler.language.capabilities import CAPABILITY_HELP
from compiler.language.diagnostics import Diagnostic, SpecError
from compiler.language.kinds import KINDS
from compiler.language.registry import REGISTRY
from compiler.passes.contract import contract

MODEL_CAPABILITIES = ("onnx", "export", "fullgraph", "fsdp", "cuda_graphs")


@contract(requires=("nodes.settings",), provides=())
def check_capabilities(ir: IR) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    graph = ir.graph
    for u, v, edge in ir.spec_edges():
        if graph.nodes[u]["role"] != "node" or graph.nodes[v]["role"] != "node":
            continue  # unknown ends: check_references; companions: their own kind's checks
        for end, vertex, capability in (
            ("to", v, "receives_messages"),
            ("from", u, "sends_messages"),
        ):
            data = graph.nodes[vertex]
            if getattr(KINDS.get(data["kind"]).capabilities, capability):
                continue
            found.append(
                ir.error(
                    (*edge["path"], end),
                    f"`{data['name']}` is a `{data['kind']}` node, which cannot "
                    f"{CAPABILITY_HELP[capability]}: this `{edge['kind']}` edge would be ignored by it",
                    _hint(data, capability),
                )
            )
    if ir.spec.feedback is not None:
        found.extend(_feedback_refusals(ir))
    return found


def _hint(data: dict, capability: str) -> str:
    if capability == "receives_messages":
        return (
            f"remove the edge, or send it to a node of a kind that receives messages (`epicycle "
            f"kinds` lists them); a `{data['kind']}` node reads only its inputs"
        )
    return "remove the edge, or read this node's states through an output instead"


def _feedback_refusals(ir: IR) -> list[Diagnostic]:
    cycles = nx.DiGraph()
    cycles.add_edges_from((u, v) for u, v, _ in ir.spec_edges())
    found = []
    for component in nx.strongly_connected_components(cycles):
        if len(component) < 2 and not any(cycles.has_edge(v, v) for v in component):
            continue
        for vertex in sorted(component):
            data = ir.graph.nodes[vertex]
            capabilities = KINDS.get(data["kind"]).capabilities if data["role"] == "node" else None
            # a node that cannot receive is refused on the edges into it already
            if (
                capabilities is not None
                and capabilities.receives_messages
                and not capabilities.feedback
            ):
                found.append(
                    ir.error(
                        (*data["path"], "kind"),
                        f"`{data['name']}` is a `{data['kind']}` node on a feedback cycle, which it "
                        "cannot take part in",
                        "take it off the cycle, or use a kind that supports feedback",
                    )
                )
    return found


@dataclass(frozen=True)
class Limit:
    """A part of the spec that rules a capability out, where it was written, and why."""

    path: tuple[Any, ...]
    reason: str


def model_capabilities(ir: IR) -> dict[str, list[Limit]]:
    """For each whole-model capability, the parts of this spec that rule it out (empty: supported)."""
    limits: dict[str, list[Limit]] = {name: [] for name in MODEL_CAPABILITIES}

    def rule_out(capabilities: Any, path: tuple, what: str) -> None:
        for name in MODEL_CAPABILITIES:
            if not getattr(capabilities, name):
                limits[name].append(Limit(path, what))

    for _, data in ir.graph.nodes(data=True):
        if data["role"] not in ("node", "observer"):
            continue
        rule_out(
            KINDS.get(data["kind"]).capabilities,
            (*data["path"], "kind"),
            f"node `{data['name']}` is a `{data['kind']}`",
        )
        settings, origin = data.get("settings"), data.get("settings_from")
        for family in ("attention", "rotary"):
            chosen = settings[family] if settings else None
            if chosen is not None:
                rule_out(
                    REGISTRY.get(family, chosen.kind).capabilities,
                    origin[family],
                    f"node `{data['name']}` uses the {family} component `{chosen.kind}`",
                )
    for name, perspective in ir.spec.perspectives.items():
        if perspective.kind == "rotation" and _used(ir, name):
            limits["onnx"].append(
                Limit(
                    ("perspectives", name, "kind"),
                    f"perspective `{name}` is a rotation, the matrix exponential of a learned "
                    "generator, an operator ONNX has no counterpart for",
                )
            )
            limits["cuda_graphs"].append(
                Limit(
                    ("perspectives", name, "kind"),
                    f"perspective `{name}` is a rotation, whose matrix exponential picks its "
                    "series' degree from the generator's norm read on the host, which a CUDA "
                    "graph cannot capture",
                )
            )
    if ir.spec.time is not None:
        why = "a time axis steps through the sequence one time step at a time"
        for name, reason in (
            ("onnx", f"{why}; an exported graph would hold one fixed number of steps"),
            ("export", f"{why}; an exported program would hold one fixed number of steps"),
        ):
            limits[name].append(Limit(("time",), reason))
    feedback = ir.spec.feedback
    if feedback is not None and feedback.mode == "equilibrium":
        where = ("feedback", "mode")
        why = "equilibrium feedback stops when its residual falls below the tolerance"
        for name, reason in (
            ("onnx", f"{why}, a data-dependent loop that cannot be exported"),
            ("export", f"{why}, a data-dependent loop that cannot be captured"),
            (
                "fullgraph",
                f"{why}: the solver runs eagerly (torch.compiler.disable), a graph break, and so "
                "does its implicit backward",
            ),
            ("cuda_graphs", f"{why}, which reads the residual on the host"),
        ):
            limits[name].append(Limit(where, reason))
        if feedback.lipschitz is not None:
            limits["fsdp"].append(
                Limit(
                    ("feedback", "lipschitz"),
                    "`lipschitz` measures the loop through a double backward, which cannot reach "
                    "the weights FSDP gathers",
                )
            )
        if feedback.jacobian is not None:
            limits["fsdp"].append(
                Limit(
                    ("feedback", "jacobian"),
                    "`jacobian` trains on a vector-Jacobian product, whose gradient is a double "
                    "backward that cannot reach the weights FSDP gathers",
                )
            )
    return limits


def _used(ir: IR, perspective: str) -> bool:
    return any(
        getattr(d["spec"], "perspective", None) == perspective for _, d in ir.vertices("node")
    )


def require(ir: IR, capability: str, action: str, hint: str) -> None:
    """Raise a located `SpecError` naming every part that rules `capability` out of `action`."""
    limits = model_capabilities(ir)[capability]
    if limits:
        raise SpecError(
            [ir.error(limit.path, f"cannot {action}: {limit.reason}", hint) for limit in limits]
        )
