"""Copy-reverse (the `lot` project's benchmark, design 002): does the lattice's phase term help?

A sequence is `half` random tokens, a delimiter, and the same tokens reversed; a model reads it
left to right and is scored on the reversed half. Exact match is the fraction of sequences whose
whole reversed half it predicts right (each token from the true tokens before it, as the `lot`
project scores; its version also counts the random first half, which nothing can predict, so we
leave that half out of both the score and the loss).

Per seed, the same spec is trained twice, with and without the lattice layout:

* `lattice`: a small transformer whose heads sit on a 2 x 2 lattice (4 Kuramoto substeps);
* `lattice, eval_substeps N`: the same weights, evaluated with N Kuramoto substeps
  (`oscillator.eval_substeps`; AKOrN reports that more test-time steps help);
* `lattice off`: the same weights with every phase-term gain set to 0 at evaluation
  (`runtime.attention.lattice.phase_term_off`): what the trained model owes to its phase term;
* `plain`: the same spec without the layout (RoPE either way). Its parameter count differs from
  the lattice's by exactly the lattice's own parameters, less the query/key rows its two phase
  dimensions per head take from the content (`parameter_difference`; tested).

    python examples/lattice_copy_reverse.py --out runs/copy_reverse     # a few minutes, 2 CPU cores
    python examples/lattice_copy_reverse.py --quick --out /tmp/cr       # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from runtime.attention.lattice import lattice_layers, phase_term_off  # noqa: E402

SHAPE, TOKEN_FREQUENCY = (2, 2), 0.1
LATTICE = f"""
    attention:
      kind: lattice
      lattice: {{{{shape: {list(SHAPE)}, boundary: periodic, neighbourhood: moore}}}}
      oscillator: {{{{coupling: 0.5, dt: 0.1, substeps: {{substeps}}{{eval_substeps}}}}}}
      token_frequency: {TOKEN_FREQUENCY}"""
SPEC = """
spec: 1
name: copy-reverse
seed: {seed}
inputs:
  tokens: {{kind: tokens, vocab: {vocab}, context: {context}}}
nodes:
  body:
    kind: transformer
    width: {width}
    heads: 4
    layers: {layers}{attention}
outputs:
  logits: {{from: body, kind: lm_head, tie: true}}
"""


def spec_text(args, seed: int, lattice: bool, eval_substeps: int | None = None) -> str:
    attention = ""
    if lattice:
        extra = f", eval_substeps: {eval_substeps}" if eval_substeps else ""
        attention = LATTICE.format(substeps=args.substeps, eval_substeps=extra)
    return SPEC.format(
        seed=seed,
        vocab=args.vocab + 1,  # the delimiter is token `vocab`
        context=2 * args.half + 1,
        width=args.width,
        layers=args.layers,
        attention=attention,
    )


def copy_reverse(batch: int, half: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """`(batch, 2 * half + 1)`: `x_0 .. x_{half-1}, delimiter, x_{half-1} .. x_0`."""
    prefix = torch.randint(0, vocab, (batch, half), generator=generator)
    delimiter = torch.full((batch, 1), vocab)
    return torch.cat((prefix, delimiter, prefix.flip(1)), 1)


def answer_logits(model, sequences: torch.Tensor, half: int) -> torch.Tensor:
    """The logits that predict the reversed half: those read at the delimiter and after it."""
    return model(sequences[:, :-1])["logits"][:, half:]


def train(model, args, seed: int, history: list | None = None) -> float:
    """AdamW with warm-up and cosine decay on the reversed half; with `history`, every
    `args.every` steps the lattice layers' report entries (`model.report()`, as `epicycle train`
    logs them, attention entropy included) are appended to it."""
    layers = [layer for _, layer in lattice_layers(model)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then a cosine decay
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        ),
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(args.steps + 1):
        recording = history is not None and (step % args.every == 0 or step == args.steps)
        for layer in layers:
            layer.record_entropy = recording
        sequences = copy_reverse(args.batch, args.half, args.vocab, generator)
        logits = answer_logits(model, sequences, args.half)
        loss = F.cross_entropy(logits.flatten(0, 1), sequences[:, args.half + 1 :].flatten())
        if recording:
            entry = model.report()["nodes"]["body"]["lattice"]
            lattice = {f"body.{layer}": values for layer, values in entry.items()}
            history.append({"step": step, "loss": float(loss.detach()), "lattice": lattice})
        if step == args.steps:  # the last pass only records
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return float(loss.detach())


@torch.no_grad()
def score(model, sequences: torch.Tensor, half: int) -> dict[str, float]:
    model.eval()
    predicted = answer_logits(model, sequences, half).argmax(-1)
    right = predicted == sequences[:, half + 1 :]
    return {
        "exact_match": float(right.all(1).float().mean()),
        "token_accuracy": float(right.float().mean()),
    }


def parameter_difference(lattice_model, plain_model) -> dict[str, int]:
    """Where the two counts differ: the lattice layers' own parameters (phases, frequencies,
    gains, coupling, range), and the query/key projection rows that its two phase dimensions
    per head take from the content (4 per head, each `width` wide, plus biases if any)."""
    own = sum(p.numel() for _, layer in lattice_layers(lattice_model) for p in layer.parameters())
    plain = sum(p.numel() for p in plain_model.parameters())
    lattice = sum(p.numel() for p in lattice_model.parameters())
    return {
        "lattice": lattice,
        "plain": plain,
        "lattice_own": own,
        "phase_rows": plain - lattice + own,
    }


def run_seed(args, seed: int, test: torch.Tensor, history: list | None) -> dict[str, dict]:
    results = {}
    torch.manual_seed(seed)
    lattice = compiler.build_model(compiler.load_spec_text(spec_text(args, seed, True)))
    torch.manual_seed(seed)
    plain = compiler.build_model(compiler.load_spec_text(spec_text(args, seed, False)))
    for name, model in (("lattice", lattice), ("plain", plain)):
        began = time.perf_counter()
        loss = train(model, args, seed, history if name == "lattice" else None)
        results[name] = {**score(model, test, args.half), "train_loss": loss}
        results[name]["train_s"] = time.perf_counter() - began
        results[name]["parameters"] = sum(p.numel() for p in model.parameters())
    with phase_term_off(lattice):
        results["lattice off"] = score(lattice, test, args.half)
    longer = compiler.build_model(
        compiler.load_spec_text(spec_text(args, seed, True, args.eval_substeps))
    )
    longer.load_state_dict(lattice.state_dict())
    results[f"lattice, eval_substeps {args.eval_substeps}"] = score(longer, test, args.half)
    return results


def draw_figures(history: list[dict], half: int, out: Path) -> list[Path]:
    """The phase-wave animation, the per-head histories and the delimiter wave (at the first and
    the last recorded step) of seed 0's lattice model, with `compiler.tools.viz.lattice`."""
    from compiler.tools.viz import lattice as viz

    histories = viz.head_histories(history, viz.layer_label)
    shapes = dict.fromkeys(histories, SHAPE)
    paths = [
        viz.animate_phases(histories, shapes, out / viz.ANIMATION_GIF, "copy-reverse"),
        viz.plot_head_histories(histories, out / viz.HEADS_PNG, "copy-reverse"),
    ]
    plt = viz._pyplot()
    fig, axes = plt.subplots(2, len(histories), figsize=(4.6 * len(histories), 6), squeeze=False)
    for row, record in enumerate((history[0], history[-1])):
        for col, (name, values) in enumerate(record["lattice"].items()):
            heads = values["heads"]
            waves = viz.phase_term_wave(
                heads["phase"],
                heads["frequency"],
                heads["strength"],
                TOKEN_FREQUENCY,
                half,
            )
            title = f"{viz.layer_label(name)}, step {record['step']}"
            viz.draw_delimiter_wave(axes[row][col], waves, half, title)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("copy-reverse: each head's phase term from the delimiter's query")
    fig.tight_layout()
    paths.append(viz._save(plt, fig, out / "delimiter_wave.png"))
    return paths


def summarise(per_seed: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    summary = {}
    for arm in per_seed[0]:
        for metric in ("exact_match", "token_accuracy"):
            values = [seed[arm][metric] for seed in per_seed]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary.setdefault(arm, {})[metric] = statistics.fmean(values)
            summary[arm][f"{metric}_std"] = spread
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--half", type=int, default=16, help="tokens before the delimiter")
    parser.add_argument("--vocab", type=int, default=32, help="content tokens (plus a delimiter)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--substeps", type=int, default=4, help="Kuramoto substeps in training")
    parser.add_argument("--eval-substeps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test", type=int, default=1000, help="held-out sequences")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (one is fastest for models this small)"
    )
    parser.add_argument("--every", type=int, default=10, help="record the lattice every N steps")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, required=True, help="folder for copy_reverse.json")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.steps, args.batch, args.test, args.every = 2, 3, 8, 32, 1
    torch.set_num_threads(args.threads)
    test = copy_reverse(args.test, args.half, args.vocab, torch.Generator().manual_seed(10**6))
    history: list[dict] = []  # seed 0's lattice model over training
    per_seed = [
        run_seed(args, seed, test, history if seed == 0 else None) for seed in range(args.seeds)
    ]
    summary = summarise(per_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()}
    payload = {"settings": settings, "per_seed": per_seed, "summary": summary}
    (args.out / "copy_reverse.json").write_text(json.dumps(payload, indent=2))
    with open(args.out / "lattice_history.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in history)
    figures = draw_figures(history, args.half, args.out)
    first = per_seed[0]
    print(
        f"{args.seeds} seeds, {args.steps} steps of batch {args.batch}, {args.half} tokens + "
        f"delimiter + {args.half} reversed, vocab {args.vocab}; lattice {first['lattice']['parameters']:,} "
        f"parameters, plain {first['plain']['parameters']:,}"
    )
    print("| model | exact match (mean ± std) | token accuracy |")
    print("|---|---|---|")
    for arm, values in summary.items():
        print(
            f"| {arm} | {values['exact_match']:.3f} ± {values['exact_match_std']:.3f} "
            f"| {values['token_accuracy']:.3f} ± {values['token_accuracy_std']:.3f} |"
        )
    print(f"wrote {args.out / 'copy_reverse.json'}, " + ", ".join(str(p) for p in figures))


if __name__ == "__main__":
    main()
