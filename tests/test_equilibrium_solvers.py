"""The batched root finders behind `mode: equilibrium` (runtime/federation/solvers.py).

    feedback: {mode: equilibrium, steps: 30, solver: anderson, history: 5, mixing: 1.0,
               tolerance: 1.0e-4, stop: relative}

Each solver sees a map on `(batch, ...)` tensors whose examples do not interact and runs one solve
per example in one batched tensor program. These tests use affine maps f(z) = A z + b, whose fixed
point (I - A)^-1 b is known exactly.
"""

from __future__ import annotations

import pytest
import torch

from runtime.federation.solvers import SolverSettings, _Rows, solve

DIM = 12


def affine(spectrum: torch.Tensor, seed: int = 0, batch: int = 3):
    """f(z) = A z + b per example, A = Q diag(spectrum) Q^T (so rho(A) = max |spectrum|), with
    each example's own b; returns f, a start and the exact fixed points."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64))
    a = q @ torch.diag(spectrum.double()) @ q.T
    b = torch.randn(batch, DIM, generator=generator, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(DIM, dtype=torch.float64) - a, b.T).T

    def f(z: torch.Tensor) -> torch.Tensor:
        return z @ a.T + b

    return f, torch.zeros_like(b), exact


CONTRACTIVE = torch.linspace(-0.5, 0.5, DIM)
ILL_CONDITIONED = torch.linspace(0.0, 0.99, DIM)  # fixed point contracts at 0.99 per step


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_every_solver_reaches_the_fixed_point_of_a_contractive_map(method):
    f, start, exact = affine(CONTRACTIVE)
    settings = SolverSettings(method=method, steps=200, tolerance=1e-10)
    z, trace = solve(f, start, settings)
    torch.testing.assert_close(z, exact, atol=1e-8, rtol=1e-8)
    assert trace.residual < 1e-10 and trace.iterations == len(trace.residuals)


def test_anderson_and_broyden_need_far_fewer_iterations_on_an_ill_conditioned_map():
    f, start, exact = affine(ILL_CONDITIONED)
    counts = {}
    for method in ("fixed_point", "anderson", "broyden"):
        settings = SolverSettings(method=method, steps=3000, tolerance=1e-6, history=8)
        z, trace = solve(f, start, settings)
        assert trace.residual < 1e-6, method
        # a relative residual of 1e-6 leaves an error up to 1e-6 / (1 - 0.99) relative
        assert (z - exact).norm() / exact.norm() < 1e-4, method
        counts[method] = trace.iterations
    # measured: fixed point 917 (the rate 0.99 per step), Anderson 26, Broyden 31
    assert counts["fixed_point"] > 800
    assert counts["anderson"] <= 40 and counts["broyden"] <= 40


def test_broyden_holding_one_update_is_the_secant_method():
    """With one update held, H restarts before every update; the update is computed against the
    H = -1 it joins, so each step meets the latest secant condition, h = s / y: on a scalar
    equation that is the secant method, z' = z - g (z - z_prev) / (g - g_prev)."""
    starts = torch.tensor([[0.0], [1.0], [-0.5]], dtype=torch.float64)
    settings = SolverSettings(method="broyden", steps=6, tolerance=1e-30, history=1)
    _, trace = solve(torch.cos, starts, settings, record=True)
    g = lambda z: torch.cos(z) - z  # noqa: E731
    secant = [starts, torch.cos(starts)]  # the first step, from H = -1, is a fixed-point step
    while len(secant) < trace.iterations:
        z, previous = secant[-1], secant[-2]
        secant.append(z - g(z) * (z - previous) / (g(z) - g(previous)))
    torch.testing.assert_close(torch.stack(trace.iterates), torch.stack(secant))


def test_mixing_damps_fixed_point_iteration_into_convergence():
    oscillating = torch.linspace(-1.5, 0.5, DIM)  # an eigenvalue of -1.5: plain iteration diverges
    f, start, exact = affine(oscillating)
    _, plain = solve(f, start, SolverSettings(steps=100, tolerance=1e-8))
    assert plain.residuals[-1] > 1 and plain.residual > 0.1  # it diverged (the image outgrows z)
    # with mixing m, the step's eigenvalues (1 - m) + m * lambda lie in (-1, 1) at m = 0.5
    z, damped = solve(f, start, SolverSettings(steps=400, tolerance=1e-8, mixing=0.5))
    assert damped.residual < 1e-8
    torch.testing.assert_close(z, exact, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["fixed_point", "anderson", "broyden"])
def test_the_batched_solve_equals_solving_each_example_alone(method):
    f, start, _ = affine(ILL_CONDITIONED, batch=4)
    settings = SolverSettings(method=method, steps=400, tolerance=1e-6, history=6)
    together, trace = solve(f, start, settings)
    for i in range(4):
        alone, alone_trace = solve(lambda z, i=i: f_one(f, z, i), start[i : i + 1], settings)
        # an example that converged stops moving, so its answer does not depend on the others
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-12, rtol=1e-12)
        assert alone_trace.iterations <= trace.iterations


def f_one(f, z: torch.Tensor, i: int) -> torch.Tensor:
    """The map of example `i` alone (row i of the batched b)."""
    padded = torch.zeros(4, DIM, dtype=z.dtype)
    padded[i] = z[0]
    return f(padded)[i : i + 1]


def test_the_stop_criterion_is_the_largest_residual_of_the_batch_relative_or_absolute():
    f, start, _ = affine(CONTRACTIVE)
    _, relative = solve(f, start, SolverSettings(steps=100, tolerance=1e-3))
    scaled = lambda z: 1000 * f(z / 1000)  # noqa: E731 - the same map in units 1000x smaller
    _, same = solve(scaled, start, SolverSettings(steps=100, tolerance=1e-3))
    _, absolute = solve(scaled, start, SolverSettings(steps=100, tolerance=1e-3, stop="absolute"))
    assert relative.iterations == same.iterations  # relative: independent of the scale
    assert absolute.iterations > relative.iterations  # absolute: 1e-3 is 1000x tighter here


def test_the_answer_is_the_best_iterate_and_never_the_callers_tensor():
    f, start, _ = affine(torch.linspace(-1.5, 0.5, DIM), batch=1)  # diverges after a dip
    z, trace = solve(f, start, SolverSettings(steps=20, tolerance=1e-8), record=True)
    best = min(range(trace.iterations), key=lambda i: trace.residuals[i])
    assert 0 < best < trace.iterations - 1 and trace.residual == trace.residuals[best]
    torch.testing.assert_close(z, trace.iterates[best], atol=0, rtol=0)
    z, _ = solve(f, start, SolverSettings(steps=1))  # the start is all there is
    z.add_(1.0)  # the caller may write into the answer
    assert torch.equal(start, torch.zeros_like(start))


def test_the_trace_records_each_iterate_only_when_asked():
    f, start, _ = affine(CONTRACTIVE)
    _, plain = solve(f, start, SolverSettings(steps=50, tolerance=1e-6))
    _, recorded = solve(f, start, SolverSettings(steps=50, tolerance=1e-6), record=True)
    assert plain.iterates == [] and len(recorded.iterates) == recorded.iterations
    torch.testing.assert_close(recorded.iterates[0], start)


@pytest.mark.parametrize("dim, pieces", [(12, 1), (3 * 8192, 4), (8191, 1)])
def test_the_history_cuts_long_states_into_pieces_for_the_same_products(dim, pieces):
    """Long dot products run as many short ones (a GPU's batched GEMV does not split a long
    inner dimension); what the solvers get is the products over whole rows."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 5, dim, generator=generator, dtype=torch.float64)
    history = _Rows(rows[:, 0], 5)
    for slot in range(5):
        history.write(slot, rows[:, slot])
    assert history.data.shape[1] == pieces
    x, weights = torch.randn(2, dim, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(history.dots(x, 3), torch.einsum("bnd,bd->bn", rows[:, :3], x))
    torch.testing.assert_close(
        history.mix(weights), torch.einsum("bn,bnd->bd", weights, rows[:, :3])
    )


def test_a_solver_setting_out_of_range_is_refused():
    with pytest.raises(ValueError, match="unknown solver `newton`"):
        SolverSettings(method="newton")
    with pytest.raises(ValueError, match="out of range"):
        SolverSettings(history=0)


ANDERSON_WITH_A_LONG_HISTORY = """
import torch
from runtime.federation.solvers import SolverSettings, solve
torch.set_num_threads(2)
generator = torch.Generator().manual_seed(0)
def f(z):  # never settles: every iterate adds a new direction to the history
    return torch.randn(z.shape, generator=generator, dtype=z.dtype)
settings = SolverSettings(method="anderson", steps=180, history=200, tolerance=1e-12)
z, trace = solve(f, torch.zeros(2, 256, dtype=torch.float64), settings)
print(trace.iterations)
"""


def test_anderson_with_a_history_of_200_returns_on_a_multithreaded_host():
    """Its Gram systems reach order 180: MKL's batched LU (`torch.linalg.solve`) hung there with
    two threads; the Cholesky solve returns."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", ANDERSON_WITH_A_LONG_HISTORY],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "180"
