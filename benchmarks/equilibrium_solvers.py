"""Equilibrium solvers (issue 22): fixed point, Anderson and Broyden against torchdeq's, one map.

The map is a compiled equilibrium loop (two transformers, `refiner -> reader` delayed by one step,
`mode: equilibrium`): f(z) is one step of the graph whose delayed edge reads `gain * z`
(`EquilibriumSolver.map`), at a fixed input. Every solver finds z* = f(z*) from the same start (the
executor's: one step from an empty history) to the same relative tolerance, and then the implicit
backward's fixed point g = J^T g + v at z* (one vector-Jacobian product per iteration on one tape,
v a fixed random cotangent, every solver starting from v). Ours are `runtime/federation/solvers.py`
at the spec's defaults; torchdeq's (`fixed_point_iter`, `anderson`, `broyden`; Geng & Kolter 2023)
run in the same process on the same map and tensors when the package is importable (`pip install
torchdeq`, the `bench` extra), at the defaults its `DEQ` class calls them with, and are skipped
otherwise. Iterations are evaluations of the map (or of the product), counted the same way for
every solver; the residual is that of the returned state, ||f(z) - z|| / ||f(z)|| per sequence,
the largest of the batch, recomputed here. Peak memory (CUDA only) is `max_memory_allocated`
above what was held before the solve; the backward's includes the one taped evaluation of f that
its products differentiate, as in the executor's implicit backward.

Times are medians over solves of ours and torchdeq's for one method timed in turn, the order
reversed every other round, after each one's counted solve and one untimed round (`interleaved`):
a GPU still clocking up, or a neighbour's load, then weighs on both alike, not on whichever ran
first. `ms_spread` is the widest (max - min) / median of a row. Sweep rows (`SWEEP`) run ours at
other histories and mixings, timed alone, so one run shows where (if anywhere) Anderson reaches
half of fixed point's iterations and what a longer memory buys Broyden; the summary has each
Anderson row's ratio and every row's milliseconds per evaluation.

The gain makes the map contractive: it is set so that the spectral radius of J_f at the fixed
point, which decides plain iteration's rate (Ostrowski), is RADIUS (0.8: fixed point needs about
log(1e-5) / log(0.8) = 52 steps). It is found by measuring that radius at the fixed point of each
trial gain (`calibrated_gain`): the radius does not scale with the gain, because the transformers
normalise their streams, so until the fed-back term is small against the input's embedding the
map hardly notices the gain (at width 512, batch 2 x 64 tokens: radius 0.96 at gain 1, no fixed
point at 0.1, 0.94 at 0.056, 0.81 at 0.043, 0.66 at 0.032; scaling the gain from the radius at
gain 1, as this benchmark first did, left a map no solver finished in 200 steps). A bound on the
Jacobian's norm, as `feedback.lipschitz` keeps, would not do: this loop's Jacobian is far from
normal (only the refiner's row is fed back), and where its norm was 0.86 its radius was 0.05, a
map every solver finishes in five steps. The summary reports the gain, radius and norm reached.

Smoke runs use one CPU thread: on a shared machine the thread pool's spinning made each
evaluation of the tiny map 20x slower.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
from common import interleaved, parse_args, peak_memory, profiled, report
from torch import Tensor

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
RADIUS, TOLERANCE, STEPS = 0.8, 1e-5, 200
# (width, heads, layers, batch, tokens)
SIZES = {"smoke": (32, 2, 1, 2, 16), "full": (512, 8, 2, 8, 512)}
POWER_ITERATIONS = 30  # for the radius estimate (`EquilibriumSolver.spectral_radius_at`)
OURS = ("fixed_point", "anderson", "broyden")
THEIRS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
# What torchdeq's solvers keep of their past: its Anderson its default m = 6, its Broyden every
# update of the solve (its DEQ sets no `LBFGS_thres`). Ours keep the spec's default `history`.
HISTORY = {"torchdeq": {"anderson": 6, "broyden": STEPS}}
# Ours at other histories and mixings, (method, history, mixing): where, if anywhere, Anderson
# reaches half of fixed point's iterations, and what a longer memory buys Broyden.
SWEEP = (
    ("anderson", 10, 1.0),
    ("anderson", 20, 1.0),
    ("anderson", 5, 0.5),
    ("anderson", 10, 0.5),
    ("anderson", 20, 0.5),
    ("broyden", 10, 1.0),
    ("broyden", 20, 1.0),
    ("broyden", 40, 1.0),
)
REPEATS, SWEEP_REPEATS = 7, 3  # timed solves per row: paired rows, sweep rows


@dataclass(frozen=True)
class FeedbackMap:
    """f and its start, the gain it runs at, and what was measured at its fixed point."""

    f: Callable[[Tensor], Tensor]
    start: Tensor
    gain: float
    radius: float  # rho(J_f(z*))
    lipschitz: float  # ||J_f(z*)||_2
    calibration: list[tuple[float, float]]  # (gain, radius at its fixed point) tried


def calibrated_gain(
    radius_at: Callable[[float], float], target: float, within: float = 0.02, attempts: int = 12
) -> list[tuple[float, float]]:
    """Every (gain, radius) tried, the chosen one last: the gain g <= 1 at which `radius_at(g)`
    is `target` to a relative `within` (`radius_at` is inf where it found no fixed point).

    A search in log g, where the radius of a normalised loop grows like a power of the gain: down
    from g = 1 by factors of ten until the radius is below the target, then the Illinois variant of
    regula falsi on log(radius / target), bisecting while the upper end has no fixed point. Out of
    attempts, the gain whose radius came closest in ratio. A loop already below the target at
    g = 1 keeps g = 1: the gain only ever scales down what is fed back."""
    tried: list[tuple[float, float]] = []

    def error(log_gain: float) -> float:
        radius = radius_at(math.exp(log_gain))
        tried.append((math.exp(log_gain), radius))
        return math.log(radius / target) if math.isfinite(radius) else math.inf

    e = error(0.0)
    low, high, side = None, (0.0, e), 0
    while e > math.log1p(within) or (low is not None and e < -math.log1p(within)):
        if len(tried) == attempts:
            return [*tried, min(tried, key=lambda t: abs(math.log(t[1] / target)))]
        if low is None:
            x = high[0] - math.log(10)
        elif math.isinf(high[1]):
            x = (low[0] + high[0]) / 2
        else:
            x = low[0] - low[1] * (high[0] - low[0]) / (high[1] - low[1])
        e = error(x)
        if e <= 0:
            if side == -1 and math.isfinite(high[1]):  # Illinois: halve the end that stays
                high = (high[0], high[1] / 2)
            low, side = (x, e), -1
        else:
            if side == 1:
                low = (low[0], low[1] / 2)
            high, side = (x, e), 1 if low is not None else 0
    return [*tried, tried[-1]]


def feedback_map(
    model, tokens: Tensor, target: float | None, gain: float | None = None
) -> FeedbackMap:
    """The loop's map at this input with the gain that puts rho(J_f(z*)) at `target`, or (target
    None) at the given `gain` as it is. Without a fixed point the radius and norm are inf."""
    equilibrium = model.federation.equilibrium
    with torch.no_grad():
        embedded = model._embed((tokens,), {})
        start = equilibrium.step(embedded, [])[1]

    def map_at(gain: float) -> Callable[[Tensor], Tensor]:
        scale = torch.tensor(gain, device=tokens.device)
        return lambda z: equilibrium.map(embedded, z, scale)[1]

    def fixed_point(gain: float) -> Tensor | None:
        settings = SolverSettings("anderson", STEPS, TOLERANCE)
        z, trace = solve(map_at(gain), start, settings)
        return z if trace.residual < TOLERANCE else None

    def radius_at(gain: float) -> float:
        z = fixed_point(gain)
        if z is None:
            return math.inf
        scale = torch.tensor(gain, device=tokens.device)
        return equilibrium.spectral_radius_at(embedded, z, scale, POWER_ITERATIONS)

    if target is None:
        tried, radius = [], radius_at(gain)
    else:
        *tried, (gain, radius) = calibrated_gain(radius_at, target)
    z = fixed_point(gain)
    scale = torch.tensor(gain, device=tokens.device)
    lipschitz = math.inf if z is None else equilibrium.lipschitz_at(embedded, z, scale, 20)
    return FeedbackMap(map_at(gain), start, gain, radius, lipschitz, tried)


def calibrated_loop(size: tuple[int, int, int, int, int], device: str) -> FeedbackMap:
    """The benchmark's loop at `size` (width, heads, layers, batch, tokens), seeded, at the gain
    that puts rho(J_f(z*)) at `RADIUS`, for one random batch of tokens."""
    width, heads, layers, batch, tokens = size
    torch.manual_seed(0)
    model = compiler.build_model(
        compiler.load_spec_text(
            LOOP.format(width=width, heads=heads, layers=layers, tokens=tokens)
        ),
        device=device,
    ).eval()
    x = torch.randint(0, 84, (batch, tokens), device=device)
    return feedback_map(model, x, RADIUS)


def relative_residual(f, z: Tensor) -> float:
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


@dataclass(frozen=True)
class Case:
    """One solver as the benchmark runs it: `run(f, start)` returns the state it settled on."""

    label: str
    run: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]
    history: int | None
    mixing: float | None


def our_case(method: str, history: int | None = None, mixing: float = 1.0) -> Case:
    """Ours at the spec's defaults, or (a sweep row) at another history or mixing."""
    default = SolverSettings()
    history = default.history if history is None else history
    settings = SolverSettings(method, STEPS, TOLERANCE, "relative", history, mixing)
    label = f"ours {method}"
    if history != default.history:
        label += f" m={history}"
    if mixing != default.mixing:
        label += f" mix={mixing:g}"
    return Case(
        label,
        lambda f, start: solve(f, start, settings)[0],
        None if method == "fixed_point" else history,
        None if method == "broyden" else mixing,
    )


def torchdeq_case(method: str) -> Case:
    from torchdeq.solver import get_solver

    run = get_solver(THEIRS[method])
    return Case(
        f"torchdeq {method}",
        lambda f, start: run(f, start, max_iter=STEPS, tol=TOLERANCE, stop_mode="rel")[0],
        HISTORY["torchdeq"].get(method),
        None if method == "broyden" else 1.0,
    )


def adjoint_map(f, z_star: Tensor, cotangent: Tensor):
    """g -> J^T g + v at z*, the map the implicit backward solves (one tape, many products)."""
    z0 = z_star.detach().requires_grad_()
    with torch.enable_grad():
        image = f(z0)

    def adjoint(g: Tensor) -> Tensor:
        (vjp,) = torch.autograd.grad(image, z0, g, retain_graph=True)
        return vjp + cotangent

    return adjoint


def untaped(fn):
    """`fn` without a tape: torchdeq's solvers, unlike ours, leave that to the caller."""

    def run():
        with torch.no_grad():
            return fn()

    return run


def peak_above_held(fn, device: str) -> int | None:
    """Peak bytes allocated while `fn` runs, less those held before it (None on the CPU)."""
    if device != "cuda":
        return None
    held = torch.cuda.memory_allocated()
    return peak_memory(fn, device) - held


def spread(samples: list[float]) -> float:
    """(max - min) / median: how far one timed solve can stray from the figure quoted."""
    return (max(samples) - min(samples)) / statistics.median(samples)


def measure(cases: list[Case], loop: FeedbackMap, cotangent: Tensor, args, repeats: int) -> list:
    """Rows for `cases` solved side by side: each first solves with its map counted (also its
    warm-up), then the solves are timed interleaved (`interleaved`; cases compared with each
    other after one more untimed round outside smoke runs), forward, then backward at each one's
    own z*."""
    f, start, device = loop.f, loop.start, args.device
    rounds = repeats + (0 if args.smoke or len(cases) == 1 else 1)
    found: list[dict] = [{"solver": case.label, "history": case.history} for case in cases]
    for row, case in zip(found, cases, strict=True):
        row["mixing"] = case.mixing
        forward, calls = counted(f)
        row["z"] = untaped(lambda: case.run(forward, start))()
        row["forward_iterations"] = calls[0]
        row["forward_residual"] = relative_residual(f, row["z"])
    times = interleaved([untaped(lambda c=c: c.run(f, start)) for c in cases], device, rounds)
    for row, samples in zip(found, times, strict=True):
        row["forward_samples"] = samples[rounds - repeats :]
    for row, case in zip(found, cases, strict=True):
        row["adjoint"] = adjoint = adjoint_map(f, row["z"], cotangent)
        backward, calls = counted(adjoint)
        g = untaped(lambda: case.run(backward, cotangent))()
        row["backward_iterations"] = calls[0]
        row["backward_residual"] = relative_residual(adjoint, g)
    solves = [
        untaped(lambda c=c, r=r: c.run(r["adjoint"], cotangent))
        for c, r in zip(cases, found, strict=True)
    ]
    for row, samples in zip(found, interleaved(solves, device, rounds), strict=True):
        row["backward_samples"] = samples[rounds - repeats :]
    rows = []
    for row, case in zip(found, cases, strict=True):
        del row["adjoint"]  # the backward's peak includes its own tape
        forward_peak = peak_above_held(untaped(lambda: case.run(f, start)), device)
        backward_peak = peak_above_held(
            untaped(lambda: case.run(adjoint_map(f, row.pop("z"), cotangent), cotangent)), device
        )
        forward, backward = row.pop("forward_samples"), row.pop("backward_samples")
        rows.append(
            {
                "solver": row["solver"],
                "history": row["history"],
                "mixing": row["mixing"],
                "converged": row["forward_residual"] < TOLERANCE
                and row["backward_residual"] < TOLERANCE,
                "forward_iterations": row["forward_iterations"],
                "forward_residual": row["forward_residual"],
                "forward_ms": statistics.median(forward),
                "backward_iterations": row["backward_iterations"],
                "backward_residual": row["backward_residual"],
                "backward_ms": statistics.median(backward),
                "timed": len(forward),
                "ms_spread": max(spread(forward), spread(backward)),
                "forward_peak_MiB": None if forward_peak is None else forward_peak / 2**20,
                "backward_peak_MiB": None if backward_peak is None else backward_peak / 2**20,
            }
        )
    return rows


def groups(torchdeq: bool) -> list[list[Case]]:
    """The cases timed side by side: ours and torchdeq's for each method (when it is there),
    then each sweep row alone."""
    paired = [[our_case(m), *([torchdeq_case(m)] if torchdeq else [])] for m in OURS]
    return paired + [[our_case(*row)] for row in SWEEP]


def torchdeq_version() -> tuple[bool, str]:
    """Whether torchdeq is importable, and its version (or why its rows are skipped)."""
    try:
        import torchdeq
    except ImportError as error:
        return False, f"not importable ({error}): its rows are skipped"
    return True, getattr(torchdeq, "__version__", None) or _version("torchdeq")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def goals(rows: list[dict]) -> dict:
    """The issue's two targets, read off the rows: the iterations of each Anderson row (the
    default, then the sweep's) over fixed point's, and the time of each of our rows over
    torchdeq's for its method (forward, backward; the default rows' timed side by side with
    torchdeq's, the sweep's alone); None where a row is missing or did not converge."""
    by = {row["solver"]: row for row in rows}

    def ratio(a: str, b: str, key: str) -> float | None:
        if a not in by or b not in by or not by[a]["converged"] or not by[b]["converged"]:
            return None
        return by[a][key] / by[b][key]

    def variants(method: str) -> list[tuple[str, str]]:  # (label, suffix in the key)
        prefix = f"ours {method}"
        sweep = [label for label in by if label.startswith(prefix + " ")]
        return [
            (label, label[len(prefix) :].replace(" ", "_").replace("=", ""))
            for label in [prefix, *sweep]
        ]

    found = {}
    for label, suffix in variants("anderson"):
        for d in ("forward", "backward"):
            key = f"anderson{suffix}_over_fixed_point_{d}_iterations"
            found[key] = ratio(label, "ours fixed_point", f"{d}_iterations")
    for m in OURS:
        for label, suffix in variants(m):
            for d in ("forward", "backward"):
                key = f"ours_over_torchdeq_{m}{suffix}_{d}_ms"
                found[key] = ratio(label, f"torchdeq {m}", f"{d}_ms")
    return found


def ms_per_iteration(rows: list[dict]) -> dict[str, list[float]]:
    """Forward and backward milliseconds per evaluation: what a solver adds to the map's cost."""
    return {
        row["solver"]: [
            round(row["forward_ms"] / row["forward_iterations"], 3),
            round(row["backward_ms"] / row["backward_iterations"], 3),
        ]
        for row in rows
    }


def kernels(cases: list[Case], loop: FeedbackMap, device: str, top: int = 6) -> dict:
    """The `top` kernels of one forward solve of each case, (name, ms, launches), by GPU time:
    where a solver's milliseconds per evaluation above fixed point's go."""
    found = {}
    for case in cases:
        solve_once = untaped(lambda case=case: case.run(loop.f, loop.start))
        costs = sorted(profiled(solve_once, device, calls=1), key=lambda k: -k[1])[:top]
        found[case.label] = [(name[:90], round(ms, 3), int(n)) for name, ms, n in costs]
    return found


def main() -> None:
    args = parse_args(__doc__)
    if args.smoke:
        torch.set_num_threads(1)
    logging.getLogger("runtime.federation.equilibrium").setLevel(logging.ERROR)
    width, heads, layers, batch, tokens = size = SIZES["smoke" if args.smoke else "full"]
    loop = calibrated_loop(size, args.device)
    cotangent = torch.randn_like(loop.start)
    has_torchdeq, torchdeq = torchdeq_version()
    rows = []
    for cases in groups(has_torchdeq):
        cases = [case for case in cases if not args.only or args.only in case.label]
        if cases:
            repeats = 1 if args.smoke else REPEATS if len(cases) > 1 else SWEEP_REPEATS
            rows += measure(cases, loop, cotangent, args, repeats)
    profile = {}
    if args.device == "cuda":  # where Anderson's costs per evaluation go, against fixed point's
        cases = [our_case("fixed_point"), our_case("anderson")]
        cases += [torchdeq_case("anderson")] if has_torchdeq else []
        profile["kernels of one forward solve (name, ms, launches)"] = kernels(cases, loop, "cuda")
    summary = {
        "map": f"2 transformers in a loop, width {width}, heads {heads}, layers {layers}, "
        f"batch {batch}, tokens {tokens}",
        "gain": loop.gain,
        "spectral_radius_target": RADIUS,
        "spectral_radius_at_fixed_point": loop.radius,
        "jacobian_norm_at_fixed_point": loop.lipschitz,
        "calibration (gain, radius)": [(round(g, 6), round(r, 4)) for g, r in loop.calibration],
        "tolerance": f"{TOLERANCE:g} (relative)",
        "max_iterations": STEPS,
        "timing": f"median of {REPEATS} solves after one untimed, ours and torchdeq's "
        f"interleaved, the order reversed every other round (sweep rows: {SWEEP_REPEATS} alone)"
        if not args.smoke
        else "one solve each (smoke times are not figures)",
        "peak_memory": "CUDA max_memory_allocated above what was held before the solve"
        if args.device == "cuda"
        else "not measured on the CPU (torch keeps no allocator statistics there)",
        "torchdeq": torchdeq,
        "ms_per_iteration (forward, backward)": ms_per_iteration(rows),
        **profile,
        **goals(rows),
    }
    report("equilibrium_solvers", args, rows, summary)


if __name__ == "__main__":
    main()
