"""What a training run records: `DIR/metrics.jsonl` (one JSON object per logged step, with the
model's report: level losses, equilibrium solves, lattice metrics) and the loss curve PNG."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    from torch import nn

    from compiler.tools.training.processes import Processes

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"


def record_from_report(
    report: dict[str, Any], objective: nn.Module, processes: Processes
) -> dict[str, Any]:
    """The metrics.jsonl fields from `GraphModel.report()` of the latest training step:

    * `level_loss`: each fractal's training loss per level (mean over its sub-models and over
      the ranks): a list for a model with one level-trained fractal, `{node: list}` for several;
    * `equilibrium`: the solves (`Federation.solve_report`), under `mode: equilibrium`;
    * `lattice`: `{"NODE.LAYER": metrics}`, every lattice attention layer of every node.
    """
    import torch

    record: dict[str, Any] = {}
    levels = {
        name: [
            processes.mean(torch.tensor(v))
            for v in report["nodes"][name]["fractal"].get("level_loss", [])
        ]
        for name in objective.fractals
    }
    if len(levels) == 1:
        record["level_loss"] = next(iter(levels.values()))
    elif levels:
        record["level_loss"] = levels
    feedback = report.get("feedback")
    if feedback is not None:
        record["equilibrium"] = {k: v for k, v in feedback.items() if k != "mode"}
    lattice = {
        f"{node}.{layer}": metrics
        for node, entry in report["nodes"].items()
        for layer, metrics in entry.get("lattice", {}).items()
    }
    if lattice:
        record["lattice"] = lattice
    return record


def prepare_metrics(out: Path, resume: str | None, start: int, processes: Processes) -> list:
    """The records up to `start` (from the run resumed), rewritten to `out/metrics.jsonl`."""
    if not processes.leader:
        return []
    out.mkdir(parents=True, exist_ok=True)
    records = []
    if resume is not None and (Path(resume) / METRICS).exists():
        for line in (Path(resume) / METRICS).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a crash
                record = json.loads(line)
                if record.get("step", math.inf) <= start:
                    records.append(record)
    temporary = out / f".tmp-{METRICS}"
    temporary.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(temporary, out / METRICS)
    return records


def append_metric(out: Path, record: dict[str, Any]) -> None:
    with open(out / METRICS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def write_loss_curve(records: list[dict[str, Any]], path: Path) -> None:
    try:
        plot_loss_curve(records, path)
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)


def plot_loss_curve(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Training and validation loss over steps, as a PNG (matplotlib's headless Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    axes.plot([r["step"] for r in records], [r["loss"] for r in records], label="train", lw=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    axes.set(xlabel="step", ylabel="loss (nats per character)", title="epicycle train")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".tmp-{path.name}")
    figure.savefig(temporary, format="png")
    plt.close(figure)
    os.replace(temporary, path)
    return path
