"""Why Anderson does not halve fixed point's iterations on the equilibrium benchmark's map (issue 22).

The map is `equilibrium_solvers.py`'s: two transformers in a loop, the fed-back gain calibrated so
the spectral radius of J_f at the fixed point z* is 0.8. Two measurements:

* **Anderson at every memory.** Iterations to a relative 1e-5, forward (z = f(z)) and backward
  (the implicit backward's linear g = J^T g + v), for fixed point and for Anderson keeping 5, 20,
  60 and every past iterate (`history` = the step limit). With every iterate kept, type-II
  Anderson on a linear map spans the same Krylov space as GMRES and minimises the same residual
  over it (Walker & Ni 2011), so it is what any history can reach.
* **Where J's spectrum lies.** Ritz values of J^T at z*, from `ARNOLDI` steps of Arnoldi with
  vector-Jacobian products on one tape (re-orthogonalised). J^T has J's eigenvalues conjugated.
  If they fill a ring or disk of radius rho around 0, the eigenvalues of I - J fill the disk
  |1 - z| <= rho, over which the best residual polynomial of degree k is (1 - z)^k, plain
  iteration's, with rate rho per step. Then no Krylov method, and no Anderson memory, halves plain
  iteration's step count; what they gain comes from the transient.

Iteration counts do not depend on the machine's speed, so CPU figures are figures here. Sizes:
`--smoke` tiny (CI); on a GPU the benchmark's full size (width 512, batch 8 x 512 tokens); on a
CPU without `--smoke` one batch of 2 x 64 tokens at width 512 (a few minutes on 2 cores).

    python benchmarks/equilibrium_spectrum.py --out benchmarks/results
"""

from __future__ import annotations

import logging
import math

import torch
from common import parse_args, report
from equilibrium_solvers import SIZES, STEPS, TOLERANCE, adjoint_map, calibrated_loop

from runtime.federation.solvers import SolverSettings, solve

HISTORIES = (5, 20, 60, STEPS)  # STEPS: every past iterate
ARNOLDI = 60  # Krylov dimension for the Ritz values (8 in smoke runs)
CPU_SIZE = (512, 8, 2, 2, 64)  # (width, heads, layers, batch, tokens) without a GPU


def ritz_values(operator, shape: torch.Size, steps: int, seed: int = 0) -> torch.Tensor:
    """Eigenvalues of the `steps x steps` Hessenberg matrix Arnoldi builds for `operator` (in
    float64, each new vector orthogonalised twice against the basis)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(math.prod(shape), generator=generator, dtype=torch.float64)
    basis = [q / q.norm()]
    hessenberg = torch.zeros(steps + 1, steps, dtype=torch.float64)
    device, dtype = operator.device, operator.dtype
    for j in range(steps):
        w = operator(basis[j].reshape(shape).to(device, dtype)).reshape(-1).cpu().double()
        for _ in range(2):
            for i in range(j + 1):
                c = basis[i] @ w
                hessenberg[i, j] += c
                w = w - c * basis[i]
        hessenberg[j + 1, j] = w.norm()
        if hessenberg[j + 1, j] < 1e-12:  # an invariant subspace: its eigenvalues are exact
            return torch.linalg.eigvals(hessenberg[: j + 1, : j + 1])
        basis.append(w / hessenberg[j + 1, j])
    return torch.linalg.eigvals(hessenberg[:steps, :steps])


class Product:
    """`g -> J^T g` at z* (the adjoint map without its constant), with the device and dtype its
    vectors live in."""

    def __init__(self, adjoint, cotangent: torch.Tensor):
        self.adjoint, self.cotangent = adjoint, cotangent
        self.device, self.dtype = cotangent.device, cotangent.dtype

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        return self.adjoint(g) - self.cotangent


def largest_angular_gap(values: torch.Tensor) -> float:
    """The widest arc, in degrees, with no value on it: 360 for none, small for a full ring."""
    angles = sorted(math.degrees(float(torch.angle(v))) % 360 for v in values)
    if not angles:
        return 360.0
    gaps = [b - a for a, b in zip(angles[:-1], angles[1:], strict=True)] + [
        angles[0] + 360 - angles[-1]
    ]
    return max(gaps)


def solvers(histories: tuple[int, ...]) -> list[tuple[str, SolverSettings]]:
    """Fixed point, then Anderson keeping each of `histories` past iterates (STEPS: every one)."""
    return [("fixed point", SolverSettings("fixed_point", STEPS, TOLERANCE))] + [
        (
            f"anderson, history {'all' if m == STEPS else m}",
            SolverSettings("anderson", STEPS, TOLERANCE, "relative", m),
        )
        for m in histories
    ]


def linearised(loop, cotangent: torch.Tensor):
    """The adjoint map g -> J^T g + v at fixed point's z*, or None where fixed point finds none
    within STEPS (a map with no fixed point to linearise at)."""
    z_star, trace = solve(loop.f, loop.start, SolverSettings("fixed_point", STEPS, TOLERANCE))
    return adjoint_map(loop.f, z_star, cotangent) if trace.residual < TOLERANCE else None


def iteration_rows(loop, adjoint, cotangent: torch.Tensor, cases) -> list[dict]:
    """Evaluations of f forward and of `adjoint` (`linearised`) backward to `TOLERANCE`, for each
    `(label, settings)` of `cases`; after the first, each as a share of the first's. Without an
    adjoint the backward columns are None."""
    rows = []
    for label, settings in cases:
        _, forward = solve(loop.f, loop.start, settings)
        _, back = (None, None) if adjoint is None else solve(adjoint, cotangent, settings)
        rows.append(
            {
                "solver": label,
                "forward_iterations": forward.iterations,
                "forward_converged": forward.residual < TOLERANCE,
                "backward_iterations": None if back is None else back.iterations,
                "backward_converged": None if back is None else back.residual < TOLERANCE,
            }
        )
    base = rows[0]
    for row in rows[1:]:
        for d in ("forward", "backward"):
            done = row[f"{d}_iterations"] is not None and base[f"{d}_iterations"] is not None
            share = row[f"{d}_iterations"] / base[f"{d}_iterations"] if done else None
            row[f"{d} x fixed point"] = share
    return rows


def spectrum(adjoint, cotangent: torch.Tensor, steps: int) -> dict:
    """Ritz values of J^T at z* (`linearised`) from `steps` Arnoldi steps: the largest
    magnitudes, how many lie above half the largest, and the widest arc those leave empty."""
    ritz = ritz_values(Product(adjoint, cotangent), cotangent.shape, steps)
    magnitudes = ritz.abs()
    outer = ritz[magnitudes > 0.5 * float(magnitudes.max())]
    return {
        "ritz_values": len(ritz),
        "ritz_largest_magnitudes": [round(float(m), 3) for m in magnitudes.sort()[0].flip(0)[:8]],
        "ritz_values_above_half_the_largest": len(outer),
        "ritz_outer_widest_empty_arc_degrees": largest_angular_gap(outer),
    }


def main() -> None:
    args = parse_args(__doc__)
    if args.smoke:
        torch.set_num_threads(1)
    logging.getLogger("runtime.federation.equilibrium").setLevel(logging.ERROR)
    size = (
        SIZES["smoke" if args.smoke else "full"]
        if args.device == "cuda" or args.smoke
        else CPU_SIZE
    )
    loop = calibrated_loop(size, args.device)
    cotangent = torch.randn_like(loop.start)
    adjoint = linearised(loop, cotangent)
    cases = solvers(HISTORIES if not args.smoke else (5, STEPS))
    rows = iteration_rows(loop, adjoint, cotangent, cases)
    full = rows[-1]
    summary = {
        "size (width, heads, layers, batch, tokens)": str(size),
        "gain": loop.gain,
        "spectral_radius_at_fixed_point": loop.radius,
        "jacobian_norm_at_fixed_point": loop.lipschitz,
        "anderson_full_memory_over_fixed_point_forward": full["forward x fixed point"],
        "anderson_full_memory_over_fixed_point_backward": full["backward x fixed point"],
        **spectrum(adjoint, cotangent, ARNOLDI if not args.smoke else 8),
    }
    report("equilibrium_spectrum", args, rows, summary)


if __name__ == "__main__":
    main()
