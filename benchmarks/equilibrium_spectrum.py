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
    fixed_point = SolverSettings("fixed_point", STEPS, TOLERANCE)
    z_star, _ = solve(loop.f, loop.start, fixed_point)
    cotangent = torch.randn_like(loop.start)
    adjoint = adjoint_map(loop.f, z_star, cotangent)
    rows, iterations = [], {}
    histories = HISTORIES if not args.smoke else (5, STEPS)
    for label, settings in [("fixed point", fixed_point)] + [
        (
            f"anderson, history {'all' if m == STEPS else m}",
            SolverSettings("anderson", STEPS, TOLERANCE, "relative", m),
        )
        for m in histories
    ]:
        _, forward = solve(loop.f, loop.start, settings)
        _, backward = solve(adjoint, cotangent, settings)
        iterations[label] = (forward.iterations, backward.iterations)
        rows.append(
            {
                "solver": label,
                "forward_iterations": forward.iterations,
                "forward_converged": forward.residual < TOLERANCE,
                "backward_iterations": backward.iterations,
                "backward_converged": backward.residual < TOLERANCE,
            }
        )
    base = iterations["fixed point"]
    for row in rows[1:]:
        row["forward x fixed point"] = row["forward_iterations"] / base[0]
        row["backward x fixed point"] = row["backward_iterations"] / base[1]
    ritz = ritz_values(
        Product(adjoint, cotangent), cotangent.shape, ARNOLDI if not args.smoke else 8
    )
    magnitudes = ritz.abs()
    outer = ritz[magnitudes > 0.5 * float(magnitudes.max())]
    full = rows[-1]
    summary = {
        "size (width, heads, layers, batch, tokens)": str(size),
        "gain": loop.gain,
        "spectral_radius_at_fixed_point": loop.radius,
        "jacobian_norm_at_fixed_point": loop.lipschitz,
        "anderson_full_memory_over_fixed_point_forward": full["forward x fixed point"],
        "anderson_full_memory_over_fixed_point_backward": full["backward x fixed point"],
        "ritz_values": len(ritz),
        "ritz_largest_magnitudes": [round(float(m), 3) for m in magnitudes.sort()[0].flip(0)[:8]],
        "ritz_values_above_half_the_largest": len(outer),
        "ritz_outer_widest_empty_arc_degrees": largest_angular_gap(outer),
    }
    report("equilibrium_spectrum", args, rows, summary)


if __name__ == "__main__":
    main()
