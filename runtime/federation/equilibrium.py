"""Deep-equilibrium feedback (Bai, Kolter & Koltun 2019): solve z* = f(z*) for the bus state.

`f` is one step of the federation whose delayed edges read `z` (the bus of "the step before"):
the `Federation` hands its step function to an `EquilibriumSolver`, which knows nothing else of
the graph. The fixed point is found without a tape (up to `steps` iterations, stopping at
`tolerance` relative change), so memory does not grow with the iterations. Gradients use the
implicit function theorem: a hook on z = f(z*) replaces dL/dz by the solution g of
g = J_f(z*)^T g + dL/dz, found by the same fixed-point iteration over vector-Jacobian products.

With a Lipschitz `bound` c the map is f(z) = step(gain * z), and in training (and in a fresh
model's first forward) the spectral norm sigma of J_f(z*) is measured after the solve
(`lipschitz_at`); above c the gain is scaled by `0.95 c / sigma` and the fixed point solved again,
so both solves contract at rate <= c near z* (Ostrowski). This is spectral normalisation (Miyato
et al. 2018) applied to the linearised loop instead of to one weight: a global bound through
attention and LayerNorm does not exist. The gain is the model's state (a buffer of the
`Federation`, kept in checkpoints); the solver reads it and, when told to, updates it in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# `step(embedded, history)`: one pass over the graph, where `history[d - 1]` is the bus a
# delay-`d` edge reads; returns the final states per group and the new bus.
Step = Callable[[dict[str, Tensor], list[Tensor]], tuple[list[Tensor], Tensor | None]]

_HEADROOM = (
    0.95  # the gain grows back only to this share of the bound: a step's drift needs no re-solve
)
_BOUND_ATTEMPTS = 10


class NonFiniteError(FloatingPointError):
    """A feedback loop produced NaN or Inf; the message names the node and the step."""


class EquilibriumSolver:
    """The fixed point of `step` and its implicit gradient, with the latest solves' convergence.

    After a `solve`, `iterations`, `residual` and `contraction` (the observed rate per iteration)
    describe the forward solve, `backward_iterations` and `backward_residual` the implicit
    backward's, and `lipschitz` the Jacobian norm last measured under the bound (None before).
    """

    def __init__(
        self,
        step: Step,
        nodes: Sequence[str],
        steps: int,
        tolerance: float,
        bound: float | None = None,
        power_iterations: int = 4,
    ):
        self.step = step
        self.nodes = tuple(nodes)  # names, for the message when a solve diverges
        self.steps = steps
        self.tolerance = tolerance
        self.bound = bound
        self.power_iterations = power_iterations
        self.iterations: int | None = None
        self.residual: float | None = None
        self.contraction: float | None = None
        self.lipschitz: float | None = None
        self.backward_iterations: int | None = None
        self.backward_residual: float | None = None
        self.mask_seed: int | None = None  # set during a training solve: one set of dropout masks

    # Eager under torch.compile: the solve stops at a data-dependent iteration, and the implicit
    # backward replays one step's tape many times, which a compiled backward cannot.
    @torch.compiler.disable
    def solve(
        self,
        embedded: dict[str, Tensor],
        training: bool,
        gain: Tensor | None = None,
        measured: Tensor | None = None,
    ) -> list[Tensor]:
        """The final states per group at the fixed point, attached to the parameters through the
        implicit gradient. With a bound, `gain` and `measured` are the owner's buffers: in training
        (or while `measured` is False) the loop is measured and the gain stored for the next step."""
        # One set of dropout masks per forward: with fresh masks at every evaluation, f would be a
        # different map each iteration and the solve would stall at the noise (the tied masks of
        # Bai et al.'s variational dropout). Drawn from the global generator, so seeded runs repeat.
        self.mask_seed = int(torch.randint(2**62, ())) if training else None
        try:
            return self._solve_with_masks(embedded, training, gain, measured)
        finally:
            self.mask_seed = None

    def _solve_with_masks(
        self,
        embedded: dict[str, Tensor],
        training: bool,
        stored: Tensor | None,
        measured: Tensor | None,
    ) -> list[Tensor]:
        start = self.step(embedded, [])[1].detach()
        gain = stored.clone() if self.bound is not None else None
        z = self._iterate(embedded, start, gain)
        if gain is not None:
            learning = (training and torch.is_grad_enabled()) or not bool(measured)
            if learning or self.residual >= self.tolerance:
                # Outside training a solve that fails is bounded too, for this forward only.
                z, gain = self._bound(embedded, start, z, gain, stored if learning else None)
            if learning:
                measured.fill_(True)
        if self.residual >= self.tolerance:
            log.warning(
                "equilibrium feedback did not converge: relative change %.3g after %d iterations (tolerance %.3g); "
                "raise `feedback.steps` or bound the loop with `feedback.lipschitz`",
                self.residual,
                self.iterations,
                self.tolerance,
            )
        if not torch.is_grad_enabled():
            return self.map(embedded, z, gain)[0]
        _, z_next = self.map(embedded, z, gain)  # re-attaches the tape to the parameters
        z0 = z_next.detach().requires_grad_()
        _, f0 = self.map(embedded, z0, gain)

        def implicit_gradient(grad: Tensor) -> Tensor:
            g, change = grad, float("inf")
            for iterations in range(1, self.steps + 1):  # noqa: B007 - reported below
                (vjp,) = torch.autograd.grad(f0, z0, g, retain_graph=True)
                following = vjp + grad
                change = float((following - g).norm() / following.norm().clamp_min(1e-12))
                g = following
                if change <= self.tolerance:
                    break
            self.backward_iterations, self.backward_residual = iterations, change
            if change > self.tolerance:
                log.warning(
                    "equilibrium backward did not converge: relative change %.3g after %d iterations "
                    "(tolerance %.3g), so the gradient is approximate; bound the loop with "
                    "`feedback.lipschitz` or raise `feedback.steps`",
                    change,
                    iterations,
                    self.tolerance,
                )
            return g

        z_next.register_hook(implicit_gradient)
        return self.map(embedded, z_next, gain)[0]

    def report(self, gain: Tensor | None = None) -> dict[str, float | int | None] | None:
        """The latest solves as a dict (None before the first); with a bound, the measured
        Jacobian norm and the stored `gain`."""
        if self.iterations is None:
            return None
        report = {
            "iterations": self.iterations,
            "residual": self.residual,
            "contraction": self.contraction,
            "backward_iterations": self.backward_iterations,
            "backward_residual": self.backward_residual,
        }
        if self.bound is not None:
            report["lipschitz"] = self.lipschitz
            report["feedback_gain"] = None if gain is None else float(gain)
        return report

    def fixed_point(self, embedded: dict[str, Tensor], gain: Tensor | None = None) -> Tensor:
        """z* for these inputs under `gain` (no tape)."""
        with torch.no_grad():
            start = self.step(embedded, [])[1]
        return self._iterate(embedded, start, gain)

    def map(
        self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None = None
    ) -> tuple[list[Tensor], Tensor | None]:
        """f(z): one step of the graph whose delayed edges read `gain * z` (during a training
        solve, with its dropout masks)."""
        history = [z if gain is None else z * gain.to(z.dtype)]
        if self.mask_seed is None:
            return self.step(embedded, history)
        devices = [z.device] if z.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.mask_seed)
            return self.step(embedded, history)

    def _iterate(self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None) -> Tensor:
        """z <- f(z) without a tape until the relative change falls below the tolerance."""
        residual = first = torch.tensor(float("inf"))
        iterations = 0
        finite: list[Tensor] = []
        with torch.no_grad():
            for iterations in range(1, self.steps + 1):  # noqa: B007 - reported below
                _, following = self.map(embedded, z, gain)
                finite.append(finite_per_node(following))
                # Every process stops at the same iteration: under FSDP each step gathers weights.
                residual = _agreed((following - z).norm() / following.norm().clamp_min(1e-12))
                first = residual if iterations == 2 else first
                z = following
                if residual < self.tolerance:
                    break
        raise_if_not_finite(torch.stack(finite), "equilibrium iteration", self.nodes)
        self.iterations, self.residual = iterations, float(residual)
        # The observed rate per iteration from the second change on (the first is from the start):
        # it tends to the spectral radius of J_f(z*), which is what decides convergence.
        self.contraction = (
            float((residual / first.clamp_min(1e-30)) ** (1 / (iterations - 2)))
            if iterations > 2
            else None
        )
        return z

    def _bound(
        self,
        embedded: dict[str, Tensor],
        start: Tensor,
        z: Tensor,
        gain: Tensor,
        store: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Measure ||J_f(z*)||, shrink the gain while it exceeds the bound (re-solving each time),
        and (into `store`, if given) leave the next step a gain that puts it at `_HEADROOM` of the
        bound, at most 1. Returns the fixed point and the gain this forward uses."""
        bound = self.bound
        assert bound is not None
        sigma = 0.0
        for attempt in range(_BOUND_ATTEMPTS):
            sigma = self.lipschitz_at(embedded, z, gain, self.power_iterations)
            proposed = gain * (_HEADROOM * bound / max(sigma, 1e-12))
            if sigma <= bound:
                if store is not None:
                    store.copy_(proposed.clamp(max=1.0))
                break
            if attempt + 1 == _BOUND_ATTEMPTS:  # this forward keeps the gain z* was solved with
                if store is not None:
                    store.copy_(proposed)
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
            converged = self.residual < self.tolerance
            z = self._iterate(embedded, z if converged else start, gain)
        self.lipschitz = sigma
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
            _, image = self.map(embedded, point, gain)
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


def finite_per_node(bus: Tensor) -> Tensor:
    """`(nodes,)` booleans: is every value of each node's state finite?"""
    return torch.isfinite(bus).flatten(0, 1).all(0).all(-1)


def raise_if_not_finite(finite: Tensor, what: str, nodes: Sequence[str]) -> None:
    """One host sync per forward: name the first (step, node) whose state is NaN or Inf.
    `finite` is `(steps, nodes)`, rows of `finite_per_node`."""
    if bool(finite.all()):
        return
    step, node = (~finite).nonzero()[0].tolist()
    raise NonFiniteError(
        f"{what} {step + 1} of {finite.shape[0]}: node `{nodes[node]}` produced NaN or Inf; "
        "the feedback diverged (lower the learning rate, use fewer steps, or make the loop contractive)"
    )


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
