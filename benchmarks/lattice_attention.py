"""Lattice attention vs flash (issue 5): one attention layer, forward + backward, bf16.

Compared at 2k and 8k tokens, 16 heads of 64 (width 1024), causal:
* `sdpa`: the plain layer (`F.scaled_dot_product_attention`, flash on a Hopper GPU);
* `lattice (fused)`: the lattice layer, its phase term folded into Q/K (two of the 64 dimensions),
  Kuramoto phases recomputed every pass (4 substeps on a 4 x 4 periodic lattice);
* `dense bias` (2k only): the design's formula with a `(tokens x tokens)` bias per head, as a
  reference for what folding avoids.
Target: lattice at most 1.15x the time of sdpa, memory linear in tokens.
"""

from __future__ import annotations

import math

import torch
from common import parse_args, peak_memory, report, time_call

from runtime.lattice import LatticeConfig
from runtime.transformer import SelfAttention, TransformerConfig


def dense_bias_attention(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    cfg = attn.cfg
    _, batch, n, _ = x.shape
    h, hw, cw = cfg.heads, cfg.head_width, cfg.content_width
    q, k, v = attn.qkv(x).split((h * cw, h * cw, h * hw), dim=-1)
    q, k, v = (t.reshape(batch, n, h, -1).transpose(1, 2) for t in (q, k, v))
    theta = attn.lattice.phases()[0]
    nu = attn.lattice.cfg.token_frequency * attn.lattice.omega[0]
    i = torch.arange(n, device=x.device, dtype=torch.float32)
    bias = attn.lattice.strength[0, :, None, None] * torch.cos(
        theta[:, None, None] + nu[:, None, None] * (i[:, None] - i[None, :])
    )
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    bias = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
    y = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=1 / math.sqrt(hw)
    )
    return attn.proj(y.transpose(1, 2).reshape(1, batch, n, h * hw))


def main() -> None:
    args = parse_args(__doc__)
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    width, heads = (1024, 16) if not args.smoke else (64, 4)
    lattice = LatticeConfig(shape=(4, 4) if not args.smoke else (2, 2), substeps=4)
    sizes = [(2048, 4), (8192, 1)] if not args.smoke else [(64, 2)]
    rows = []
    for tokens, batch in sizes:
        plain_cfg = TransformerConfig(width=width, heads=heads, layers=1, context=tokens)
        lattice_cfg = TransformerConfig(
            width=width, heads=heads, layers=1, context=tokens, attention=lattice
        )
        plain = SelfAttention(plain_cfg, 1).to(args.device, dtype)
        latt = SelfAttention(lattice_cfg, 1).to(args.device, dtype)
        x = torch.randn(
            1, batch, tokens, width, device=args.device, dtype=dtype, requires_grad=True
        )
        with torch.no_grad():  # the fused layer computes the dense formula
            fused, dense = latt(x, None).float(), dense_bias_attention(latt, x).float()
        error = float((fused - dense).abs().max() / dense.abs().max())
        assert error < (5e-2 if cuda else 1e-4), error  # bf16: phase dims carry sqrt(d) * strength
        variants = {
            "sdpa": lambda: plain(x, None).sum().backward(),
            "lattice (fused)": lambda: latt(x, None).sum().backward(),
        }
        if cuda:  # compiled, the phase computation fuses into a few kernels
            plain_c, latt_c = torch.compile(plain), torch.compile(latt)
            variants["sdpa, compiled"] = lambda: plain_c(x, None).sum().backward()
            variants["lattice (fused), compiled"] = lambda: latt_c(x, None).sum().backward()
            # and with CUDA graphs: what is left when kernel launches cost nothing
            plain_g = torch.compile(plain, mode="reduce-overhead")
            latt_g = torch.compile(latt, mode="reduce-overhead")
            variants["sdpa, CUDA graphs"] = lambda: plain_g(x, None).sum().backward()
            variants["lattice (fused), CUDA graphs"] = lambda: latt_g(x, None).sum().backward()
        if tokens <= 2048:
            variants["dense bias"] = lambda: dense_bias_attention(latt, x).sum().backward()
        times = {}
        for name, fn in variants.items():
            timing = time_call(fn, args.device, warmup=3, repeats=3 if args.smoke else 20)
            times[name] = timing["median_ms"]
            peak = peak_memory(fn, args.device)
            rows.append(
                {
                    "tokens": tokens,
                    "batch": batch,
                    "variant": name,
                    "fwd+bwd_ms": timing["median_ms"],
                    "min_ms": timing["min_ms"],
                    "peak_MiB": (peak or 0) / 2**20,
                    "peak_KiB_per_token": (peak or 0) / 2**10 / (tokens * batch),
                    "max_rel_error_vs_dense": error,
                }
            )
        for row in rows:
            if row["tokens"] == tokens:
                base = "sdpa" + row["variant"][len(row["variant"].split(",")[0]) :]
                base = base if base in times else "sdpa"
                row["x sdpa"] = row["fwd+bwd_ms"] / times[base]
    summary = {
        f"{r['tokens']} tokens: {r['variant']} x sdpa": round(r["x sdpa"], 3)
        for r in rows
        if not r["variant"].startswith("sdpa")
    }
    report("lattice_attention", args, rows, summary)


if __name__ == "__main__":
    main()
