"""Does the equilibrium feedback loop help, on a task where iteration should matter?

The task is a running sum modulo `k` (parity for k = 2): a sequence of digits 0..k-1 in, and at
every position the sum of the digits so far, mod k, out. A causal transformer of one layer per node
has to fold a whole prefix into each position in a fixed depth, which is hard for small models and
long sequences (parity is the classic case); an equilibrium loop applies the same two transformers
again and again until their state stops moving, so it could carry the count further. Per seed, the
same two transformers (`reader` -> `refiner`) are built from epicycle specs and trained with the
same data, optimiser and steps:

* `no_loop`: the two transformers without the feedback edge (the same nodes; the edge's message
  weights are the only parameters it lacks, counted in the table);
* `lipschitz`: the loop `refiner -> reader` (delay 1, `mode: equilibrium`) with the gain clamp
  `feedback.lipschitz: 0.8`;
* `jacobian`: the same loop with Jacobian regularisation instead (`feedback.jacobian`);

first at equal steps (and so equal parameters), then at equal training wall time: the arms that
finished early keep training (constant learning rate, the same optimiser) until the slowest arm's
time. Each looped model is also evaluated with other solver budgets (`feedback.eval_iterations`:
1, the training `steps`, and 4x that), rebuilt from its spec with that field and the trained
weights, to see whether more iterations at test time help.

It writes `equilibrium_loop_helps.json` and `.md` to `--out` (default `runs/equilibrium_loop_helps`).

    python examples/equilibrium_loop_helps.py --threads 1      # the README's table, ~9 min on CPU
    python examples/equilibrium_loop_helps.py --quick --out /tmp/lh # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402

ARMS = ("no_loop", "lipschitz", "jacobian")
LOOPED = ("lipschitz", "jacobian")
SPEC = """
spec: 1
name: running-sum
seed: {seed}
defaults:
  transformer: {{width: {width}, heads: 2, layers: {layers}, position: rope}}
inputs:
  tokens: {{kind: tokens, vocab: {modulus}, context: {length}}}
nodes:
  reader: {{kind: transformer}}
  refiner: {{kind: transformer}}
edges:
  - {{from: reader, to: refiner}}{feedback}
outputs:
  logits: {{from: refiner, kind: lm_head}}
"""
LOOP_EDGE = "\n  - {from: refiner, to: reader, kind: feedback, delay: 1}"
BOUNDS = {"lipschitz": "lipschitz: 0.8", "jacobian": "jacobian: {{weight: {weight}, every: 1}}"}


def spec_text(args, arm: str, seed: int, eval_iterations: int | None = None) -> str:
    """The arm's spec: the same nodes, with or without the loop and its bound."""
    feedback = ""
    if arm in LOOPED:
        settings = [
            f"steps: {args.iterations}",
            "mode: equilibrium",
            "tolerance: 1.0e-4",
            BOUNDS[arm].format(weight=args.jacobian_weight),
        ]
        if eval_iterations is not None:
            settings.append(f"eval_iterations: {eval_iterations}")
        feedback = LOOP_EDGE + "\nfeedback: {" + ", ".join(settings) + "}"
    return SPEC.format(
        seed=seed,
        width=args.width,
        layers=args.layers,
        modulus=args.modulus,
        length=args.length,
        feedback=feedback,
    )


def build(text: str):
    return compiler.build_model(compiler.load_spec_text(text))


def running_sum(batch: int, length: int, modulus: int, generator: torch.Generator):
    """Digits and, at each position, their running sum mod `modulus`."""
    digits = torch.randint(0, modulus, (batch, length), generator=generator)
    return digits, digits.cumsum(1) % modulus


def task_loss(model, digits: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    logits = model(digits)["logits"]
    return F.cross_entropy(logits.flatten(0, 1), sums.flatten())


def train_until(model, optimizer, args, generator, state: dict, *, steps=None, seconds=None):
    """Train from `state` (steps done, seconds spent) until `steps` or `seconds`; constant
    learning rate after a short warm-up, so continuing a run equals a longer one."""
    model.train()
    solves = state.setdefault("solves", [])
    while (steps is not None and state["steps"] < steps) or (
        seconds is not None and state["seconds"] < seconds
    ):
        begin = time.perf_counter()
        digits, sums = running_sum(args.batch, args.length, args.modulus, generator)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (state["steps"] + 1) / args.warmup)
        loss = task_loss(model, digits, sums)
        total = loss + model.auxiliary_loss(state["steps"])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state["seconds"] += time.perf_counter() - begin
        state["steps"] += 1
        state["loss"] = float(loss.detach())
        report = model.federation.solve_report()
        if report is not None:
            solves.append(
                {
                    "iterations": report["iterations"],
                    "residual": report["residual"],
                    "backward_iterations": report["backward_iterations"],
                    "backward_residual": report["backward_residual"],
                }
            )
    return state


@torch.no_grad()
def evaluate(model, batch) -> dict:
    model.eval()
    digits, sums = batch
    logits = model(digits)["logits"]
    right = logits.argmax(-1) == sums
    result = {
        "loss": float(F.cross_entropy(logits.flatten(0, 1), sums.flatten())),
        "token_accuracy": float(right.float().mean()),
        "sequence_accuracy": float(right.all(1).float().mean()),
        "last_position_accuracy": float(right[:, -1].float().mean()),
    }
    report = model.federation.solve_report()
    if report is not None:
        result["eval_solver_iterations"] = report["iterations"]
        result["eval_residual"] = report["residual"]
    return result


def solve_summary(solves: list[dict]) -> dict:
    if not solves:
        return {}
    return {
        "forward_iterations_median": statistics.median(s["iterations"] for s in solves),
        "forward_converged": sum(s["residual"] < 1e-4 for s in solves) / len(solves),
        "backward_converged": sum(
            s["backward_residual"] is not None and s["backward_residual"] < 1e-4 for s in solves
        )
        / len(solves),
    }


def run_seed(args, seed: int, test_batch) -> dict:
    models, optimizers, states, generators, results = {}, {}, {}, {}, {}
    for arm in ARMS:
        torch.manual_seed(seed)
        models[arm] = build(spec_text(args, arm, seed))
        optimizers[arm] = torch.optim.AdamW(models[arm].parameters(), lr=args.lr)
        generators[arm] = torch.Generator().manual_seed(1000 + seed)  # the same batches per arm
        states[arm] = {"steps": 0, "seconds": 0.0}
        train_until(
            models[arm], optimizers[arm], args, generators[arm], states[arm], steps=args.steps
        )
        results[arm] = {
            "parameters": sum(p.numel() for p in models[arm].parameters()),
            "equal_steps": {
                "steps": states[arm]["steps"],
                "train_seconds": states[arm]["seconds"],
                "train_loss": states[arm]["loss"],
                **evaluate(models[arm], test_batch),
                **solve_summary(states[arm]["solves"]),
            },
        }
        if arm in LOOPED:
            results[arm]["eval_iterations"] = {}
            for budget in (1, args.iterations, 4 * args.iterations):
                rebuilt = build(spec_text(args, arm, seed, eval_iterations=budget))
                rebuilt.load_state_dict(models[arm].state_dict())
                results[arm]["eval_iterations"][str(budget)] = evaluate(rebuilt, test_batch)
    budget = max(states[arm]["seconds"] for arm in ARMS)
    for arm in ARMS:
        train_until(
            models[arm], optimizers[arm], args, generators[arm], states[arm], seconds=budget
        )
        results[arm]["equal_time"] = {
            "steps": states[arm]["steps"],
            "train_seconds": states[arm]["seconds"],
            "train_loss": states[arm]["loss"],
            **evaluate(models[arm], test_batch),
        }
    return results


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(payload: dict) -> str:
    seeds = payload["seeds"]
    per_seed = [payload["results"][str(s)] for s in seeds]

    def cell(arm, table, key, fmt="{:.3f}"):
        values = [r[arm][table].get(key) for r in per_seed]
        if any(v is None for v in values):
            return "-"
        if fmt == "{:.3f}":
            return mean_std(values)
        return fmt.format(statistics.median(values))

    setup = payload["setup"]
    lines = [
        f"Running sum mod {setup['modulus']} over {setup['length']} digits; two transformers of "
        f"width {setup['width']}, {setup['layers']} layer(s), 2 heads; batch {setup['batch']}, "
        f"AdamW lr {setup['lr']}; {setup['steps']} steps; loop: `steps: {setup['iterations']}`, "
        f"tolerance 1e-4; seeds {seeds} (mean ± std); test batch of {setup['test_batch']}; "
        f"{payload['machine']}, torch {payload['torch']}.",
        "",
        "| equal steps | " + " | ".join(ARMS) + " |",
        "|---|" + "---|" * len(ARMS),
        "| parameters | " + " | ".join(f"{per_seed[0][a]['parameters']:,}" for a in ARMS) + " |",
    ]
    rows = [
        ("test token accuracy", "token_accuracy", "{:.3f}"),
        ("test accuracy at the last position", "last_position_accuracy", "{:.3f}"),
        ("test sequence accuracy", "sequence_accuracy", "{:.3f}"),
        ("test loss", "loss", "{:.3f}"),
        ("training seconds (median)", "train_seconds", "{:.1f}"),
        ("forward iterations in training (median)", "forward_iterations_median", "{:g}"),
        ("forward solves converged (median)", "forward_converged", "{:.0%}"),
        ("backward solves converged (median)", "backward_converged", "{:.0%}"),
    ]
    for label, key, fmt in rows:
        lines.append(
            f"| {label} | " + " | ".join(cell(a, "equal_steps", key, fmt) for a in ARMS) + " |"
        )
    lines += ["", "| equal wall time | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for label, key, fmt in [
        ("training steps (median)", "steps", "{:g}"),
        ("training seconds (median)", "train_seconds", "{:.1f}"),
        ("test token accuracy", "token_accuracy", "{:.3f}"),
        ("test accuracy at the last position", "last_position_accuracy", "{:.3f}"),
        ("test loss", "loss", "{:.3f}"),
    ]:
        lines.append(
            f"| {label} | " + " | ".join(cell(a, "equal_time", key, fmt) for a in ARMS) + " |"
        )
    budgets = list(per_seed[0][LOOPED[0]]["eval_iterations"])
    lines += [
        "",
        "| `eval_iterations` (equal-steps weights) | "
        + " | ".join(f"{a}: token acc. / iterations used" for a in LOOPED)
        + " |",
        "|---|" + "---|" * len(LOOPED),
    ]
    for budget in budgets:
        cells = []
        for arm in LOOPED:
            evals = [r[arm]["eval_iterations"][budget] for r in per_seed]
            accuracy = mean_std([e["token_accuracy"] for e in evals])
            used = statistics.median(e["eval_solver_iterations"] for e in evals)
            cells.append(f"{accuracy} / {used:g}")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's settings from `argv` (the command line if None), `--quick` applied: the trained
    map benchmark (`benchmarks/equilibrium_trained_map.py`) trains with these defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "equilibrium_loop_helps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=12, help="digits per sequence")
    parser.add_argument("--modulus", type=int, default=2, help="k of the running sum (2: parity)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=12, help="the loop's `feedback.steps`")
    parser.add_argument("--jacobian-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--test-batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.batch, args.length = [0], 2, 4, 6
        args.width, args.iterations, args.test_batch, args.warmup = 16, 2, 16, 1
        args.threads = args.threads or 1  # tiny ops: a second thread only contends
    return args


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    # unconverged solves are counted in the tables instead of logged on every step
    logging.getLogger("runtime.federation.equilibrium").setLevel(logging.ERROR)
    logging.getLogger("runtime.federation.executor").setLevel(logging.ERROR)
    test_batch = running_sum(
        args.test_batch, args.length, args.modulus, torch.Generator().manual_seed(12345)
    )
    results = {}
    for seed in args.seeds:
        results[str(seed)] = run_seed(args, seed, test_batch)
        print(f"seed {seed} done", flush=True)
    payload = {
        "machine": f"{os.cpu_count()} CPU cores (shared), {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "quick": args.quick,
        "seeds": args.seeds,
        "arms": list(ARMS),
        "setup": {
            k: getattr(args, k)
            for k in (
                "steps",
                "batch",
                "length",
                "modulus",
                "width",
                "layers",
                "iterations",
                "jacobian_weight",
                "lr",
                "test_batch",
            )
        },
        "results": results,
    }
    table = markdown(payload)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "equilibrium_loop_helps.json").write_text(json.dumps(payload, indent=1))
    (args.out / "equilibrium_loop_helps.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'equilibrium_loop_helps.json'} and .md")


if __name__ == "__main__":
    main()
