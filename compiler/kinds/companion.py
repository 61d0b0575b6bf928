"""`kind: companion` (the geolip SVAE companion): an observer that reconstructs a host's states.

A companion observes exactly one host and feeds nothing; its shapes must fit.

The geometry constrains the sizes: the lens lifts `sphere_dim` to `lens_dim` isometrically, so it
cannot narrow; the spectral attention splits `lens_dim` into heads; alpha starts inside its bound.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field, Strict

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.language.kinds import Capabilities, Description, NodeKind, NodePlan, kind
from compiler.language.spec import Heads, Int, Real, SpecModel, Width


class CompanionNode(SpecModel):
    """The geolip SVAE companion (design 004, AbstractPhil's geolip-svae): a small autoencoder that
    rides alongside a host node, reading the host's token states through a `companion` edge and
    reconstructing them through a code of fixed geometry (see `runtime.companion`).

    Each token becomes `rows` unit vectors on S^(sphere_dim-1), lifted by an exactly isometric lens
    to `lens_dim`; the lensed matrix's column norms (its spectrum) pass a spectral-alpha attention
    across tokens, `S * (1 + alpha * tanh(SDPA(S)))` with every alpha held in `[0, alpha_max]`, and
    modulate the decoder. Its reconstruction loss joins `model.auxiliary_loss()`, weighted by
    `weight`; `model.companion_metrics()` reports the reconstruction cosine, the frame-rigidity
    deviation against its 0.02*sqrt(sphere_dim) envelope, and the alphas.
    """

    kind: Literal["companion"]
    rows: Annotated[Int, Field(ge=2, le=4096)] = Field(
        32, description="Rows of each token's sphere-normalised matrix (the design: 32)."
    )
    sphere_dim: Annotated[Int, Field(ge=2, le=1024)] = Field(
        4, description="The rows lie on S^(sphere_dim-1) (the design: 4)."
    )
    lens_dim: Annotated[Int, Field(ge=2, le=4096)] = Field(
        16,
        description="Width of the isometric lens and of the spectrum, >= sphere_dim (the design: 16).",
    )
    heads: Heads = Field(
        4, description="Heads of the spectral attention across tokens; divide lens_dim."
    )
    layers: Annotated[Int, Field(ge=1, le=64)] = Field(
        1, description="Spectral-alpha attention layers."
    )
    alpha_max: Annotated[Real, Field(ge=0, le=1)] = Field(
        0.2, description="Upper bound of every per-mode alpha, in [0, 1] (the design: 0.2)."
    )
    alpha_init: Annotated[Real, Field(ge=0, le=1)] = Field(
        0.024,
        description="Initial alpha of every mode, in [0, alpha_max] (the design: sigmoid(-2) * 0.2 = 0.024).",
    )
    hidden: Width = Field(
        256, description="Hidden width of the encoder's and decoder's residual MLPs."
    )
    depth: Annotated[Int, Field(ge=0, le=64)] = Field(
        1, description="Residual blocks in the encoder and in the decoder."
    )
    causal: Annotated[bool, Strict()] | None = Field(
        None,
        description="Causal attention across tokens (token t sees tokens <= t). Default: the host's `causal`.",
    )
    canonical_signs: Annotated[bool, Strict()] = Field(
        True, description="Put every row on one hemisphere (first non-zero coordinate positive)."
    )
    lens_trainable: Annotated[bool, Strict()] = Field(
        True,
        description="Learn the lens (it stays exactly orthonormal); false: a fixed random one.",
    )
    cosine_weight: Annotated[Real, Field(ge=0, le=1e6)] = Field(
        0.0, description="Weight of (1 - cosine) added to the reconstruction's MSE."
    )
    weight: Annotated[Real, Field(ge=0, le=1e6)] = Field(
        1.0, description="Weight of the companion's loss in `model.auxiliary_loss()`."
    )
    detach: Annotated[bool, Strict()] = Field(
        True,
        description="The companion only observes: its loss does not reach the host. false: it also trains "
        "the host's layers.",
    )


ATTACH = "connect it with `{from: HOST, to: %s, kind: companion}`"


def check_companions(ir: IR) -> list[Diagnostic]:
    graph, found = ir.graph, []
    role = {v: d["role"] for v, d in graph.nodes(data=True)}
    hosts: dict[str, list[int]] = {v: [] for v, _ in ir.vertices("observer")}
    for u, v, edge in sorted(graph.edges(data=True), key=lambda e: str(e[2]["path"])):
        if edge["role"] == "companion":
            found.extend(_check_attachment(ir, u, v, edge, role))
            if role[v] == "observer":  # a wrong host is reported once, by `_check_attachment`
                hosts[v].append(edge["index"])
        elif edge["role"] == "edge" and "observer" in (role[u], role[v]):
            name = graph.nodes[u if role[u] == "observer" else v]["name"]
            end = "from" if role[u] == "observer" else "to"
            found.append(
                ir.error(
                    (*edge["path"], end),
                    f"`{name}` is a companion: it observes its host and takes part in no "
                    f"`{edge['kind']}` edge",
                    f"{ATTACH % name}, or make `{name}` a transformer",
                )
            )
        elif edge["role"] == "output" and role[u] == "observer":
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
    for vertex, data in ir.vertices("observer"):
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
    if role[v] not in ("observer", "unknown"):
        found.append(
            ir.error(
                (*path, "to"),
                f"a `companion` edge must end at a `kind: companion` node; `{nodes[v]['name']}` is a "
                f"{nodes[v]['kind']}",
                "use `kind: message` between sub-models",
            )
        )
    if role[u] == "observer":
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


@kind("companion")
class Companion(NodeKind):
    Spec = CompanionNode
    observer = True
    capabilities = Capabilities(
        receives_messages=False, sends_messages=False, batched=False, time_steps=False
    )
    graph_checks = (check_companions,)
    colour = "#2c7a7b"

    def reads(self, node: Any) -> list[str]:
        return []  # a companion reads its host through its edge, never an input

    def declared_width(self, node: Any) -> int | None:
        return None

    def plan(self, ir: IR, vertex: str) -> NodePlan:
        """The resolved `CompanionConfig`: the input width is the host's, and `causal` follows
        the host unless the companion says."""
        from runtime.configs import CompanionConfig

        host = ir.graph.nodes[observed_host(ir, vertex)]
        spec = ir.graph.nodes[vertex]["spec"]
        causal = spec.causal if spec.causal is not None else host["settings"]["causal"]
        chosen = {
            f.name: getattr(spec, f.name)
            for f in dataclasses.fields(CompanionConfig)
            if f.name not in ("input_width", "causal")
        }
        floats = ("alpha_max", "alpha_init", "cosine_weight")  # spec numbers as plain floats
        chosen.update({name: float(chosen[name]) for name in floats})
        return NodePlan(CompanionConfig(input_width=host["width"], causal=causal, **chosen))

    def build(self, config: Any) -> Any:
        from runtime.companion import GeoCompanion

        return GeoCompanion(config)

    counts_exactly = True  # tests/test_parameter_counts.py holds the count to the built module

    def parameters(self, config: Any) -> int:
        from compiler import counting

        return counting.companion(config)

    def flops_per_token(self, config: Any, *, context: int) -> int:
        """Every companion weight is used once a token (a multiply-add each), plus attention
        across up to `context` tokens (the host's) over the `lens_dim`-wide spectrum in each
        layer."""
        return 2 * self.parameters(config) + config.layers * 2 * 2 * context * config.lens_dim

    def describe(self, ir: IR, vertex: str) -> Description:
        config = ir.graph.nodes[vertex]["config"]
        host = ir.graph.nodes[observed_host(ir, vertex)]["name"]
        return Description(
            width=f"{config.rows}x{config.sphere_dim}->{config.lens_dim}",
            heads=str(config.heads),
            layers=str(config.layers),
            group=f"observes {host}",
            lines=[f"observes {host}"],
        )


def observed_host(ir: IR, vertex: str) -> str:
    return next(u for u, _, role in ir.graph.in_edges(vertex, data="role") if role == "companion")
