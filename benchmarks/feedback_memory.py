"""Feedback memory (issue 3): peak memory of forward + backward against the number of steps.

A loop of gears closed by a delay-1 feedback edge, run in `unroll` mode (backpropagation through
every step: memory should grow linearly) and `equilibrium` mode (fixed point without a tape,
implicit gradient: memory should not grow). The loop is made contractive (a strong input, a weak
feedback message) so the equilibrium exists. Target: equilibrium at 32 steps <= 1.5x the peak of 1.
"""

from __future__ import annotations

import logging

import torch
from common import parse_args, peak_memory, report, time_call

import compiler

LOOP = """
spec: 1
name: loop
defaults:
  transformer: {{width: {width}, heads: {heads}, layers: {layers}}}
inputs:
  t: {{kind: features, width: 8, context: {tokens}}}
nodes:
  a: {{kind: gear, teeth: 30}}
  b: {{kind: gear, teeth: 20}}
  c: {{kind: gear, teeth: 12}}
edges:
  - {{from: a, to: b, kind: mesh}}
  - {{from: b, to: c, kind: mesh}}
  - {{from: c, to: a, kind: feedback, delay: 1}}
feedback: {{steps: {steps}, mode: {mode}, tolerance: 1.0e-12}}
outputs:
  y: {{from: [a, b, c], kind: regression, width: 2}}
"""


def main() -> None:
    args = parse_args(__doc__)
    # the tolerance is set unreachably low on purpose, to run every iteration: silence its warning
    logging.getLogger("runtime.federation.executor").setLevel(logging.ERROR)
    width, heads, layers, batch, tokens = (32, 2, 1, 2, 16) if args.smoke else (512, 8, 2, 8, 1024)
    # the smoke run only shows that both modes run and report (CPU: no peak memory to compare)
    step_counts = (2, 8) if args.smoke else (2, 4, 8, 16, 32)
    rows = []
    for mode in ("unroll", "equilibrium"):
        for steps in step_counts:
            text = LOOP.format(
                width=width, heads=heads, layers=layers, tokens=tokens, steps=steps, mode=mode
            )
            if mode == "unroll":
                text = text.replace(", tolerance: 1.0e-12", "")
            model = compiler.build_model(compiler.load_spec_text(text), device=args.device)
            with torch.no_grad():
                model.inputs["t"].proj.weight.normal_(std=1.0)
                model.federation.messages.lin.weight.mul_(0.05)
            x = torch.randn(batch, tokens, 8, device=args.device)

            def step():
                model.zero_grad(set_to_none=True)
                model(x)["y"].square().mean().backward()

            if not args.smoke:
                step()  # warm-up (allocator, kernels)
            peak = peak_memory(step, args.device)
            timing = time_call(
                step, args.device, warmup=0 if args.smoke else 1, repeats=1 if args.smoke else 5
            )
            rows.append(
                {
                    "mode": mode,
                    "steps": steps,
                    "peak_MiB": None if peak is None else peak / 2**20,
                    "median_ms": timing["median_ms"],
                    "iterations": getattr(model.federation, "last_iterations", steps),
                }
            )
    summary: dict = {
        "shape": f"3 gears, width {width}, heads {heads}, layers {layers}, batch {batch}, tokens {tokens}"
    }
    if rows[0]["peak_MiB"] is not None:
        peak = {(r["mode"], r["steps"]): r["peak_MiB"] for r in rows}
        summary["equilibrium_32_over_2"] = peak[("equilibrium", 32)] / peak[("equilibrium", 2)]
        summary["unroll_32_over_2"] = peak[("unroll", 32)] / peak[("unroll", 2)]
        summary["unroll_MiB_per_step"] = (peak[("unroll", 32)] - peak[("unroll", 2)]) / 30
        summary["target_equilibrium_ratio"] = 1.5
        summary["target_met"] = bool(summary["equilibrium_32_over_2"] <= 1.5)
    report("feedback_memory", args, rows, summary)


if __name__ == "__main__":
    main()
