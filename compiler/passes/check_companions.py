"""A companion (design 004) observes exactly one host and feeds nothing; its shapes must fit.

The geometry constrains the sizes: the lens lifts `sphere_dim` to `lens_dim` isometrically, so it
cannot narrow; the spectral attention splits `lens_dim` into heads; alpha starts inside its bound.
"""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic

ATTACH = "connect it with `{from: HOST, to: %s, kind: companion}`"


def check_companions(ir: IR) -> list[Diagnostic]:
    graph, found = ir.graph, []
    role = {v: d["role"] for v, d in graph.nodes(data=True)}
    hosts: dict[str, list[int]] = {v: [] for v, _ in ir.vertices("companion")}
    for u, v, edge in sorted(graph.edges(data=True), key=lambda e: str(e[2]["path"])):
        if edge["role"] == "companion":
            found.extend(_check_attachment(ir, u, v, edge, role))
            if role[v] == "companion":  # a wrong host is reported once, by `_check_attachment`
                hosts[v].append(edge["index"])
        elif edge["role"] == "edge" and "companion" in (role[u], role[v]):
            name = graph.nodes[u if role[u] == "companion" else v]["name"]
            end = "from" if role[u] == "companion" else "to"
            found.append(
                ir.error(
                    (*edge["path"], end),
                    f"`{name}` is a companion: it observes its host and takes part in no "
                    f"`{edge['kind']}` edge",
                    f"{ATTACH % name}, or make `{name}` a transformer",
                )
            )
        elif edge["role"] == "output" and role[u] == "companion":
            name = graph.nodes[u]["name"]
            found.append(
                ir.error(
                    edge["path"],
                    f"output `{graph.nodes[v]['name']}` reads companion `{name}`, which has no token "
                    "stream of its own",
                    "read its host instead; the companion's reconstruction and metrics come from "
                    "`model.companion_outputs` and `model.companion_metrics()`",
                )
            )
    for vertex, data in ir.vertices("companion"):
        name, path, spec = data["name"], data["path"], data["spec"]
        if not hosts[vertex]:
            found.append(
                ir.error(
                    (*path, "kind"),
                    f"companion `{name}` has no host to observe",
                    f"{ATTACH % name} from the node whose states it should read",
                )
            )
        for index in hosts[vertex][1:]:
            found.append(
                ir.error(
                    ("edges", index, "to"),
                    f"companion `{name}` already observes a host; a companion reads one stream",
                    "declare another companion for the second host",
                )
            )
        found.extend(_check_sizes(ir, path, name, spec))
    return found


def _check_attachment(ir: IR, u: str, v: str, edge: dict, role: dict) -> list[Diagnostic]:
    nodes, path, found = ir.graph.nodes, edge["path"], []
    if role[v] not in ("companion", "unknown"):
        found.append(
            ir.error(
                (*path, "to"),
                f"a `companion` edge must end at a `kind: companion` node; `{nodes[v]['name']}` is a "
                f"{nodes[v]['kind']}",
                "use `kind: message` between sub-models",
            )
        )
    if role[u] == "companion":
        found.append(
            ir.error(
                (*path, "from"),
                f"a companion's host must be a sub-model; `{nodes[u]['name']}` is itself a companion",
                "attach both companions to the same host",
            )
        )
    if edge["delay"]:
        found.append(
            ir.error(
                (*path, "delay"),
                "a `companion` edge reads the host's states of the same pass; it cannot be delayed",
                "remove `delay`",
            )
        )
    if edge["ratio"] is not None:
        found.append(
            ir.error(
                (*path, "ratio"),
                "a `companion` edge carries no message, so a `ratio` has nothing to condition",
                "remove `ratio`",
            )
        )
    return found


def _check_sizes(ir: IR, path: tuple, name: str, spec) -> list[Diagnostic]:
    found = []
    if spec.lens_dim < spec.sphere_dim:
        found.append(
            ir.error(
                (*path, "lens_dim"),
                f"companion `{name}`'s lens maps {spec.sphere_dim} dimensions to {spec.lens_dim}; an "
                "isometric lens cannot narrow",
                f"make `lens_dim` at least `sphere_dim` ({spec.sphere_dim})",
            )
        )
    if spec.lens_dim % spec.heads:
        found.append(
            ir.error(
                (*path, "heads"),
                f"`heads: {spec.heads}` does not divide companion `{name}`'s `lens_dim: {spec.lens_dim}`",
                "the spectral attention splits the spectrum's modes into equal heads",
            )
        )
    if spec.alpha_init > spec.alpha_max:
        found.append(
            ir.error(
                (*path, "alpha_init"),
                f"`alpha_init: {spec.alpha_init}` lies above `alpha_max: {spec.alpha_max}`",
                "alpha starts inside [0, alpha_max]: lower `alpha_init` or raise `alpha_max`",
            )
        )
    return found
