"""Sub-transformers joined by message-passing edges and feedback (docs/designs.md, design 000).

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

Every step reads the inputs afresh (the original sketch's loop began from zeros and never saw them);
a delayed edge reads the bus of `delay` steps before, which is zero before the first step.
The loops run over the plan, whose length is fixed at compile time, so `torch.compile` unrolls them.
An edge from an output (`FeedPlan`) adds what that output gave `delay` steps before, through its
projection, to the receiving node's input; the heads are the model's (`GraphModel` sets
`read_back`), evaluated after each step on its final states.
Under `mode: equilibrium` the steps are not unrolled: an `EquilibriumSolver` (equilibrium.py)
solves for the bus state that one more step leaves unchanged, iterating this module's `_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from runtime.attention.cross import CrossAttention
from runtime.configs import EdgePlan, FederationPlan, GroupPlan  # noqa: F401 (re-exported)
from runtime.federation.equilibrium import (
    EquilibriumPlan,
    EquilibriumSolver,
    NonFiniteError,  # noqa: F401 - raised by the unrolled loop too, and imported from here
    finite_per_node,
    raise_if_not_finite,
)
from runtime.federation.messages import stage_edges
from runtime.federation.solvers import SolverSettings
from runtime.layers import MemberLinear, init_normal_
from runtime.names import NamedModules
from runtime.perspective import Perspective, apply_frames


def _reported(field: str) -> property:
    """`Federation.last_<field>`: the equilibrium solver's latest report of `field`."""

    def get(self: Federation) -> float | int | None:
        return None if self.equilibrium is None else getattr(self.equilibrium, field)

    return property(
        get, doc=f"The latest equilibrium solve's `{field}` (None before it, or in other modes)."
    )


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
        self.perspectives = NamedModules({k: NamedModules(v) for k, v in frames.items()})
        self.reads = nn.ModuleList(
            nn.ModuleList(_projection(len(g.nodes), width, g.config.width) for _, width in g.inputs)
            for g in groups
        )
        self.has_bus = bool(plan.edges)
        self.max_delay = plan.max_delay  # a plain int: torch.compile traces it as a constant
        # Only the parts some edge uses are built, so every parameter gets a gradient (DDP refuses
        # unused ones): `to_bus` for groups that send on any edge (a `cross` edge attends to its
        # source's bus row too), `from_bus` for groups that receive, and the message layer only if
        # some edge is not `cross`. Entries of groups that need none stay `nn.Identity`, never
        # called: per-group indexing holds, and counting their parameters gives zero.
        senders = {e.source for e in plan.edges}
        receivers = {e.target for e in plan.edges}
        self._sends = [any(i in senders for i in g.indices) for g in groups]
        self._receives = [any(i in receivers for i in g.indices) for g in groups]
        passing = [e for e in plan.edges if e.kind != "cross"]
        self._receives_messages = [any(e.target in g.indices for e in passing) for g in groups]
        if self.has_bus:
            self.to_bus = nn.ModuleList(
                _projection(len(g.nodes), g.config.width, plan.bus_width)
                if sends
                else nn.Identity()
                for g, sends in zip(groups, self._sends, strict=True)
            )
            self.from_bus = nn.ModuleList(
                _projection(len(g.nodes), plan.bus_width, g.config.width)
                if receives
                else nn.Identity()
                for g, receives in zip(groups, self._receives, strict=True)
            )
            if passing:
                from runtime.federation.message_layer import (
                    EdgeConditionedMessage,  # torch-geometric: only when needed
                )

                self.messages = EdgeConditionedMessage(
                    plan.bus_width, plan.aggregate, len(plan.nodes)
                )
            else:
                self.messages = nn.Identity()
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
        # Outputs fed back: one projection per edge `from: outputs.NAME`, from the output's width
        # to its receiver's; the receiver's (group, member) and the delay say where and when.
        place = {i: (g, m) for g, group in enumerate(groups) for m, i in enumerate(group.indices)}
        self.feeds = nn.ModuleList(
            _feed_projection(f.width, groups[place[f.target][0]].config.width) for f in plan.feeds
        )
        self._feeds_into: list[list[tuple[int, int, str, int]]] = [[] for _ in groups]
        for k, f in enumerate(plan.feeds):
            g, m = place[f.target]
            self._feeds_into[g].append((k, m, f.output, f.delay))
        # The model's heads for the fed-back outputs, `states -> {output: values}`: set by
        # `GraphModel` (its heads are its own modules, not registered twice here).
        self.read_back: Callable[[list[Tensor]], dict[str, Tensor]] | None = None
        self.feed_delay = plan.feed_delay  # plain values, constants to torch.compile
        self.fed_outputs = plan.fed_outputs
        if plan.mode == "equilibrium" and plan.lipschitz is not None:
            # What the delayed edges read is scaled by this gain (<= 1): the Lipschitz bound's only
            # lever, kept in the state dict so a checkpoint reproduces the map it was trained on.
            self.register_buffer("feedback_gain", torch.ones(()))
            # False until the first forward measures the loop: a fresh model's first solve, in any
            # mode, sets the gain (as spectral normalisation's power iteration starts at build).
            self.register_buffer("feedback_gain_measured", torch.zeros((), dtype=torch.bool))
        # The solver iterates this federation's own step; it holds no tensors of its own.
        self.equilibrium = (
            EquilibriumSolver(
                self._step,
                plan.nodes,
                plan.equilibrium or _plain_equilibrium(plan),
                plan.lipschitz,
                plan.power_iterations,
            )
            if plan.mode == "equilibrium"
            else None
        )
        if self.equilibrium is not None and self.equilibrium.settings.jacobian_weight:
            self.jacobian_regularisation = JacobianRegularisation(self.equilibrium)

    @property
    def leaves_parameters_unused(self) -> bool:
        """Whether a training step may leave parameters without a gradient by design: truncated
        feedback cuts the only path through a delayed edge's sender when the last steps kept are
        fewer than the delay reaches (data-parallel wrappers must then look for unused ones)."""
        plan = self.plan
        return plan.mode == "truncated" and plan.backprop_steps < plan.steps and self.max_delay > 0

    def forward(self, embedded: dict[str, Tensor]) -> list[Tensor]:
        """Final states per group, each `(members, batch, tokens, width)`."""
        plan = self.plan
        if self.equilibrium is not None:
            measured = self.feedback_gain_measured if plan.lipschitz is not None else None
            return self.equilibrium.solve(embedded, self.training, self._gain(), measured)
        history: list[Tensor] = []  # buses of earlier steps, newest first
        fed: list[dict[str, Tensor]] = []  # fed-back outputs of earlier steps, newest first
        outs: list[Tensor] = []
        finite: list[Tensor] = []
        for step in range(plan.steps):
            last = step == plan.steps - 1  # its outputs are the model's, fed back to no step
            if step >= plan.steps - plan.backprop_steps:
                outs, bus = self._step(embedded, history, fed)
                fed = fed if last else self._feed_back(outs, fed)
            else:  # truncated: the early steps run without a tape
                with torch.no_grad():
                    outs, bus = self._step(embedded, history, fed)
                    fed = self._feed_back(outs, fed)
            if bus is not None and self.max_delay:
                history = [bus, *history][: self.max_delay]
                if plan.steps > 1 and not torch.compiler.is_compiling():
                    finite.append(finite_per_node(bus))
        if finite:
            raise_if_not_finite(torch.stack(finite), "feedback step", plan.nodes)
        return outs

    def init_state(
        self,
        batch: int,
        tokens: int,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, ...]:
        """The state before the first time step: the buses the delayed edges read, newest first,
        then for each step back the fed-back outputs (`plan.fed_outputs` order), all zero
        (nothing was sent before the first step). Empty without delayed edges."""
        buses: tuple[Tensor, ...] = ()
        if self.has_bus and self.max_delay:
            shape = (batch, tokens, len(self.plan.nodes), self.plan.bus_width)
            buses = tuple(
                torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.max_delay)
            )
        width = {f.output: f.width for f in self.plan.feeds}
        fed = tuple(
            torch.zeros(batch, tokens, width[name], device=device, dtype=dtype)
            for _ in range(self.feed_delay)
            for name in self.fed_outputs
        )
        return buses + fed

    def step(
        self, embedded: dict[str, Tensor], state: tuple[Tensor, ...]
    ) -> tuple[list[Tensor], tuple[Tensor, ...]]:
        """One time step of a time axis: this step's inputs and the state `init_state` or the
        previous step gave; the final states per group, and the state for the next step."""
        buses = len(state) - self.feed_delay * len(self.fed_outputs)
        history, fed = list(state[:buses]), self._unflatten(state[buses:])
        outs, bus = self._step(embedded, history, fed)
        if bus is not None and self.max_delay:
            history = [bus, *history][: self.max_delay]
        fed = self._feed_back(outs, fed)
        names = self.fed_outputs
        return outs, (*history, *(values[name] for values in fed for name in names))

    def _unflatten(self, flat: tuple[Tensor, ...]) -> list[dict[str, Tensor]]:
        """The fed-back outputs of a flat state, one dict per step back, newest first."""
        names = self.fed_outputs
        return [
            dict(zip(names, flat[d : d + len(names)], strict=True))
            for d in range(0, len(flat), len(names) or 1)
        ]

    def _feed_back(
        self, outs: list[Tensor], fed: list[dict[str, Tensor]]
    ) -> list[dict[str, Tensor]]:
        """The fed-back outputs with this step's (from its final states) as the newest."""
        if not self.feed_delay:
            return fed
        if self.read_back is None:
            raise RuntimeError(
                "this federation feeds outputs back, and no heads were given to compute them: "
                "run it inside its `GraphModel`, which sets `read_back`"
            )
        return [self.read_back(outs), *fed][: self.feed_delay]

    def fixed_point(self, embedded: dict[str, Tensor]) -> Tensor:
        """The equilibrium bus state z* for these inputs, with the stored gain (no tape)."""
        if self.equilibrium is None:
            raise ValueError("only `mode: equilibrium` feedback has a fixed point")
        return self.equilibrium.fixed_point(embedded, self._gain())

    def lipschitz_at(
        self,
        embedded: dict[str, Tensor],
        z: Tensor,
        gain: Tensor | None = None,
        iterations: int = 20,
    ) -> float:
        """The spectral norm of the feedback map's Jacobian at `z` (`EquilibriumSolver.lipschitz_at`),
        under `gain` or else the stored one."""
        if self.equilibrium is None:
            raise ValueError("only `mode: equilibrium` feedback has a fixed point to measure at")
        return self.equilibrium.lipschitz_at(
            embedded, z, gain if gain is not None else self._gain(), iterations
        )

    def correction_states(self) -> list[tuple[float, list[Tensor]]]:
        """Fixed-point correction: (weight, final states per group) for each trajectory state of
        the latest training forward that `feedback.correction` supervises (empty otherwise)."""
        return [] if self.equilibrium is None else list(self.equilibrium.correction)

    def solve_report(self) -> dict[str, float | int | None] | None:
        """The latest equilibrium solves, for logs and the command line: iterations, residual and
        contraction forward, iterations and residual backward, and with `lipschitz` the measured
        Jacobian norm and the stored gain. None for other modes or before the first forward."""
        return None if self.equilibrium is None else self.equilibrium.report(self._gain())

    def _map(
        self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None
    ) -> tuple[list[Tensor], Tensor | None]:
        """f(z), the map the equilibrium solves (tests compare its Jacobian and unrolled gradients)."""
        return self.equilibrium.map(embedded, z, gain)

    def _gain(self) -> Tensor | None:
        return self.feedback_gain if self.plan.lipschitz is not None else None

    # What the latest equilibrium forward and backward reported (None before the first, and in
    # other modes); the solver holds them.
    last_iterations = _reported("iterations")
    last_residual = _reported("residual")
    last_contraction = _reported("contraction")
    last_lipschitz = _reported("lipschitz")
    last_backward_iterations = _reported("backward_iterations")
    last_backward_residual = _reported("backward_residual")

    @property
    def _mask_seed(self) -> int | None:
        return None if self.equilibrium is None else self.equilibrium.mask_seed

    @_mask_seed.setter
    def _mask_seed(self, seed: int | None) -> None:  # tests replay a training solve's masks
        self.equilibrium.mask_seed = seed

    def _step(
        self,
        embedded: dict[str, Tensor],
        history: list[Tensor],
        fed: list[dict[str, Tensor]] = (),
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
                received = None
                if self._receives_messages[g]:
                    received = incoming.index_select(-2, index).movedim(-2, 0)
                if self._cross_edges[g]:
                    attended = self._cross_attend(g, x, sources)
                    received = attended if received is None else received + attended
                if received is not None:
                    x = x + self.from_bus[g](received)
                x = self._add_fed_back(g, x, fed)
                y = self.transformers[g](x)
                outs.append(y)
                if self._sends[g]:  # a row no edge reads stays zero, out of an equilibrium residual
                    # Each slot starts at zero and is written once per step, so adding equals copying;
                    # index_add's backward is an index_select, where index_copy's tripped torch 2.11's AOT.
                    sent = self.to_bus[g](y).movedim(0, -2).to(bus.dtype)
                    bus = bus.index_add(-2, index, sent)
                g += 1
        return outs, bus

    def _add_fed_back(self, g: int, x: Tensor, fed: list[dict[str, Tensor]]) -> Tensor:
        """Group `g`'s input plus, for each output fed into one of its members, the projection
        of what that output gave `delay` steps before (nothing before the first such step)."""
        for k, member, output, delay in self._feeds_into[g]:
            if delay <= len(fed):
                added = self.feeds[k](fed[delay - 1][output].to(x.dtype))
                x = torch.cat([x[:member], (x[member] + added)[None], x[member + 1 :]])
        return x

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


class JacobianRegularisation(nn.Module):
    """`feedback.jacobian`'s training term, found by `GraphModel.auxiliary_loss` through its
    `regularisation()`: weight times the estimate of ||J_f(z*)||_F^2 / dim of the latest training
    forward that made one (None on the others). A module of its own, present only when the spec
    asks for it, so models without it keep their FSDP wrapping (which looks for the hook)."""

    def __init__(self, solver: EquilibriumSolver):
        super().__init__()
        self.solver = solver

    def regularisation(self) -> Tensor | None:
        return self.solver.jacobian_term


def _plain_equilibrium(plan: FederationPlan) -> EquilibriumPlan:
    """Fixed-point iteration forward and backward to the plan's tolerance, implicit gradient."""
    settings = SolverSettings(steps=plan.steps, tolerance=plan.tolerance)
    return EquilibriumPlan(forward=settings, backward=settings)


def _feed_projection(width_in: int, width_out: int) -> nn.Linear:
    """`projection: linear` of an output fed back: a learned matrix, no bias (a zero output, as
    before the first step, adds nothing)."""
    projection = nn.Linear(width_in, width_out, bias=False)
    init_normal_(projection.weight)
    return projection


def _projection(members: int, width_in: int, width_out: int) -> nn.Module:
    """A learned map between widths, or nothing at all where they already agree."""
    return nn.Identity() if width_in == width_out else MemberLinear(members, width_in, width_out)
