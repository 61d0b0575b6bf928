"""Federation batching (issue 3): 16 same-shaped gears, forward + backward.

Compares the transformer part of the compiled model (one `Transformer` holding 16 members'
stacked weights, each member with its own rotary velocity) against (i) a Python loop over 16
ordinary single transformers holding the same weights, and (ii) `torch.func.stack_module_state`
+ `functional_call` + `vmap` over those 16 modules. All three compute the same function (checked).
Target: batched >= 5x faster than the loop on a GPU.
"""

from __future__ import annotations

import copy

import torch
from common import machine, parse_args, report, time_call  # noqa: F401
from torch.func import functional_call, stack_module_state
from torch.nn.attention import SDPBackend, sdpa_kernel

import compiler
from runtime.transformer import Transformer

GEARS = 16


def spec_text(width: int, heads: int, layers: int, context: int) -> str:
    # a driver g0 and 16 driven gears of different teeth: one batched group of 16 velocities
    nodes = "\n".join(f"  g{i}: {{kind: gear, teeth: {20 + 3 * i}}}" for i in range(GEARS + 1))
    edges = "\n".join(f"  - {{from: g0, to: g{i}, kind: mesh}}" for i in range(1, GEARS + 1))
    return f"""
spec: 1
name: sixteen-gears
defaults:
  transformer: {{width: {width}, heads: {heads}, layers: {layers}}}
inputs:
  t: {{kind: features, width: 8, context: {context}}}
nodes:
{nodes}
edges:
{edges}
outputs:
  y: {{from: [{", ".join(f"g{i}" for i in range(GEARS + 1))}], kind: regression, width: 2}}
"""


def main() -> None:
    args = parse_args(__doc__)
    width, heads, layers, batch, tokens = (32, 2, 1, 2, 16) if args.smoke else (256, 4, 3, 8, 256)
    model = compiler.build_model(
        compiler.load_spec_text(spec_text(width, heads, layers, tokens)), device=args.device
    )
    group = next(g for g in model.federation.plan.groups if len(g.nodes) == GEARS)
    index = model.federation.plan.groups.index(group)
    batched = model.federation.transformers[index]
    members = len(group.nodes)
    singles = []
    for m, scale in enumerate(group.rope_scales):
        single = Transformer(group.config, 1, (scale,)).to(args.device)
        with torch.no_grad():
            for (_, p), (_, q) in zip(
                single.named_parameters(), batched.named_parameters(), strict=True
            ):
                p.copy_(q[m])
        singles.append(single)

    x = torch.randn(members, batch, tokens, width, device=args.device)

    def run_batched():
        batched(x).square().mean().backward()

    def run_loop():
        torch.stack([s(x[m : m + 1])[0] for m, s in enumerate(singles)]).square().mean().backward()

    # vmap needs one module structure; the rotary tables differ per member, so each member's
    # module is called with its own (cos, sin) buffers stacked alongside its parameters.
    params, buffers = stack_module_state(singles)
    base = copy.deepcopy(singles[0]).to("meta")

    def one(p, b, xm):
        return functional_call(base, (p, b), (xm.unsqueeze(0),))[0]

    def run_vmap():
        torch.vmap(one)(params, buffers, x).square().mean().backward()

    vmap_note = "flash/efficient SDPA"
    try:
        run_vmap()
    except RuntimeError as exc:  # torch's vmap over the fused attention backward can fail on CUDA
        vmap_note = f"math SDPA (fused kernels failed under vmap: {str(exc).splitlines()[0]})"
        plain_vmap = run_vmap

        def run_vmap():  # noqa: F811
            with sdpa_kernel(SDPBackend.MATH):
                plain_vmap()

    with torch.no_grad():
        reference = torch.stack([s(x[m : m + 1])[0] for m, s in enumerate(singles)])
        for name, value in (("batched", batched(x)), ("vmap", torch.vmap(one)(params, buffers, x))):
            error = ((value - reference).norm() / reference.norm()).item()
            assert error < 1e-4, f"{name} differs from the loop by {error:.2e}"

    rows = []
    repeats = 3 if args.smoke else 20
    for mode in ("eager",) if args.smoke or args.device == "cpu" else ("eager", "compiled"):
        fns = {"batched": run_batched, "loop": run_loop, "vmap": run_vmap}
        if mode == "compiled":
            torch._dynamo.reset()
            cb = torch.compile(batched)
            # the whole loop as one compiled function: compiling 16 modules apart would recompile per module
            cl = torch.compile(
                lambda xs: torch.stack([s(xs[m : m + 1])[0] for m, s in enumerate(singles)])
            )

            def run_batched():  # noqa: F811
                cb(x).square().mean().backward()

            def run_loop():  # noqa: F811
                cl(x).square().mean().backward()

            fns = {"batched": run_batched, "loop": run_loop}
        times = {
            name: time_call(fn, args.device, warmup=2 if args.smoke else 5, repeats=repeats)
            for name, fn in fns.items()
        }
        for name, t in times.items():
            rows.append(
                {
                    "mode": mode,
                    "variant": name,
                    **t,
                    "x_batched": t["median_ms"] / times["batched"]["median_ms"],
                }
            )
    eager = {r["variant"]: r["median_ms"] for r in rows if r["mode"] == "eager"}
    speedup = eager["loop"] / eager["batched"]
    summary = {
        "members": members,
        "shape": f"width {width}, heads {heads}, layers {layers}, batch {batch}, tokens {tokens}",
        "loop_over_batched_eager": speedup,
        "vmap_over_batched_eager": eager["vmap"] / eager["batched"],
        "vmap_attention": vmap_note,
        "target_loop_over_batched": 5.0,
        "target_met": bool(speedup >= 5.0) if not args.smoke else None,
    }
    report("federation_batching", args, rows, summary)


if __name__ == "__main__":
    main()
