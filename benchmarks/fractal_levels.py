"""Fractal training cost (issue 4): one training step of every level at once vs the largest alone.

A training step is forward, backward and an AdamW update, under bf16 autocast on a GPU. Compared:

* `largest alone`: the full model (level 0) only, i.e. an ordinary transformer;
* `all levels, stacked`: every sub-model of every level in one full-width pass whose linears are
  masked to each level's diagonal blocks (`schedule: stacked`, `runtime.fractal.stacked`): level
  0's number of kernels, `levels` times its matmul FLOPs;
* `all levels, blocks`: each level one block-diagonal pass over the full model's weights
  (`schedule: blocks`): the fewest FLOPs, `levels` times the kernels;
* `all levels, loop`: the original's way, one call per sub-model (`1 + 2 + 4` of them);
* the same two schedules with `heads: subset` (full-width heads, a share per sub-model);
* `level_batch: split`: every level trained in the same step, each on its own third of the batch
  (so each sub-model sees a third of the data a step): a different training recipe, timed for
  what it buys.

Target (issue 4): all levels at most 1.3x the largest alone. `FLOP ratio` is the floor of any
schedule that computes every level with the fewest FLOPs: level `l`'s matmuls cost
`1/branching**l` of level 0's, but its attention (scores and weighted sums over `heads x d/k` per
sub-model, `k` sub-models) costs as much as level 0's, so the ratio is
`sum_l (M/k_l + A) / (M + A)`, plus the LM head once per level. A step bound by the number of
kernels rather than by FLOPs (small models) can beat it; `kernels` counts GPU kernel launches per
step (`torch.profiler`), which is what the stacked schedule reduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import parse_args, peak_memory, profiled, report, time_call

import compiler

CASES = {
    # the original's size (specs/fractalformer.yaml): 1M parameters, batch 64 x 256
    "original (w128 L4 ctx256 b64)": dict(
        width=128, heads=4, kv_heads=1, layers=4, context=256, batch=64, vocab=84
    ),
    # between: where the schedules' costs cross
    "middle (w512 L6 ctx512 b16)": dict(
        width=512, heads=8, kv_heads=2, layers=6, context=512, batch=16, vocab=256
    ),
    # a larger model where matmuls dominate
    "larger (w1024 L8 ctx1024 b8)": dict(
        width=1024, heads=16, kv_heads=4, layers=8, context=1024, batch=8, vocab=256
    ),
}
SMOKE = {
    "smoke (w32 L2 ctx32 b3)": dict(
        width=32, heads=4, kv_heads=1, layers=2, context=32, batch=3, vocab=40
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


def build(c: dict, args, heads: str = "narrow", schedule: str = "blocks", batch: str = "shared"):
    """A model of case `c` (the same initial weights for every schedule)."""
    torch.manual_seed(0)
    text = spec_text(c if heads == "narrow" else {**c, "kv_heads": subset_kv(c)}, heads)
    text = text.replace(
        "    heads: ", f"    schedule: {schedule}\n    level_batch: {batch}\n    heads: ", 1
    )
    return compiler.build_model(compiler.load_spec_text(text), device=args.device)


def kernels_per_step(step, device: str) -> float | None:
    if device != "cuda":
        return None
    return sum(launches for _, _, launches in profiled(step, device, calls=3))


def main() -> None:
    args = parse_args(__doc__)
    cases = SMOKE if args.smoke else CASES
    cuda = args.device == "cuda"
    rows = []
    for label, c in cases.items():
        if args.only not in label:
            continue
        ids = torch.randint(0, c["vocab"], (c["batch"], c["context"]), device=args.device)
        targets = torch.roll(ids, -1, dims=1)
        models = {
            (heads, schedule): build(c, args, heads, schedule)
            for heads in ("narrow", "subset")
            for schedule in ("blocks", "stacked")
        }
        for schedule in ("blocks", "stacked"):  # each level on a third of the batch
            models["split", schedule] = build(c, args, "narrow", schedule, "split")
        models["subset split", "stacked"] = build(c, args, "subset", "stacked", "split")
        optimizers = {
            key: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=cuda) for key, m in models.items()
        }
        narrow = models["narrow", "blocks"]

        def largest(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(narrow(ids)["logits"].flatten(0, 1).float(), targets.flatten())

        def largest_subset(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = models["subset", "blocks"](ids)["logits"]  # level 0 of the subset model
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

        def every_level(key):
            view = models[key].fractal()
            return lambda ids, targets: view.loss(targets, ids)[0]

        def loop(ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            view = narrow.fractal()
            total = ids.new_zeros((), dtype=torch.float32)
            for level in range(LEVELS):
                k = BRANCHING**level
                for index in range(k):
                    logits = view.sub_model(level, index)(ids)["logits"]
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                    total = total + loss / k
            return total

        with torch.no_grad():  # every schedule computes the same losses
            reference = loop(ids, targets)
            for key in models:
                value = every_level(key)(ids, targets)
                if key[0] == "narrow":
                    assert torch.allclose(value, reference, rtol=1e-4, atol=1e-4), (key, value)
            for heads in ("subset", "split"):
                stacked = every_level((heads, "stacked"))(ids, targets)
                blocks = every_level((heads, "blocks"))(ids, targets)
                assert torch.allclose(stacked, blocks, rtol=1e-4, atol=1e-4), heads
        variants = {
            "largest alone": (largest, ("narrow", "blocks")),
            "all levels, stacked": (every_level(("narrow", "stacked")), ("narrow", "stacked")),
            "all levels, blocks": (every_level(("narrow", "blocks")), ("narrow", "blocks")),
            "all levels, loop": (loop, ("narrow", "blocks")),
            "all levels, level_batch: split, stacked": (
                every_level(("split", "stacked")),
                ("split", "stacked"),
            ),
        }
        # small steps leave gaps between kernel launches: there, compile with CUDA graphs
        mode = "reduce-overhead" if c["width"] <= 512 else None
        if cuda:
            for name, key in (
                ("largest alone", ("narrow", "blocks")),
                ("all levels, stacked", ("narrow", "stacked")),
                ("all levels, blocks", ("narrow", "blocks")),
                ("all levels, heads: subset, stacked", ("subset", "stacked")),
                ("all levels, heads: subset, blocks", ("subset", "blocks")),
                ("all levels, level_batch: split, stacked", ("split", "stacked")),
                ("all levels, level_batch: split, blocks", ("split", "blocks")),
                ("largest alone, heads: subset", ("subset", "blocks")),
                (
                    "all levels, heads: subset, level_batch: split, stacked",
                    ("subset split", "stacked"),
                ),
            ):
                fn = {"largest alone": largest, "largest alone, heads: subset": largest_subset}.get(
                    name
                ) or every_level(key)
                variants[name + ", compiled"] = (torch.compile(fn, mode=mode), key)

        def step(fn, key):
            optimizer = optimizers[key]

            def run() -> None:
                with torch.autocast(args.device, torch.bfloat16, enabled=cuda):
                    loss = fn(ids, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            return run

        times = {}
        for name, (fn, key) in variants.items():
            repeats = 3 if args.smoke else 20
            run = step(fn, key)
            timing = time_call(run, args.device, warmup=2 if args.smoke else 5, repeats=repeats)
            times[name] = timing["median_ms"]
            rows.append(
                {
                    "case": label,
                    "variant": name,
                    "step_ms": timing["median_ms"],
                    "min_ms": timing["min_ms"],
                    "max_ms": timing["max_ms"],
                    "compile_mode": (mode or "default") if cuda and "compiled" in name else "",
                    "kernels": kernels_per_step(run, args.device),
                    "peak_GiB": (peak_memory(run, args.device) or 0) / 2**30,
                }
            )
            print(rows[-1], flush=True)
        for row in rows:
            if row["case"] == label:
                base = (
                    "largest alone, compiled" if "compiled" in row["variant"] else "largest alone"
                )
                row["x largest"] = row["step_ms"] / times[base]
                if "heads: subset" in row["variant"] and "compiled" in row["variant"]:
                    # against the subset model's own level 0 (its kv heads may differ)
                    own = times["largest alone, heads: subset, compiled"]
                    row["x its own largest"] = row["step_ms"] / own
                row["FLOP ratio"] = flop_ratio(c)
    summary = {
        f"{r['case']}: {r['variant']}": round(r["x largest"], 3)
        for r in rows
        if not r["variant"].startswith("largest alone")
    }
    report("fractal_levels", args, rows, summary)


if __name__ == "__main__":
    main()
