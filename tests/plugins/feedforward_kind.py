"""A node kind written outside the project, as a user would: a stack of token-wise residual MLPs
(no attention at all). Importing this module registers it through the decorator; the
`epicycle.kinds` entry point of a package calls `register(registry)` instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from compiler.language.kinds import Capabilities, Description, NodeKind, NodePlan, kind
from compiler.language.spec import InputNames, SpecModel, Width
from runtime.layers import MemberLinear


class FeedForwardSpec(SpecModel):
    """Token-wise residual MLPs: every token is transformed on its own, with no attention."""

    kind: Literal["feedforward"]
    width: Width = Field(description="Width of the token stream.")
    layers: int = Field(2, ge=1, le=64, description="Residual MLP blocks.")
    input: InputNames | None = Field(None, description="The input(s) it reads.")


@dataclass(frozen=True)
class FeedForwardConfig:
    width: int
    layers: int
    heads: int = 1


class FeedForwardStack(nn.Module):
    """`members` stacks of `x + W2 relu(W1 x)`; `(members, batch, tokens, width)` in and out."""

    def __init__(self, config: FeedForwardConfig, members: int):
        super().__init__()
        self.up = nn.ModuleList(
            MemberLinear(members, config.width, 2 * config.width) for _ in range(config.layers)
        )
        self.down = nn.ModuleList(
            MemberLinear(members, 2 * config.width, config.width) for _ in range(config.layers)
        )
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        for up, down in zip(self.up, self.down, strict=True):
            x = x + down(torch.relu(up(x)))
        return x

    def report(self) -> dict[str, Any]:
        return {"blocks": len(self.up)}


@kind("feedforward")
class FeedForward(NodeKind):
    Spec = FeedForwardSpec
    capabilities = Capabilities(receives_messages=False)
    colour = "#805ad5"

    def check(self, ir: Any, vertex: str) -> list:
        data = ir.graph.nodes[vertex]
        if data["spec"].width % 2:
            return [ir.error((*data["path"], "width"), "a feedforward node needs an even width")]
        return []

    def plan(self, ir: Any, vertex: str) -> NodePlan:
        spec = ir.graph.nodes[vertex]["spec"]
        return NodePlan(FeedForwardConfig(spec.width, spec.layers))

    def build(self, group: Any) -> nn.Module:
        return FeedForwardStack(group.config, len(group.nodes))

    def parameters(self, config: FeedForwardConfig) -> int:
        return config.layers * 4 * config.width * config.width

    def flops_per_token(self, config: FeedForwardConfig) -> int:
        return 2 * self.parameters(config)

    def describe(self, ir: Any, vertex: str) -> Description:
        config = ir.graph.nodes[vertex]["config"]
        return Description(
            width=str(config.width),
            layers=str(config.layers),
            lines=[f"w{config.width} · {config.layers} MLP blocks"],
            details={"blocks": config.layers},
        )


def register(registry: Any) -> None:
    """The `epicycle.kinds` entry point's target."""
    registry.add(FeedForward, "feedforward", replace=True)
