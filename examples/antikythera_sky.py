"""Predict the sky with the gear federation of docs/designs.md, design 000, against baselines.

Data: geocentric apparent ecliptic longitudes of the Sun, Moon, Mercury, Venus, Mars, Jupiter and
Saturn from the `ephem` package, every 5 days. Each token is a date; the 4 input features encode the
calendar only (a linear time coordinate, the phase of the year as sin/cos, the phase of the 19-year
Metonic cycle), so no astronomy is given away. Targets are (sin, cos) of the 7 longitudes. Training
uses the years -200..1799, validation 1800..1899 and the test the held-out years 1900..1999, each
cut into sequences of 256 consecutive dates (so all four models see exactly the same dates).

Four models with the same budget (optimizer steps, batch, dates per example and step, AdamW,
learning rate and schedule) and about the same number of parameters:
- the federation compiled from `specs/antikythera.yaml` (39 gears, each a small transformer whose
  heads turn at the gear's velocity) on windows of 64 dates;
- the same mechanism made recurrent, `specs/antikythera_recurrent.yaml`: a time axis over runs of
  16 dates, the state (the dials' delayed edges and the predicted longitudes fed back) carried
  from one run to the next. It trains by truncated backpropagation through time: a batch of
  sequences of 16 steps is cut into chunks of 4 steps (64 dates, a window's worth); each chunk is
  one optimizer step, `model.scan` runs it from the state the previous chunk left, and the state
  is detached and carried on (the trainer's own `tbptt.Chunks` does the cutting);
- one plain transformer compiled from a spec, and a per-date MLP.
The metric is the mean angular error in degrees per body on the test years; the recurrent model
reads each test sequence from a fresh state, as in training (and, in the JSON, the whole century
streamed from one state).

    pip install ephem
    python examples/antikythera_sky.py                 # about 20 minutes on 2 shared CPU cores
    python examples/antikythera_sky.py --quick         # a smoke run (seconds)

It writes `examples/results/antikythera_sky.json` (`--quick`: `antikythera_sky_quick.json`); the
measured run the README quotes is `examples/figures/antikythera_sky.json`, written only when
`--out` names it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import compiler  # noqa: E402
from compiler.tools.training.tbptt import Chunks  # noqa: E402

BODIES = ("Sun", "Moon", "Mercury", "Venus", "Mars", "Jupiter", "Saturn")
STEP_DAYS = 5
WINDOW = 64  # dates a non-recurrent model reads at once, and a recurrent one per chunk
SEQUENCE = 256  # dates of one recurrent training sequence (16 steps of 16 dates: 4 chunks)
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
    try:
        import ephem
    except ImportError:
        raise SystemExit("the sky example needs `ephem` for its data: pip install ephem") from None

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


def trimmed(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole sequences only, so windows and sequences cover the same dates."""
    count = len(x) // SEQUENCE * SEQUENCE
    return x[:count], y[:count]


def windows(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """`(windows, WINDOW, width)`: consecutive dates, what the non-recurrent models read."""
    return (
        torch.from_numpy(x.reshape(-1, WINDOW, x.shape[-1])),
        torch.from_numpy(y.reshape(-1, WINDOW, y.shape[-1])),
    )


def sequences(x: np.ndarray, y: np.ndarray, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sequences, time, tokens, width)`: a time step reads `tokens` consecutive dates, the next
    step the next ones (the layout a spec with `time:` reads)."""
    steps = SEQUENCE // tokens
    return (
        torch.from_numpy(x.reshape(-1, steps, tokens, x.shape[-1])),
        torch.from_numpy(y.reshape(-1, steps, tokens, y.shape[-1])),
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


def plain_transformer(target: int, device: str) -> nn.Module:
    """The plain transformer whose parameter count is nearest `target`."""

    def text(width: int, layers: int) -> str:
        return PLAIN_SPEC.format(window=WINDOW, width=width, layers=layers)

    def count(width: int, layers: int) -> int:
        return compiler.analyze(compiler.load_spec_text(text(width, layers))).facts.parameters

    best = min(
        ((w, layers) for w in range(32, 257, 8) for layers in (1, 2, 3, 4)),
        key=lambda c: abs(count(*c) - target),
    )
    return compiler.build_model(compiler.load_spec_text(text(*best)), device=device)


def fits_the_data(model: nn.Module, path: Path) -> nn.Module:
    """`model`, if its spec reads the 4 date features as `date` and writes `longitude`, 14 values
    per date; otherwise the run stops, saying what the spec must declare."""
    spec = model.spec
    date, longitude = spec.inputs.get("date"), spec.outputs.get("longitude")
    if date is None or date.kind != "features" or date.width != 4:
        raise SystemExit(
            f"{path}: the sky example needs an input `date: {{kind: features, width: 4}}`"
        )
    if longitude is None or longitude.width != 2 * len(BODIES):
        raise SystemExit(f"{path}: the sky example needs an output `longitude` of width 14")
    return model


def build_models(spec: Path, recurrent_spec: Path, device: str) -> dict[str, nn.Module]:
    gears = fits_the_data(compiler.build_model(spec, device=device), spec)
    recurrent = fits_the_data(compiler.build_model(recurrent_spec, device=device), recurrent_spec)
    if gears.spec.time is not None:
        raise SystemExit(f"{spec}: `--spec` is the non-recurrent mechanism; this one has `time:`")
    if recurrent.spec.time is None:
        raise SystemExit(f"{recurrent_spec}: the recurrent model's spec declares no `time:` axis")
    tokens = recurrent.spec.inputs["date"].context
    if WINDOW % tokens:
        raise SystemExit(
            f"{recurrent_spec}: a time step reads {tokens} dates (`context`), which does not "
            f"divide the {WINDOW} dates of a chunk"
        )
    target = parameters(gears)
    # a plain transformer and an MLP sized to the gear federation's parameter count
    plain = plain_transformer(target, device)
    hidden = int((-(4 + 14 + 2) + math.sqrt((4 + 14 + 2) ** 2 + 4 * target)) / 2)  # h^2 + 20h
    torch.manual_seed(0)
    return {
        f"gear federation ({spec.name})": gears,
        f"recurrent federation ({recurrent_spec.name})": recurrent,
        "plain transformer": plain,
        "MLP": PerDateMLP(hidden).to(device),
    }


def fit(
    model: nn.Module, steps: int, lr: float, loss_at: Callable[[int], torch.Tensor]
) -> list[float]:
    """The one training recipe every model gets: AdamW, a one-cycle schedule, `steps` steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.1
    )
    model.train()
    losses = []
    for step in range(steps):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def window_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int):
    """Step `s`: a random batch of windows, scored at every date."""
    generator = torch.Generator().manual_seed(0)

    def loss_at(step: int) -> torch.Tensor:
        index = torch.randint(0, len(x), (batch,), generator=generator)
        return F.mse_loss(model(date=x[index])["longitude"], y[index])

    return loss_at


def chunk_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, chunk: int):
    """Truncated backpropagation through time, as `epicycle train` cuts it (`tbptt.Chunks`):
    each optimizer step runs the next chunk of `chunk` time steps of a random batch of sequences
    from the state the previous chunk left (fresh at a sequence's start), scores its steps, and
    carries the state on, detached (the gradient stops at the chunk's first step)."""
    generator = torch.Generator().manual_seed(0)

    def fetch(index: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Batch `index` of sequences; `Chunks` asks for them in order, so a draw each will do."""
        picked = torch.randint(0, len(x), (batch,), generator=generator)
        return {"date": x[picked]}, {"longitude": y[picked]}

    chunks = Chunks(fetch, steps=x.shape[1], length=chunk)

    def loss_at(step: int) -> torch.Tensor:
        inputs, targets, state = chunks.at(step, model)
        state, outputs = model.scan(state, **inputs)
        chunks.carry(step, state)
        return F.mse_loss(outputs["longitude"], targets["longitude"])

    return loss_at


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-body error over `x`, 64 windows or sequences at a time (a sequence from a fresh state)."""
    model.eval()
    predictions = torch.cat([model(date=x[i : i + 64])["longitude"] for i in range(0, len(x), 64)])
    return angular_error_degrees(predictions, y)


@torch.no_grad()
def evaluate_streamed(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-body error with all of `x`'s sequences run one after the other as one sequence, from
    one state: how the recurrent model holds up far beyond the length it was trained on."""
    model.eval()

    def joined(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1, -1, *t.shape[2:])

    return angular_error_degrees(model(date=joined(x))["longitude"], joined(y))


def table(results: dict[str, dict]) -> str:
    header = "| model | parameters | train s | " + " | ".join(BODIES) + " | mean |"
    lines = [header, "|" + "---|" * (len(BODIES) + 4)]
    for name, r in results.items():
        cells = " | ".join(f"{r['test_error_deg'][b]:.1f}" for b in BODIES)
        lines.append(
            f"| {name} | {r['parameters']:,} | {r['train_seconds']:.0f} | {cells} "
            f"| {r['test_mean_error_deg']:.1f} |"
        )
    return "\n".join(lines)


def shown(value: object) -> str:
    """A setting as the JSON keeps it: paths inside the repository relative to it."""
    if isinstance(value, Path) and value.resolve().is_relative_to(ROOT):
        return str(value.resolve().relative_to(ROOT))
    return str(value)


def machine() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "antikythera.yaml")
    parser.add_argument(
        "--recurrent-spec", type=Path, default=ROOT / "specs" / "antikythera_recurrent.yaml"
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps, every model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (one is fastest for gears this small: more wait on each other, "
        "many times over on a busy machine)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps on a few decades (smoke run)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the JSON written (default: examples/results/antikythera_sky.json, "
        "antikythera_sky_quick.json with --quick)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results_dir = ROOT / "examples" / "results"
    out = args.out or results_dir / (
        "antikythera_sky_quick.json" if args.quick else "antikythera_sky.json"
    )
    torch.manual_seed(0)
    first, split_val, split_test, last = (
        (1900, 1980, 1990, 1999) if args.quick else (-200, 1800, 1900, 1999)
    )
    steps, batch = (4, 2) if args.quick else (args.steps, args.batch)

    years, longitudes = ephemeris(first, last, ROOT / "examples" / ".cache")
    x, y = features(years), targets(longitudes)
    parts = {
        "train": years < split_val,
        "validation": (years >= split_val) & (years < split_test),
        "test": years >= split_test,
    }
    split = {name: trimmed(x[mask], y[mask]) for name, mask in parts.items()}

    results = {}
    try:
        models = build_models(args.spec, args.recurrent_spec, args.device)
    except compiler.SpecError as error:  # a spec given with --spec or --recurrent-spec
        raise SystemExit(error.format()) from None
    for name, model in models.items():
        recurrent = getattr(getattr(model, "spec", None), "time", None) is not None
        if recurrent:  # per time step, the dates the spec's input reads at once
            tokens = model.spec.inputs["date"].context
            data = {k: [t.to(args.device) for t in sequences(*v, tokens)] for k, v in split.items()}
            loss_at = chunk_loss(model, *data["train"], batch, chunk=WINDOW // tokens)
        else:
            data = {k: [t.to(args.device) for t in windows(*v)] for k, v in split.items()}
            loss_at = window_loss(model, *data["train"], batch)
        start = time.perf_counter()
        losses = fit(model, steps, args.lr, loss_at)
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
        if recurrent:
            streamed = evaluate_streamed(model, *data["test"])
            results[name]["test_streamed_error_deg"] = dict(
                zip(BODIES, map(float, streamed), strict=True)
            )
            results[name]["test_streamed_mean_error_deg"] = float(streamed.mean())
        print(
            f"{name}: {parameters(model):,} parameters, {seconds:.0f} s, "
            f"test mean error {errors.mean():.1f} deg",
            flush=True,
        )

    text = table(results)
    print("\nmean angular error (degrees) on the held-out years\n" + text)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: shown(v) for k, v in vars(args).items()} | {
        "years": [first, split_val, split_test, last],
        "steps": steps,
        "batch": batch,
        "dates_per_example_and_step": WINDOW,
        "sequence_dates": SEQUENCE,
        "command": " ".join(["python", "examples/antikythera_sky.py", *sys.argv[1:]]),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    out.write_text(json.dumps({"settings": settings, "results": results, "table": text}, indent=2))


if __name__ == "__main__":
    main()
