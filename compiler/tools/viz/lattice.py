"""Pictures of a trained lattice model: its phase field and its order parameter over time.

* `lattice_phases.png`: every lattice layer of every node, one arrow per head at its lattice cell,
  pointing at the head's phase angle (colour: the angle), titled with the layer's order parameter
  `r`. Lattices of more than two dimensions are drawn with their last axis across and the others
  stacked down (row-major, as the heads are numbered).
* `lattice_order.png`: `r` of every layer against the training step, read from the checkpoint
  directory's `metrics.jsonl` (one JSON object per line: `step` and `lattice`, a dict of
  layer -> {"order_parameter": ...}; training names a layer `NODE.blocks.I.attn.lattice`, from
  `GraphModel.report()`; the module names of `runtime.attention.lattice.lattice_metrics`,
  `federation.transformers.G.blocks.I...`, are read too).

`draw_phase_field` and `draw_order_parameter` draw onto a matplotlib axis, so
`examples/lattice_oscillators.py` composes its multi-dataset figures from the same code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from compiler.language.diagnostics import Diagnostic, Span, SpecError

METRICS = "metrics.jsonl"
METRICS_LIMIT = 1 << 30  # a line per logged step: a long run's file is megabytes, never this
PHASES_PNG = "lattice_phases.png"
ORDER_PNG = "lattice_order.png"
_LAYER = re.compile(r"^federation\.transformers\.(\d+)\.blocks\.(\d+)\.")  # lattice_metrics'
_NODE_LAYER = re.compile(r"^(.+?)\.blocks\.(\d+)\.")  # training's `NODE.blocks.I.attn.lattice`
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class PhaseField:
    node: str
    layer: str  # its module path under the node's module, as `GraphModel.report()` names it
    block: int | None
    shape: tuple[int, ...]
    phases: tuple[float, ...]  # one per head, row-major over `shape`

    @property
    def order_parameter(self) -> float:
        c = sum(math.cos(p) for p in self.phases) / len(self.phases)
        s = sum(math.sin(p) for p in self.phases) / len(self.phases)
        return math.hypot(c, s)

    @property
    def title(self) -> str:
        where = f"{self.node}, layer {self.block}" if self.block is not None else self.layer
        return f"{where}: r = {self.order_parameter:.2f}"


def phase_fields(model) -> list[PhaseField]:
    """The phases of every lattice layer of `model`, one field per node (batched nodes split)."""
    import torch

    from runtime.attention.lattice import lattice_layers

    fields = []
    with torch.no_grad():
        for node in model.nodes():
            if node.address is None:  # a companion: no attention lattice
                continue
            for path, layer in lattice_layers(node.module):
                theta = layer.phases().detach().cpu()[node.member]
                block = _BLOCK.match(path)
                fields.append(
                    PhaseField(
                        node.name,
                        path,
                        int(block.group(1)) if block else None,
                        tuple(layer.cfg.shape),
                        tuple(float(v) for v in theta),
                    )
                )
    return fields


def layer_label(name: str, model=None) -> str:
    """A metrics.jsonl layer name as a reader says it: `body.blocks.1.attn.lattice` ->
    `body layer 1`; `federation.transformers.0.blocks.1.attn.lattice` (`lattice_metrics`) ->
    the nodes of group 0 where `model` says which, else `group 0 layer 1`."""
    match = _LAYER.match(name)
    if match:
        group, block = int(match.group(1)), match.group(2)
        nodes = [n.name for n in model.nodes() if n.address and n.group == group] if model else []
        return f"{'+'.join(nodes) or f'group {group}'} layer {block}"
    match = _NODE_LAYER.match(name)
    return f"{match.group(1)} layer {match.group(2)}" if match else name


def draw_phase_field(ax, shape: tuple[int, ...], phases, title: str | None = None) -> None:
    """One arrow per head at its cell, pointing at its phase; colour = phase (a cyclic map)."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1]
    xs = [i % cols for i in range(len(phases))]
    ys = [i // cols for i in range(len(phases))]
    wrapped = [p % (2 * math.pi) for p in phases]
    ax.quiver(
        xs,
        ys,
        [math.cos(p) for p in phases],
        [math.sin(p) for p in phases],
        wrapped,
        cmap="hsv",
        clim=(0, 2 * math.pi),
        pivot="middle",
        scale=max(cols, rows) * 1.5,
        width=0.012,
    )
    ax.set_xlim(-0.7, cols - 0.3)
    ax.set_ylim(rows - 0.3, -0.7)  # row 0 on top, as the heads are numbered
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.set_aspect("equal")
    ax.grid(alpha=0.15)
    if title:
        ax.set_title(title, fontsize=9)


def draw_order_parameter(ax, series: dict[str, tuple[list[int], list[float]]]) -> None:
    """`r` against the step, one line per layer."""
    for label, (steps, values) in series.items():
        ax.plot(steps, values, label=label, marker="." if len(steps) < 40 else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("order parameter r")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(title="layer", fontsize=8)


def plot_phases(fields: list[PhaseField], path: str | Path, title: str = "") -> Path:
    plt = _pyplot()
    cols = min(4, len(fields))
    rows = math.ceil(len(fields) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.5 * rows), squeeze=False)
    for ax, field in zip(axes.flat, fields, strict=False):
        draw_phase_field(ax, field.shape, field.phases, field.title)
    for ax in list(axes.flat)[len(fields) :]:
        ax.axis("off")
    fig.suptitle(f"{title}: lattice phases (arrow = phase angle)" if title else "lattice phases")
    fig.tight_layout()
    return _save(plt, fig, path)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a `metrics.jsonl`; a line that is not a JSON object is a located error."""
    from compiler.language.files import read_regular_file

    path = Path(path)
    records = []
    raw = read_regular_file(
        path,
        limit=METRICS_LIMIT,
        what="metrics file",
        hint="metrics.jsonl is written by `epicycle train` beside its checkpoint",
    )
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SpecError(
            [Diagnostic(Span(str(path), 1, 1), f"the metrics file is not UTF-8 ({exc.reason})")]
        ) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(
                [
                    Diagnostic(
                        Span(str(path), number, exc.colno),
                        f"not a JSON object: {exc.msg}",
                        "each line of metrics.jsonl is one JSON object with `step` and `lattice`",
                    )
                ]
            ) from None
        if not isinstance(record, dict):
            raise SpecError(
                [Diagnostic(Span(str(path), number, 1), "each line must be a JSON object")]
            )
        records.append(record)
    return records


def order_parameter_series(
    records: list[dict], label=lambda name: name
) -> dict[str, tuple[list[int], list[float]]]:
    """layer -> (steps, r), from records that carry `step` and `lattice` (others are skipped)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        lattice, step = record.get("lattice"), record.get("step")
        if not isinstance(lattice, dict) or not isinstance(step, (int, float)):
            continue
        for name, values in lattice.items():
            r = values.get("order_parameter") if isinstance(values, dict) else None
            if isinstance(r, (int, float)):
                steps, rs = series.setdefault(label(name), ([], []))
                steps.append(int(step))
                rs.append(float(r))
    return series


def plot_order_parameter(
    series: dict[str, tuple[list[int], list[float]]], path: str | Path, title: str = ""
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    draw_order_parameter(ax, series)
    ax.set_title(f"{title}: Kuramoto order parameter over training" if title else "order parameter")
    fig.tight_layout()
    return _save(plt, fig, path)


@dataclass(frozen=True)
class LatticePlots:
    phases: Path
    order: Path | None
    note: str | None  # why there is no order-parameter plot


def plot_checkpoint(directory: str | Path, out: str | Path | None = None) -> LatticePlots:
    """Both plots for a checkpoint directory (written into `out`, default the directory itself)."""
    from compiler.tools.checkpoint import load_checkpoint

    directory = Path(directory)
    model = load_checkpoint(directory)
    fields = phase_fields(model)
    name = getattr(getattr(model, "spec", None), "name", directory.name)
    if not fields:
        raise SpecError(
            [
                Diagnostic(
                    Span(f"{directory}", 1, 1),
                    "this checkpoint's model has no lattice attention layer to plot",
                    "`--lattice` draws models with `attention: {kind: lattice, ...}`",
                )
            ]
        )
    out = Path(out) if out is not None else directory
    phases = plot_phases(fields, out / PHASES_PNG, name)
    metrics = directory / METRICS if directory.is_dir() else directory.parent / METRICS
    if not metrics.exists():
        return LatticePlots(
            phases,
            None,
            f"no {metrics}: the order-parameter plot needs the metrics a training run writes there",
        )
    series = order_parameter_series(read_metrics(metrics), lambda n: layer_label(n, model))
    if not series:
        return LatticePlots(phases, None, f"{metrics} holds no `lattice` order parameters")
    return LatticePlots(phases, plot_order_parameter(series, out / ORDER_PNG, name), None)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the lattice plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Written all or nothing, by the output-path rule (`compiler.tools.outputs`); the bounding
    box is the drawing's own, so tick labels and titles past the axes are never cut off."""
    from compiler.tools.outputs import write_with

    try:
        return write_with(
            path,
            lambda staged: fig.savefig(staged, dpi=130, bbox_inches="tight", pad_inches=0.15),
            "--out",
        )
    finally:
        plt.close(fig)
