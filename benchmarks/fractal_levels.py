"""Fractal training cost (issue 4): one training step of every level at once vs the largest alone.

A training step is forward, backward and an AdamW update, under bf16 autocast on a GPU. Compared:

* `largest alone`: the full model (level 0) only, i.e. an ordinary transformer;
* `all levels, one pass`: every sub-model of every level, each level one block-diagonal pass over
  the full model's weights (what `model.fractal().loss` runs);
* `all levels, loop`: the original's way, one call per sub-model (`1 + 2 + 4` of them).

Target (issue 4): all levels at most 1.3x the largest alone. The `FLOP ratio` column is the floor
no schedule can beat: level `l`'s matmuls cost `1/branching**l` of level 0's, but its attention
(scores and weighted sums over `heads x d/k` per sub-model, `k` sub-models) costs as much as level 0's,
so the ratio is `sum_l (M/k_l + A) / (M + A)`, plus the LM head once per level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import parse_args, peak_memory, report, time_call

import compiler

CASES = {
    # the original's size (specs/fractalformer.yaml): 1M parameters, batch 64 x 256
    "original (w128 L4 ctx256 b64)": dict(
        width=128, heads=4, kv_heads=1, layers=4, context=256, batch=64, vocab=84
    ),
    # a larger model where matmuls dominate
    "larger (w1024 L8 ctx1024 b8)": dict(
        width=1024, heads=16, kv_heads=4, layers=8, context=1024, batch=8, vocab=256
    ),
}
SMOKE = {
    "smoke (w32 L2 ctx32 b2)": dict(
        width=32, heads=4, kv_heads=1, layers=2, context=32, batch=2, vocab=40
    )
}
LEVELS, BRANCHING = 3, 2


def spec_text(c: dict, heads: str = "narrow") -> str:
    return f"""
spec: 1
name: fractal-bench
inputs:
  tokens: {{kind: tokens, vocab: {c["vocab"]}, context: {c["context"]}}}
nodes:
  lm:
    kind: fractal
    levels: {LEVELS}
    branching: {BRANCHING}
    heads: {heads}
    base: {{width: {c["width"]}, heads: {c["heads"]}, kv_heads: {c["kv_heads"]}, layers: {c["layers"]},
            activation: geglu, norm: rmsnorm, rope_theta: 100}}
outputs:
  logits: {{from: lm, kind: lm_head, tie: true}}
"""


def subset_kv(c: dict) -> int:
    """`heads: subset` splits the kv heads too: keep the case's count where it splits (then level 0
    is the very same model), else one kv head per query head."""
    return c["kv_heads"] if c["kv_heads"] % BRANCHING ** (LEVELS - 1) == 0 else c["heads"]


def flop_ratio(c: dict) -> float:
    """Forward FLOPs per token of all levels over level 0's (causal attention at full context)."""
    w, layers, ctx, vocab = c["width"], c["layers"], c["context"], c["vocab"]
    hw = w // c["heads"]
    inner = 4 * w
    matmul = (
        2 * layers * (w * (c["heads"] + 2 * c["kv_heads"]) * hw + w * w + w * 2 * inner + inner * w)
    )
    attention = layers * 2 * 2 * ctx * w // 2
    head = 2 * w * vocab
    k = [BRANCHING**level for level in range(LEVELS)]
    every = sum(matmul / kk + attention + head for kk in k)  # k heads of V x d/k: one V x d
    return every / (matmul + attention + head)


def main() -> None:
    args = parse_args(__doc__)
    cases = SMOKE if args.smoke else CASES
    cuda = args.device == "cuda"
    rows = []
    for label, c in cases.items():
        model = compiler.build_model(compiler.load_spec_text(spec_text(c)), device=args.device)
        view = model.fractal()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        ids = torch.randint(0, c["vocab"], (c["batch"], c["context"]), device=args.device)
        targets = torch.roll(ids, -1, dims=1)

        def largest(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(ids)["logits"].flatten(0, 1).float(), targets.flatten())

        def every_level(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return view.loss(targets, ids)[0]

        def loop(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            total = ids.new_zeros((), dtype=torch.float32)
            for level in range(LEVELS):
                k = BRANCHING**level
                for index in range(k):
                    logits = view.sub_model(level, index)(ids)["logits"]
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                    total = total + loss / k
            return total

        # `heads: subset`: the same weight blocks cut into full-width heads (kv heads split too)
        subset = compiler.build_model(
            compiler.load_spec_text(spec_text({**c, "kv_heads": subset_kv(c)}, "subset")),
            device=args.device,
        )
        subset_view = subset.fractal()
        subset_optimizer = torch.optim.AdamW(subset.parameters(), lr=1e-4, fused=cuda)

        def every_level_subset(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return subset_view.loss(targets, ids)[0]

        def step(loss_fn):
            opt = subset_optimizer if "subset" in getattr(loss_fn, "__name__", "") else optimizer

            def run() -> None:
                with torch.autocast(args.device, torch.bfloat16, enabled=cuda):
                    loss = loss_fn(ids, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            return run

        with torch.no_grad():  # the one-pass and the loop compute the same losses
            a, b = every_level(ids, targets), loop(ids, targets)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (float(a), float(b))
        variants = {
            "largest alone": largest,
            "all levels, one pass": every_level,
            "all levels, loop": loop,
            "all levels, heads: subset": every_level_subset,
        }
        if cuda:
            # the small model is launch-bound: there, compile with CUDA graphs
            mode = "reduce-overhead" if c["width"] <= 256 else None
            variants["largest alone, compiled"] = torch.compile(largest, mode=mode)
            variants["all levels, one pass, compiled"] = torch.compile(every_level, mode=mode)
            compiled_subset = torch.compile(every_level_subset, mode=mode)
            compiled_subset.__name__ = "every_level_subset"
            variants["all levels, heads: subset, compiled"] = compiled_subset
        times = {}
        for name, fn in variants.items():
            repeats = 3 if args.smoke else 10
            timing = time_call(
                step(fn), args.device, warmup=2 if args.smoke else 5, repeats=repeats
            )
            times[name] = timing["median_ms"]
            rows.append(
                {
                    "case": label,
                    "variant": name,
                    "step_ms": timing["median_ms"],
                    "min_ms": timing["min_ms"],
                    "max_ms": timing["max_ms"],
                    "compile_mode": (mode or "default") if cuda and "compiled" in name else "",
                    "peak_GiB": (peak_memory(step(fn), args.device) or 0) / 2**30,
                }
            )
        for row in rows:
            if row["case"] == label:
                base = (
                    "largest alone, compiled" if "compiled" in row["variant"] else "largest alone"
                )
                row["x largest"] = row["step_ms"] / times[base]
                row["FLOP ratio"] = flop_ratio(c)
    summary = {
        f"{r['case']}: {r['variant']}": round(r["x largest"], 3)
        for r in rows
        if r["variant"] != "largest alone" and r["variant"] != "largest alone, compiled"
    }
    report("fractal_levels", args, rows, summary)


if __name__ == "__main__":
    main()
