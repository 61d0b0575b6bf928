"""Does Anderson halve fixed point's iterations on a *trained* equilibrium map? (issue 22)

`equilibrium_spectrum.py` found that on the solver benchmark's untrained loop at width 512 the
Ritz values of J^T fill a ring of radius 0.8, so no Anderson memory halves plain iteration's count.
A trained model's Jacobian may have a clustered spectrum instead. This benchmark trains the loop of
`examples/equilibrium_loop_helps.py` (a running sum mod 2 over 12 digits, two one-layer transformers
`reader -> refiner` of width 32 with the feedback edge `refiner -> reader`, delay 1,
`mode: equilibrium`) with that example's settings and code (its defaults: AdamW, lr 3e-3, batch
32, 300 steps, seeds 0 and 1; the settings its README table was made with, so these are its
equal-steps models), once per arm: `lipschitz` (the gain clamp, `feedback.lipschitz: 0.8`) and
`jacobian` (`feedback.jacobian`, weight 1). Both arms of a seed start from the same weights, which
are that seed's untrained map.

At the first `HELD_OUT` sequences of the example's held-out batch, each map is measured as
`equilibrium_spectrum.py` measures its one: evaluations to a relative 1e-5 of fixed point, Anderson
keeping 5, 20 and every past iterate, and Broyden (the spec's default history, 5), forward
(z = f(z)) and backward (g = J^T g + v at fixed point's z*, v a seeded random cotangent), and
`ARNOLDI` Arnoldi steps on J^T at z* for its Ritz values. The maps (fixed before the committed run; nothing was changed after it):

* `untrained, rho 0.8`: the untrained weights with the fed-back gain that puts rho(J_f(z*)) at 0.8
  (`feedback_map`, the condition the issue's goal was set under);
* `<arm>, as trained`: the trained weights at the gain they were trained with (the clamp's stored
  `feedback_gain`; 1 for `jacobian`), the map the trained model's own solver faces;
* `<arm>, rho 0.8`: the trained weights with the gain calibrated as for the untrained map (only
  ever scaled down from 1), so trained and untrained spectra are compared at one spectral radius.
  Where the radius jumps with the gain (a fixed point that vanishes between two close gains)
  the search ends at the closest radius it found; the summary lists every (gain, radius) tried.

A map with no fixed point (fixed point iteration not at 1e-5 within `STEPS`) has no z* to
linearise at: its backward columns and spectrum are left out, and its radius and norm are inf.

Everything runs on the CPU in one torch thread, wherever the script runs: iteration counts do not
depend on the machine, the maps are tiny (a second thread only contends), and with two threads
torch 2.13's MKL `linalg.solve` on a batch of float64 systems of order >= 160 (Anderson's with
every iterate kept, past 160 iterations) stops with "Parameter 6 was incorrect on entry to
DLASWP" and never returns. `--smoke` trains the example's `--quick` model for its two steps.

    python benchmarks/equilibrium_trained_map.py --out benchmarks/results   # ~2 min on 2 cores
"""

from __future__ import annotations

import logging
import sys
import time

import torch
from common import ROOT, parse_args, report
from equilibrium_solvers import RADIUS, STEPS, TOLERANCE, feedback_map
from equilibrium_spectrum import iteration_rows, linearised, solvers, spectrum

from runtime.federation.solvers import SolverSettings

sys.path.insert(0, str(ROOT / "examples"))
import equilibrium_loop_helps as loop_helps  # noqa: E402

HISTORIES = (5, 20, STEPS)  # STEPS: every past iterate
ARNOLDI = 60  # Krylov dimension for the Ritz values (8 in smoke runs)
HELD_OUT = 8  # sequences of the held-out batch the maps are measured at


def trained(args, arm: str, seed: int) -> tuple[torch.nn.Module, dict]:
    """The arm's model after the example's training for `seed`, and its steps and seconds."""
    torch.manual_seed(seed)
    model = loop_helps.build(loop_helps.spec_text(args, arm, seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(1000 + seed)  # the example's batches for this seed
    state = {"steps": 0, "seconds": 0.0}
    loop_helps.train_until(model, optimizer, args, batches, state, steps=args.steps)
    return model.eval(), {"steps": state["steps"], "seconds": state["seconds"]}


def untrained(args, seed: int) -> torch.nn.Module:
    """The weights both arms start from (the same seed; the bound adds no parameters)."""
    torch.manual_seed(seed)
    return loop_helps.build(loop_helps.spec_text(args, "jacobian", seed)).eval()


def trained_gain(model) -> float:
    """The gain the model's delayed edges read z with: the clamp's stored one, else 1."""
    gain = model.federation._gain()
    return 1.0 if gain is None else float(gain)


def models_of_seed(task, seed: int, test_batch) -> tuple[dict, dict]:
    """The untrained model and each arm's trained one, and their training and held-out scores."""
    models, facts = {"untrained": untrained(task, seed)}, {}
    for arm in loop_helps.LOOPED:
        models[arm], facts[arm] = trained(task, arm, seed)
    for name, model in models.items():
        scores = loop_helps.evaluate(model, test_batch)
        facts.setdefault(name, {}).update(
            {k: round(scores[k], 3) for k in ("loss", "token_accuracy", "last_position_accuracy")}
        )
    return models, facts


def maps_of(models: dict) -> list[tuple[str, torch.nn.Module, float | None, float | None]]:
    """(label, model, target radius, gain) of each map measured: see the module's docstring."""
    maps = [("untrained, rho 0.8", models["untrained"], RADIUS, None)]
    for arm in loop_helps.LOOPED:
        maps.append((f"{arm}, as trained", models[arm], None, trained_gain(models[arm])))
        maps.append((f"{arm}, rho 0.8", models[arm], RADIUS, None))
    return maps


def measured(loop, cases, arnoldi: int, seed: int) -> tuple[list[dict], dict]:
    """Rows (one per solver) and what the map is at its z*."""
    torch.manual_seed(seed)
    cotangent = torch.randn_like(loop.start)
    adjoint = linearised(loop, cotangent)
    rows = iteration_rows(loop, adjoint, cotangent, cases)
    about = {
        "gain": loop.gain,
        "spectral_radius_at_fixed_point": loop.radius,
        "jacobian_norm_at_fixed_point": loop.lipschitz,
        "calibration (gain, radius)": [(round(g, 5), round(r, 4)) for g, r in loop.calibration],
        "fixed_point_found": adjoint is not None,
    }
    if adjoint is not None:
        about.update(spectrum(adjoint, cotangent, arnoldi))
    for direction in ("forward", "backward"):
        share = best_anderson(rows, direction)
        about[f"best_anderson_over_fixed_point_{direction}"] = share
        about[f"halved_{direction}"] = None if share is None else share <= 0.5
    return rows, about


def best_anderson(rows: list[dict], direction: str) -> float | None:
    """The smallest share of fixed point's evaluations any Anderson memory took (None where
    fixed point or every Anderson row did not converge)."""
    shares = [
        row[f"{direction} x fixed point"]
        for row in rows
        if row["solver"].startswith("anderson") and row[f"{direction}_converged"]
    ]
    return min(shares) if shares and rows[0][f"{direction}_converged"] else None


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    for name in ("runtime.federation.equilibrium", "runtime.federation.executor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    task = loop_helps.arguments(["--quick"] if args.smoke else [])
    test_batch = loop_helps.running_sum(
        task.test_batch, task.length, task.modulus, torch.Generator().manual_seed(12345)
    )
    tokens = test_batch[0][:HELD_OUT]
    cases = solvers(HISTORIES if not args.smoke else (5, STEPS))
    cases.append(("broyden, history 5", SolverSettings("broyden", STEPS, TOLERANCE)))
    rows, training, about = [], {}, {}
    began = time.perf_counter()
    for seed in task.seeds:
        models, training[f"seed {seed}"] = models_of_seed(task, seed, test_batch)
        for label, model, target, gain in maps_of(models):
            loop = feedback_map(model, tokens, target, gain)
            found, about[f"seed {seed}: {label}"] = measured(
                loop, cases, ARNOLDI if not args.smoke else 8, seed
            )
            rows += [{"seed": seed, "map": label, **row} for row in found]
    summary = {
        "task": f"running sum mod {task.modulus} over {task.length} digits; width {task.width}, "
        f"{task.layers} layer(s) per node; {task.steps} steps of batch {task.batch}, lr {task.lr}",
        "measured_at": f"{len(tokens)} held-out sequences, relative tolerance {TOLERANCE:g}, "
        f"at most {STEPS} evaluations",
        f"training, and held-out scores on {task.test_batch} sequences": training,
        "seconds": time.perf_counter() - began,
        **about,
    }
    report("equilibrium_trained_map", args, rows, summary)


if __name__ == "__main__":
    main()
