"""Root finders for z = f(z), batched over the leading (batch) dimension.

Each solver sees `f` as a map on `(batch, ...)` tensors whose examples do not interact (no layer of
a federation mixes the sequences of a batch, so its Jacobian is block-diagonal over them). Every
example therefore runs its own solver, in one batched tensor program: Anderson's least-squares
weights are a batch of small linear systems, Broyden's low-rank inverse Jacobians a batch of
rank-`history` updates. An example that reaches the tolerance stops moving (its iterate is
frozen), so its answer does not depend on the examples it is batched with. The loop stops when the
largest residual of the batch, agreed over the processes of a distributed run, is below the
tolerance; that is one host sync per iteration, which also feeds the residual trace.

- fixed point: z <- (1 - mixing) z + mixing f(z) (Krasnosel'skii-Mann damping for mixing < 1).
- Anderson acceleration (Anderson 1965; Walker & Ni 2011), type II: the next iterate mixes the last
  `history` images with the weights that minimise the norm of the mixed residual.
- Broyden's "good" method (Broyden 1965) on g(z) = f(z) - z with a limited-memory inverse Jacobian
  H = -I + U V^T (the form deep-equilibrium models use, Bai et al. 2019), full steps, no line search.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from runtime.configs import METHODS, STOPS, SolverSettings  # noqa: F401 (re-exported)

# Anderson's normal equations are regularised relative to their scale: an absolute ridge (1e-4 in
# many codes) swamps them once the residuals are small and turns acceleration into averaging.
_ANDERSON_RIDGE = 1e-8
_BROYDEN_MIN_DENOMINATOR = 1e-30
# The shortest piece a history row is cut into for its dot products (`_Rows`).
_PIECE = 4096


@dataclass
class Trace:
    """What one solve did: f evaluations; the batch's largest residual at each (agreed over
    processes); `residual`, the largest over examples of the smallest each reached (that of the
    returned state, which the stop test reads); and, when asked for, every iterate evaluated."""

    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    residual: float = float("inf")
    iterates: list[Tensor] = field(default_factory=list)

    def contraction(self) -> float | None:
        """The observed rate per iteration from the second residual on (the first measures the
        distance from the start): for fixed-point iteration it tends to the spectral radius of the
        damped map's Jacobian."""
        if self.iterations <= 2:
            return None
        first, last = self.residuals[1], self.residuals[-1]
        return (last / max(first, 1e-30)) ** (1 / (self.iterations - 2))


Agree = Callable[[Tensor], Tensor]


def solve(
    f: Callable[[Tensor], Tensor],
    start: Tensor,
    settings: SolverSettings,
    agree: Agree = lambda value: value,
    record: bool = False,
) -> tuple[Tensor, Trace]:
    """The iterate with the smallest residual per example, and the trace; without a tape.
    `agree(residual)` makes every process see the same largest residual (a max all-reduce)."""
    shape = start.shape

    def flat_f(z: Tensor) -> Tensor:
        return f(z.view(shape)).reshape(shape[0], -1)

    step = {"fixed_point": _fixed_point, "anderson": _anderson, "broyden": _broyden}
    with torch.no_grad():
        z, trace = _iterate(flat_f, start.reshape(shape[0], -1), settings, agree, record, step)
    trace.iterates = [iterate.view(shape) for iterate in trace.iterates]
    return z.view(shape), trace


def _iterate(f, z, settings, agree, record, steps_by_method):
    """The loop every method shares: evaluate, measure, keep the best, stop together, update.

    The one host sync per iteration also brings back two local facts that spare a select over
    the whole state in the common case: whether every example improved (the best iterate is then
    z itself) and whether any has converged (if none has, none is frozen)."""
    trace = Trace()
    initial = best = z
    best_residual = torch.full((z.shape[0],), float("inf"), device=z.device)
    update = steps_by_method[settings.method](z, settings)
    for iteration in range(1, settings.steps + 1):
        image = f(z)
        if record:
            trace.iterates.append(z.clone())
        g = image - z
        residual = _residual(g, image, settings.stop)
        better = residual < best_residual
        best_residual = torch.where(better, residual, best_residual)
        # one all-reduce (the current and the best residuals) and one host sync per iteration
        agreed = agree(torch.stack([residual.max(), best_residual.max()]))
        local = torch.stack([best_residual.min(), better.all()])
        current, smallest, least, all_better = torch.cat([agreed, local]).tolist()
        best = z if all_better else torch.where(better[:, None], z, best)
        trace.iterations = iteration
        trace.residuals.append(current)
        trace.residual = smallest
        if smallest < settings.tolerance or iteration == settings.steps:
            break
        following = update(z, image, g)
        if least < settings.tolerance:  # the converged examples stay where they are
            following = torch.where((best_residual >= settings.tolerance)[:, None], following, z)
        z = following
    return (best.clone() if best is initial else best), trace


def _residual(g: Tensor, image: Tensor, stop: str) -> Tensor:
    """Per example; in float32 at least (a bf16 norm is too coarse to test 1e-4 against)."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    absolute = g.norm(dim=1, dtype=dtype)
    if stop == "absolute":
        return absolute
    return absolute / image.norm(dim=1, dtype=dtype).clamp_min(1e-12)


class _Rows:
    """`m` past states of each example (Anderson's iterates, images and residuals, Broyden's
    update vectors), with the two products the solvers take of them: their dot products with a
    state, and a weighted sum of them.

    A row is stored cut into pieces of at least `_PIECE` elements (a power of two that divides
    the state's size; one piece where none does), as (batch, pieces, m, piece): the dot products
    are then one batched matrix-vector product over batch x pieces entries. Over whole rows they
    would be `batch` products with the whole state as inner dimension, which a batched GEMM can
    run on about one block of the GPU per entry, since it does not split the inner dimension (the
    shape of NVIDIA/cutlass#1033), leaving a GPU all but idle while it reads the history for a
    batch of 8. On an H200 (the equilibrium benchmark's map, batch 8 x 512) Anderson's forward
    iteration cost 1.8 ms more than fixed point's before (6.66 against 4.86 ms) and 0.27 ms more
    with the pieces and the other changes of the same commit (5.28 against 5.00 ms)."""

    def __init__(self, like: Tensor, m: int, dtype: torch.dtype | None = None):
        batch, dim = like.shape
        pieces = 1
        while dim % (2 * pieces) == 0 and dim // (2 * pieces) >= _PIECE:
            pieces *= 2
        self.shape = (batch, pieces, dim // pieces)
        self.data = like.new_zeros(batch, pieces, m, dim // pieces, dtype=dtype)

    def write(self, slot: int, x: Tensor) -> None:
        self.data[:, :, slot] = x.reshape(self.shape)

    def dots(self, x: Tensor, n: int) -> Tensor:
        """(batch, n): the first `n` rows' dot products with `x`, in the rows' dtype."""
        batch, pieces, piece = self.shape
        rows = self.data.view(batch * pieces, -1, piece)[:, :n]
        partial = torch.bmm(rows, x.to(self.data.dtype).reshape(batch * pieces, piece, 1))
        return partial.view(batch, pieces, n).sum(1)

    def mix(self, weights: Tensor) -> Tensor:
        """(batch, dim): sum_i weights[:, i] row_i over the first `weights.shape[1]` rows."""
        batch, pieces, piece = self.shape
        n = weights.shape[1]
        rows = self.data.view(batch * pieces, -1, piece)[:, :n]
        per_piece = weights[:, None, None, :].expand(batch, pieces, 1, n).reshape(-1, 1, n)
        return torch.bmm(per_piece.to(self.data.dtype), rows).view(batch, -1)


def _fixed_point(z0: Tensor, settings: SolverSettings):
    beta = settings.mixing

    def update(z: Tensor, image: Tensor, g: Tensor) -> Tensor:
        return image if beta == 1 else z + beta * g

    return update


def _anderson(z0: Tensor, settings: SolverSettings):
    """Type-II Anderson: with G the last m residuals (rows), the weights alpha minimise
    ||G^T alpha|| subject to sum(alpha) = 1, that is alpha ∝ (G G^T)^-1 1; the next iterate is
    sum alpha_i ((1 - beta) z_i + beta f(z_i)).

    The residuals are kept in float64 as they come, and the Gram matrix G G^T is updated by the
    new residual's row alone: one pass over the history per iteration, not a copy and a product
    of all of it. The tiny (m x m) systems are solved on the host, which the loop syncs with every
    iteration anyway: a batch of 5 x 5 solves on a GPU is a chain of solver launches (and its own
    sync), which cost more than the map's evaluation on a large federation."""
    m, beta = settings.history, settings.mixing
    batch = z0.shape[0]
    points, images = _Rows(z0, m), _Rows(z0, m)
    residuals = _Rows(z0, m, torch.float64)
    gram = torch.zeros(batch, m, m, dtype=torch.float64)  # on the host
    filled = {"count": 0}

    def update(z: Tensor, image: Tensor, g: Tensor) -> Tensor:
        slot = filled["count"] % m
        points.write(slot, z), images.write(slot, image), residuals.write(slot, g)
        filled["count"] += 1
        n = min(filled["count"], m)
        row = residuals.dots(g, n).cpu()  # (batch, n)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        system = gram[:, :n, :n]
        scale = system.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-300)
        system = system + (_ANDERSON_RIDGE * scale)[:, None, None] * torch.eye(n, dtype=gram.dtype)
        weights = _spd_solve(system, system.new_ones(batch, n, 1))[..., 0]
        weights = (weights / weights.sum(1, keepdim=True)).to(z.device, z.dtype)  # (batch, n)
        mixed = images.mix(weights)
        if beta != 1:
            mixed = beta * mixed + (1 - beta) * points.mix(weights)
        return mixed

    return update


def _spd_solve(system: Tensor, rhs: Tensor) -> Tensor:
    """`system^-1 rhs` for a batch of symmetric positive definite systems (a Gram matrix plus a
    ridge), by Cholesky. Not `torch.linalg.solve`: its batched LU in MKL, on a host with more than
    one thread, fails ("Parameter 6 was incorrect on entry to DLASWP") and never returns from
    systems of order 160 or more (torch 2.13, float64), which an Anderson history that long
    reaches. A system that rounding left indefinite is solved by least squares."""
    factor, info = torch.linalg.cholesky_ex(system)
    if bool(info.any()):
        return torch.linalg.lstsq(system, rhs, driver="gelsd").solution
    return torch.cholesky_solve(rhs, factor)


def _broyden(z0: Tensor, settings: SolverSettings):
    """Good Broyden with H = -I + sum u_i v_i^T approximating the inverse Jacobian of g: the step
    is -H g; after it, with s the step and y the change of g, the rank-one update
    u = (s - H y) / (s^T H y), v = H^T s keeps the secant condition H y = s.

    With `history` updates held, H restarts from -I, and the next update is computed against the
    H it joins (computed against the full H, as this solver first did, it met no secant condition
    after the restart: on the benchmark's map at width 512, batch 2 x 64 tokens, that cost the
    backward 60 evaluations where a correct restart takes 46). Overwriting only the oldest update
    instead (a sliding window, torchdeq's `LBFGS_thres`) leaves the older updates' secant
    conditions broken: there, holding 10 or 20 updates, sliding windows took 51 to 89 evaluations
    where restarting took 41 to 46, and torchdeq's window of 10 diverged. Only the updates held
    enter a product (`_Rows`: batched matrix-vector products, no (batch, history, dim)
    temporary)."""
    m = settings.history
    us, vs = _Rows(z0, m), _Rows(z0, m)
    last: dict[str, Tensor | int] = {"held": 0}

    def product(x: Tensor, left: _Rows, right: _Rows) -> Tensor:  # -x + sum left_i right_i^T x
        n = last["held"]
        return -x if n == 0 else left.mix(right.dots(x, n)) - x

    def update(z: Tensor, image: Tensor, g: Tensor) -> Tensor:
        if "z" in last:
            if last["held"] == m:  # memory full: restart from H = -I
                last["held"] = 0
            s, y = z - last["z"], g - last["g"]
            hy = product(y, us, vs)  # H y
            denominator = (s * hy).sum(-1, keepdim=True)
            usable = denominator.abs() > _BROYDEN_MIN_DENOMINATOR
            safe = torch.where(usable, denominator, torch.ones_like(denominator))
            u = torch.where(usable, (s - hy) / safe, torch.zeros_like(s))
            v = torch.where(usable, product(s, vs, us), torch.zeros_like(s))  # H^T s
            us.write(last["held"], u), vs.write(last["held"], v)
            last["held"] += 1
        last["z"], last["g"] = z, g
        return z - product(g, us, vs)

    return update
