"""Count parameters and FLOPs per node by building the model on the meta device.

On `meta`, tensors have shapes but no storage, so a 10-billion-parameter spec builds in well under
a second without allocating its weights; the counts come from the real modules the back end will
build, not from a formula that could drift from them. A closed-form count is checked first, so an
absurd spec (a trillion layers) is refused before anything is constructed.

FLOPs per token are forward FLOPs: 2 per weight of every matmul the token passes through, plus
attention's scores and weighted sum over a full context (halved when causal), times the feedback
steps. Training costs about three times as much.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic, SpecError
from compiler.language.kinds import KINDS
from compiler.passes.contract import contract

if TYPE_CHECKING:
    from runtime.transformer import TransformerConfig

MAX_PARAMETERS = 2 * 10**12
MAX_BLOCKS = 20_000


def transformer_parameters(cfg: TransformerConfig) -> int:
    """Closed-form count, used as a guard before building (and checked against the build in tests).

    Registered attention and rotary components bring their own few parameters, which
    this guard leaves out; the reported counts come from the built modules."""
    w = cfg.width
    norm = w * (2 if cfg.bias and cfg.norm == "layernorm" else 1)
    positions = cfg.context * w if cfg.position == "learned" else 0
    blocks = sum(_block_parameters(cfg.layer(i)) for i in range(cfg.layers))
    return blocks + norm + positions


def _block_parameters(cfg: TransformerConfig) -> int:
    w, hw, cw = cfg.width, cfg.head_width, cfg.content_width
    qkv_out = (cfg.heads + cfg.n_kv_heads) * cw + cfg.n_kv_heads * hw
    qkv = w * qkv_out + qkv_out * cfg.bias
    if cfg.attention is not None:  # per head: frequency (if learned), initial phase, strength
        learned = 3 if cfg.attention.frequencies == "learned" else 2
        qkv += learned * cfg.heads + 2  # and the coupling and the lattice constant
    proj = cfg.heads * hw * w + w * cfg.bias
    fc_out = cfg.inner_width * (2 if cfg.gated else 1)
    mlp = w * fc_out + fc_out * cfg.bias + cfg.inner_width * w + w * cfg.bias
    norm = w * (2 if cfg.bias and cfg.norm == "layernorm" else 1)
    return qkv + proj + mlp + 2 * norm


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


@contract(
    requires=("nodes.config", "facts.federation", "facts.context"),
    provides=(
        "facts.estimates",
        "facts.companion_estimates",
        "facts.parameters_outside_nodes",
        "facts.parameters",
    ),
)
def estimate(ir: IR) -> IR:
    import torch

    from compiler.lower import build_group, lower

    federation = ir.facts.federation
    blocks = sum(getattr(g.config, "layers", 1) for g in federation.groups)
    guess = sum(KINDS.get(g.kind).parameters(g.config) * len(g.nodes) for g in federation.groups)
    if guess > MAX_PARAMETERS or blocks > MAX_BLOCKS:
        what = (
            f"{guess:,} parameters"
            if guess > MAX_PARAMETERS
            else f"{blocks:,} transformer blocks to build"
        )
        raise SpecError(
            [
                Diagnostic(
                    ir.span(("nodes",), key=True),
                    f"this spec asks for {what}, beyond what epicycle will build "
                    f"(at most {MAX_PARAMETERS:,} parameters and {MAX_BLOCKS:,} blocks)",
                    "check `width`, `layers` and the number of nodes for a typo",
                )
            ]
        )
    built: dict[tuple, torch.nn.Module] = {}

    def once_per_shape(group: Any) -> torch.nn.Module:
        # identical groups have identical counts: build each (kind, shape, members) once
        key = (group.kind, group.config, len(group.nodes), group.options)
        if key not in built:
            built[key] = build_group(group)
        return built[key]

    with torch.device("meta"):
        model = lower(ir, make_group=once_per_shape)
    steps = federation.steps
    rows: dict[str, dict] = {}
    for g, group in enumerate(federation.groups):
        members = len(group.nodes)
        shared = sum(p.numel() for p in model.federation.transformers[g].parameters())
        shared += sum(p.numel() for p in model.federation.reads[g].parameters())
        if model.federation.has_bus:
            shared += sum(p.numel() for p in model.federation.to_bus[g].parameters())
            shared += sum(p.numel() for p in model.federation.from_bus[g].parameters())
        flops = KINDS.get(group.kind).flops_per_token(group.config) * steps
        for name in group.nodes:
            rows[name] = {
                "parameters": shared // members,
                "flops_per_token": flops,
                "group": g,
                "members": members,
            }
    shared_parts = {
        f"inputs.{name}": sum(p.numel() for p in module.parameters())
        for name, module in model.inputs.items()
    }
    seen: set[int] = {id(p) for module in model.inputs.values() for p in module.parameters()}
    for name, module in model.outputs.items():
        own = [p for p in module.parameters() if id(p) not in seen]
        shared_parts[f"outputs.{name}"] = sum(p.numel() for p in own)
    if model.federation.has_bus:
        shared_parts["messages"] = sum(p.numel() for p in model.federation.messages.parameters())
    companions = {
        name: {
            "parameters": sum(p.numel() for p in module.parameters()),
            "flops_per_token": KINDS.get(ir.spec.nodes[name].kind).flops_per_token(
                module.config, context=ir.facts.context
            ),
        }
        for name, module in model.companions.items()
    }
    outside = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not n.startswith("federation.transformers.")
    )
    total = outside + sum(
        sum(p.numel() for p in model.federation.transformers[g].parameters())
        for g in range(len(federation.groups))
    )
    return ir.with_facts(
        estimates=rows,
        companion_estimates=companions,
        parameters_outside_nodes=shared_parts,
        parameters=total,
    )
