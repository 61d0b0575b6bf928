"""Predict the sky with the gear federation of docs/designs.md, design 000, against baselines.

Data: geocentric apparent ecliptic longitudes of the Sun, Moon, Mercury, Venus, Mars, Jupiter and
Saturn from the `ephem` package, every 5 days. Each token is a date; the 4 input features encode the
calendar only (a linear time coordinate, the phase of the year as sin/cos, the phase of the 19-year
Metonic cycle), so no astronomy is given away. Targets are (sin, cos) of the 7 longitudes. Models
see windows of 64 consecutive dates; training uses the years -200..1799, validation 1800..1899 and
the test the held-out years 1900..1999.

Three models with the same budget (steps, batch, AdamW, learning rate) and about the same number of
parameters: the federation compiled from `specs/antikythera.yaml` (39 gears, each a small
transformer whose heads turn at the gear's velocity), one plain transformer compiled from a spec,
and a per-date MLP. The metric is the mean angular error in degrees per body on the test years.

    pip install ephem
    python examples/antikythera_sky.py                 # about 10 minutes on 2 CPU cores
    python examples/antikythera_sky.py --quick         # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402

BODIES = ("Sun", "Moon", "Mercury", "Venus", "Mars", "Jupiter", "Saturn")
STEP_DAYS = 5
WINDOW = 64
EPOCH_YEAR = 900.0  # centre of the linear time coordinate
HALF_SPAN = 1100.0

PLAIN_SPEC = """
spec: 1
name: plain-transformer
seed: 0
inputs:
  date: {{kind: features, width: 4, context: {window}}}
nodes:
  body: {{kind: transformer, width: {width}, heads: 4, layers: {layers}}}
outputs:
  longitude: {{from: body, kind: regression, width: 14}}
"""


def ephemeris(first_year: int, last_year: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Years (fractional, Julian) and longitudes in radians `(dates, 7)`, cached as .npz."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"sky_{first_year}_{last_year}_{STEP_DAYS}d.npz"
    if path.exists():
        data = np.load(path)
        return data["years"], data["longitudes"]
    import ephem

    start, end = ephem.Date(f"{first_year}/1/1"), ephem.Date(f"{last_year + 1}/1/1")
    dates = np.arange(float(start), float(end), STEP_DAYS)
    bodies = [getattr(ephem, name)() for name in BODIES]
    longitudes = np.empty((len(dates), len(BODIES)), dtype=np.float64)
    for i, date in enumerate(dates):
        for j, body in enumerate(bodies):
            body.compute(ephem.Date(date))
            longitudes[i, j] = float(ephem.Ecliptic(body).lon)
    years = 2000.0 + (dates - float(ephem.Date("2000/1/1"))) / 365.25
    np.savez(path, years=years, longitudes=longitudes)
    return years, longitudes


def features(years: np.ndarray) -> np.ndarray:
    phase = 2 * math.pi * years
    return np.stack(
        [(years - EPOCH_YEAR) / HALF_SPAN, np.sin(phase), np.cos(phase), (years % 19.0) / 19.0],
        axis=-1,
    ).astype(np.float32)


def targets(longitudes: np.ndarray) -> np.ndarray:
    return np.concatenate([np.sin(longitudes), np.cos(longitudes)], axis=-1).astype(np.float32)


def windows(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(x) // WINDOW
    shape = (count, WINDOW)
    return (
        torch.from_numpy(x[: count * WINDOW].reshape(*shape, -1)),
        torch.from_numpy(y[: count * WINDOW].reshape(*shape, -1)),
    )


def angular_error_degrees(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per body: mean |angle(pred) - angle(truth)| wrapped to [0, 180] degrees."""
    n = len(BODIES)
    predicted = torch.atan2(pred[..., :n], pred[..., n:])
    actual = torch.atan2(truth[..., :n], truth[..., n:])
    diff = torch.remainder(predicted - actual + math.pi, 2 * math.pi) - math.pi
    return diff.abs().rad2deg().reshape(-1, n).mean(0)


class PerDateMLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 14),
        )

    def forward(self, date: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"longitude": self.net(date)}


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(spec_path: Path, device: str) -> dict[str, nn.Module]:
    gears = compiler.build_model(spec_path, device=device)
    target = parameters(gears)
    # a plain transformer and an MLP sized to the gear federation's parameter count
    best = min(
        ((w, layers) for w in range(32, 257, 8) for layers in (1, 2, 3, 4)),
        key=lambda c: (
            abs(
                compiler.analyze(
                    compiler.load_spec_text(
                        PLAIN_SPEC.format(window=WINDOW, width=c[0], layers=c[1])
                    )
                ).facts.parameters
                - target
            )
            if c[0] % 4 == 0
            else float("inf")
        ),
    )
    plain = compiler.build_model(
        compiler.load_spec_text(PLAIN_SPEC.format(window=WINDOW, width=best[0], layers=best[1])),
        device=device,
    )
    hidden = int(
        (-(4 + 14 + 2) + math.sqrt((4 + 14 + 2) ** 2 + 4 * target)) / 2
    )  # h^2 + 20h ~ target
    torch.manual_seed(0)
    mlp = PerDateMLP(hidden).to(device)
    return {"gear federation (antikythera.yaml)": gears, "plain transformer": plain, "MLP": mlp}


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float
) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    model.train()
    losses = []
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        prediction = model(date=x[index])["longitude"]
        loss = torch.nn.functional.mse_loss(prediction, y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.eval()
    predictions = torch.cat([model(date=x[i : i + 64])["longitude"] for i in range(0, len(x), 64)])
    return angular_error_degrees(predictions, y)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "antikythera.yaml")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on a few centuries (smoke run)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "examples" / "results" / "antikythera_sky.json"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    first, split_val, split_test, last = (
        (1500, 1900, 1950, 1999) if args.quick else (-200, 1800, 1900, 1999)
    )
    steps = 5 if args.quick else args.steps

    years, longitudes = ephemeris(first, last, ROOT / "examples" / ".cache")
    x, y = features(years), targets(longitudes)
    parts = {
        "train": years < split_val,
        "validation": (years >= split_val) & (years < split_test),
        "test": years >= split_test,
    }
    data = {
        name: [t.to(args.device) for t in windows(x[mask], y[mask])] for name, mask in parts.items()
    }

    results = {}
    for name, model in build_models(args.spec, args.device).items():
        start = time.perf_counter()
        losses = train(model, *data["train"], steps, args.batch, args.lr)
        seconds = time.perf_counter() - start
        errors = evaluate(model, *data["test"])
        results[name] = {
            "parameters": parameters(model),
            "train_seconds": seconds,
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
            "validation_mean_error_deg": float(evaluate(model, *data["validation"]).mean()),
            "test_error_deg": dict(zip(BODIES, map(float, errors), strict=True)),
            "test_mean_error_deg": float(errors.mean()),
        }
        print(
            f"{name}: {parameters(model):,} parameters, {seconds:.0f} s, test mean error {errors.mean():.1f} deg",
            flush=True,
        )

    header = "| model | parameters | " + " | ".join(BODIES) + " | mean |"
    lines = [header, "|" + "---|" * (len(BODIES) + 3)]
    for name, r in results.items():
        cells = " | ".join(f"{r['test_error_deg'][b]:.1f}" for b in BODIES)
        lines.append(f"| {name} | {r['parameters']:,} | {cells} | {r['test_mean_error_deg']:.1f} |")
    table = "\n".join(lines)
    print("\nmean angular error (degrees) on the held-out years\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items()} | {
        "years": [first, split_val, split_test, last],
        "steps": steps,
    }
    args.out.write_text(
        json.dumps({"settings": settings, "results": results, "table": table}, indent=2)
    )


if __name__ == "__main__":
    main()
