"""How the Lattice Oscillator Transformer's phases behave on the design's three research datasets.

Design 002 (docs/designs.md) proposes watching the order parameter `r` while a lattice transformer
learns (a) periodic patterns, (b) hierarchical patterns and (c) a random baseline. This script
trains the same small lattice model (16 heads on a 4 x 4 periodic lattice per layer) on each, as
next-token prediction, records `r` per layer, the coupling force and the attention entropy as it
trains, and writes:

* `lattice_sync.png`: the order parameter of every layer over training, one panel per dataset;
* `lattice_phases.png`: each dataset's final phase field, one arrow per head on its lattice cell
  (direction = phase), coloured by phase;
* `lattice_phases_DATASET.gif`: each dataset's phase field over training, every layer, one frame
  per recorded step (the phase wave of `epicycle viz --lattice`);
* `lattice_heads_DATASET.png`: per-head histories of phase, coupling force and attention entropy;
* `lattice_oscillators.json`: every recorded metric.

    pip install -e '.[examples]'
    python examples/lattice_oscillators.py               # about a minute on 2 CPU cores
    python examples/lattice_oscillators.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from compiler.tools.viz.lattice import layer_label  # noqa: E402
from runtime.attention.lattice import lattice_layers, lattice_metrics, lattice_regularisation  # noqa: E402

VOCAB = 16
SPEC = """
spec: 1
name: lattice-experiment
seed: 0
inputs:
  tokens: {{kind: tokens, vocab: {vocab}, context: {context}}}
nodes:
  body:
    kind: transformer
    width: 128
    heads: 16
    layers: 2
    attention:
      kind: lattice
      lattice: {{shape: [4, 4], boundary: periodic, neighbourhood: moore}}
      oscillator: {{coupling: 0.5, dt: 0.1, substeps: 4}}
      training:
        phase: {{weight: 0.01, target: synchrony, schedule: warmup, steps: {steps}}}
        coherence: {{weight: 0.01}}
outputs:
  logits: {{from: body, kind: lm_head, tie: true}}
"""


def periodic(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Each sequence repeats a random motif of period 3 to 8."""
    rows = []
    for _ in range(batch):
        period = int(torch.randint(3, 9, (1,), generator=generator))
        motif = torch.randint(0, VOCAB, (period,), generator=generator)
        rows.append(motif.repeat(tokens // period + 1)[:tokens])
    return torch.stack(rows)


def hierarchical(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """Two nested periods: phrases of 4 tokens drawn from 2 to 3 phrase types, the phrase types
    themselves following a repeating higher-level pattern (AAB, ABAC, ...)."""
    rows = []
    for _ in range(batch):
        types = torch.randint(0, VOCAB, (3, 4), generator=generator)
        outer = torch.randint(
            0, 3, (int(torch.randint(2, 5, (1,), generator=generator)),), generator=generator
        )
        phrases = types[outer.repeat(tokens // (4 * len(outer)) + 1)]
        rows.append(phrases.flatten()[:tokens])
    return torch.stack(rows)


def random_tokens(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=generator)


DATASETS = {"periodic": periodic, "hierarchical": hierarchical, "random": random_tokens}


def run(name: str, args) -> dict:
    generator = torch.Generator().manual_seed(0)
    model = compiler.build_model(
        compiler.load_spec_text(SPEC.format(vocab=VOCAB, context=args.tokens, steps=args.steps))
    )
    layers = lattice_layers(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    history = []
    for step in range(args.steps + 1):
        batch = DATASETS[name](args.batch, args.tokens + 1, generator)
        record = step % args.every == 0
        for _, layer in layers:
            layer.record_entropy = record
        logits = model(batch[:, :-1])["logits"]
        task = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss = task + lattice_regularisation(model, step)
        if record:
            layers_now = {layer_label(n, model): v for n, v in lattice_metrics(model).items()}
            history.append({"step": step, "loss": task.item(), "layers": layers_now})
        if step == args.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    phases = {layer_label(n, model): layer.phases()[0].detach().tolist() for n, layer in layers}
    return {"history": history, "final_phases": phases}


def plot(results: dict, out: Path) -> list[Path]:
    """The two figures, panel by panel, with the drawing functions `epicycle viz --lattice` uses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compiler.tools.viz.lattice import (
        animate_phases,
        draw_order_parameter,
        draw_phase_field,
        head_histories,
        plot_head_histories,
    )

    paths = []
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.4), sharey=True)
    for ax, (name, result) in zip(axes, results.items(), strict=True):
        steps = [h["step"] for h in result["history"]]
        series = {
            layer_label(layer): (
                steps,
                [h["layers"][layer]["order_parameter"] for h in result["history"]],
            )
            for layer in result["history"][0]["layers"]
        }
        draw_order_parameter(ax, series)
        ax.set_title(name)
    fig.tight_layout()
    paths.append(out / "lattice_sync.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    layer_names = list(next(iter(results.values()))["final_phases"])
    fig, axes = plt.subplots(
        len(layer_names),
        len(results),
        figsize=(3.2 * len(results), 3.2 * len(layer_names)),
        squeeze=False,
    )
    for col, (name, result) in enumerate(results.items()):
        for row, layer in enumerate(layer_names):
            r = result["history"][-1]["layers"][layer]["order_parameter"]
            draw_phase_field(
                axes[row][col],
                (4, 4),
                result["final_phases"][layer],
                f"{name}, layer {row}: r={r:.2f}",
            )
    fig.tight_layout()
    paths.append(out / "lattice_phases.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    for name, result in results.items():
        records = [{"step": h["step"], "lattice": h["layers"]} for h in result["history"]]
        histories = head_histories(records)
        shapes = dict.fromkeys(histories, (4, 4))
        paths.append(animate_phases(histories, shapes, out / f"lattice_phases_{name}.gif", name))
        paths.append(plot_head_histories(histories, out / f"lattice_heads_{name}.png", name))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=20, help="record metrics every N steps")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "results")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.tokens, args.every = 4, 2, 16, 2
    torch.manual_seed(0)
    results = {name: run(name, args) for name in DATASETS}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lattice_oscillators.json").write_text(
        json.dumps(
            {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2
        )
    )
    paths = plot(results, args.out)
    print(f"{args.steps} steps of batch {args.batch} x {args.tokens} tokens")
    print(
        "| dataset | final loss | r layer 0 (start -> end) | r layer 1 (start -> end) | attention entropy (end) |"
    )
    print("|---|---|---|---|---|")
    for name, result in results.items():
        first, last = result["history"][0], result["history"][-1]
        cells = []
        for layer in last["layers"]:
            cells.append(
                f"{first['layers'][layer]['order_parameter']:.2f} -> {last['layers'][layer]['order_parameter']:.2f}"
            )
        entropy = sum(v.get("attention_entropy", 0) for v in last["layers"].values()) / len(
            last["layers"]
        )
        print(f"| {name} | {last['loss']:.3f} | {' | '.join(cells)} | {entropy:.2f} |")
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
