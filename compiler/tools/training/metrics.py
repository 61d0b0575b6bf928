"""What a training run records: `DIR/metrics.jsonl` (one JSON object per logged step, with the
model's report: level losses, equilibrium solves, lattice metrics), the loss curve PNG, and, when
the `tensorboard` package is installed (`pip install epicycle[tensorboard]`), TensorBoard event
files in `DIR/tensorboard/` holding every number of every record (`tensorboard --logdir DIR`)."""

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
EVENTS = "tensorboard"


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


def open_event_log(out: Path, wanted: bool | None, purge_step: int | None = None) -> Any:
    """A TensorBoard `SummaryWriter` on `out/tensorboard`, or None. `wanted`: None writes events
    when the package is installed; True asks for them (a warning when it is missing); False
    never. `purge_step`: a resumed run hides the events a crashed run wrote after its checkpoint."""
    if wanted is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if wanted:
            log.warning("tensorboard is not installed: no event files (pip install tensorboard)")
        return None
    return SummaryWriter(str(out / EVENTS), purge_step=purge_step)


def write_events(writer: Any, record: dict[str, Any]) -> None:
    """Every number of a metrics record as a TensorBoard scalar, tagged by its path in the record
    (`loss`, `losses/longitude`, `lattice/body.blocks.0.attn.lattice/order_parameter`, ...)."""
    step = record["step"]
    for tag, value in scalars(record):
        if tag != "step":
            writer.add_scalar(tag, value, step)
    writer.flush()


def scalars(value: Any, tag: str = "") -> list[tuple[str, float]]:
    """The numbers in nested dicts and lists, with their `/`-joined paths."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(tag, float(value))] if math.isfinite(value) else []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    found = []
    for key, part in items:
        found += scalars(part, f"{tag}/{key}" if tag else str(key))
    return found


def progress_line(record: dict[str, Any], stop: int) -> str:
    """One plain line per logged step, for a log file (a terminal gets the progress bar)."""
    parts = [f"step {record['step']}/{stop}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    parts += [f"lr {record['lr']:.3g}", f"{record['tokens_per_s']:,.0f} tok/s"]
    return "  ".join(parts)
