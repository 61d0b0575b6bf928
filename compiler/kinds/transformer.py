"""`kind: transformer`: a decoder-only transformer, the sub-model every other kind builds on."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from compiler.language.kinds import Capabilities, Description, NodeKind, NodePlan, kind
from compiler.language.spec import InputNames, TransformerSettings


class TransformerNode(TransformerSettings):
    """A decoder-only transformer on a token stream `(batch, tokens, width)`."""

    kind: Literal["transformer"]
    input: InputNames | None = Field(
        None,
        description="The input(s) this node reads, or [] for a node driven by messages alone. "
        "Default: the only input.",
    )


class TransformerKind(NodeKind):
    """Shared by every kind whose node is one `runtime.transformer.Transformer` per batch group."""

    def transformer_settings(self, node: Any) -> tuple[Any, tuple] | None:
        return node, ()

    def declared_width(self, node: Any) -> int | None:
        return None  # the settings' width, resolved from `defaults.transformer`

    def plan(self, ir: Any, vertex: str) -> NodePlan:
        return NodePlan(transformer_config_of(ir, vertex))

    def build(self, group: Any) -> Any:
        from runtime.transformer import Transformer

        return Transformer(group.config, len(group.nodes), group.rope_scales or None)

    counts_exactly = True  # tests/test_parameter_counts.py holds the count to the built module

    def parameters(self, config: Any) -> int:
        from compiler.passes.estimate import transformer_parameters

        return transformer_parameters(config)

    def group_parameters(self, group: Any) -> int:
        from compiler.passes.estimate import transformer_parameters

        return transformer_parameters(group.config, len(group.nodes))

    def flops_per_token(self, config: Any) -> int:
        from compiler.passes.estimate import transformer_flops_per_token

        return transformer_flops_per_token(config)

    def describe(self, ir: Any, vertex: str) -> Description:
        cfg = ir.graph.nodes[vertex]["config"]
        heads = f"{cfg.heads}/{cfg.kv_heads}kv" if cfg.kv_heads else str(cfg.heads)
        return Description(
            width=str(cfg.width),
            heads=heads,
            layers=str(cfg.layers),
            lines=[f"w{cfg.width} · {cfg.heads} heads · {cfg.layers} layers"],
            notes=component_notes(ir.graph.nodes[vertex]["name"], cfg),
        )


def component_notes(name: str, cfg: Any) -> list[str]:
    """The node's chosen components and, with `variations`, what every layer drew."""
    notes = []
    chosen = [
        f"{what} {choice.name}({', '.join(f'{k}={v}' for k, v in choice.options)})"
        for what, choice in (("attention", cfg.variant), ("rotary", cfg.rotary))
        if choice is not None and choice.level != "lattice"  # the lattice has its own line
    ]
    if chosen:
        notes.append(f"{name}: " + "; ".join(chosen))
    for i, layer in enumerate(cfg.layer_settings):
        notes.append(
            f"{name} layer {i}: activation {layer.activation}, heads {layer.heads}, "
            f"dropout {layer.dropout:g}, norm {layer.norm}"
        )
    return notes


def transformer_config_of(ir: Any, vertex: str) -> Any:
    """The resolved `TransformerConfig` of a node with transformer settings."""
    from compiler.passes.plan import transformer_config

    data = ir.graph.nodes[vertex]
    return transformer_config(
        data["settings"], data["width"], ir.facts.context, data["layer_settings"]
    )


@kind("transformer")
class Transformer(TransformerKind):
    Spec = TransformerNode
    capabilities = Capabilities()
    colour = "#2b6cb0"
