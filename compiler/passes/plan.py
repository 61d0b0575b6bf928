"""Decide how the graph runs: topological stages, batch groups, the feedback schedule.

* Stages are the topological generations of the delay-0 edges: a node runs after everything it
  reads within the same step. Delayed edges read the previous step and impose no order.
* Within a stage, nodes with the same resolved transformer and the same inputs form one batch
  group, executed as one call with stacked weights (`runtime.layers`): 16 same-shaped gears are
  one module, never a loop of 16.
* Nodes sit on the message bus in the order the spec declares them, which keeps plans stable.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import networkx as nx

from compiler.ir import IR, input_id, node_id

if TYPE_CHECKING:
    from runtime.transformer import TransformerConfig


def transformer_config(
    settings: dict, width: int, context: int, layer_settings: tuple = ()
) -> TransformerConfig:
    from runtime.transformer import TransformerConfig

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
    from runtime.transformer import Choice

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
    from runtime.attention.lattice import LatticeConfig

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


def plan(ir: IR) -> IR:
    from runtime.federation.executor import EdgePlan, FederationPlan, GroupPlan
    from runtime.fractal.transformer import FractalConfig

    spec, graph = ir.spec, ir.graph.copy()
    names = [name for name, node in spec.nodes.items() if node.kind != "companion"]
    position = {name: i for i, name in enumerate(names)}
    context = max(inp.context for inp in spec.inputs.values())

    reads: dict[str, tuple[tuple[str, int], ...]] = {}
    for name in names:
        vertex = node_id(name)
        config = transformer_config(
            graph.nodes[vertex]["settings"],
            graph.nodes[vertex]["width"],
            context,
            graph.nodes[vertex].get("layer_settings", ()),
        )
        graph.nodes[vertex]["config"] = config
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
        (e.source, e.to) for e in spec.edges if e.delay == 0 and e.kind != "companion"
    )
    stages = []
    for generation in nx.topological_generations(instant):
        groups: dict[tuple, list[str]] = {}
        for name in sorted(generation, key=position.__getitem__):
            node = spec.nodes[name]
            fractal = (
                FractalConfig(
                    node.levels,
                    node.branching,
                    node.residual,
                    tuple(float(w) for w in node.level_weights or ()),
                    node.heads,
                    node.schedule,
                    node.level_batch,
                )
                if node.kind == "fractal"
                else None
            )
            # a fractal is a group of its own: its levels are its batch
            key = (graph.nodes[node_id(name)]["config"], reads[name], fractal, fractal and name)
            groups.setdefault(key, []).append(name)
        stages.append(
            tuple(
                GroupPlan(
                    nodes=tuple(members),
                    indices=tuple(position[m] for m in members),
                    config=config,
                    inputs=inputs,
                    rope_scales=tuple(
                        float(graph.nodes[node_id(m)].get("velocity", 1)) for m in members
                    ),
                    perspectives=tuple(
                        getattr(spec.nodes[m], "perspective", None) for m in members
                    ),
                    fractal=fractal,
                )
                for (config, inputs, fractal, _), members in groups.items()
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
        bus_width=ir.facts["bus_width"],
        aggregate=spec.defaults.message.aggregate,
        steps=steps,
        backprop_steps=backprop,
        mode=feedback.mode if feedback else "unroll",
        tolerance=float(feedback.tolerance) if feedback and feedback.tolerance else 1e-4,
        lipschitz=float(feedback.lipschitz) if feedback and feedback.lipschitz else None,
        power_iterations=(feedback.power_iterations or 4) if feedback else 4,
    )
    address = {}
    for g, group in enumerate(federation.groups):
        for m, name in enumerate(group.nodes):
            address[name] = (g, m)
            graph.nodes[node_id(name)]["group"] = g
    for name in spec.inputs:
        graph.nodes[input_id(name)]["context"] = spec.inputs[name].context
    companions = plan_companions(ir.with_graph(graph), address)
    return ir.with_graph(graph).with_facts(
        federation=federation, address=address, context=context, companions=companions
    )


def plan_companions(ir: IR, address: dict[str, tuple[int, int]]) -> dict[str, tuple]:
    """Each companion's host address in the federation and its resolved `CompanionConfig`: the
    input width is the host's, and `causal` follows the host unless the companion says."""
    from runtime.companion import CompanionConfig

    planned = {}
    for u, v, role in ir.graph.edges(data="role"):
        if role != "companion":
            continue
        host, spec = ir.graph.nodes[u], ir.graph.nodes[v]["spec"]
        causal = spec.causal if spec.causal is not None else host["settings"]["causal"]
        chosen = {
            f.name: getattr(spec, f.name)
            for f in dataclasses.fields(CompanionConfig)
            if f.name not in ("input_width", "causal")
        }
        floats = ("alpha_max", "alpha_init", "cosine_weight")  # spec numbers as plain floats
        chosen.update({name: float(chosen[name]) for name in floats})
        config = CompanionConfig(input_width=host["width"], causal=causal, **chosen)
        planned[ir.graph.nodes[v]["name"]] = (address[host["name"]], config)
    return dict(sorted(planned.items(), key=lambda item: list(ir.spec.nodes).index(item[0])))
