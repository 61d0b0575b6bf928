"""Deep-equilibrium feedback (Bai, Kolter & Koltun 2019): solve z* = f(z*) for the bus state.

`f` is one step of the federation whose delayed edges read `z` (the bus of "the step before"):
the `Federation` hands its step function to an `EquilibriumSolver`, which knows nothing else of
the graph. The fixed point is found without a tape by one of the batched solvers of `solvers.py`
(fixed point, Anderson, Broyden; up to `steps` evaluations of f, or `eval_steps` outside training),
so memory does not grow with the iterations. The bus holds every node's row, so all members of
all groups are one vector per sequence and are solved jointly, in one batched call per iteration.

Gradients, as `EquilibriumPlan.grad` says:
- `implicit` (the implicit function theorem): a hook on z = f(z*) replaces dL/dz by the solution
  g of g = J_f(z*)^T g + dL/dz, found by the backward solver over vector-Jacobian products;
- `phantom` (Geng et al. 2021): `phantom_steps` damped steps z <- (1 - d) z + d f(z) unrolled with
  a tape from z*, whose gradient approximates the implicit one at the cost of those steps.
Fixed-point correction (Bai et al. 2022) additionally reads the outputs at `correction_states`
iterates of the forward solve, each through one step with a tape; the trainer adds their task
losses (`GraphModel.correction_loss`). Jacobian regularisation (Bai, Koltun & Kolter 2021) adds
`jacobian_weight` times a Hutchinson estimate of ||J_f(z*)||_F^2 / dim to the training loss, as the
`regularisation()` term `GraphModel.auxiliary_loss` collects.

With a Lipschitz `bound` c the map is f(z) = step(gain * z), and in training (and in a fresh
model's first forward) the spectral norm sigma of J_f(z*) is measured after the solve
(`lipschitz_at`); above c the gain is scaled by `0.95 c / sigma` and the fixed point solved again,
so both solves contract at rate <= c near z* (Ostrowski). This is spectral normalisation (Miyato
et al. 2018) applied to the linearised loop instead of to one weight: a global bound through
attention and LayerNorm does not exist. The gain is the model's state (a buffer of the
`Federation`, kept in checkpoints); the solver reads it and, when told to, updates it in place.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from runtime.configs import GRADIENTS, EquilibriumPlan  # noqa: F401 (re-exported)
from runtime.federation.solvers import SolverSettings, Trace, solve

log = logging.getLogger(__name__)

# `step(embedded, history)`: one pass over the graph, where `history[d - 1]` is the bus a
# delay-`d` edge reads; returns the final states per group and the new bus.
Step = Callable[[dict[str, Tensor], list[Tensor]], tuple[list[Tensor], Tensor | None]]

_HEADROOM = (
    0.95  # the gain grows back only to this share of the bound: a step's drift needs no re-solve
)
_BOUND_ATTEMPTS = 10


def eager_under_compile(fn: Callable) -> Callable:
    """`fn` as `torch.compiler.disable(fn)` where torch.compile traces it (a graph break; under
    `fullgraph=True`, dynamo's refusal), and plain `fn` in eager calls. The disabled function is
    made at the first traced call: decorating at import would import torch._dynamo (71 MB, and
    2 s on the project's shared 2-core machine) in every process that builds an equilibrium
    model, compiled or not."""
    disabled: Callable | None = None

    @functools.wraps(fn)
    def eager(*args: Any, **kwargs: Any) -> Any:
        nonlocal disabled
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return eager


class NonFiniteError(FloatingPointError):
    """A feedback loop produced NaN or Inf; the message names the node and the step."""


class EquilibriumSolver:
    """The fixed point of `step` and its gradient, with the latest solves' statistics.

    After a `solve`, `forward_trace` and `backward_trace` (`solvers.Trace`) hold the residual
    trace of the latest forward and backward solves; `iterations`, `residual` and `contraction`
    summarise the forward, `backward_iterations` and `backward_residual` the backward, `lipschitz`
    is the Jacobian norm last measured under the bound, `spectral_radius` the last estimate of
    rho(J_f(z*)) and `jacobian` the last estimate of ||J_f(z*)||_F^2 / dim (None before them).
    """

    def __init__(
        self,
        step: Step,
        nodes: Sequence[str],
        settings: EquilibriumPlan,
        bound: float | None = None,
        power_iterations: int = 4,
    ):
        self.step = step
        self.nodes = tuple(nodes)  # names, for the message when a solve diverges
        self.settings = settings
        self.bound = bound
        self.power_iterations = power_iterations
        self.forward_trace: Trace | None = None
        self.backward_trace: Trace | None = None
        self.lipschitz: float | None = None
        self.spectral_radius: float | None = None
        self.jacobian_term: Tensor | None = (
            None  # weight * estimate, of the latest training forward
        )
        self._jacobian: Tensor | None = None  # the estimate itself, read out by `report`
        # (weight, final states per group) per supervised trajectory state of the latest forward
        self.correction: list[tuple[float, list[Tensor]]] = []
        self.forwards = self.training_forwards = 0
        self.mask_seed: int | None = None  # set during a training solve: one set of dropout masks

    @property
    def tolerance(self) -> float:
        return self.settings.forward.tolerance

    @property
    def iterations(self) -> int | None:
        return None if self.forward_trace is None else self.forward_trace.iterations

    @property
    def residual(self) -> float | None:
        return None if self.forward_trace is None else self.forward_trace.residual

    @property
    def contraction(self) -> float | None:
        return None if self.forward_trace is None else self.forward_trace.contraction()

    @property
    def backward_iterations(self) -> int | None:
        return None if self.backward_trace is None else self.backward_trace.iterations

    @property
    def backward_residual(self) -> float | None:
        return None if self.backward_trace is None else self.backward_trace.residual

    @property
    def jacobian(self) -> float | None:
        return None if self._jacobian is None else float(self._jacobian)

    # Eager under torch.compile: the solve stops at a data-dependent iteration, and the implicit
    # backward replays one step's tape many times, which a compiled backward cannot.
    @eager_under_compile
    def solve(
        self,
        embedded: dict[str, Tensor],
        training: bool,
        gain: Tensor | None = None,
        measured: Tensor | None = None,
    ) -> list[Tensor]:
        """The final states per group at the fixed point, attached to the parameters through the
        chosen gradient. With a bound, `gain` and `measured` are the owner's buffers: in training
        (or while `measured` is False) the loop is measured and the gain stored for the next step."""
        # One set of dropout masks per forward: with fresh masks at every evaluation, f would be a
        # different map each iteration and the solve would stall at the noise (the tied masks of
        # Bai et al.'s variational dropout). Drawn from the global generator, so seeded runs repeat.
        self.mask_seed = int(torch.randint(2**62, ())) if training else None
        self.jacobian_term, self.correction = None, []
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
        plan = self.settings
        learning = training and torch.is_grad_enabled()
        self.forwards += 1
        self.training_forwards += learning
        forward = plan.forward
        if not training and plan.eval_steps is not None:
            forward = replace(forward, steps=plan.eval_steps)
        record = learning and plan.correction_states > 0
        start = self.step(embedded, [])[1].detach()
        gain = stored.clone() if self.bound is not None else None
        z = self._forward(embedded, start, gain, forward, record)
        if gain is not None:
            measuring = learning or not bool(measured)
            if measuring or self.residual >= forward.tolerance:
                # Outside training a solve that fails is bounded too, for this forward only.
                z, gain = self._bound(
                    embedded, start, z, gain, stored if measuring else None, forward, record
                )
            if measuring:
                measured.fill_(True)
        if self.residual >= forward.tolerance:
            log.warning(
                "equilibrium feedback did not converge: %s residual %.3g after %d iterations of "
                "`%s` (tolerance %.3g); raise `feedback.steps`, try `solver: anderson`, or bound "
                "the loop with `feedback.lipschitz` or `feedback.jacobian`",
                forward.stop,
                self.residual,
                self.iterations,
                forward.method,
                forward.tolerance,
            )
        if plan.spectral_radius_every and (self.forwards - 1) % plan.spectral_radius_every == 0:
            self.spectral_radius = self.spectral_radius_at(
                embedded, z, gain, plan.spectral_radius_iterations
            )
        if not torch.is_grad_enabled():
            return self.map(embedded, z, gain)[0]
        if (
            learning
            and plan.jacobian_weight
            and ((self.training_forwards - 1) % plan.jacobian_every == 0)
        ):
            estimate = self.jacobian_estimate(embedded, z, gain, differentiable=True)
            self.jacobian_term, self._jacobian = plan.jacobian_weight * estimate, estimate.detach()
        if record:
            self.correction = self._correction_states(embedded, gain)
        if plan.grad == "phantom":
            return self._phantom(embedded, z, gain)
        return self._implicit(embedded, z, gain)

    def _implicit(
        self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None
    ) -> list[Tensor]:
        """The outputs one step past z*, whose gradient reaches the parameters through the implicit
        function theorem: dL/dz is replaced by the root of g = J^T g + dL/dz."""
        _, z_next = self.map(embedded, z, gain)  # re-attaches the tape to the parameters
        z0 = z.detach().requires_grad_()
        _, f0 = self.map(embedded, z0, gain)
        backward = self.settings.backward

        def implicit_gradient(grad: Tensor) -> Tensor:
            def adjoint(g: Tensor) -> Tensor:
                (vjp,) = torch.autograd.grad(f0, z0, g, retain_graph=True)
                return vjp + grad

            g, self.backward_trace = solve(adjoint, grad, backward, _agreed)
            if self.backward_trace.residual >= backward.tolerance:
                log.warning(
                    "equilibrium backward did not converge: %s residual %.3g after %d iterations "
                    "of `%s` (tolerance %.3g), so the gradient is approximate; bound the loop with "
                    "`feedback.lipschitz`, or raise `feedback.backward.steps`",
                    backward.stop,
                    self.backward_trace.residual,
                    self.backward_trace.iterations,
                    backward.method,
                    backward.tolerance,
                )
            return g

        z_next.register_hook(implicit_gradient)
        return self.map(embedded, z_next, gain)[0]

    def _phantom(self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None) -> list[Tensor]:
        """The outputs after `phantom_steps` damped steps from z*, unrolled with a tape: their
        gradient is the phantom gradient (Geng et al. 2021), exact as the steps grow when f
        contracts, and its memory grows with the steps."""
        self.backward_trace = None
        damping = self.settings.phantom_damping
        z = z.detach()
        for _ in range(self.settings.phantom_steps):
            _, image = self.map(embedded, z, gain)
            z = image if damping == 1 else (1 - damping) * z + damping * image
        return self.map(embedded, z, gain)[0]

    def _correction_states(
        self, embedded: dict[str, Tensor], gain: Tensor | None
    ) -> list[tuple[float, list[Tensor]]]:
        """The final states per group one step (with a tape) past evenly spaced iterates of the
        forward solve before its last, weighted decay^k for the k-th back from the fixed point."""
        iterates = self.forward_trace.iterates[:-1]
        self.forward_trace.iterates = []  # they are held only until the states are read
        picks = correction_picks(len(iterates), self.settings.correction_states)
        decay = self.settings.correction_decay
        return [
            (decay ** (len(picks) - k), self.map(embedded, iterates[i].detach(), gain)[0])
            for k, i in enumerate(picks)
        ]

    def report(self, gain: Tensor | None = None) -> dict[str, Any] | None:
        """The latest solves as a dict (None before the first): iterations, residual, contraction
        and the residual trace of both solves, the solvers, the estimates (spectral radius, the
        Jacobian's squared Frobenius norm per dimension) and, with a bound, the measured Jacobian
        norm and the stored `gain`."""
        if self.forward_trace is None:
            return None
        report = {
            "solver": self.settings.forward.method,
            "iterations": self.iterations,
            "residual": self.residual,
            "residuals": list(self.forward_trace.residuals),
            "contraction": self.contraction,
            "gradient": self.settings.grad,
            "backward_solver": self.settings.backward.method,
            "backward_iterations": self.backward_iterations,
            "backward_residual": self.backward_residual,
            "backward_residuals": None
            if self.backward_trace is None
            else list(self.backward_trace.residuals),
            "spectral_radius": self.spectral_radius,
        }
        if self.settings.jacobian_weight:
            report["jacobian"] = self.jacobian
        if self.bound is not None:
            report["lipschitz"] = self.lipschitz
            report["feedback_gain"] = None if gain is None else float(gain)
        return report

    def fixed_point(self, embedded: dict[str, Tensor], gain: Tensor | None = None) -> Tensor:
        """z* for these inputs under `gain` (no tape)."""
        with torch.no_grad():
            start = self.step(embedded, [])[1]
        return self._forward(embedded, start, gain, self.settings.forward)

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

    def _forward(
        self,
        embedded: dict[str, Tensor],
        start: Tensor,
        gain: Tensor | None,
        settings: SolverSettings,
        record: bool = False,
    ) -> Tensor:
        """z* by `settings`' solver from `start`, without a tape; NaN or Inf names its node."""
        finite: list[Tensor] = []

        def f(z: Tensor) -> Tensor:
            following = self.map(embedded, z, gain)[1]
            finite.append(finite_per_node(following))
            return following

        z, self.forward_trace = solve(f, start, settings, _agreed, record)
        raise_if_not_finite(torch.stack(finite), "equilibrium iteration", self.nodes)
        return z

    def _bound(
        self,
        embedded: dict[str, Tensor],
        start: Tensor,
        z: Tensor,
        gain: Tensor,
        store: Tensor | None,
        settings: SolverSettings,
        record: bool = False,
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
            converged = self.residual < settings.tolerance
            z = self._forward(embedded, z if converged else start, gain, settings, record)
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

    def spectral_radius_at(
        self, embedded: dict[str, Tensor], z: Tensor, gain: Tensor | None, iterations: int
    ) -> float:
        """An estimate of rho(J_f(z)), the spectral radius that decides whether fixed-point
        iteration converges near z (Ostrowski), largest over the sequences of the batch.

        Power iteration on J^T (the same eigenvalues as J) by vector-Jacobian products on one tape,
        per sequence; the estimate is the geometric mean of the growth ratios over the second half
        of the iterations (Gelfand's formula rho = lim ||A^k||^(1/k)), which also settles when the
        dominant eigenvalues are a complex pair, where the plain ratio oscillates. Under a forked
        RNG from a seeded start, so the caller's random stream is untouched."""
        generator = torch.Generator(device=z.device).manual_seed(0)
        v = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        devices = [z.device] if z.device.type == "cuda" else []
        logs = []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            point = z.detach().requires_grad_()
            _, image = self.map(embedded, point, gain)
            for _ in range(iterations):
                v = _per_sequence_unit(v)
                (u,) = torch.autograd.grad(image, point, v, retain_graph=True)
                logs.append(u.flatten(1).norm(dim=1).clamp_min(1e-30).log())
                v = u
        tail = torch.stack(logs[iterations // 2 :]).mean(0)
        return float(_agreed(tail.exp().max().detach()))

    def jacobian_estimate(
        self,
        embedded: dict[str, Tensor],
        z: Tensor,
        gain: Tensor | None,
        differentiable: bool = False,
        probes: int = 1,
    ) -> Tensor:
        """A Hutchinson estimate of ||J_f(z)||_F^2 / dim (dim: the size of one sequence's state),
        averaged over the batch: for v ~ N(0, I), E ||v^T J||^2 = ||J||_F^2 (Hutchinson 1989; the
        training term of Bai, Koltun & Kolter 2021). `differentiable` keeps its graph, so the
        estimate can be a loss: a double backward, in the math attention kernel. The probes come
        from a generator of their own, seeded by the forward's dropout seed in training."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        seed = 0 if self.mask_seed is None else self.mask_seed + 1
        generator = torch.Generator(device=z.device).manual_seed(seed)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            point = z.detach().requires_grad_()
            _, image = self.map(embedded, point, gain)
            total = image.new_zeros((), dtype=torch.float32)
            for probe in range(probes):
                v = torch.randn(
                    image.shape, generator=generator, device=image.device, dtype=image.dtype
                )
                # a differentiable product keeps the tape: its own backward reads the saved tensors
                (vj,) = torch.autograd.grad(
                    image,
                    point,
                    v,
                    create_graph=differentiable,
                    retain_graph=differentiable or probe + 1 < probes,
                )
                total = total + vj.float().square().sum()
        estimate = total / (probes * image.numel())
        return estimate if differentiable else estimate.detach()


def correction_picks(available: int, states: int) -> list[int]:
    """`states` (or all, if fewer) evenly spaced indices of `available` trajectory iterates,
    ending at the last one: the states fixed-point correction supervises."""
    if available <= states:
        return list(range(available))
    return sorted({round((k + 1) * available / states) - 1 for k in range(states)})


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
