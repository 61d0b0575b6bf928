"""Decide how the graph runs: topological stages, batch groups, the feedback schedule.

* Stages are the topological generations of the delay-0 edges: a node runs after everything it
  reads within the same step. Delayed edges read the previous step and impose no order.
* Within a stage, nodes with the same resolved transformer and the same inputs form one batch
  group, executed as one call with stacked weights (`runtime.layers`): 16 same-shaped gears are
  one module, never a loop of 16.
* Nodes sit on the message bus in the order the spec declares them, which keeps plans stable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import networkx as nx

from compiler.ir import IR, input_id, node_id
from compiler.language.kinds import KINDS, NodePlan
from compiler.passes.contract import contract

if TYPE_CHECKING:
    from runtime.configs import EquilibriumPlan, TransformerConfig


def transformer_config(
    settings: dict, width: int, context: int, layer_settings: tuple = ()
) -> TransformerConfig:
    from runtime.configs import TransformerConfig

    attention = settings["attention"]
    lattice = attention if attention is not None and attention.kind == "lattice" else None
    # `sdpa` is the fused path SelfAttention takes by default: the same computation, no module
    variant = attention if attention is not None and attention.kind != "sdpa" else None
    rotary = settings["rotary"]
    return TransformerConfig(
        width=width,
        heads=settings["heads"],
        layers=settings["layers"],
        context=context,
        kv_heads=settings["kv_heads"] if settings["kv_heads"] != settings["heads"] else None,
        mlp_width=max(1, round(settings["mlp_ratio"] * width)),
        activation=settings["activation"],
        norm=settings["norm"],
        position=settings["position"],
        rope_theta=float(settings["rope_theta"]),
        dropout=float(settings["dropout"]),
        bias=settings["bias"],
        causal=settings["causal"],
        attention=lattice_config(lattice),
        variant=component_choice("attention", variant),
        rotary=component_choice(
            "rotary", rotary if rotary is None or rotary.kind != "rope" else None
        ),
        layer_settings=layer_settings,
    )


def component_choice(family: str, config):
    """The runtime's handle on a registered component the spec chose (`runtime.transformer.Choice`)."""
    if config is None:
        return None
    from compiler.language.registry import REGISTRY
    from runtime.configs import Choice

    component = REGISTRY.get(family, config.kind)
    if component.level == "lattice":  # its options travel resolved, as the config's layout
        return Choice(config.kind, component.build, (), component.level)
    options = tuple((k, _frozen(v)) for k, v in config.options().items())
    return Choice(config.kind, component.build, options, component.level)


def _frozen(value):
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def lattice_config(attention):
    if attention is None:
        return None
    from runtime.configs import LatticeConfig

    lattice, oscillator = attention.lattice, attention.oscillator
    return LatticeConfig(
        shape=tuple(lattice.shape),
        boundary=lattice.boundary,
        neighbourhood=lattice.neighbourhood,
        radius=float(lattice.radius) if lattice.radius is not None else None,
        frequencies=oscillator.frequencies,
        frequency_range=tuple(float(f) for f in oscillator.frequency_range),
        coupling=float(oscillator.coupling),
        range=float(oscillator.range),
        dt=float(oscillator.dt),
        substeps=oscillator.substeps,
        eval_substeps=oscillator.eval_substeps,
        strength=float(attention.strength),
        token_frequency=float(attention.token_frequency),
        phase_weight=float(attention.training.phase.weight),
        phase_target=attention.training.phase.target,
        phase_schedule=(attention.training.phase.schedule, attention.training.phase.steps),
        coherence_weight=float(attention.training.coherence.weight),
        coherence_schedule=(
            attention.training.coherence.schedule,
            attention.training.coherence.steps,
        ),
    )


@contract(
    requires=(
        "nodes.settings",
        "nodes.width",
        "nodes.layer_settings",
        "inputs.width",
        "facts.bus_width",
    ),
    provides=(
        "nodes.config",
        "nodes.group",
        "observers.config",
        "facts.federation",
        "facts.address",
        "facts.context",
        "facts.companions",
    ),
)
def plan(ir: IR) -> IR:
    from runtime.configs import EdgePlan, FederationPlan, GroupPlan

    spec = ir.spec
    context = max(inp.context for inp in spec.inputs.values())
    ir = ir.with_facts(context=context)
    graph = ir.graph.copy()
    names = [data["name"] for _, data in ir.vertices("node")]
    position = {name: i for i, name in enumerate(names)}

    planned: dict[str, NodePlan] = {}
    reads: dict[str, tuple[tuple[str, int], ...]] = {}
    for name in names:
        vertex = node_id(name)
        planned[name] = KINDS.get(graph.nodes[vertex]["kind"]).plan(ir, vertex)
        _check_plan(graph.nodes[vertex]["kind"], planned[name])
        graph.nodes[vertex]["config"] = planned[name].config
        reads[name] = tuple(
            (graph.nodes[u]["name"], graph.nodes[u]["width"])
            for u, _, d in sorted(
                graph.in_edges(vertex, data=True), key=lambda e: str(e[2]["path"])
            )
            if d["role"] == "read"
        )

    instant = nx.DiGraph()
    instant.add_nodes_from(names)
    instant.add_edges_from(
        (graph.nodes[u]["name"], graph.nodes[v]["name"])
        for u, v, e in ir.spec_edges()
        if e["delay"] == 0
    )
    stages = []
    for generation in nx.topological_generations(instant):
        groups: dict[tuple, list[str]] = {}
        for name in sorted(generation, key=position.__getitem__):
            node_kind = KINDS.get(graph.nodes[node_id(name)]["kind"])
            node = planned[name]
            # kinds that build alike batch alike (a gear with a transformer of its shape);
            # a kind that cannot batch is a group of its own
            alone = None if node_kind.capabilities.batched else name
            key = (type(node_kind).build, node.config, reads[name], node.batch_key, alone)
            groups.setdefault(key, []).append(name)
        stages.append(
            tuple(
                GroupPlan(
                    nodes=tuple(members),
                    indices=tuple(position[m] for m in members),
                    config=planned[members[0]].config,
                    inputs=reads[members[0]],
                    rope_scales=tuple(planned[m].rope_scale for m in members),
                    perspectives=tuple(planned[m].perspective for m in members),
                    kind=graph.nodes[node_id(members[0])]["kind"],
                    options=planned[members[0]].options,
                )
                for members in groups.values()
            )
        )

    feedback = spec.feedback
    steps = feedback.steps if feedback else 1
    backprop = feedback.backprop_steps if feedback and feedback.mode == "truncated" else steps
    federation = FederationPlan(
        nodes=tuple(names),
        stages=tuple(stages),
        edges=tuple(
            EdgePlan(
                position[graph.nodes[u]["name"]],
                position[graph.nodes[v]["name"]],
                e["delay"],
                e["kind"],
                float(e["ratio"]) if e["ratio"] else None,
            )
            for u, v, e in ir.with_graph(graph).spec_edges()
        ),
        perspectives=tuple((name, p.kind) for name, p in spec.perspectives.items()),
        bus_width=ir.facts.bus_width,
        aggregate=spec.defaults.message.aggregate,
        steps=steps,
        backprop_steps=backprop,
        mode=feedback.mode if feedback else "unroll",
        tolerance=float(feedback.tolerance) if feedback and feedback.tolerance else 1e-4,
        lipschitz=float(feedback.lipschitz) if feedback and feedback.lipschitz else None,
        power_iterations=(feedback.power_iterations or 4) if feedback else 4,
        time=spec.time is not None,
        feeds=plan_feeds(ir, position),
        equilibrium=plan_equilibrium(feedback)
        if feedback and feedback.mode == "equilibrium"
        else None,
    )
    address = {}
    for g, group in enumerate(federation.groups):
        for m, name in enumerate(group.nodes):
            address[name] = (g, m)
            graph.nodes[node_id(name)]["group"] = g
    for name in spec.inputs:
        graph.nodes[input_id(name)]["context"] = spec.inputs[name].context
    companions = plan_observers(ir.with_graph(graph), address)
    return ir.with_graph(graph).with_facts(
        federation=federation, address=address, companions=companions
    )


def plan_feeds(ir: IR, position: dict[str, int]) -> tuple:
    """The edges `from: outputs.NAME` (role `feed`), in the spec's order: each output's values
    per token (an lm_head's vocabulary, a regression's width) into a node's bus position."""
    from runtime.configs import FeedPlan

    graph, feeds = ir.graph, []
    for u, v, edge in sorted(ir.graph.edges(data=True), key=lambda e: e[2].get("index", -1)):
        if edge["role"] != "feed":
            continue
        output = graph.nodes[u]["spec"]
        width = output.width if output.kind == "regression" else _vocabulary(ir, output)
        feeds.append(
            FeedPlan(graph.nodes[u]["name"], width, position[graph.nodes[v]["name"]], edge["delay"])
        )
    return tuple(feeds)


def _vocabulary(ir: IR, head: Any) -> int:
    tokens = [n for n, i in ir.spec.inputs.items() if i.kind == "tokens"]
    return ir.spec.inputs[head.vocab_of or tokens[0]].vocab


def _check_plan(kind: str, planned: NodePlan) -> None:
    """The runtime reads a node's `width` (bus projections, reads) and `heads` (a cross edge into
    it) from its config: a kind whose plan leaves either out is a bug of that kind, said so."""
    missing = [
        f for f in ("width", "heads") if not isinstance(getattr(planned.config, f, None), int)
    ]
    if missing:
        raise TypeError(
            f"node kind `{kind}`'s plan returned a config without integer {' and '.join(missing)} "
            f"({type(planned.config).__name__}); see NodePlan"
        )


def plan_observers(ir: IR, address: dict[str, tuple[int, int]]) -> dict[str, tuple]:
    """Each observer's (companion's) host address in the federation and its resolved config,
    in the order the spec declares them."""
    graph, planned = ir.graph, {}
    for vertex, data in ir.vertices("observer"):
        config = KINDS.get(data["kind"]).plan(ir, vertex).config
        graph.nodes[vertex]["config"] = config
        host = next(u for u, _, role in graph.in_edges(vertex, data="role") if role == "companion")
        planned[data["name"]] = (address[graph.nodes[host]["name"]], config)
    return planned


def plan_equilibrium(feedback: Any) -> EquilibriumPlan:
    """The resolved solvers and gradient of `mode: equilibrium` (defaults filled in; the backward
    takes the forward's settings where it sets none)."""
    from dataclasses import replace

    from runtime.configs import EquilibriumPlan, SolverSettings

    forward = SolverSettings(
        method=feedback.solver or "fixed_point",
        steps=feedback.steps,
        tolerance=float(feedback.tolerance or 1e-4),
        stop=feedback.stop or "relative",
        history=feedback.history or 5,
        mixing=float(feedback.mixing or 1.0),
    )
    chosen = feedback.backward
    backward = forward
    if chosen is not None:
        fields = {
            k: getattr(chosen, k) for k in ("solver", "steps", "tolerance", "history", "mixing")
        }
        fields["method"] = fields.pop("solver")
        backward = replace(forward, **{k: v for k, v in fields.items() if v is not None})
    phantom, correction = feedback.phantom, feedback.correction
    jacobian, radius = feedback.jacobian, feedback.spectral_radius
    return EquilibriumPlan(
        forward=forward,
        backward=backward,
        eval_steps=feedback.eval_iterations,
        grad=feedback.grad or "implicit",
        phantom_steps=phantom.steps if phantom else 5,
        phantom_damping=float(phantom.damping) if phantom else 1.0,
        correction_states=correction.states if correction else 0,
        correction_decay=float(correction.decay) if correction else 0.8,
        jacobian_weight=float(jacobian.weight) if jacobian else 0.0,
        jacobian_every=jacobian.every if jacobian else 1,
        spectral_radius_every=radius.every if radius else 0,
        spectral_radius_iterations=radius.iterations if radius else 10,
    )
