"""`epicycle train` end to end against a training loop written by hand over the same model (issue 20).

Two GPT-2-small-shaped specs (width 768, 12 layers, 12 heads, context 1024, batch 16, dropout 0,
`specs/gpt2_small.yaml` with another vocabulary): (a) 50,304 tokens, its data random text over
50,304 distinct code points (generated here, never downloaded), and (b) the character vocabulary
of the shipped Shakespeare sample (tests/fixtures). Both loops run in this process on the same
compiled model: bf16 autocast, fused AdamW, gradient clipping at 1.0, torch.compile. The hand loop
draws its batches on the GPU and computes `F.cross_entropy` over the whole batch's logits;
`epicycle train` (`compiler.tools.training.train`, called in-process) reads its text reader's
batches, pins and copies them, logs every 10 steps, and validates and checkpoints at the end.

Rows: tokens/s of the hand loop (measured before and after `epicycle train`, ratios against the
mean of the two), of `epicycle train`'s steps (its own `tokens_per_s`: logging
intervals after warm-up, its data reading included), and of `epicycle train` end to end (from the
end of the warm-up to its return: logging, one validation of 2 batches, one checkpoint with the
optimizer state and the loss curve included). The overhead row is the difference, in seconds and
as a share of the measured time (one evaluation per `--steps` steps: a real run's `eval_every`
is usually larger, so its share smaller). The warm-up ends with a validation and a checkpoint
too, so compiling the evaluation is not counted. MFU: (6 * matmul parameters + 6 * layers * context * width) FLOPs per
token (as overhead_vs_handwritten.py) against a matmul rate measured here in the same dtype.
Targets (GPU): train / hand >= 0.97, MFU >= 45%.

    python benchmarks/train_throughput.py                  # GPU: both vocabularies (~6 minutes)
    python benchmarks/train_throughput.py --quick          # CPU: tiny shapes, eager (a minute)
    python benchmarks/train_throughput.py --smoke          # the same, 2 steps a loop (CI)
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from common import ROOT, report

import compiler
from compiler.tools.training import RunOptions, train

FULL = {"width": 768, "heads": 12, "layers": 12, "context": 1024, "batch": 16}
TINY = {"width": 64, "heads": 4, "layers": 2, "context": 64, "batch": 4}
CHARACTERS = ROOT / "tests" / "fixtures" / "shakespeare_20k.txt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--smoke", action="store_true", help="--quick with 2 steps a loop (CI)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per loop")
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="torch.compile both loops (default: on CUDA only)",
    )  # fmt: skip
    parser.add_argument("--only", default="", help="run only the cases whose label has this")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.device == "auto":
        quick = args.quick or args.smoke
        args.device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    args.compile = args.device == "cuda" if args.compile is None else args.compile
    args.steps = args.steps or (50 if args.device == "cuda" else 2 if args.smoke else 6)
    args.warmup = args.warmup or (50 if args.device == "cuda" else 2 if args.smoke else 4)
    return args


def spec_text(vocab: int, shape: dict, steps: int, eval_every: int) -> str:
    """specs/gpt2_small.yaml with this vocabulary and shape, dropout off, and a `train:` section
    that validates and checkpoints at the end of the warm-up (so the compiled evaluation is in
    place before measuring) and at the end."""
    text = (ROOT / "specs" / "gpt2_small.yaml").read_text(encoding="utf-8")
    for old, new in [
        ("vocab: 50257", f"vocab: {vocab}"),
        ("context: 1024", f"context: {shape['context']}"),
        ("width: 768", f"width: {shape['width']}"),
        ("heads: 12", f"heads: {shape['heads']}"),
        ("layers: 12", f"layers: {shape['layers']}"),
        ("dropout: 0.1", "dropout: 0.0"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    return text + (
        f"train:\n  optimizer: {{kind: adamw, lr: 6.0e-4}}\n  steps: {steps}\n"
        f"  batch: {shape['batch']}\n  eval_every: {eval_every}\n  grad_clip: 1.0\n"
    )


def random_text(vocab: int, characters: int, path: Path) -> Path:
    """Text over exactly `vocab` distinct code points (from U+4E00, skipping surrogates), every
    one present, so the character reader's vocabulary has `vocab` entries."""
    points = [p for p in range(0x4E00, 0x4E00 + vocab + 0x800) if not 0xD800 <= p < 0xE000][:vocab]
    rng = random.Random(0)
    body = points + rng.choices(points, k=characters - vocab)
    path.write_text("".join(map(chr, body)), encoding="utf-8")
    return path


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    """Measured matmul FLOP/s of square `dtype` matrices."""
    n = 8192 if device == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    repeats = 20 if device == "cuda" else 5
    begin = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - begin)


def flops_per_token(model: torch.nn.Module, shape: dict) -> int:
    matmul = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "positions" not in n
    )
    return 6 * matmul + 6 * shape["layers"] * shape["context"] * shape["width"]


def hand_loop(spec: Path, vocab: int, shape: dict, args: argparse.Namespace) -> Callable[[], float]:
    """A loop written by hand over the compiled spec model (nanoGPT's train.py): a function that
    warms up, then returns the tokens/s of `args.steps` steps. It is measured before and after
    `epicycle train`, so a drift of the GPU's clocks between the two shows and averages out."""
    device, cuda = args.device, args.device == "cuda"
    model = compiler.build_model(spec, device=device).train()
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda
    )
    batch, context = shape["batch"], shape["context"]
    ids = torch.randint(0, vocab, (1 << 20,), device=device)
    offsets = torch.arange(context + 1, device=device)

    def step() -> None:
        starts = torch.randint(0, len(ids) - context - 1, (batch, 1), device=device)
        rows = ids[starts + offsets]
        x, y = rows[:, :-1], rows[:, 1:]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            logits = step_model(x)["logits"]
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def measure() -> float:
        for _ in range(args.warmup):
            step()
        _sync(device)
        begin = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        return args.steps * batch * context / (time.perf_counter() - begin)

    return measure


def trainer(spec: Path, data: Path, shape: dict, args: argparse.Namespace, out: Path) -> dict:
    """`epicycle train`'s tokens/s over its steps, and end to end from the first measured step."""
    log_every = 10 if args.device == "cuda" else 2
    marks: dict[int, float] = {}
    options = RunOptions(
        data=str(data), out=str(out), log_every=log_every, eval_batches=2, device=args.device,
        compile=args.compile, tensorboard=False,
    )  # fmt: skip
    records = train(
        spec, options, on_record=lambda r: marks.__setitem__(r["step"], time.perf_counter())
    )
    done = time.perf_counter()
    measured = [r for r in records if r["step"] > args.warmup]
    first = max(step for step in marks if step <= args.warmup)  # where the measured part starts
    tokens = (records[-1]["step"] - first) * shape["batch"] * shape["context"]
    steps_rate = statistics.median(r["tokens_per_s"] for r in measured)
    return {
        "steps": steps_rate,
        "end_to_end": tokens / (done - marks[first]),
        "overhead_s": (done - marks[first]) - tokens / steps_rate,
        "final_loss": records[-1]["loss"],
        "precision": records[-1]["precision"],
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    args = parse_args()
    shape = TINY if args.device == "cpu" else FULL
    if args.device == "cpu":
        print("CPU mode: tiny shapes, fp32; GPU rows need CUDA (run without --quick on a GPU)")
    assert (args.warmup // (10 if args.device == "cuda" else 2)) >= 1, "warm up one log interval"
    steps = args.warmup + args.steps
    rows, summary = [], {"shape": shape, "compiled": args.compile, "steps": args.steps}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    rate = matmul_rate(args.device, dtype)
    summary[f"measured_{'bf16' if args.device == 'cuda' else 'fp32'}_matmul_TFLOPs"] = rate / 1e12
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        text = CHARACTERS.read_text(encoding="utf-8")
        cases = {
            "vocab 50304": (50304, random_text(50304, 400_000, scratch / "tokens.txt")),
            f"characters ({len(set(text))})": (len(set(text)), CHARACTERS),
        }
        for label, (vocab, data) in cases.items():
            if args.only not in label:
                continue
            spec = scratch / f"{label.split()[0]}.yaml"
            spec.write_text(spec_text(vocab, shape, steps, args.warmup), encoding="utf-8")
            per_token = flops_per_token(compiler.build_model(spec, device="meta", budget=0), shape)
            torch._dynamo.reset()
            measure_hand = hand_loop(spec, vocab, shape, args)
            before = measure_hand()
            ours = trainer(spec, data, shape, args, scratch / f"run-{vocab}")
            after = measure_hand()
            hand = (before + after) / 2
            torch._dynamo.reset()
            for loop, tokens_per_s in [
                ("hand-written loop, before", before),
                ("hand-written loop, after", after),
                ("hand-written loop (mean)", hand),
                ("epicycle train (steps)", ours["steps"]),
                ("epicycle train (end to end)", ours["end_to_end"]),
            ]:
                rows.append(
                    {
                        "case": label,
                        "loop": loop,
                        "tokens_per_s": tokens_per_s,
                        "over_hand": tokens_per_s / hand,
                        "MFU": per_token * tokens_per_s / rate,
                    }
                )
            rows.append(
                {
                    "case": label,
                    "loop": "trainer overhead (logging, evaluation, checkpoint, loss curve)",
                    "overhead_s": ours["overhead_s"],
                    "share_of_time": 1 - ours["end_to_end"] / ours["steps"],
                }
            )
            summary[f"{label}: train_over_hand"] = ours["steps"] / hand
            summary[f"{label}: MFU"] = per_token * ours["steps"] / rate
            summary[f"{label}: precision"] = ours["precision"]
    if args.device == "cuda":
        ratios = [v for k, v in summary.items() if k.endswith("train_over_hand")]
        mfus = [v for k, v in summary.items() if k.endswith(": MFU")]
        summary["target"] = "train / hand >= 0.97, MFU >= 0.45"
        summary["target_met"] = all(r >= 0.97 for r in ratios) and all(m >= 0.45 for m in mfus)
    args.smoke = args.device == "cpu"
    report("train_throughput", args, rows, summary)


if __name__ == "__main__":
    main()
