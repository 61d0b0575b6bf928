"""Does the geolip companion's spectral alpha engage only when tokens are correlated?

Design 004 (docs/designs.md) claims its spectral-alpha attention is *demand driven*:
per-mode alpha starts near 0.024 and stays there on independent tokens (each token is solved on
its own) but rises (0.024 -> 0.031 in the model card) on correlated image patches, where
coordination across tokens helps. This script trains `runtime.companion.GeoCompanion` with the
design's shape (32 rows on S^3, lens 4 -> 16, 4 heads, alpha in [0, 0.2]) on

* `independent`: i.i.d. standard-normal 192-d feature vectors, 64 tokens a sequence;
* `correlated`: the 64 patches (8 x 8 x 3 = 192-d) of smooth random 64 x 64 images (bicubic
  upsampling of 8 x 8 noise plus a little pixel noise), so the tokens of a sequence share the
  image's structure;
* `shuffled_patches`: the same patches re-sequenced so no two tokens of a sequence come from the
  same image: the correlated data's per-token distribution with the correlation removed, which
  separates "harder/easier tokens" from "tokens that share structure".

For each it records, at the start and end, the reconstruction cosine, the frame deviation
(mean over tokens, signed, against the 0.02 * sqrt(4) = 0.04 envelope) and the fraction of
frames in the envelope, the mean alpha (and every mode's), and three probes of what the attention
does once trained:

* `context_benefit`: validation loss with every token moved among tokens of other images minus the
  loss in its own sequence (the same tokens, only the context changes); > 0 means the companion
  uses cross-token structure;
* `alpha_off_increase`: loss with every alpha forced to 0 minus the loss as trained;
* `gate_token_std` / `gate_abs_mean`: spread across tokens and mean magnitude of the tanh gate; a
  gate that is the same for every token is a learned constant gain, not coordination.

It writes `geolip_companion.json` (all figures) and `geolip_companion_alpha.png` (mean alpha over
training, with the range over modes, one line per dataset) to `--out`.

    python examples/geolip_companion.py            # about a minute on 2 CPU cores
    python examples/geolip_companion.py --quick    # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.companion import CompanionConfig, GeoCompanion  # noqa: E402

IMAGE, COARSE, PATCH, PIXEL_NOISE = 64, 8, 8, 0.1
TOKENS = (IMAGE // PATCH) ** 2  # 64 patches an image
WIDTH = 3 * PATCH * PATCH  # 192
DATASETS = ("independent", "correlated", "shuffled_patches")


def image_patches(images: int, generator: torch.Generator) -> torch.Tensor:
    """(images, TOKENS, WIDTH) patches of smooth random images, scaled to unit variance."""
    coarse = torch.randn(images, 3, COARSE, COARSE, generator=generator)
    pictures = F.interpolate(coarse, size=(IMAGE, IMAGE), mode="bicubic", align_corners=False)
    pictures = pictures + PIXEL_NOISE * torch.randn(pictures.shape, generator=generator)
    grid = IMAGE // PATCH
    patches = pictures.reshape(images, 3, grid, PATCH, grid, PATCH).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(images, TOKENS, WIDTH)
    return patches / patches.std()


def resequence(patches: torch.Tensor, sequences: int) -> torch.Tensor:
    """Sequence b's token t is patch t of image (t + b) mod images: every token of a sequence comes
    from a different (independent) image. With `sequences == images` it is a permutation of the
    tokens, each kept at its position."""
    images = patches.shape[0]
    t = torch.arange(TOKENS)
    b = torch.arange(sequences).unsqueeze(1)
    return patches[(t + b) % images, t]


def batch_of(dataset: str, sequences: int, generator: torch.Generator) -> torch.Tensor:
    if dataset == "independent":
        return torch.randn(sequences, TOKENS, WIDTH, generator=generator)
    if dataset == "correlated":
        return image_patches(sequences, generator)
    if dataset == "shuffled_patches":
        return resequence(image_patches(TOKENS, generator), sequences)
    raise ValueError(f"unknown dataset {dataset!r}")


@torch.no_grad()
def probes(model: GeoCompanion, features: torch.Tensor) -> dict:
    """What the trained attention does (see the module docstring)."""
    output = model(features)
    loss = float(model.loss(features, output))
    foreign = resequence(features, features.shape[0])
    foreign_loss = float(model.loss(foreign, model(foreign)))
    saved = [layer.alpha_logits.clone() for layer in model.attention]
    for layer in model.attention:
        layer.alpha_logits.fill_(-float("inf"))
    off_loss = float(model.loss(features, model(features)))
    for layer, logits in zip(model.attention, saved, strict=True):
        layer.alpha_logits.copy_(logits)
    gate = model.attention[0].gate(output.spectrum)
    spectrum = output.spectrum
    return {
        "loss": loss,
        "context_benefit": foreign_loss - loss,
        "alpha_off_increase": off_loss - loss,
        "gate_abs_mean": float(gate.mean(dim=(0, 1)).abs().mean()),
        "gate_token_std": float(gate.std(dim=1).mean()),
        "spectrum_token_cv": float((spectrum.std(dim=1) / spectrum.mean(dim=1)).mean()),
    }


def train(dataset: str, steps: int, sequences: int, validation: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    model = GeoCompanion(CompanionConfig(input_width=WIDTH, hidden=128))
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    held_out = batch_of(dataset, validation, torch.Generator().manual_seed(seed + 1000))
    start = model.summary(held_out)
    every = max(1, steps // 100)
    history = {"step": [], "alpha_mean": [], "alpha_min": [], "alpha_max": [], "loss": []}
    began = time.perf_counter()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            alpha = model.mean_alpha_per_mode().detach()
            history["step"].append(step)
            history["alpha_mean"].append(float(alpha.mean()))
            history["alpha_min"].append(float(alpha.min()))
            history["alpha_max"].append(float(alpha.max()))
        if step == steps:
            break
        features = batch_of(dataset, sequences, generator)
        loss = model.loss(features, model(features))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % every == 0:
            history["loss"].append(float(loss.detach()))
    seconds = time.perf_counter() - began
    end = model.summary(held_out)
    return {
        "start": start,
        "end": end,
        "probes": probes(model, held_out),
        "alpha_rise": end["mean_alpha"] - start["mean_alpha"],
        "train_seconds": seconds,
        "history": history,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, result in results.items():
        h = result["history"]
        (line,) = ax.plot(h["step"], h["alpha_mean"], label=f"{name} (mean over modes)")
        ax.fill_between(
            h["step"], h["alpha_min"], h["alpha_max"], color=line.get_color(), alpha=0.15
        )
    first = next(iter(results.values()))
    ax.axhline(first["start"]["mean_alpha"], color="grey", lw=0.8, ls="--", label="alpha_init")
    ax.set_xlabel("training step")
    ax.set_ylabel("spectral alpha (band: min to max over modes)")
    ax.set_title("geolip companion: spectral alpha over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few steps (smoke run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps a dataset")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "examples" / "results" / "geolip_companion"
    )
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (20 if args.quick else 1000)
    sequences, validation = (4, 8) if args.quick else (8, 64)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    results = {
        name: train(name, steps, sequences, validation, args.lr, args.seed) for name in DATASETS
    }
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {
        "steps": steps,
        "sequences_per_step": sequences,
        "validation_sequences": validation,
        "tokens": TOKENS,
        "width": WIDTH,
        "lr": args.lr,
        "seed": args.seed,
        "config": vars(CompanionConfig(input_width=WIDTH, hidden=128)),
    }
    (args.out / "geolip_companion.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2)
    )
    plot(results, args.out / "geolip_companion_alpha.png")

    header = f"{'dataset':17} {'cos start->end':>16} {'deviation':>10} {'in env':>7} "
    header += f"{'alpha start->end':>18} {'context':>9} {'alpha off':>9} {'gate std':>9}"
    print(header)
    for name, r in results.items():
        s, e, p = r["start"], r["end"], r["probes"]
        print(
            f"{name:17} {s['reconstruction_cosine']:7.3f}->{e['reconstruction_cosine']:7.3f} "
            f"{e['frame_deviation']:+10.4f} {e['in_envelope_fraction']:7.2f} "
            f"{s['mean_alpha']:8.4f}->{e['mean_alpha']:8.4f} {p['context_benefit']:+9.2e} "
            f"{p['alpha_off_increase']:+9.2e} {p['gate_token_std']:9.2e}"
        )
    return results


if __name__ == "__main__":
    main()
