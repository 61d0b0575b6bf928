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

* `lattice_phases.gif`: the phase field of every layer over training, one frame per logged step
  (matplotlib's PillowWriter), from the per-head phases `GraphModel.report()` gives and training
  logs (`lattice` -> layer -> `heads` -> `phase`);
* `lattice_heads.png`: per-head histories over training: phase (unwrapped), coupling force and,
  where recorded, attention entropy, one panel per quantity and layer.

`draw_phase_field`, `draw_order_parameter`, `draw_head_histories` and `draw_delimiter_wave` draw
onto a matplotlib axis, so the examples compose their figures from the same code.
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
ANIMATION_GIF = "lattice_phases.gif"
HEADS_PNG = "lattice_heads.png"
HEAD_QUANTITIES = {  # per-head histories: report key -> axis label
    "phase": "phase (rad, unwrapped)",
    "coupling_force": "coupling force",
    "attention_entropy": "attention entropy (nats)",
}
MAX_FRAMES = 120
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
class HeadHistory:
    """One layer's per-head values over training: `values[quantity][t][h]` at `steps[t]`."""

    steps: tuple[int, ...]
    values: dict[str, tuple[tuple[float, ...], ...]]


def head_histories(records: list[dict], label=lambda name: name) -> dict[str, HeadHistory]:
    """layer -> its per-head history, from records whose `lattice` entries carry `heads` (a
    quantity missing at some step, such as an unrecorded attention entropy, is left out)."""
    found: dict[str, tuple[list[int], dict[str, list]]] = {}
    for record in records:
        lattice, step = record.get("lattice"), record.get("step")
        if not isinstance(lattice, dict) or not isinstance(step, (int, float)):
            continue
        for name, values in lattice.items():
            heads = values.get("heads") if isinstance(values, dict) else None
            if not isinstance(heads, dict) or not _numbers(heads.get("phase")):
                continue
            steps, quantities = found.setdefault(label(name), ([], {}))
            steps.append(int(step))
            for quantity in HEAD_QUANTITIES:
                if _numbers(heads.get(quantity)):
                    quantities.setdefault(quantity, []).append((len(steps) - 1, heads[quantity]))
    histories = {}
    for name, (steps, quantities) in found.items():
        complete = {
            q: tuple(tuple(float(v) for v in row) for _, row in rows)
            for q, rows in quantities.items()
            if len(rows) == len(steps)
        }
        histories[name] = HeadHistory(tuple(steps), complete)
    return histories


def draw_head_histories(ax, steps, rows, ylabel: str, unwrap: bool = False) -> None:
    """One line per head of `rows[t][h]` against the step."""
    import numpy as np

    values = np.asarray(rows, dtype=float)
    if unwrap:
        values = np.unwrap(values, axis=0)
    for head in range(values.shape[1]):
        ax.plot(steps, values[:, head], lw=1, label=f"head {head}")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_head_histories(histories: dict[str, HeadHistory], path: str | Path, title: str = ""):
    plt = _pyplot()
    quantities = [q for q in HEAD_QUANTITIES if any(q in h.values for h in histories.values())]
    fig, axes = plt.subplots(
        len(quantities),
        len(histories),
        figsize=(4.2 * len(histories), 2.8 * len(quantities)),
        squeeze=False,
    )
    for col, (layer, history) in enumerate(histories.items()):
        for row, quantity in enumerate(quantities):
            ax = axes[row][col]
            if quantity not in history.values:
                ax.axis("off")
                continue
            rows = history.values[quantity]
            draw_head_histories(
                ax, history.steps, rows, HEAD_QUANTITIES[quantity], unwrap=quantity == "phase"
            )
            if row == 0:
                ax.set_title(layer, fontsize=9)
    if len(axes[0][0].get_lines()) <= 16:
        axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title}: per-head histories" if title else "per-head histories")
    fig.tight_layout()
    return _save(plt, fig, path)


def animate_phases(
    histories: dict[str, HeadHistory],
    shapes: dict[str, tuple[int, ...]],
    path: str | Path,
    title: str = "",
    fps: int = 6,
) -> Path:
    """A GIF of every layer's phase field over training (at most `MAX_FRAMES` frames, evenly
    spaced over the logged steps): the phase wave an arrow per head on its lattice cell."""
    plt = _pyplot()
    from matplotlib.animation import FuncAnimation, PillowWriter

    layers = list(histories)
    frames = min(len(h.steps) for h in histories.values())
    picked = sorted({round(i * (frames - 1) / max(MAX_FRAMES - 1, 1)) for i in range(MAX_FRAMES)})
    picked = [i for i in picked if i < frames]
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.6 * rows), squeeze=False)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")

    def draw(frame: int):
        for ax, layer in zip(axes.flat, layers, strict=False):
            ax.clear()
            phases = histories[layer].values["phase"][frame]
            shape = shapes.get(layer, (len(phases),))
            r = math.hypot(sum(map(math.cos, phases)), sum(map(math.sin, phases))) / len(phases)
            draw_phase_field(ax, shape, phases, f"{layer}: r = {r:.2f}")
        step = histories[layers[0]].steps[frame]
        fig.suptitle(f"{title + ': ' if title else ''}lattice phases, step {step}")
        return []

    animation = FuncAnimation(fig, draw, frames=picked, blit=False)
    save = lambda path: animation.save(path, writer=PillowWriter(fps=fps))  # noqa: E731
    return _save(plt, fig, path, save)


def phase_term_wave(
    phases, frequencies, strengths, token_frequency: float, query: int
) -> list[list[float]]:
    """Per head, the phase term the query at position `query` adds to the score of each key
    `j <= query` (causal): `strength_h * cos(theta_h + token_frequency * omega_h * (query - j))`."""
    return [
        [s * math.cos(p + token_frequency * f * (query - j)) for j in range(query + 1)]
        for p, f, s in zip(phases, frequencies, strengths, strict=True)
    ]


def draw_delimiter_wave(ax, waves: list[list[float]], delimiter: int, title: str = "") -> None:
    """The phase term of the delimiter's query over the keys before it, one line per head: the
    wave each head lays over the sequence it is about to reverse."""
    offsets = [j - delimiter for j in range(delimiter + 1)]
    for head, wave in enumerate(waves):
        ax.plot(offsets, wave, lw=1.2, label=f"head {head}")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("key position - delimiter position")
    ax.set_ylabel("phase term added to the score")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)


def _numbers(values) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    )


@dataclass(frozen=True)
class LatticePlots:
    phases: Path
    order: Path | None
    note: str | None  # why there is no order-parameter plot
    animation: Path | None = None  # the phases over training, from per-head metrics
    heads: Path | None = None
    heads_note: str | None = None  # why there is no animation or per-head plot


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
    records = read_metrics(metrics)
    series = order_parameter_series(records, lambda n: layer_label(n, model))
    if not series:
        return LatticePlots(phases, None, f"{metrics} holds no `lattice` order parameters")
    order = plot_order_parameter(series, out / ORDER_PNG, name)
    histories = head_histories(records, lambda n: layer_label(n, model))
    if not histories or max(len(h.steps) for h in histories.values()) < 2:
        note = f"{metrics} holds per-head phases at fewer than two steps"
        return LatticePlots(phases, order, None, heads_note=note)
    shapes = {layer_label(f"{f.node}.{f.layer}"): f.shape for f in fields}
    animation = animate_phases(histories, shapes, out / ANIMATION_GIF, name)
    heads = plot_head_histories(histories, out / HEADS_PNG, name)
    return LatticePlots(phases, order, None, animation, heads)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the lattice plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path, save=None) -> Path:
    """Write `fig` (or, with `save`, what `save(path)` writes of it) and close it, all or nothing
    by the output-path rule (`compiler.tools.outputs`); the bounding box is the drawing's own, so
    tick labels and titles past the axes are never cut off."""
    from compiler.tools.outputs import write_with

    default = lambda staged: fig.savefig(staged, dpi=130, bbox_inches="tight", pad_inches=0.15)  # noqa: E731
    try:
        return write_with(path, save or default, "--out")
    finally:
        plt.close(fig)
