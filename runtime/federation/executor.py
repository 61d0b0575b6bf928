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

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from runtime.attention.cross import CrossAttention
from runtime.federation.messages import stage_edges
from runtime.layers import MemberLinear
from runtime.perspective import Perspective, apply_frames
from runtime.transformer import TransformerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupPlan:
    """Same-shaped nodes that read the same input: run as one `Transformer` with stacked weights."""

    nodes: tuple[str, ...]
    indices: tuple[int, ...]  # positions on the message bus
    config: TransformerConfig
    inputs: tuple[tuple[str, int], ...]  # (input name, its width); their reads are summed
    rope_scales: tuple[float, ...] = ()  # per member: a gear's velocity; empty = all 1
    perspectives: tuple[str | None, ...] = ()  # per member: the frame it sees its inputs through
    kind: str = "transformer"  # the node kind whose `build` hook makes the group's module
    options: Any = None  # what that hook needs beyond `config` (a fractal's levels)


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
    mode: str = "unroll"  # unroll | truncated | equilibrium
    tolerance: float = 1e-4  # equilibrium: relative change at which the fixed point is reached
    lipschitz: float | None = None  # equilibrium: bound on the Jacobian's spectral norm at z*
    power_iterations: int = 4  # per measurement, for `lipschitz`
    perspectives: tuple[tuple[str, str], ...] = ()  # (name, kind)

    @property
    def groups(self) -> tuple[GroupPlan, ...]:
        return tuple(g for stage in self.stages for g in stage)

    @property
    def max_delay(self) -> int:
        return max((e.delay for e in self.edges), default=0)


class Federation(nn.Module):
    def __init__(self, plan: FederationPlan, make_group: Callable[[GroupPlan], nn.Module]):
        """`make_group(group)` builds each batch group's module, which maps a stream
        `(members, batch, tokens, width)` to one of the same shape: the compiler passes its node
        kinds' `build` hooks (and, counting on the meta device, a caching builder)."""
        super().__init__()
        self.plan = plan
        groups = plan.groups
        self.transformers = nn.ModuleList(make_group(g) for g in groups)
        kinds = dict(plan.perspectives)
        frames: dict[str, dict[str, Perspective]] = {}
        for g in groups:
            for name in {p for p in g.perspectives if p is not None}:
                for inp, width in g.inputs:
                    frames.setdefault(name, {})[inp] = Perspective(kinds[name], width)
        self.perspectives = nn.ModuleDict({k: nn.ModuleDict(v) for k, v in frames.items()})
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
            from runtime.federation.message_layer import (
                EdgeConditionedMessage,  # torch-geometric: only when needed
            )

            self.messages = EdgeConditionedMessage(plan.bus_width, plan.aggregate, len(plan.nodes))
        self._stage_has_edges: list[bool] = []
        n = len(plan.nodes)
        for s, stage in enumerate(plan.stages):
            members = {i for g in stage for i in g.indices}
            edges = [
                (e.source, e.target, e.delay, e.kind, e.ratio)
                for e in plan.edges
                if e.target in members and e.kind != "cross"
            ]
            index, attr = stage_edges(edges, n)
            self.register_buffer(f"edge_index_{s}", index, persistent=False)
            self.register_buffer(f"edge_attr_{s}", attr, persistent=False)
            self._stage_has_edges.append(bool(edges))
        cross: dict[str, CrossAttention] = {}
        self._cross_edges: list[list[EdgePlan]] = []
        for g, group in enumerate(groups):
            self.register_buffer(
                f"bus_index_{g}", torch.tensor(group.indices, dtype=torch.long), persistent=False
            )
            into = [e for e in plan.edges if e.kind == "cross" and e.target in group.indices]
            self._cross_edges.append(into)
            if into:
                cross[str(g)] = CrossAttention(
                    group.config.width, plan.bus_width, group.config.heads
                )
                sources = [e.delay * n + e.source for e in into]
                members = [group.indices.index(e.target) for e in into]
                self.register_buffer(f"cross_source_{g}", torch.tensor(sources), persistent=False)
                self.register_buffer(f"cross_member_{g}", torch.tensor(members), persistent=False)
        self.cross = nn.ModuleDict(cross)
        if plan.mode == "equilibrium" and plan.lipschitz is not None:
            # What the delayed edges read is scaled by this gain (<= 1): the Lipschitz bound's only
            # lever, kept in the state dict so a checkpoint reproduces the map it was trained on.
            self.register_buffer("feedback_gain", torch.ones(()))
            # False until the first forward measures the loop: a fresh model's first solve, in any
            # mode, sets the gain (as spectral normalisation's power iteration starts at build).
            self.register_buffer("feedback_gain_measured", torch.zeros((), dtype=torch.bool))
        # What the latest equilibrium forward and backward reported (None before the first).
        self.last_iterations: int | None = None
        self.last_residual: float | None = None
        self.last_contraction: float | None = None
        self.last_lipschitz: float | None = None
        self.last_backward_iterations: int | None = None
        self.last_backward_residual: float | None = None
        self._mask_seed: int | None = None  # set during an equilibrium forward in training

    def forward(self, embedded: dict[str, Tensor]) -> list[Tensor]:
        """Final states per group, each `(members, batch, tokens, width)`."""
        if self.plan.mode == "equilibrium":
            return self._equilibrium(embedded)
        plan = self.plan
        history: list[Tensor] = []  # buses of earlier steps, newest first
        outs: list[Tensor] = []
        finite: list[Tensor] = []
        for step in range(plan.steps):
            if step >= plan.steps - plan.backprop_steps:
                outs, bus = self._step(embedded, history)
            else:  # truncated: the early steps run without a tape
                with torch.no_grad():
                    outs, bus = self._step(embedded, history)
            if bus is not None and self.max_delay:
                history = [bus, *history][: self.max_delay]
                if plan.steps > 1 and not torch.compiler.is_compiling():
                    finite.append(_finite_per_node(bus))
        if finite:
            self._raise_if_not_finite(torch.stack(finite), "feedback step")
        return outs

    def _raise_if_not_finite(self, finite: Tensor, what: str) -> None:
        """One host sync per forward: name the first (step, node) whose state is NaN or Inf."""
        if bool(finite.all()):
            return
        step, node = (~finite).nonzero()[0].tolist()
        raise NonFiniteError(
            f"{what} {step + 1} of {finite.shape[0]}: node `{self.plan.nodes[node]}` produced NaN or Inf; "
            "the feedback diverged (lower the learning rate, use fewer steps, or make the loop contractive)"
        )

    # Eager under torch.compile: the solve stops at a data-dependent iteration, and the implicit
    # backward replays one step's tape many times, which a compiled backward cannot.
    @torch.compiler.disable
    def _equilibrium(self, embedded: dict[str, Tensor]) -> list[Tensor]:
        """Deep-equilibrium feedback (Bai, Kolter & Koltun 2019): solve z* = f(z*) for the bus state.

        The fixed point is found without a tape (up to `steps` iterations, stopping at `tolerance`
        relative change), so memory does not grow with the iterations. Gradients use the implicit
        function theorem: a hook on z = f(z*) replaces dL/dz by the solution g of
        g = J_f(z*)^T g + dL/dz, found by the same fixed-point iteration over vector-Jacobian
        products. `last_iterations`, `last_residual` and `last_contraction` (the observed rate per
        iteration) report the forward solve's convergence, `last_backward_iterations` and
        `last_backward_residual` the backward's.

        With `lipschitz: c` the map is f(z) = step(gain * z), and in training (and in a fresh model's
        first forward) the spectral norm sigma of J_f(z*) is measured after the solve
        (`lipschitz_at`); above `c` the gain is scaled by `0.95 c / sigma` and the fixed point
        solved again, so both solves contract at rate <= c near z* (Ostrowski). This is spectral normalisation (Miyato et al. 2018) applied to the linearised
        loop instead of to one weight: a global bound through attention and LayerNorm does not exist.
        """
        # One set of dropout masks per forward: with fresh masks at every evaluation, f would be a
        # different map each iteration and the solve would stall at the noise (the tied masks of
        # Bai et al.'s variational dropout). Drawn from the global generator, so seeded runs repeat.
        self._mask_seed = int(torch.randint(2**62, ())) if self.training else None
        try:
            return self._equilibrium_with_masks(embedded)
        finally:
            self._mask_seed = None

    def _equilibrium_with_masks(self, embedded: dict[str, Tensor]) -> list[Tensor]:
        plan = self.plan
        start = self._step(embedded, [])[1].detach()
        gain = self.feedback_gain.clone() if plan.lipschitz is not None else None
        z = self._solve(embedded, start, gain)
        if gain is not None:
            learning = (self.training and torch.is_grad_enabled()) or not bool(
                self.feedback_gain_measured
            )
            if learning or self.last_residual >= plan.tolerance:
                # Outside training a solve that fails is bounded too, for this forward only.
                z, gain = self._bound_lipschitz(embedded, start, z, gain, store=learning)
            if learning:
                self.feedback_gain_measured.fill_(True)
        if self.last_residual >= plan.tolerance:
            log.warning(
                "equilibrium feedback did not converge: relative change %.3g after %d iterations (tolerance %.3g); "
                "raise `feedback.steps` or bound the loop with `feedback.lipschitz`",
                self.last_residual,
                self.last_iterations,
                plan.tolerance,
            )
        if not torch.is_grad_enabled():
            return self._map(embedded, z, gain)[0]
        _, z_next = self._map(embedded, z, gain)  # re-attaches the tape to the parameters
        z0 = z_next.detach().requires_grad_()
        _, f0 = self._map(embedded, z0, gain)

        def implicit_gradient(grad: Tensor) -> Tensor:
            g, change = grad, float("inf")
            for iterations in range(1, plan.steps + 1):  # noqa: B007 - reported below
                (vjp,) = torch.autograd.grad(f0, z0, g, retain_graph=True)
                following = vjp + grad
                change = float((following - g).norm() / following.norm().clamp_min(1e-12))
                g = following
                if change <= plan.tolerance:
                    break
            self.last_backward_iterations, self.last_backward_residual = iterations, change
            if change > plan.tolerance:
                log.warning(
                    "equilibrium backward did not converge: relative change %.3g after %d iterations "
                    "(tolerance %.3g), so the gradient is approximate; bound the loop with "
                    "`feedback.lipschitz` or raise `feedback.steps`",
                    change,
                    iterations,
                    plan.tolerance,
                )
            return g

        z_next.register_hook(implicit_gradient)
        return self._map(embedded, z_next, gain)[0]

    def solve_report(self) -> dict[str, float | int | None] | None:
        """The latest equilibrium solves, for logs and the command line: iterations, residual and
        contraction forward, iterations and residual backward, and with `lipschitz` the measured
        Jacobian norm and the stored gain. None for other modes or before the first forward."""
        if self.plan.mode != "equilibrium" or self.last_iterations is None:
            return None
        report = {
            "iterations": self.last_iterations,
            "residual": self.last_residual,
            "contraction": self.last_contraction,
            "backward_iterations": self.last_backward_iterations,
            "backward_residual": self.last_backward_residual,
        }
        if self.plan.lipschitz is not None:
            report["lipschitz"] = self.last_lipschitz
            report["feedback_gain"] = float(self.feedback_gain)
        return report

    def fixed_point(self, embedded: dict[str, Tensor]) -> Tensor:
        """The equilibrium bus state z* for these inputs, with the stored gain (no tape)."""
        if self.plan.mode != "equilibrium":
            raise ValueError("only `mode: equilibrium` feedback has a fixed point")
        gain = self.feedback_gain if self.plan.lipschitz is not None else None
        with torch.no_grad():
            start = self._step(embedded, [])[1]
        return self._solve(embedded, start, gain)

    def _map(
        self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None
    ) -> tuple[list[Tensor], Tensor | None]:
        """f(z): one step of the graph whose delayed edges read `gain * z` (in training, with this
        forward's dropout masks)."""
        history = [z if gain is None else z * gain.to(z.dtype)]
        if self._mask_seed is None:
            return self._step(embedded, history)
        devices = [z.device] if z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._mask_seed)
            return self._step(embedded, history)

    def _solve(self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None) -> Tensor:
        plan = self.plan
        residual = first = torch.tensor(float("inf"))
        iterations = 0
        finite: list[Tensor] = []
        with torch.no_grad():
            for iterations in range(1, plan.steps + 1):  # noqa: B007 - reported below
                _, following = self._map(embedded, z, gain)
                finite.append(_finite_per_node(following))
                # Every process stops at the same iteration: under FSDP each step gathers weights.
                residual = _agreed((following - z).norm() / following.norm().clamp_min(1e-12))
                first = residual if iterations == 2 else first
                z = following
                if residual < plan.tolerance:
                    break
        self._raise_if_not_finite(torch.stack(finite), "equilibrium iteration")
        self.last_iterations, self.last_residual = iterations, float(residual)
        # The observed rate per iteration from the second change on (the first is from the start):
        # it tends to the spectral radius of J_f(z*), which is what decides convergence.
        self.last_contraction = (
            float((residual / first.clamp_min(1e-30)) ** (1 / (iterations - 2)))
            if iterations > 2
            else None
        )
        return z

    def _bound_lipschitz(
        self,
        embedded: dict[str, Tensor],
        start: Tensor,
        z: Tensor,
        gain: Tensor,
        store: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Measure ||J_f(z*)||, shrink the gain while it exceeds the bound (re-solving each time),
        and (with `store`) leave the next step a gain that puts it at `_HEADROOM` of the bound, at
        most 1. Returns the fixed point and the gain this forward uses."""
        bound = self.plan.lipschitz
        assert bound is not None
        sigma = 0.0
        for attempt in range(_BOUND_ATTEMPTS):
            sigma = self.lipschitz_at(embedded, z, gain, self.plan.power_iterations)
            proposed = gain * (_HEADROOM * bound / max(sigma, 1e-12))
            if sigma <= bound:
                if store:
                    self.feedback_gain.copy_(proposed.clamp(max=1.0))
                break
            if attempt + 1 == _BOUND_ATTEMPTS:  # this forward keeps the gain z* was solved with
                if store:
                    self.feedback_gain.copy_(proposed)
                log.warning(
                    "feedback Lipschitz bound %.3g not reached after %d re-solves (%.3g measured); "
                    "the next step starts from gain %.3g",
                    bound,
                    _BOUND_ATTEMPTS,
                    sigma,
                    float(proposed),
                )
                break
            gain = proposed
            converged = self.last_residual < self.plan.tolerance
            z = self._solve(embedded, z if converged else start, gain)
        self.last_lipschitz = sigma
        return z, gain

    def lipschitz_at(
        self,
        embedded: dict[str, Tensor],
        z: Tensor,
        gain: Tensor | None = None,
        iterations: int = 20,
    ) -> float:
        """The spectral norm of J_f at `z`: the map's local Lipschitz constant, by power iteration
        on J^T J from a seeded start.

        No layer mixes the sequences of a batch, so J is block-diagonal over them and its norm is
        the largest block's: each sequence runs its own power iteration (normalised separately),
        which converges at its own block's spectral gap instead of the gap between the top blocks.
        One forward with a tape serves every iteration: J^T u is a vector-Jacobian product, and
        J v the derivative of that (linear) product with respect to u, a double backward. It runs
        in the math attention kernel (flash kernels have no double backward), without autocast,
        and under a forked RNG so the caller's dropout stream is untouched. (Not under FSDP: a
        double backward cannot reach the weights it gathers; training refuses that combination.)
        """
        if gain is None and self.plan.lipschitz is not None:
            gain = self.feedback_gain
        generator = torch.Generator(device=z.device).manual_seed(0)
        v = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        devices = [z.device] if z.device.type == "cuda" else []
        with (
            torch.random.fork_rng(devices=devices),
            torch.enable_grad(),
            torch.autocast(z.device.type, enabled=False),
            sdpa_kernel(SDPBackend.MATH),
        ):
            point = z.detach().requires_grad_()
            _, image = self._map(embedded, point, gain)
            probe = torch.zeros_like(image, requires_grad=True)
            (transposed,) = torch.autograd.grad(image, point, probe, create_graph=True)
            sigma = torch.zeros(())
            for _ in range(iterations):
                direction = _per_sequence_unit(v)
                (jv,) = torch.autograd.grad(transposed, probe, direction, retain_graph=True)
                (v,) = torch.autograd.grad(image, point, _per_sequence_unit(jv), retain_graph=True)
                # ||J^T J v|| / ||J v|| >= ||J v|| for a unit v: the sharper lower bound
                sigma = v.flatten(1).norm(dim=1).max()
        return float(_agreed(sigma.detach()))

    def _step(
        self, embedded: dict[str, Tensor], history: list[Tensor]
    ) -> tuple[list[Tensor], Tensor | None]:
        plan = self.plan
        n = len(plan.nodes)
        first = next(iter(embedded.values()))
        batch, tokens = first.shape[0], first.shape[1]
        bus = first.new_zeros(batch, tokens, n, plan.bus_width) if self.has_bus else None
        outs: list[Tensor] = []
        g = 0
        for s, stage in enumerate(plan.stages):
            sources = None
            if bus is not None:
                past = [
                    history[d] if d < len(history) else torch.zeros_like(bus)
                    for d in range(self.max_delay)
                ]
                sources = torch.cat([bus, *past], dim=-2) if past else bus
            incoming = None
            if sources is not None and self._stage_has_edges[s]:
                incoming = self.messages(
                    sources, getattr(self, f"edge_index_{s}"), getattr(self, f"edge_attr_{s}"), n
                )
            for group in stage:
                x = self._read(group, g, embedded, batch, tokens)
                index = getattr(self, f"bus_index_{g}")
                received = (
                    incoming.index_select(-2, index).movedim(-2, 0)
                    if incoming is not None
                    else None
                )
                if self._cross_edges[g]:
                    attended = self._cross_attend(g, x, sources)
                    received = attended if received is None else received + attended
                if received is not None:
                    x = x + self.from_bus[g](received)
                y = self.transformers[g](x)
                outs.append(y)
                if bus is not None:
                    # Each slot starts at zero and is written once per step, so adding equals copying;
                    # index_add's backward is an index_select, where index_copy's tripped torch 2.11's AOT.
                    sent = self.to_bus[g](y).movedim(0, -2).to(bus.dtype)
                    bus = bus.index_add(-2, index, sent)
                g += 1
        return outs, bus

    def _read(
        self, group: GroupPlan, g: int, embedded: dict[str, Tensor], batch: int, tokens: int
    ) -> Tensor:
        """The members' view of their inputs, `(members, batch, tokens, width)`: framed, projected, summed."""
        members = len(group.nodes)
        first = next(iter(embedded.values()))
        x = (
            first.new_zeros(members, batch, tokens, group.config.width)
            if not group.inputs
            else None
        )
        for (name, _), read in zip(group.inputs, self.reads[g], strict=True):
            value = embedded[name].unsqueeze(0).expand(members, *embedded[name].shape)
            if any(p is not None for p in group.perspectives):
                value = apply_frames(value, self._frames(group, name, value))
            value = read(value)
            x = value if x is None else x + value
        return x

    def _cross_attend(self, g: int, x: Tensor, sources: Tensor) -> Tensor:
        """Token-to-token messages on `cross` edges: each target member's tokens attend (causally) to
        its source's tokens; one attention call for all cross edges into the group."""
        keys = sources.index_select(-2, getattr(self, f"cross_source_{g}")).movedim(
            -2, 0
        )  # (edges, B, T, bus)
        member = getattr(self, f"cross_member_{g}")
        attended = self.cross[str(g)](x.index_select(0, member), keys)
        return attended.new_zeros(x.shape[0], *attended.shape[1:]).index_add(0, member, attended)

    def _frames(self, group: GroupPlan, name: str, like: Tensor) -> Tensor:
        """Each member's perspective matrix on input `name` (identity for members without one)."""
        eye = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
        mats = []
        for perspective in group.perspectives:
            matrix = (
                self.perspectives[perspective][name].matrix() if perspective is not None else None
            )
            mats.append(eye if matrix is None else matrix.to(like.dtype))
        return torch.stack(mats)


_HEADROOM = (
    0.95  # the gain grows back only to this share of the bound: a step's drift needs no re-solve
)
_BOUND_ATTEMPTS = 10


def _per_sequence_unit(t: Tensor) -> Tensor:
    """`t` scaled so each sequence's slice `t[b]` has unit norm."""
    norms = t.flatten(1).norm(dim=1).clamp_min(1e-30)
    return t / norms.view(-1, *[1] * (t.dim() - 1))


def _agreed(value: Tensor) -> Tensor:
    """The largest `value` over the processes of a distributed run (itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


class NonFiniteError(FloatingPointError):
    """A feedback loop produced NaN or Inf; the message names the node and the step."""


def _finite_per_node(bus: Tensor) -> Tensor:
    """`(nodes,)` booleans: is every value of each node's state finite?"""
    return torch.isfinite(bus).flatten(0, 1).all(0).all(-1)


def _projection(members: int, width_in: int, width_out: int) -> nn.Module:
    """A learned map between widths, or nothing at all where they already agree."""
    return nn.Identity() if width_in == width_out else MemberLinear(members, width_in, width_out)
