"""Does `feedback.lipschitz` keep a deep-equilibrium model's solves converging while it trains?

`specs/equilibrium.yaml` is a character model whose two transformers close a loop solved for its
fixed point (Bai, Kolter & Koltun 2019). This script trains it on Shakespeare twice with the same
seed, data and budget:

* `bounded`: as shipped, `lipschitz: 0.8`: the spectral norm of the loop's Jacobian at the fixed
  point is measured after every solve and kept at most 0.8 through a gain on what the delayed edge
  reads;
* `unbounded`: the same spec without `lipschitz`;
* `no_loop`: the same two transformers without the feedback edge (reader -> refiner only), to
  see what the loop adds.

Per logged step it records the forward solve's iterations and final relative change, the implicit
backward's, the measured Jacobian norm and the gain; at the end the validation loss, the share of
steps whose forward and backward solves reached the tolerance, the training throughput (the
bound's cost, side by side) and the Jacobian norm of each trained loop measured afresh on a
validation batch. It writes `equilibrium_bound.json` to `--out` (default `examples/results/`; the
shipped figures in `examples/figures/` are never overwritten unless `--out` names that folder).

    python examples/equilibrium_bound.py --device cuda          # 300 steps, batch 32 x 256
    python examples/equilibrium_bound.py --width 64 --context 64 --batch 16 --steps 200  # CPU
    python examples/equilibrium_bound.py --quick                # a smoke run on the CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "shakespeare.txt"))
    parser.add_argument(
        "--out",
        default=str(ROOT / "examples" / "results"),
        help="folder for equilibrium_bound.json (the shipped one, in examples/figures, is kept)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=128, help="the spec's width (128)")
    parser.add_argument("--context", type=int, default=256, help="the spec's context (256)")
    parser.add_argument("--quick", action="store_true", help="a few steps of a narrow model")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.width, args.context = 4, 4, 32, 32
    logging.getLogger("runtime.federation.executor").setLevel(
        logging.ERROR
    )  # counted below instead

    import torch

    from compiler.tools.checkpoint import load_checkpoint
    from compiler.tools.data import batch_at, load_corpus
    from compiler.tools.training import RunOptions, train

    shipped = (ROOT / "specs" / "equilibrium.yaml").read_text(encoding="utf-8")
    shipped = shipped.replace("width: 128", f"width: {args.width}")
    shipped = shipped.replace("context: 256", f"context: {args.context}")
    no_loop = re.sub(r"\n  - \{from: refiner, to: reader, kind: feedback.*", "", shipped)
    arms = {
        "bounded": shipped,
        "unbounded": re.sub(r", lipschitz: [0-9.]+", "", shipped),
        "no_loop": re.sub(r"\nfeedback: .*", "", no_loop),
    }
    assert "lipschitz" not in arms["unbounded"].split("feedback:")[1].split("\n")[0]
    assert "feedback" not in arms["no_loop"].split("spec: 1")[1]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, text in arms.items():
            spec = Path(scratch) / f"{name}.yaml"
            spec.write_text(text, encoding="utf-8")
            out = Path(scratch) / name
            records = train(
                spec,
                RunOptions(data=args.data, out=str(out), log_every=1, device=args.device),
                steps=args.steps,
                batch=args.batch,
                eval_every=args.steps,
            )
            if name == "no_loop":
                results[name] = {
                    "val_loss": records[-1]["val_loss"],
                    "tokens_per_s": statistics.median(
                        r["tokens_per_s"] for r in records[1:] or records
                    ),
                }
                continue
            solves = [r["equilibrium"] for r in records]
            tolerance = 1e-4
            model = load_checkpoint(out, device=args.device).eval()
            context = model.spec.inputs["tokens"].context
            corpus = load_corpus(args.data, context=context)
            x, _ = batch_at(corpus.val, -1, 8, context, 0, (0, 1))
            raw = model.feedback_lipschitz(x.to(args.device))
            if model.federation.plan.lipschitz is not None:  # the loop as trained, gain included,
                gain = float(model.federation.feedback_gain)  # and the same loop without the gain
                model.federation.feedback_gain.fill_(1.0)
                ungained = model.feedback_lipschitz(x.to(args.device))
            else:
                gain, ungained = 1.0, raw
            results[name] = {
                "val_loss": records[-1]["val_loss"],
                "tokens_per_s": statistics.median(
                    r["tokens_per_s"] for r in records[1:] or records
                ),
                "forward_converged": sum(s["residual"] < tolerance for s in solves) / len(solves),
                "backward_converged": sum(s["backward_residual"] < tolerance for s in solves)
                / len(solves),
                "forward_iterations_median": statistics.median(s["iterations"] for s in solves),
                "contraction_median": statistics.median(
                    [s["contraction"] for s in solves if s["contraction"] is not None] or [0.0]
                ),
                "backward_iterations_median": statistics.median(
                    s["backward_iterations"] for s in solves
                ),
                "final_gain": gain,
                "jacobian_norm_trained": raw,
                "jacobian_norm_without_gain": ungained,
                "per_step": solves,
            }
    rows = [
        ("validation loss", "val_loss", "{:.3f}"),
        ("tokens/s (median)", "tokens_per_s", "{:,.0f}"),
        ("forward solves converged", "forward_converged", "{:.0%}"),
        ("backward solves converged", "backward_converged", "{:.0%}"),
        ("forward iterations (median)", "forward_iterations_median", "{:g}"),
        ("backward iterations (median)", "backward_iterations_median", "{:g}"),
        ("contraction per iteration (median)", "contraction_median", "{:.3g}"),
        ("gain at the end", "final_gain", "{:.3g}"),
        ("||J|| at the fixed point, trained", "jacobian_norm_trained", "{:.3g}"),
        ("||J|| with the gain set to 1", "jacobian_norm_without_gain", "{:.3g}"),
    ]
    print(f"{'':36} " + " ".join(f"{a:>12}" for a in arms))
    for label, key, fmt in rows:
        cells = [fmt.format(results[a][key]) if key in results[a] else "-" for a in arms]
        print(f"{label:36} " + " ".join(f"{c:>12}" for c in cells))
    ratio = results["bounded"]["tokens_per_s"] / results["unbounded"]["tokens_per_s"]
    print(f"throughput bounded / unbounded: {ratio:.2f}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    target = Path(args.out) / "equilibrium_bound.json"
    target.write_text(
        json.dumps(
            {
                "device": device,
                "torch": torch.__version__,
                "steps": args.steps,
                "batch": args.batch,
                "width": args.width,
                "context": args.context,
                "throughput_ratio": ratio,
                "results": results,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
