"""The module the compiler produces: inputs -> federation of sub-models -> outputs.

It is an ordinary `nn.Module`: parameters, `state_dict`, `.to()`, `torch.compile` all behave as
usual. `forward` takes the spec's inputs (positionally in declaration order, or by name) and
returns a dict of the spec's outputs by name.

Tools reach inside it two ways only: `model.node(name)`, a `NodeHandle` on one spec node (its
kind, its place in the federation, its state, its module, its fractal view), and
`model.report()`, what the latest forward pass did, as plain JSON values.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from runtime.federation.executor import Federation, GroupPlan
from runtime.names import NamedModules
from runtime.ports import TokenInput, check_context, concat_states

if TYPE_CHECKING:
    from runtime.fractal.view import FractalView


@dataclass(frozen=True)
class OutputWiring:
    """Which node states an output reads: `(group, member)` addresses into the federation."""

    sources: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CompanionWiring:
    """Which node state a companion observes, whether its loss may reach that host, and how much
    the loss weighs in `auxiliary_loss`."""

    host: tuple[int, int]
    detach: bool
    weight: float


@runtime_checkable
class Reports(Protocol):
    """A runtime part that says what it did in the latest forward pass, as plain JSON values
    (floats, ints, strings, lists, dicts). Any part of a node's module that has `report()`
    contributes to that node's entry in `GraphModel.report()`, under its module path."""

    def report(self) -> dict[str, Any]: ...


class UnknownNode(KeyError):
    """`model.node(name)` for a name the spec does not declare; the message lists the nodes."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class NodeHandle:
    """One node of the spec inside a compiled model: `model.node(name)`.

    `address` is its `(group, member)` place in the federation: batch group `group` runs it as
    member `member` of one stacked module, `module`. A companion sends nothing to the federation:
    its address is None, `module` is the companion and `observes` names its host.
    """

    name: str
    kind: str  # the spec's `kind`
    address: tuple[int, int] | None
    module: nn.Module = field(repr=False, compare=False)
    model: GraphModel = field(repr=False, compare=False)
    observes: str | None = None

    @property
    def group(self) -> int:
        return self._placed()[0]

    @property
    def member(self) -> int:
        return self._placed()[1]

    @property
    def plan(self) -> GroupPlan:
        """Its batch group's plan: the resolved transformer config, the inputs it reads, etc."""
        return self.model.federation.plan.groups[self.group]

    @property
    def reads(self) -> nn.ModuleList:
        """Its group's projection of each input it reads, in `plan.inputs` order (`nn.Identity`
        where the widths agree)."""
        return self.model.federation.reads[self.group]

    @property
    def receives_messages(self) -> bool:
        """Whether any edge of the graph sends it messages (or feeds it an output)."""
        position = self.plan.indices[self.member]
        plan = self.model.federation.plan
        return any(e.target == position for e in (*plan.edges, *plan.feeds))

    @property
    def outputs(self) -> tuple[str, ...]:
        """The spec's outputs that read this node and nothing else."""
        if self.address is None:
            return ()
        return tuple(n for n, w in self.model.wiring.items() if w.sources == (self.address,))

    def states(self, states: list[Tensor]) -> Tensor:
        """This node's `(batch, tokens, width)` state out of the federation's per-group states
        (`model.federation(...)`, `(members, batch, tokens, width)` per group)."""
        g, m = self._placed()
        return states[g][m]

    @property
    def nests(self) -> bool:
        """Whether its module holds runnable sub-models (a fractal's levels)."""
        from runtime.fractal.transformer import FractalTransformer

        return isinstance(self.module, FractalTransformer)

    @property
    def fractal(self) -> FractalView:
        """The model seen through this fractal node: every level at once, any sub-model alone,
        merging (`runtime.fractal.view.FractalView`). One view per node, kept by the model."""
        problem = self.fractal_problem
        if problem is not None:
            raise ValueError(problem)
        views = self.model._fractal_views
        if self.name not in views:
            from runtime.fractal.view import FractalView

            views[self.name] = FractalView(self)
        return views[self.name]

    @property
    def fractal_problem(self) -> str | None:
        """Why `.fractal` is not available for this node, or None when it is."""
        if not self.nests:
            return f"node `{self.name}` is `kind: {self.kind}`, not a fractal node"
        if self.receives_messages:
            return (
                f"fractal `{self.name}` receives messages along edges, so its sub-models cannot "
                "run alone; levels and sub-models are available for fractals fed by inputs only"
            )
        if not self.outputs:
            return f"no output reads fractal `{self.name}` alone; add one, e.g. an lm_head from it"
        return None

    def report(self) -> dict[str, Any]:
        """What this node's module reports about the latest forward pass (see `GraphModel.report`)."""
        entry: dict[str, Any] = {"kind": self.kind}
        if self.address is None:
            entry["observes"] = self.observes
            observed = self.model.companion_outputs.get(self.name)
            if observed is not None:
                with torch.no_grad():
                    entry["companion"] = self.module.summary(*observed)
            return entry
        from runtime.attention.lattice import lattice_layers, layer_report

        lattice = {
            path: layer_report(layer, self.member) for path, layer in lattice_layers(self.module)
        }
        if lattice:
            entry["lattice"] = lattice
        if self.nests:
            view = self.model._fractal_views.get(self.name)
            entry["fractal"] = view.report() if view is not None else _fractal_entry(self.module)
        for path, part in self.module.named_modules():
            if isinstance(part, Reports):
                entry[path or "module"] = _plain(part.report())
        return entry

    def _placed(self) -> tuple[int, int]:
        if self.address is None:
            raise ValueError(
                f"`{self.name}` is a {self.kind} observing `{self.observes}`: it has no state in "
                f"the federation; read its host's, `model.node({self.observes!r})`"
            )
        return self.address


class GraphModel(nn.Module):
    def __init__(
        self,
        inputs: dict[str, nn.Module],
        federation: Federation,
        outputs: dict[str, nn.Module],
        wiring: dict[str, OutputWiring],
        companions: dict[str, nn.Module] | None = None,
        companion_wiring: dict[str, CompanionWiring] | None = None,
        kinds: dict[str, str] | None = None,
    ):
        """`kinds`: each node's spec `kind` (by default read from `spec`, which the compiler sets)."""
        super().__init__()
        self.inputs = NamedModules(inputs)
        self.federation = federation
        self.outputs = NamedModules(outputs)
        self.wiring = wiring
        # Companions observe node states and add a training term; they send nothing,
        # so the outputs never depend on them. Their results of the latest forward pass are kept in
        # `companion_outputs` (name -> (features read, CompanionOutput)) for the loss and metrics.
        self.companions = NamedModules(companions or {})
        self.companion_wiring = companion_wiring or {}
        self.companion_outputs: dict[str, tuple[Tensor, Any]] = {}
        self.input_names = tuple(inputs)
        # Set by the compiler: the validated spec, its text and digest, the resolved plan.
        self.spec: Any = None
        self.spec_text: str = ""
        self.spec_digest: str = ""
        self.kinds = dict(kinds or {})
        self._fractal_views: dict[str, FractalView] = {}
        if federation.plan.feeds:  # the federation computes the fed-back outputs with our heads
            federation.read_back = self._fed_outputs

    def forward(self, *args: Tensor, **kwargs: Tensor) -> dict[str, Tensor]:
        if self.federation.plan.time:  # inputs (batch, time, tokens, ...): step through them
            values = self._bind(args, kwargs)
            first = self._time_steps(values)
            state = self.init_state(first.shape[0], first.shape[2])
            return self.scan(state, **values)[1]
        states = self.federation(self._embed(args, kwargs))
        result = self.read_outputs(states)
        if self.companions:
            observed = {}
            for name, companion in self.companions.items():
                wiring = self.companion_wiring[name]
                features = states[wiring.host[0]][wiring.host[1]]
                features = features.detach() if wiring.detach else features
                observed[name] = (features, companion(features))
            self.companion_outputs = observed
        return result

    def init_state(self, batch: int, tokens: int) -> tuple[Tensor, ...]:
        """A time axis's state before the first step (`Federation.init_state`), on the model's
        device, for `batch` sequences of `tokens` tokens per time step."""
        weight = next(self.parameters())
        return self.federation.init_state(batch, tokens, device=weight.device, dtype=weight.dtype)

    def step(
        self, state: tuple[Tensor, ...], *args: Tensor, **kwargs: Tensor
    ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        """One time step, for streaming: this step's inputs, `(batch, tokens)` ids or `(batch,
        tokens, width)` features, and the state so far; the next state and this step's outputs."""
        if not self.federation.plan.time:
            raise TypeError("`step` runs a time axis, and this spec declares none (`time:`)")
        outs, state = self.federation.step(self._embed(args, kwargs), state)
        return state, self.read_outputs(outs)

    def scan(
        self, state: tuple[Tensor, ...], *args: Tensor, **kwargs: Tensor
    ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
        """A run of time steps from `state`: inputs `(batch, time, ...)`, outputs `(batch, time,
        ...)`, and the state after the last step (truncated backpropagation through time carries
        it, detached, into the next chunk)."""
        values = self._bind(args, kwargs)
        steps = self._time_steps(values).shape[1]
        per_step = []
        for t in range(steps):
            state, outputs = self.step(state, **{k: v[:, t] for k, v in values.items()})
            per_step.append(outputs)
        stacked = {name: torch.stack([o[name] for o in per_step], 1) for name in per_step[0]}
        return state, stacked

    def _time_steps(self, values: dict[str, Tensor]) -> Tensor:
        """The first input, after checking every input has a time axis of the same length."""
        for name, value in values.items():
            per_step = 2 if isinstance(self.inputs[name], TokenInput) else 3
            if value.dim() != per_step + 1:
                shape = "(batch, time, tokens)" if per_step == 2 else "(batch, time, tokens, width)"
                raise ValueError(
                    f"input `{name}` has shape {tuple(value.shape)}; with a time axis it is {shape}"
                )
        lengths = {name: value.shape[1] for name, value in values.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"the inputs' time axes differ in length: {lengths}")
        return next(iter(values.values()))

    def read_outputs(self, states: list[Tensor]) -> dict[str, Tensor]:
        """The spec's outputs by name from the federation's final states (per group)."""
        return {name: self._output(name, states) for name in self.outputs}

    def _output(self, name: str, states: list[Tensor]) -> Tensor:
        read = [states[g][m] for g, m in self.wiring[name].sources]
        return self.outputs[name](concat_states(read))

    def _fed_outputs(self, states: list[Tensor]) -> dict[str, Tensor]:
        """The outputs that edges feed back, from one step's final states (per group)."""
        return {name: self._output(name, states) for name in self.federation.fed_outputs}

    def auxiliary_loss(
        self, step: int = 0, task_loss: Callable[[dict[str, Tensor]], Tensor] | None = None
    ) -> Tensor:
        """Every training term the spec declares, summed; add it to the task loss. Lattice phase
        and coherence terms at their scheduled weights for `step`, attention
        components' own penalties such as adaptive span's L1 on spans, the equilibrium loop's
        Jacobian term (`feedback.jacobian`), and each companion's reconstruction loss on the
        latest forward pass, times its `weight`. Under `feedback.correction`, `task_loss` (the
        task's loss of a dict of outputs, as `forward` returns) also scores the outputs at the
        supervised trajectory states (`correction_loss`); it is required then."""
        from runtime.attention.lattice import LatticeOscillators, lattice_regularisation

        total = lattice_regularisation(self, step)
        corrected = self.federation.correction_states()
        if corrected and task_loss is None:
            raise ValueError(
                "`feedback.correction` supervises states along the equilibrium solve with the "
                "task loss: pass it as `model.auxiliary_loss(step, task_loss=...)`, a function "
                "of the outputs dict"
            )
        if corrected:
            total = total + self.correction_loss(task_loss)
        for module in self.modules():
            term = getattr(module, "regularisation", None)
            if callable(term) and not isinstance(module, LatticeOscillators):
                value = term()
                if value is not None:
                    total = total + value
        for name, (features, output) in self.companion_outputs.items():
            weight = self.companion_wiring[name].weight
            if weight:
                total = total + weight * self.companions[name].loss(features, output)
        return total

    def correction_loss(self, task_loss: Callable[[dict[str, Tensor]], Tensor]) -> Tensor:
        """Fixed-point correction (Bai et al. 2022): sum of weight * task_loss(outputs) over the
        trajectory states of the latest training forward that `feedback.correction` supervises
        (zero without them); each state's outputs reach the parameters through one step of f."""
        terms = [
            weight * task_loss(self.read_outputs(states))
            for weight, states in self.federation.correction_states()
        ]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def companion_metrics(self) -> dict[str, dict[str, Any]]:
        """Per companion, on the latest forward pass: reconstruction cosine and loss, the frame
        deviation against its rigidity envelope, the share of frames inside it, the alphas."""
        return {
            name: self.companions[name].summary(features, output)
            for name, (features, output) in self.companion_outputs.items()
        }

    def feedback_lipschitz(self, *args: Tensor, iterations: int = 50, **kwargs: Tensor) -> float:
        """The local Lipschitz constant of the equilibrium feedback map at its fixed point for these
        inputs: the spectral norm of its Jacobian, by `iterations` power iterations. Below 1 the
        solve and the implicit backward contract near z*; `feedback.lipschitz` keeps it at most
        its bound in training."""
        with torch.no_grad():
            embedded = self._embed(args, kwargs)
        z = self.federation.fixed_point(embedded)
        return self.federation.lipschitz_at(embedded, z, iterations=iterations)

    def _embed(self, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        values = self._bind(args, kwargs)
        embedded = {}
        for name, module in self.inputs.items():
            value = values[name]
            check_context(name, module, value)
            embedded[name] = module(value)
        return embedded

    def node(self, name: str) -> NodeHandle:
        """The spec node `name` in this model (`NodeHandle`): its kind, its `(group, member)`
        address, its state, its module and, for a fractal, its view. Unknown names raise
        `UnknownNode` (a `KeyError`) listing the nodes."""
        addresses = self._addresses()
        if name in addresses:
            g, m = addresses[name]
            module = self.federation.transformers[g]
            return NodeHandle(name, self._kind(name, "transformer"), (g, m), module, self)
        if name in self.companions:
            host = self.companion_wiring[name].host
            observes = next(n for n, a in addresses.items() if a == host)
            kind = self._kind(name, "companion")
            return NodeHandle(name, kind, None, self.companions[name], self, observes)
        known = [*addresses, *self.companions]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise UnknownNode(f"no node `{name}` (the nodes are {', '.join(known)}){hint}")

    def nodes(self) -> list[NodeHandle]:
        """Every spec node, federation nodes in bus order, then the companions."""
        return [self.node(name) for name in (*self.federation.plan.nodes, *self.companions)]

    def report(self) -> dict[str, Any]:
        """Everything a tool logs about the latest forward pass, as plain JSON values:

            {
              "nodes": {                            # every spec node, by name
                NAME: {
                  "kind": "transformer",            # the spec's kind
                  "lattice": {LAYER: {...}},        # lattice attention layers, by module path
                                                    #   under the node's module: order_parameter,
                                                    #   coupling_force, incoherence, coupling,
                                                    #   range (and attention_entropy when recorded)
                  "fractal": {"levels": 3, "level_weights": [...],
                              "level_loss": [...]}, # level_loss: the view's latest `loss()`
                  "observes": HOST,                 # companions: the host node, and after a
                  "companion": {...},               #   forward `companion_metrics()`'s entry
                  PATH: {...},                      # any part with `report()` (`Reports`)
                },
              },
              "feedback": {"mode": "equilibrium",   # only under equilibrium feedback, after a
                           "iterations": ..., ...}, #   forward: `Federation.solve_report()`
            }

        Entries appear only where the node has them. Reading lattice phases computes them from
        the weights (no forward needed); everything else is what the latest forward recorded.
        """
        result: dict[str, Any] = {
            "nodes": {handle.name: handle.report() for handle in self.nodes()}
        }
        solve = self.federation.solve_report()
        if solve is not None:
            result["feedback"] = {"mode": self.federation.plan.mode, **_plain(solve)}
        return result

    def fractal(self, node: str | None = None) -> FractalView:
        """The model seen through fractal node `node` (default: the only one); the same as
        `model.node(node).fractal`. See `runtime.fractal.view.FractalView`."""
        fractals = [h.name for h in self.nodes() if h.nests]
        if not fractals:
            raise ValueError("this model has no fractal node")
        if node is None:
            if len(fractals) > 1:
                raise ValueError(f"this model has fractal nodes {fractals}; name one")
            node = fractals[0]
        if node not in fractals:
            raise ValueError(f"`{node}` is not a fractal node; the fractal nodes are {fractals}")
        return self.node(node).fractal

    def _addresses(self) -> dict[str, tuple[int, int]]:
        return {
            name: (g, m)
            for g, group in enumerate(self.federation.plan.groups)
            for m, name in enumerate(group.nodes)
        }

    def _kind(self, name: str, default: str) -> str:
        if name in self.kinds:
            return self.kinds[name]
        if self.spec is not None and name in self.spec.nodes:
            return self.spec.nodes[name].kind
        return default

    def _bind(self, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        if len(args) > len(self.input_names):
            raise TypeError(
                f"the model takes {len(self.input_names)} input(s) {list(self.input_names)}, got {len(args)}"
            )
        values = dict(zip(self.input_names, args, strict=False))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise TypeError(
                    f"unknown input `{name}`; the spec's inputs are {list(self.input_names)}"
                )
            if name in values:
                raise TypeError(f"input `{name}` given twice")
            values[name] = value
        missing = [n for n in self.input_names if n not in values]
        if missing:
            raise TypeError(
                f"missing input(s) {missing}; the spec's inputs are {list(self.input_names)}"
            )
        return values


def _fractal_entry(module: nn.Module) -> dict[str, Any]:
    fractal = module.fractal
    return {"levels": fractal.levels, "level_weights": list(fractal.weights())}


def _plain(value: Any) -> Any:
    """`value` with tensors turned into floats or lists, so that `json.dumps` takes it."""
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
