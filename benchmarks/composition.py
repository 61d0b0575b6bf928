"""Composition and time (issue 19): batched sub-graphs, and streaming a recurrent spec.

(a) Eight same-shaped sub-graphs (`kind: graph`, each a three-gear train) in one spec, flattened
    into one graph whose same-shaped gears run as batched calls, against a loop over eight models
    compiled from the train alone (the same transformers and parameter count: checked; the one model shares its input
    read and message bus, which the eight hold once each), forward and
    backward. Target: batched >= 4x faster than the loop on a GPU (as for gears).
(b) The recurrent three-gear spec (`specs/recurrent_gears.yaml`, `time:`), inference over 1,000
    time steps: streamed through `model.step` one step at a time, against the same model's forward
    over the whole sequence (which steps through it in the same way: the ratio shows what
    streaming costs, not a different algorithm), and the step under `torch.compile` on a GPU:
    with CUDA graphs (`mode="reduce-overhead"`) where the capability check allows them, else
    inductor alone (the spec's rotation perspectives rule graphs out; the summary says why).
"""

from __future__ import annotations

import torch
from common import ROOT, parse_args, report, time_call

import compiler
from compiler.passes.check_capabilities import model_capabilities

TRAINS = 8

TRAIN = """
    kind: graph
    inputs:
      date: {{kind: features, width: 8}}
    nodes:
      driver: {{kind: gear, teeth: {teeth}}}
      idler: {{kind: gear, teeth: 32}}
      follower: {{kind: gear, teeth: 48}}
    edges:
      - {{from: driver, to: idler, kind: mesh}}
      - {{from: idler, to: follower, kind: arbor}}
    outputs:
      phase: {{from: follower, kind: regression, width: 2}}
"""


def spec(width: int, layers: int, context: int, trains: int) -> str:
    nodes = "".join(f"  t{i}:{TRAIN.format(teeth=20 + 4 * i)}" for i in range(trains))
    return f"""
spec: 1
name: trains
defaults:
  transformer: {{width: {width}, heads: 4, layers: {layers}}}
inputs:
  date: {{kind: features, width: 8, context: {context}}}
nodes:
{nodes}
outputs:
  none: {{from: t0.follower, kind: regression, width: 1}}
"""


def main() -> None:
    args = parse_args(__doc__)
    device = args.device
    width, layers, batch, tokens = (32, 1, 2, 16) if args.smoke else (256, 2, 8, 256)
    rows: list[dict] = []
    repeats = 3 if args.smoke else 20

    together = compiler.build_model(
        compiler.load_spec_text(spec(width, layers, tokens, TRAINS), str(ROOT / "trains.yaml")),
        device=device,
    )
    alone = [
        compiler.build_model(
            compiler.load_spec_text(spec(width, layers, tokens, 1), str(ROOT / "train.yaml")),
            device=device,
        )
        for _ in range(TRAINS)
    ]

    def gear_weights(model) -> int:  # the trains' transformers (the bus and reads are shared)
        return sum(p.numel() for p in model.federation.transformers.parameters())

    assert gear_weights(together) == sum(map(gear_weights, alone)), "different transformers"
    x = torch.randn(batch, tokens, 8, device=device)

    def run_batched():
        sum(v.square().mean() for v in together(date=x).values()).backward()

    def run_loop():
        sum(v.square().mean() for m in alone for v in m(date=x).values()).backward()

    times = {
        "batched sub-graphs": time_call(run_batched, device, warmup=2, repeats=repeats),
        "loop over models": time_call(run_loop, device, warmup=2, repeats=repeats),
    }
    for name, t in times.items():
        rows.append({"case": "8 sub-graphs, fwd+bwd", "variant": name, **t})
    batching = times["loop over models"]["median_ms"] / times["batched sub-graphs"]["median_ms"]

    steps = 5 if args.smoke else 1000
    recurrent = compiler.build_model(ROOT / "specs" / "recurrent_gears.yaml", device=device).eval()
    dates = torch.randn(1, steps, 16, 4, device=device)

    @torch.no_grad()
    def run_whole():
        recurrent(date=dates)

    @torch.no_grad()
    def run_streamed(step=recurrent.step, graphed=False):
        state = recurrent.init_state(1, 16)
        for t in range(steps):
            if graphed:  # a replay overwrites the last one's outputs: the state is copied out
                torch.compiler.cudagraph_mark_step_begin()
                state, _ = step(state, date=dates[:, t])
                state = tuple(s.clone() for s in state)
            else:
                state, _ = step(state, date=dates[:, t])

    stream = {
        "whole sequence (forward)": time_call(run_whole, device, warmup=1, repeats=3),
        "streamed (model.step)": time_call(run_streamed, device, warmup=1, repeats=3),
    }
    graph_limits = model_capabilities(compiler.analyze(ROOT / "specs" / "recurrent_gears.yaml"))
    graphed = not graph_limits["cuda_graphs"]
    if device == "cuda":  # CUDA graphs where the spec allows them, else inductor alone
        compiled = torch.compile(
            recurrent.step, mode="reduce-overhead" if graphed else "default", fullgraph=True
        )
        label = "CUDA graphs" if graphed else "inductor, no CUDA graphs"
        stream[f"streamed, compiled step ({label})"] = time_call(
            lambda: run_streamed(compiled, graphed=graphed), device, warmup=2, repeats=3
        )
    for name, t in stream.items():
        rows.append(
            {
                "case": f"recurrent gears, {steps} steps",
                "variant": name,
                **t,
                "us_per_step": 1000 * t["median_ms"] / steps,
            }
        )
    whole = stream["whole sequence (forward)"]["median_ms"]
    summary = {
        "sub_graphs": TRAINS,
        "shape": f"width {width}, layers {layers}, batch {batch}, tokens {tokens}",
        "loop_over_batched": batching,
        "target_loop_over_batched": 4.0,
        "target_met": bool(batching >= 4.0) if not args.smoke else None,
        "streamed_over_whole": stream["streamed (model.step)"]["median_ms"] / whole,
        "time_steps": steps,
        "cuda_graphs_ruled_out_by": [limit.reason for limit in graph_limits["cuda_graphs"]],
    }
    report("composition", args, rows, summary)


if __name__ == "__main__":
    main()
