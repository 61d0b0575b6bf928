"""The module the compiler produces: inputs -> federation of sub-models -> outputs.

It is an ordinary `nn.Module`: parameters, `state_dict`, `.to()`, `torch.compile` all behave as
usual. `forward` takes the spec's inputs (positionally in declaration order, or by name) and
returns a dict of the spec's outputs by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from runtime.federation.executor import Federation
from runtime.ports import check_context, concat_states


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


class GraphModel(nn.Module):
    def __init__(
        self,
        inputs: dict[str, nn.Module],
        federation: Federation,
        outputs: dict[str, nn.Module],
        wiring: dict[str, OutputWiring],
        companions: dict[str, nn.Module] | None = None,
        companion_wiring: dict[str, CompanionWiring] | None = None,
    ):
        super().__init__()
        self.inputs = nn.ModuleDict(inputs)
        self.federation = federation
        self.outputs = nn.ModuleDict(outputs)
        self.wiring = wiring
        # Companions (design 004) observe node states and add a training term; they send nothing,
        # so the outputs never depend on them. Their results of the latest forward pass are kept in
        # `companion_outputs` (name -> (features read, CompanionOutput)) for the loss and metrics.
        self.companions = nn.ModuleDict(companions or {})
        self.companion_wiring = companion_wiring or {}
        self.companion_outputs: dict[str, tuple[Tensor, Any]] = {}
        self.input_names = tuple(inputs)
        # Set by the compiler: the validated spec, its text and digest, the resolved plan.
        self.spec: Any = None
        self.spec_text: str = ""
        self.spec_digest: str = ""

    def forward(self, *args: Tensor, **kwargs: Tensor) -> dict[str, Tensor]:
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

    def read_outputs(self, states: list[Tensor]) -> dict[str, Tensor]:
        """The spec's outputs by name from the federation's final states (per group)."""
        result = {}
        for name, head in self.outputs.items():
            read = [states[g][m] for g, m in self.wiring[name].sources]
            result[name] = head(concat_states(read))
        return result

    def auxiliary_loss(self, step: int = 0) -> Tensor:
        """Every training term the spec declares, summed; add it to the task loss. Lattice phase
        and coherence terms at their scheduled weights for `step` (design 002), attention
        components' own penalties such as adaptive span's L1 on spans (design 003), and each
        companion's reconstruction loss on the latest forward pass, times its `weight` (design 004)."""
        from runtime.attention.lattice import LatticeOscillators, lattice_regularisation

        total = lattice_regularisation(self, step)
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

    def fractal(self, node: str | None = None):
        """The model seen through fractal node `node` (default: the only one): every level at once,
        any sub-model alone, merging. See `runtime.fractal.view.FractalView`."""
        from runtime.fractal.transformer import FractalTransformer
        from runtime.fractal.view import FractalView

        found = {
            name: g
            for g, group in enumerate(self.federation.plan.groups)
            for name in group.nodes
            if isinstance(self.federation.transformers[g], FractalTransformer)
        }
        if not found:
            raise ValueError("this model has no fractal node")
        if node is None:
            if len(found) > 1:
                raise ValueError(f"this model has fractal nodes {sorted(found)}; name one")
            node = next(iter(found))
        if node not in found:
            raise ValueError(
                f"`{node}` is not a fractal node; the fractal nodes are {sorted(found)}"
            )
        return FractalView(self, node, found[node])

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
