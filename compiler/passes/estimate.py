"""Count parameters and FLOPs per part of the model, in closed form, without building it.

Every part is counted: the inputs' embeddings, each batch group's sub-model (through its kind's
`group_parameters` hook), the projections onto and off the message bus, the message layer, cross
attention, perspectives, the output heads and the companions. The counts mirror the runtime's
modules (`compiler.counting`; `tests/test_parameter_counts.py` holds them equal to the built model
for every gallery spec), so `epicycle validate` reports exact numbers without importing torch.
A kind whose hook is only a guard (`NodeKind.counts_exactly` false, as a plugin's may be) has its
groups built on the meta device instead, where tensors have shapes but no storage.

Before anything else the total is compared with `MAX_PARAMETERS`: a spec that asks for more is
refused, located at its largest part (an embedding of 2^20 x 2^24 is the input, not the nodes).

FLOPs per token are forward FLOPs: 2 per weight of every matmul the token passes through, plus
attention's scores and weighted sum over a full context (halved when causal), times the feedback
steps. Training costs about three times as much. Besides the nodes, the projections of outputs fed
back (`feeds`) are counted, once per step that adds one (`feed_flops_per_token`); the inputs'
projections, the bus and the message layer, cross attention and the heads are not counted yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compiler import counting
from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic, SpecError
from compiler.language.kinds import KINDS
from compiler.passes.contract import contract
from runtime.configs import EDGE_FEATURES

if TYPE_CHECKING:
    from runtime.configs import Choice, TransformerConfig

MAX_PARAMETERS = 2 * 10**12
MAX_BLOCKS = 20_000


def transformer_parameters(cfg: TransformerConfig, members: int = 1) -> int:
    """`runtime.transformer.Transformer` with `members` stacked sets of weights: rotary tables
    (shared by the members), learned positions, the blocks and the final norm."""
    mixes = cfg.variant is not None and cfg.variant.level == "mixer"
    rope = cfg.position == "rope" and not mixes
    rotary = 0
    if rope:
        widths = {cfg.layer(i).content_width for i in range(cfg.layers)} | {cfg.content_width}
        rotary = sum(_rotary_parameters(cfg, w) for w in widths)
    positions = members * cfg.context * cfg.width if cfg.position == "learned" else 0
    blocks = sum(_block_parameters(cfg.layer(i), members) for i in range(cfg.layers))
    return rotary + positions + blocks + counting.norm(cfg.width, cfg.norm, cfg.bias, members)


def _rotary_parameters(cfg: TransformerConfig, head_width: int) -> int:
    if cfg.rotary is None:
        return 0  # RoPE's tables are buffers
    return component_parameters(
        "rotary",
        cfg.rotary,
        head_width=head_width,
        context=cfg.context,
        theta=cfg.rope_theta,
        scales=(1.0,),
    )


def _block_parameters(cfg: TransformerConfig, members: int) -> int:
    """`runtime.transformer.Block`: the attention sub-layer, its norms and the MLP."""
    choice = cfg.variant
    mlp_out = cfg.inner_width * (2 if cfg.gated else 1)
    mlp = counting.linear(cfg.width, mlp_out, cfg.bias, members)
    mlp += counting.linear(cfg.inner_width, cfg.width, cfg.bias, members)
    norm = counting.norm(cfg.width, cfg.norm, cfg.bias, members)
    if cfg.attention is not None:  # the lattice layout
        attention = counting.lattice_attention(
            layout=cfg.attention, width=cfg.width, heads=cfg.heads, bias=cfg.bias, members=members
        )
        return attention + 2 * norm + mlp
    if choice is not None and choice.level == "mixer":
        attention = component_parameters(
            "attention",
            choice,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.layers,
            context=cfg.context,
            members=members,
            causal=cfg.causal,
            bias=cfg.bias,
        )
        owns_norm = getattr(_count_of("attention", choice), "takes_stream", False)
        return attention + (1 if owns_norm else 2) * norm + mlp
    hw, h, kv = cfg.head_width, cfg.heads, cfg.n_kv_heads
    attention = counting.linear(cfg.width, (h + 2 * kv) * hw, cfg.bias, members)
    attention += counting.linear(h * hw, cfg.width, cfg.bias, members)
    if choice is not None:
        attention += component_parameters(
            "attention",
            choice,
            heads=h,
            kv_heads=kv,
            head_width=hw,
            context=cfg.context,
            members=members,
        )
    return attention + 2 * norm + mlp


def _count_of(family: str, choice: Choice) -> Any:
    from compiler.language.registry import REGISTRY

    return REGISTRY.get(family, choice.name).parameters


def component_parameters(family: str, choice: Choice, **context: Any) -> int:
    """A registered component's count from its `parameters` hook, or, for a component that
    declares none, from the module built on the meta device."""
    count = _count_of(family, choice)
    if count is not None:
        return count(**context, **dict(choice.options))
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in choice.make(**context).parameters())


def transformer_flops_per_token(cfg: TransformerConfig) -> int:
    if cfg.layer_settings:
        return sum(transformer_flops_per_token(cfg.layer(i)) for i in range(cfg.layers))
    w, hw = cfg.width, cfg.head_width
    matmul = w * (cfg.heads + 2 * cfg.n_kv_heads) * hw + cfg.heads * hw * w
    matmul += w * cfg.inner_width * (2 if cfg.gated else 1) + cfg.inner_width * w
    attention = 2 * 2 * cfg.context * cfg.heads * hw // (2 if cfg.causal else 1)
    if cfg.attention is None and cfg.variant is not None and cfg.variant.level == "scores":
        window = dict(cfg.variant.options).get("window")
        if window:  # a sliding window scores `window` keys per query, not the whole context
            attention = 2 * 2 * min(window, cfg.context) * cfg.heads * hw
    return cfg.layers * (2 * matmul + attention)


# --------------------------------------------------------------------------- the whole model


def input_parameters(data: dict) -> int:
    """`runtime.ports.TokenInput` (a table) or `FeatureInput` (a biased projection)."""
    spec, width = data["spec"], data["width"]
    if data["kind"] == "tokens":
        return spec.vocab * width
    return counting.linear(spec.width, width, True)


def output_parameters(data: dict) -> int:
    """`runtime.ports.LinearHead` (an lm head tied to its table adds nothing) or `PooledHead`."""
    spec, width = data["spec"], data["width"]
    if data["kind"] == "lm_head":
        return 0 if spec.tie else width * data["vocab"]
    if data["kind"] == "regression":
        return counting.linear(width, spec.width, True)
    return counting.linear(width, spec.classes, True)


def _projection(members: int, width_in: int, width_out: int) -> int:
    """`runtime.federation.executor._projection`: nothing where the widths agree."""
    return 0 if width_in == width_out else counting.linear(width_in, width_out, False, members)


def federation_parameters(plan: Any) -> dict[str, Any]:
    """`runtime.federation.executor.Federation` outside its groups' sub-models: per group its
    reads and bus projections; the message layer, cross attention, perspectives and the
    projections of outputs fed back."""
    groups = plan.groups
    senders = {e.source for e in plan.edges}
    receivers = {e.target for e in plan.edges}
    per_group = []
    for g in groups:
        members, width = len(g.nodes), g.config.width
        own = sum(_projection(members, w, width) for _, w in g.inputs)
        if plan.edges:
            if any(i in senders for i in g.indices):
                own += _projection(members, width, plan.bus_width)
            if any(i in receivers for i in g.indices):
                own += _projection(members, plan.bus_width, width)
        per_group.append(own)
    bus = plan.bus_width
    messages = 0
    if plan.edges and any(e.kind != "cross" for e in plan.edges):
        messages = counting.linear(bus, bus, False) + counting.linear(EDGE_FEATURES, bus, True)
        if plan.aggregate == "attention":
            messages += bus * bus + len(plan.nodes) * bus + counting.linear(EDGE_FEATURES, 1, True)
    cross = sum(
        g.config.width * bus + 2 * bus * bus + bus * bus
        for g in groups
        if any(e.kind == "cross" and e.target in g.indices for e in plan.edges)
    )
    kinds = dict(plan.perspectives)
    frames = {(p, inp): w for g in groups for p in g.perspectives if p for inp, w in g.inputs}
    perspectives = sum(
        w * w for (p, _), w in frames.items() if kinds[p] in ("rotation", "projection")
    )
    place = {i: g for g in groups for i in g.indices}
    feeds = sum(counting.linear(f.width, place[f.target].config.width, False) for f in plan.feeds)
    return {
        "groups": per_group,
        "messages": messages,
        "cross": cross,
        "perspectives": perspectives,
        "feeds": feeds,
    }


def feed_flops_per_token(plan: Any, *, time_axis: bool) -> int:
    """The projections of outputs fed back (`from: outputs.NAME`, `projection: linear`): 2 FLOPs
    per weight, per token, for each step that adds one (`Federation._add_fed_back`). Over a time
    axis every time step adds it (the state holds the outputs of the steps before, zero at
    first); unrolled, the first `delay` feedback steps have no output of `delay` steps before, so
    `steps - delay` of them do."""
    width = {i: g.config.width for g in plan.groups for i in g.indices}
    return sum(
        2 * f.width * width[f.target] * (plan.steps if time_axis else max(0, plan.steps - f.delay))
        for f in plan.feeds
    )


def _group_parameters(ir: IR, group: Any, built: dict) -> int:
    node_kind = KINDS.get(group.kind)
    if node_kind.counts_exactly:
        return node_kind.group_parameters(group)
    key = (group.kind, group.config, len(group.nodes), group.options)
    if key not in built:  # identical groups have identical counts: build each shape once
        import torch

        with torch.device("meta"):
            built[key] = sum(p.numel() for p in node_kind.build(group).parameters())
    return built[key]


def _guard(ir: IR, parts: dict[tuple, int], blocks: int) -> None:
    """Refuse a spec beyond what epicycle will build, at its largest part."""
    total = sum(parts.values())
    if total <= MAX_PARAMETERS and blocks <= MAX_BLOCKS:
        return
    if total > MAX_PARAMETERS:
        path, largest = max(parts.items(), key=lambda item: item[1])
        where = ".".join(str(p) for p in path)
        message = (
            f"this spec asks for {total:,} parameters, beyond what epicycle will build (at most "
            f"{MAX_PARAMETERS:,}); the largest part, `{where}`, holds {largest:,}"
        )
        hint = {
            "inputs": "check the input's `vocab` (or `width`) and the width it feeds for a typo",
            "outputs": "check the head's `classes`, `width` or vocabulary and the width it reads",
        }.get(path[0], "check `width`, `layers` and the number of nodes for a typo")
        raise SpecError([Diagnostic(ir.span(path, key=True), message, hint)])
    raise SpecError(
        [
            Diagnostic(
                ir.span(("nodes",), key=True),
                f"this spec asks for {blocks:,} transformer blocks to build, beyond what epicycle "
                f"will build (at most {MAX_BLOCKS:,} blocks)",
                "check `layers` and the number of nodes for a typo",
            )
        ]
    )


@contract(
    requires=("nodes.config", "facts.federation", "facts.context"),
    provides=(
        "facts.estimates",
        "facts.companion_estimates",
        "facts.parameters_outside_nodes",
        "facts.flops_outside_nodes",
        "facts.parameters",
    ),
)
def estimate(ir: IR) -> IR:
    federation = ir.facts.federation
    blocks = sum(getattr(g.config, "layers", 1) for g in federation.groups)
    inputs = {name: input_parameters(data) for name, data in _ports(ir, "input")}
    outputs = {name: output_parameters(data) for name, data in _ports(ir, "output")}
    guesses = [KINDS.get(g.kind).parameters(g.config) * len(g.nodes) for g in federation.groups]
    around = federation_parameters(federation)
    companions = {
        name: KINDS.get(ir.spec.nodes[name].kind).parameters(config)
        for name, (_, config) in ir.facts.companions.items()
    }
    parts = {("inputs", name): n for name, n in inputs.items()}
    parts |= {("outputs", name): n for name, n in outputs.items()}
    parts |= {("nodes", name): n for name, n in companions.items()}
    for g, group in enumerate(federation.groups):  # a group's guess is its first node's part
        parts[("nodes", group.nodes[0])] = guesses[g] + around["groups"][g]
    parts[("edges",)] = around["messages"] + around["cross"] + around["feeds"]
    parts[("perspectives",)] = around["perspectives"]
    _guard(ir, parts, blocks)

    built: dict[tuple, int] = {}
    steps = federation.steps
    rows: dict[str, dict] = {}
    nodes_total = 0
    for g, group in enumerate(federation.groups):
        members = len(group.nodes)
        own = _group_parameters(ir, group, built)
        nodes_total += own
        flops = KINDS.get(group.kind).flops_per_token(group.config) * steps
        for name in group.nodes:
            rows[name] = {
                "parameters": (own + around["groups"][g]) // members,
                "flops_per_token": flops,
                "group": g,
                "members": members,
            }
    outside = {f"inputs.{name}": n for name, n in inputs.items()}
    outside |= {f"outputs.{name}": n for name, n in outputs.items()}
    for part in ("messages", "cross", "perspectives", "feeds"):
        if around[part]:
            outside[part] = around[part]
    companion_rows = {
        name: {
            "parameters": companions[name],
            "flops_per_token": KINDS.get(ir.spec.nodes[name].kind).flops_per_token(
                config, context=ir.facts.context
            ),
        }
        for name, (_, config) in ir.facts.companions.items()
    }
    flops_outside = {}
    if federation.feeds:
        flops_outside["feeds"] = feed_flops_per_token(
            federation, time_axis=ir.spec.time is not None
        )
    total = nodes_total + sum(around["groups"]) + sum(outside.values()) + sum(companions.values())
    return ir.with_facts(
        estimates=rows,
        companion_estimates=companion_rows,
        parameters_outside_nodes=outside,
        flops_outside_nodes=flops_outside,
        parameters=total,
    )


def _ports(ir: IR, role: str) -> list[tuple[str, dict]]:
    """Inputs or outputs with what their count needs (an lm head: its table's vocabulary)."""
    found = []
    for _, data in ir.vertices(role):
        data = dict(data)
        if data["kind"] == "lm_head":
            spec = data["spec"]
            tokens = [n for n, i in ir.spec.inputs.items() if i.kind == "tokens"]
            data["vocab"] = ir.spec.inputs[spec.vocab_of or tokens[0]].vocab
        found.append((data["name"], data))
    return found
