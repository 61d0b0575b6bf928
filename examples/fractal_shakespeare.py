"""Train FractalFormer (docs/designs.md, design 001) on Shakespeare against plain transformers.

Character-level language modelling on `data/shakespeare.txt` (the last 10% held out).
`specs/fractalformer.yaml` (~1M parameters, as the original) is trained with the loss of all
`1 + 2 + 4` sub-models at once; then, with the same budget (steps, batch, learning-rate schedule),
one plain transformer per level, of that level's width and otherwise the same settings. The table
gives the validation loss (nats per character) of each level (the mean over its sub-models, and
the best one) next to the plain transformer of that size.

`--level-batch shared,split` also trains the fractal with `level_batch: split` (each level on its
own third of every batch, a step costing about one of the full model alone) with the same steps,
batch and schedule: what the cheaper step costs each level in validation loss.

    python examples/fractal_shakespeare.py                 # a GPU: a few minutes
    python examples/fractal_shakespeare.py --level-batch shared,split
    python examples/fractal_shakespeare.py --quick         # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402

DATA = ROOT / "data" / "shakespeare.txt"  # written by `epicycle data shakespeare`; or `--data FILE`

PLAIN_SPEC = """
spec: 1
name: plain-{width}
seed: 0
inputs:
  tokens: {{kind: tokens, vocab: {vocab}, context: {context}}}
nodes:
  lm:
    kind: transformer
    width: {width}
    heads: {heads}
    kv_heads: {kv_heads}
    layers: {layers}
    mlp_ratio: {mlp_ratio}
    activation: {activation}
    norm: {norm}
    position: {position}
    rope_theta: {rope_theta}
    dropout: {dropout}
    bias: {bias}
outputs:
  logits: {{from: lm, kind: lm_head, tie: true}}
"""


def load_data(path: Path, ir, context: int):
    """The corpus as `epicycle train` reads it (characters, the last 10% held out), in windows of
    `context` (shorter than the spec's in `--quick`)."""
    from compiler.tools.training.datasets import DataSource, load_training_data
    from compiler.tools.training.ports import Ports, ports_of

    ports = ports_of(ir)
    ports = Ports((dataclasses.replace(ports.inputs[0], context=context),), ports.targets)
    try:
        return load_training_data(DataSource(str(path)), ports, val_fraction=0.1)
    except compiler.SpecError as exc:
        raise SystemExit(exc.format()) from None


def batch(data, split: str, index: int, args, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = data.batch(split, index, args.batch, seed)
    return next(iter(inputs.values())), next(iter(targets.values()))


def schedule(optimizer, steps: int, lr: float):
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(args):
    """bf16 autocast on a GPU (as nanoGPT trains); full precision on the CPU."""
    cuda = args.device.startswith("cuda")
    return torch.autocast("cuda" if cuda else "cpu", torch.bfloat16, enabled=cuda)


def train(model, loss_of, data, args) -> float:
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95)
    )
    lr_schedule = schedule(optimizer, args.steps, args.lr)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = batch(data, "train", step, args, seed=0)
        with autocast(args):
            loss = loss_of(x.to(args.device), y.to(args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def validation_batches(data, args):
    return [batch(data, "val", -1 - i, args, seed=1) for i in range(args.eval_batches)]


def with_level_batch(text: str, mode: str) -> str:
    """The spec's text with its fractal's `level_batch` set to `mode`."""
    if mode not in ("shared", "split"):
        raise SystemExit(f"--level-batch takes shared and/or split, got `{mode}`")
    if re.search(r"^\s+level_batch:", text, flags=re.M):
        return re.sub(r"^(\s+level_batch:)\s*\w+", rf"\1 {mode}", text, count=1, flags=re.M)
    return re.sub(
        r"^(\s+)(kind: fractal)$", rf"\1\2\n\1level_batch: {mode}", text, count=1, flags=re.M
    )


def train_fractal(args, text: str, name: str, node, data, valid):
    """Train the fractal spec `text` on all levels at once; each sub-model's validation loss."""
    torch.manual_seed(0)
    model = compiler.build_model(compiler.load_spec_text(text), device=args.device)
    view = model.fractal(name)
    seconds = train(model, lambda x, y: view.loss(y, x)[0], data, args)
    model.eval()
    per_model = torch.zeros(node.levels, node.branching ** (node.levels - 1), dtype=torch.float64)
    with torch.no_grad(), autocast(args):
        for x, y in valid:
            logits = view.all_levels(x.to(args.device))["logits"]
            for level, lg in enumerate(logits):
                for j in range(lg.shape[-2]):
                    per_model[level, j] += F.cross_entropy(
                        lg[..., j, :].flatten(0, 1).float(), y.to(args.device).flatten()
                    ).item() / len(valid)
    return per_model, seconds, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "fractalformer.yaml")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a few steps on a short context")
    parser.add_argument(
        "--level-batch",
        default="shared",
        help="comma-separated `level_batch` settings to train the fractal with (shared, split)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "examples" / "results" / "fractal_shakespeare.json"
    )
    args = parser.parse_args()

    ir = compiler.analyze(args.spec)
    (name, node), *_ = [(n, v) for n, v in ir.spec.nodes.items() if v.kind == "fractal"]
    tokens_input = next(i for i in ir.spec.inputs.values() if i.kind == "tokens")
    args.context = tokens_input.context
    if args.quick:
        args.steps, args.batch, args.context, args.eval_batches = 6, 4, 32, 2
    data = load_data(args.data, ir, args.context)
    valid = validation_batches(data, args)

    results: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "levels": []}
    modes = [m.strip() for m in args.level_batch.split(",") if m.strip()]
    fractal_loss = {}
    for mode in modes:
        fractal_loss[mode], seconds, fractal_params = train_fractal(
            args, with_level_batch(args.spec.read_text(), mode), name, node, data, valid
        )
        print(
            f"fractal {args.spec.name} (level_batch: {mode}): {fractal_params:,} parameters, "
            f"{seconds:.1f} s for {args.steps} steps",
            flush=True,
        )
        results.setdefault("fractal", {})[mode] = {
            "parameters": fractal_params,
            "train_seconds": seconds,
        }

    settings = ir.graph.nodes[f"nodes.{name}"]["settings"]
    width = ir.graph.nodes[f"nodes.{name}"]["width"]
    for level in range(node.levels):
        k = node.branching**level
        spec_text = PLAIN_SPEC.format(
            width=width // k,
            vocab=tokens_input.vocab,
            context=tokens_input.context,
            heads=settings["heads"],
            kv_heads=settings["kv_heads"] or settings["heads"],
            layers=settings["layers"],
            mlp_ratio=settings["mlp_ratio"],
            activation=settings["activation"],
            norm=settings["norm"],
            position=settings["position"],
            rope_theta=settings["rope_theta"],
            dropout=settings["dropout"],
            bias=str(settings["bias"]).lower(),
        )
        torch.manual_seed(0)
        plain = compiler.build_model(compiler.load_spec_text(spec_text), device=args.device)
        seconds = train(
            plain,
            lambda x, y, m=plain: F.cross_entropy(
                m(x)["logits"].flatten(0, 1).float(), y.flatten()
            ),
            data,
            args,
        )
        plain.eval()
        with torch.no_grad(), autocast(args):
            plain_loss = sum(
                F.cross_entropy(
                    plain(x.to(args.device))["logits"].flatten(0, 1).float(),
                    y.to(args.device).flatten(),
                ).item()
                for x, y in valid
            ) / len(valid)
        row = {
            "level": level,
            "sub_models": k,
            "width": width // k,
            **{
                f"fractal_{mode}_{kind}": value
                for mode, per_model in fractal_loss.items()
                for kind, value in (
                    ("mean", float(per_model[level, :k].mean())),
                    ("best", float(per_model[level, :k].min())),
                    ("each", [float(v) for v in per_model[level, :k]]),
                )
            },
            "plain": plain_loss,
            "plain_parameters": sum(p.numel() for p in plain.parameters()),
            "plain_train_seconds": seconds,
        }
        results["levels"].append(row)

    print(
        f"\nvalidation loss (nats/char), {args.steps} steps of batch {args.batch} x {args.context}, device {args.device}"
    )
    fractal_columns = "".join(f" fractal, {m} (mean) | fractal, {m} (best) |" for m in modes)
    print(f"| level | sub-models | width |{fractal_columns} plain transformer | plain parameters |")
    print("|---|---|---|" + "---|---|" * len(modes) + "---|---|")
    for r in results["levels"]:
        cells = "".join(
            f" {r[f'fractal_{m}_mean']:.3f} | {r[f'fractal_{m}_best']:.3f} |" for m in modes
        )
        print(
            f"| {r['level']} | {r['sub_models']} | {r['width']} |{cells} {r['plain']:.3f} | "
            f"{r['plain_parameters']:,} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
