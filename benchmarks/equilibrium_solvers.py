"""Equilibrium solvers (issue 22): fixed point, Anderson and Broyden against torchdeq's, one map.

The map is a compiled equilibrium loop (two transformers, `refiner -> reader` delayed by one step,
`mode: equilibrium`): f(z) is one step of the graph whose delayed edge reads `gain * z`
(`EquilibriumSolver.map`), at a fixed input. Every solver finds z* = f(z*) from the same start to
the same relative tolerance, and then the implicit backward's fixed point g = J^T g + v at z* (one
vector-Jacobian product per iteration, v a fixed random cotangent). Our solvers are
`runtime/federation/solvers.py`; torchdeq's (`anderson`, `broyden`, `fixed_point_iter`; Geng &
Kolter 2023) run in the same process when the package is importable, and are skipped otherwise.
Iterations are counted as evaluations of the map (or of the vector-Jacobian product), the same for
every solver; the residual is that of the returned z, ||f(z) - z|| / ||f(z)|| per sequence, the
largest of the batch, recomputed here. Peak memory (CUDA only) is measured above the memory held
before the solve; the backward's includes the one taped evaluation of f that its products
differentiate, as in the executor's implicit backward.
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from common import parse_args, peak_memory, report, time_call

import compiler
from runtime.federation.solvers import SolverSettings, solve

LOOP = """
spec: 1
name: solver-benchmark
seed: 0
defaults:
  transformer: {{width: {width}, heads: {heads}, layers: {layers}, position: rope}}
inputs:
  tokens: {{kind: tokens, vocab: 84, context: {tokens}}}
nodes:
  reader: {{kind: transformer}}
  refiner: {{kind: transformer}}
edges:
  - {{from: reader, to: refiner}}
  - {{from: refiner, to: reader, kind: feedback, delay: 1}}
feedback: {{steps: 30, mode: equilibrium}}
outputs:
  logits: {{from: refiner, kind: lm_head, tie: true}}
"""
OURS = ("fixed_point", "anderson", "broyden")
THEIRS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def feedback_map(model, tokens: torch.Tensor, radius: float):
    """f(z) at this input, the start the executor uses (one step from an empty history), and the
    gain: the delayed edge's scale that puts the spectral radius of J_f at the start near
    `radius`, so the fixed point exists and plain iteration needs on the order of
    log(tolerance) / log(radius) steps (a fresh loop's radius is anywhere; the gain makes it one
    chosen map at every size)."""
    equilibrium = model.federation.equilibrium
    with torch.no_grad():
        embedded = model._embed((tokens,), {})
        start = equilibrium.step(embedded, [])[1]
    one = torch.tensor(1.0, device=tokens.device)
    unscaled = equilibrium.spectral_radius_at(embedded, start, one, iterations=30)
    gain = torch.tensor(min(1.0, radius / unscaled), device=tokens.device)

    def f(z: torch.Tensor) -> torch.Tensor:
        return equilibrium.map(embedded, z, gain)[1]

    return f, start, float(gain), unscaled


def relative_residual(f, z: torch.Tensor) -> float:
    with torch.no_grad():
        image = f(z)
    difference = (image - z).flatten(1).norm(dim=1)
    return float((difference / image.flatten(1).norm(dim=1).clamp_min(1e-30)).max())


def counted(f):
    """`f` that counts its calls in `calls[0]`."""
    calls = [0]

    def wrapped(z):
        calls[0] += 1
        return f(z)

    return wrapped, calls


def our_solver(method: str, tolerance: float, steps: int):
    settings = SolverSettings(method=method, steps=steps, tolerance=tolerance, stop="relative")
    return lambda f, start: solve(f, start, settings)[0]


def torchdeq_solver(method: str, tolerance: float, steps: int):
    from torchdeq.solver import get_solver

    run = get_solver(THEIRS[method])
    return lambda f, start: run(f, start, max_iter=steps, tol=tolerance, stop_mode="rel")[0]


def adjoint_map(f, z_star: torch.Tensor, cotangent: torch.Tensor):
    """g -> J^T g + v at z*, the map the implicit backward solves (one tape, many products)."""
    z0 = z_star.detach().requires_grad_()
    with torch.enable_grad():
        image = f(z0)

    def adjoint(g: torch.Tensor) -> torch.Tensor:
        (vjp,) = torch.autograd.grad(image, z0, g, retain_graph=True)
        return vjp + cotangent

    return adjoint


def peak_above_held(fn, device: str) -> int | None:
    """Peak bytes allocated while `fn` runs, less those held before it (None on the CPU)."""
    if device != "cuda":
        return None
    held = torch.cuda.memory_allocated()
    return peak_memory(fn, device) - held


def timed(fn, device: str, smoke: bool) -> float:
    """Median wall time of `fn` in ms, after the counted call that warmed it up: one more call in
    smoke runs (on a shared CPU single calls vary several-fold: smoke times are not figures),
    otherwise five after a further warm-up (`time_call`: CUDA events on a GPU)."""
    return time_call(fn, device, warmup=0 if smoke else 1, repeats=1 if smoke else 5)["median_ms"]


def measure(label, solver, f, start, cotangent, args, tolerance: float) -> dict:
    forward, calls = counted(f)
    with torch.no_grad():
        z_star = solver(forward, start)
        forward_ms = timed(lambda: solver(f, start), args.device, args.smoke)
    adjoint = adjoint_map(f, z_star, cotangent)
    counted_adjoint, adjoint_calls = counted(adjoint)
    g = solver(counted_adjoint, cotangent)
    backward_ms = timed(lambda: solver(adjoint, cotangent), args.device, args.smoke)
    forward_calls, backward_calls = calls[0], adjoint_calls[0]
    forward_peak = peak_above_held(lambda: solver(f, start), args.device)
    backward_peak = peak_above_held(
        lambda: solver(adjoint_map(f, z_star, cotangent), cotangent), args.device
    )
    forward_residual, backward_residual = (
        relative_residual(f, z_star),
        relative_residual(adjoint, g),
    )
    return {
        "solver": label,
        "converged": forward_residual < tolerance and backward_residual < tolerance,
        "forward_iterations": forward_calls,
        "forward_residual": forward_residual,
        "forward_ms": forward_ms,
        "backward_iterations": backward_calls,
        "backward_residual": backward_residual,
        "backward_ms": backward_ms,
        "forward_peak_MiB": None if forward_peak is None else forward_peak / 2**20,
        "backward_peak_MiB": None if backward_peak is None else backward_peak / 2**20,
    }


def main() -> None:
    args = parse_args(__doc__)
    logging.getLogger("runtime.federation.equilibrium").setLevel(logging.ERROR)
    width, heads, layers, batch, tokens = (32, 2, 1, 2, 16) if args.smoke else (512, 8, 2, 8, 512)
    tolerance, steps, radius = 1e-5, 200, 0.25
    torch.manual_seed(0)
    model = compiler.build_model(
        compiler.load_spec_text(
            LOOP.format(width=width, heads=heads, layers=layers, tokens=tokens)
        ),
        device=args.device,
    ).eval()
    x = torch.randint(0, 84, (batch, tokens), device=args.device)
    f, start, gain, unscaled = feedback_map(model, x, radius)
    cotangent = torch.randn_like(start)
    solvers = {f"ours {m}": our_solver(m, tolerance, steps) for m in OURS}
    have_torchdeq = importlib.util.find_spec("torchdeq") is not None
    if have_torchdeq:
        solvers |= {f"torchdeq {m}": torchdeq_solver(m, tolerance, steps) for m in OURS}
    rows = [
        measure(label, solver, f, start, cotangent, args, tolerance)
        for label, solver in solvers.items()
        if not args.only or args.only in label
    ]
    summary = {
        "map": f"2 transformers in a loop, width {width}, heads {heads}, layers {layers}, "
        f"batch {batch}, tokens {tokens}",
        "gain": gain,
        "spectral_radius_at_start_gain_1": unscaled,
        "spectral_radius_target": radius,
        "tolerance": f"{tolerance:g} (relative)",
        "max_iterations": steps,
        "torchdeq": _torchdeq_version(have_torchdeq),
    }
    report("equilibrium_solvers", args, rows, summary)


def _torchdeq_version(available: bool) -> str:
    if not available:
        return "not installed (its rows are skipped)"
    from importlib.metadata import version

    return version("torchdeq")


if __name__ == "__main__":
    main()
