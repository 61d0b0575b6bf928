"""Where the time goes (issue 9, item 3): kernel profiles of the steps whose targets are not met.

For each case, a compiled training step (bf16 autocast, fused AdamW) is profiled with
`torch.profiler` over 5 steps after warm-up; GPU kernel time is grouped into matmul (cuBLAS/
CUTLASS), attention (flash / efficient SDPA), fused elementwise (Triton kernels that
`torch.compile` generated) and other, and the 8 largest kernels are listed.

* `gpt2-small`: the overhead benchmark's spec (MFU below the issue's 50% aim);
* `fractal all levels` / `fractal largest`: the FractalFormer-shaped width-1024 case of
  `fractal_levels.py` (target 1.3x; BENCHMARKS.md has the measured ratio);
* `lattice 2k` / `sdpa 2k`: one lattice attention layer vs plain SDPA (target 1.15x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import parse_args, profiled, report
from fractal_levels import CASES, SMOKE, spec_text
from overhead_vs_handwritten import SPEC as GPT_SPEC

import compiler
from runtime.attention.lattice import LatticeConfig
from runtime.transformer import TransformerConfig, attention_layer

GROUPS = (  # in this order: cuDNN's attention kernels' names contain "sm90" too
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("matmul", ("gemm", "sm90", "cutlass", "nvjet", "cublas", "matmul", "addmm", "bmm")),
    ("fused elementwise (triton)", ("triton",)),
)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(k in lowered for k in keys):
            return group
    return "other"


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def training_step(model, loss_of, device):
    cuda = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    compiled = torch.compile(loss_of) if cuda else loss_of

    def step() -> None:
        with torch.autocast(device, torch.bfloat16, enabled=cuda):
            loss = compiled()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cases(args):
    device, smoke = args.device, args.smoke
    vocab, seq, width, heads, layers, batch = (
        (256, 64, 64, 4, 2, 2) if smoke else (50304, 1024, 768, 12, 12, 16)
    )
    gpt = compiler.build_model(
        compiler.load_spec_text(
            GPT_SPEC.format(vocab=vocab, seq=seq, width=width, heads=heads, layers=layers)
        ),
        device=device,
    )
    idx = torch.randint(0, vocab, (batch, seq), device=device)
    yield "gpt2-small", training_step(gpt, lambda: lm_loss(gpt(idx)["logits"], idx), device)

    c = next(iter(SMOKE.values())) if smoke else CASES["larger (w1024 L8 ctx1024 b8)"]
    fractal = compiler.build_model(compiler.load_spec_text(spec_text(c)), device=device)
    view = fractal.fractal()
    ids = torch.randint(0, c["vocab"], (c["batch"], c["context"]), device=device)
    yield "fractal all levels", training_step(fractal, lambda: view.loss(ids, ids)[0], device)
    largest = training_step(fractal, lambda: lm_loss(fractal(ids)["logits"], ids), device)
    yield "fractal largest", largest

    width, heads, tokens, batch = (64, 4, 64, 2) if smoke else (1024, 16, 2048, 4)
    shape = (2, 2) if smoke else (4, 4)
    x = torch.randn(1, batch, tokens, width, device=device)
    for label, attention in (
        ("lattice 2k", LatticeConfig(shape=shape, substeps=4)),
        ("sdpa 2k", None),
    ):
        cfg = TransformerConfig(
            width=width, heads=heads, layers=1, context=tokens, attention=attention
        )
        layer = attention_layer(cfg, 1).to(device)
        yield (
            label,
            training_step(
                layer, lambda layer=layer: layer(x, None).float().square().mean(), device
            ),
        )


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    summary = {}
    for label, step in cases(args):
        events = profiled(step, args.device)
        total = sum(ms for _, ms, _ in events)
        groups: dict[str, float] = {}
        for key, ms, _ in events:
            groups[group_of(key)] = groups.get(group_of(key), 0.0) + ms
        summary[f"{label}: ms per step"] = round(total, 3)
        summary[f"{label}: kernels per step"] = round(sum(count for *_, count in events))
        for group, ms in sorted(groups.items(), key=lambda g: -g[1]):
            rows.append({"case": label, "what": group, "ms_per_step": ms, "share": ms / total})
        for key, ms, count in sorted(events, key=lambda e: -e[1])[:8]:
            rows.append(
                {
                    "case": label,
                    "what": "  " + key[:70],
                    "ms_per_step": ms,
                    "share": ms / total,
                    "calls_per_step": count,
                }
            )
    report("profile_steps", args, rows, summary)


if __name__ == "__main__":
    main()
