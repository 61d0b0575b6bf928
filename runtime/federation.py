"""A federation of sub-transformers joined by message-passing edges and feedback (design 000).

The compiler hands over a `FederationPlan`: nodes in topological stages, each stage split into
batch groups of same-shaped nodes (one `Transformer` with `members` stacked weights each), the edges
with their delays, and the feedback schedule. The forward pass is then:

    for step in 1..steps:                        # feedback iterations
        bus = zeros(batch, tokens, nodes, bus_width)
        for stage in stages:                     # topological order of the delay-0 edges
            msgs = propagate([bus, bus_{-1}, ..., bus_{-D}], edges into this stage)
            for group in stage:                  # one batched call per group, not per node
                x = read(input) + from_bus(msgs[group])
                y = group.transformer(x)
                bus[group] = to_bus(y)

Every step reads the inputs afresh (the seed sketch's loop began from zeros and never saw them);
a delayed edge reads the bus of `delay` steps before, which is zero before the first step.
The loops run over the plan, whose length is fixed at compile time, so `torch.compile` unrolls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import MemberLinear
from .message_passing import stage_edges
from .transformer import Transformer, TransformerConfig


@dataclass(frozen=True)
class GroupPlan:
    """Same-shaped nodes that read the same input: run as one `Transformer` with stacked weights."""

    nodes: tuple[str, ...]
    indices: tuple[int, ...]  # positions on the message bus
    config: TransformerConfig
    inputs: tuple[tuple[str, int], ...]  # (input name, its width); their reads are summed


@dataclass(frozen=True)
class EdgePlan:
    source: int
    target: int
    delay: int
    kind: str
    ratio: float | None


@dataclass(frozen=True)
class FederationPlan:
    nodes: tuple[str, ...]
    stages: tuple[tuple[GroupPlan, ...], ...]
    edges: tuple[EdgePlan, ...]
    bus_width: int
    aggregate: str = "sum"
    steps: int = 1
    backprop_steps: int = 1

    @property
    def groups(self) -> tuple[GroupPlan, ...]:
        return tuple(g for stage in self.stages for g in stage)

    @property
    def max_delay(self) -> int:
        return max((e.delay for e in self.edges), default=0)


class Federation(nn.Module):
    def __init__(self, plan: FederationPlan):
        super().__init__()
        self.plan = plan
        groups = plan.groups
        self.transformers = nn.ModuleList(Transformer(g.config, len(g.nodes)) for g in groups)
        self.reads = nn.ModuleList(
            nn.ModuleList(_projection(len(g.nodes), width, g.config.width) for _, width in g.inputs)
            for g in groups
        )
        self.has_bus = bool(plan.edges)
        self.max_delay = plan.max_delay  # a plain int: torch.compile traces it as a constant
        if self.has_bus:
            self.to_bus = nn.ModuleList(
                _projection(len(g.nodes), g.config.width, plan.bus_width) for g in groups
            )
            self.from_bus = nn.ModuleList(
                _projection(len(g.nodes), plan.bus_width, g.config.width) for g in groups
            )
            from .message_passing_layer import (
                EdgeConditionedMessage,  # torch-geometric: only when needed
            )

            self.messages = EdgeConditionedMessage(plan.bus_width, plan.aggregate)
        self._stage_has_edges: list[bool] = []
        n = len(plan.nodes)
        for s, stage in enumerate(plan.stages):
            members = {i for g in stage for i in g.indices}
            edges = [
                (e.source, e.target, e.delay, e.kind, e.ratio)
                for e in plan.edges
                if e.target in members
            ]
            index, attr = stage_edges(edges, n)
            self.register_buffer(f"edge_index_{s}", index, persistent=False)
            self.register_buffer(f"edge_attr_{s}", attr, persistent=False)
            self._stage_has_edges.append(bool(edges))
        for g, group in enumerate(groups):
            self.register_buffer(
                f"bus_index_{g}", torch.tensor(group.indices, dtype=torch.long), persistent=False
            )

    def forward(self, embedded: dict[str, Tensor]) -> list[Tensor]:
        """Final states per group, each `(members, batch, tokens, width)`."""
        plan = self.plan
        first = next(iter(embedded.values()))
        batch, tokens = first.shape[0], first.shape[1]
        history: list[Tensor] = []  # buses of earlier steps, newest first
        outs: list[Tensor] = []
        for step in range(plan.steps):
            keep_grad = step >= plan.steps - plan.backprop_steps
            if keep_grad:
                outs, bus = self._step(embedded, history, batch, tokens)
            else:
                with torch.no_grad():
                    outs, bus = self._step(embedded, history, batch, tokens)
            if bus is not None and self.max_delay:
                history = [bus, *history][: self.max_delay]
        return outs

    def _step(
        self, embedded: dict[str, Tensor], history: list[Tensor], batch: int, tokens: int
    ) -> tuple[list[Tensor], Tensor | None]:
        plan = self.plan
        n = len(plan.nodes)
        first = next(iter(embedded.values()))
        bus = first.new_zeros(batch, tokens, n, plan.bus_width) if self.has_bus else None
        outs: list[Tensor] = []
        g = 0
        for s, stage in enumerate(plan.stages):
            incoming = None
            if bus is not None and self._stage_has_edges[s]:
                past = [
                    history[d] if d < len(history) else torch.zeros_like(bus)
                    for d in range(self.max_delay)
                ]
                sources = torch.cat([bus, *past], dim=-2) if past else bus
                incoming = self.messages(
                    sources, getattr(self, f"edge_index_{s}"), getattr(self, f"edge_attr_{s}"), n
                )
            for group in stage:
                members = len(group.nodes)
                x = (
                    first.new_zeros(members, batch, tokens, group.config.width)
                    if not group.inputs
                    else None
                )
                for (name, _), read in zip(group.inputs, self.reads[g], strict=True):
                    value = embedded[name].unsqueeze(0)
                    value = read(value.expand(members, *value.shape[1:]))
                    x = value if x is None else x + value
                index = getattr(self, f"bus_index_{g}")
                if incoming is not None:
                    x = x + self.from_bus[g](incoming.index_select(-2, index).movedim(-2, 0))
                y = self.transformers[g](x)
                outs.append(y)
                if bus is not None:
                    bus = bus.index_copy(-2, index, self.to_bus[g](y).movedim(0, -2).to(bus.dtype))
                g += 1
        return outs, bus


def _projection(members: int, width_in: int, width_out: int) -> nn.Module:
    """A learned map between widths, or nothing at all where they already agree."""
    return nn.Identity() if width_in == width_out else MemberLinear(members, width_in, width_out)
