"""A drawing-neutral scene of a spec: what is to be drawn, in the spec's vocabulary, with no geometry.

Every renderer (SVG, PNG, Mermaid, the HTML page) draws the same `Scene`, so they cannot disagree
about what a graph holds. A scene comes from one of two places:

* `scene_from_ir`: a valid spec after `compiler.analyze`: resolved settings, exact gear velocities,
  batch groups, parameters and FLOPs per node;
* `scene_from_document`: the raw YAML of a spec that does not validate, drawn from what was written
  (tolerating anything malformed), so that its errors can be shown at the nodes they concern;
  its sub-graphs are expanded where they can be (`scene_of`), else drawn as one box each.

Sub-graphs (`kind: graph`) are flattened before validation, so a valid spec's nodes carry their
paths (`outer.train_a.driver`); the scene gives every sub-graph a `Frame` holding the nodes and
sub-graphs directly inside it, to any depth. `collapsed` draws chosen frames closed: one box
each, the edges into their inside attached to it.

Diagnostics are attached to the thing they point at by their span: the source map records where
every path of the data was written, so a `file:line:col` leads back to `nodes.sun` or `edges.3`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

from compiler.language.diagnostics import Diagnostic
from compiler.language.kinds import KINDS, Description
from compiler.language.source import Document, SourceMap

GEAR_TRAIN_KINDS = ("mesh", "arbor", "pin_slot")
MAX_FRACTAL_LEAVES = 64  # nested boxes drawn for at most this many smallest sub-models
FOLD_READS = 8  # an input read by more nodes than this is named in each reader, not drawn to it


@dataclass(frozen=True)
class Issue:
    """A diagnostic as the page shows it: where, how bad, what, what to do."""

    severity: str
    where: str
    message: str
    hint: str | None = None

    @classmethod
    def of(cls, diagnostic: Diagnostic) -> Issue:
        return cls(diagnostic.severity, str(diagnostic.span), diagnostic.message, diagnostic.hint)


@dataclass(frozen=True)
class Fractal:
    """Nested boxes: level `l` holds `branching**l` sub-models of width `width / branching**l`."""

    levels: int
    branching: int
    width: int | None

    @property
    def drawn_levels(self) -> int:
        """Levels drawn as boxes: as deep as keeps the smallest boxes legible."""
        drawn = 1
        while drawn < self.levels and self.branching**drawn <= MAX_FRACTAL_LEAVES:
            drawn += 1
        return drawn


@dataclass(frozen=True)
class Lattice:
    """A lattice attention layout: one head per cell of `shape` (row-major)."""

    shape: tuple[int, ...]
    boundary: str | None = None
    neighbourhood: str | None = None

    @property
    def grid(self) -> tuple[int, int]:
        """Rows and columns of the drawing: the last axis across, the others stacked down."""
        if len(self.shape) == 1:
            return 1, self.shape[0]
        return math.prod(self.shape[:-1]), self.shape[-1]


@dataclass
class SceneNode:
    id: str  # the IR's vertex id: `inputs.NAME`, `nodes.NAME`, `outputs.NAME`
    name: str
    role: str  # input | node | observer | output | unknown
    kind: str | None
    lines: list[str] = field(default_factory=list)  # what the box says under the name
    details: dict[str, Any] = field(default_factory=dict)  # what a click shows (JSON-able)
    cog: bool = False  # drawn with a cog of `teeth` teeth (a gear)
    teeth: int | None = None
    velocity: str | None = None
    fractal: Fractal | None = None
    lattice: Lattice | None = None
    group: int | None = None
    issues: list[Issue] = field(default_factory=list)


@dataclass
class SceneEdge:
    id: str  # `edges.3` for the spec's edges; `reads.N` / `outputs.N` for the others
    source: str
    target: str
    role: str  # read | edge | companion | output | feed (an output fed back)
    kind: str | None = None
    ratio: str | None = None
    delay: int = 0
    issues: list[Issue] = field(default_factory=list)
    folded: bool = False  # a read named inside its node instead of drawn (see `fold_reads`)

    @property
    def feedback(self) -> bool:
        """Drawn as feedback: a `feedback` edge, or any edge that reads an earlier step."""
        return self.kind == "feedback" or self.delay > 0

    @property
    def label(self) -> str:
        parts = []
        if self.ratio is not None:
            parts.append(f"×{self.ratio}")
        if self.delay:
            parts.append(f"delay {self.delay}")
        return " · ".join(parts)

    def describe(self) -> str:
        kind = self.kind or self.role
        return f"{kind} · ratio {self.ratio or '-'} · delay {self.delay}"


@dataclass(frozen=True)
class BatchGroup:
    index: int
    members: tuple[str, ...]  # node ids, in bus order

    @property
    def label(self) -> str:
        return f"batch group #{self.index} ×{len(self.members)}: one batched call"


@dataclass
class Frame:
    """A sub-graph (`kind: graph`): a box labelled by its path around what is directly inside it."""

    path: str  # `outer.train_a`
    parent: str | None  # the path of the frame around it; None at the top level
    members: list[str] = field(default_factory=list)  # scene node ids directly inside
    frames: list[str] = field(default_factory=list)  # paths of the sub-graphs directly inside
    lines: list[str] = field(default_factory=list)  # what its closed box says under its path
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return frame_id(self.path)

    @property
    def depth(self) -> int:
        """1 for a sub-graph of the spec itself, 2 for one inside it, ..."""
        return self.path.count(".") + 1


def frame_id(path: str) -> str:
    return f"graphs.{path}"


@dataclass
class Scene:
    title: str
    summary: str
    valid: bool
    nodes: list[SceneNode]
    edges: list[SceneEdge]
    groups: list[BatchGroup] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)  # those that name no node or edge
    frames: list[Frame] = field(default_factory=list)  # outer frames before the ones inside them

    def node(self, node_id: str) -> SceneNode:
        return next(n for n in self.nodes if n.id == node_id)

    def frame(self, path: str) -> Frame:
        return next(f for f in self.frames if f.path == path)

    def frame_chain(self, node_id: str) -> list[str]:
        """The paths of the frames around a node, outermost first (empty at the top level)."""
        return self.frame_chains().get(node_id, [])

    def frame_chains(self) -> dict[str, list[str]]:
        """`frame_chain` of every node, in one pass."""
        parent = {f.path: f.parent for f in self.frames}
        chains = {}
        for frame in self.frames:
            chain, at = [], frame.path
            while at is not None:
                chain.append(at)
                at = parent[at]
            chains.update({member: chain[::-1] for member in frame.members})
        return {n.id: chains.get(n.id, []) for n in self.nodes}

    def all_issues(self) -> list[Issue]:
        found = list(self.issues)
        for item in [*self.nodes, *self.edges]:
            found.extend(item.issues)
        return found


# --------------------------------------------------------------------------- from a valid spec


def scene_from_ir(ir, diagnostics: Iterable[Diagnostic] = ()) -> Scene:
    """The scene of an analysed spec; `diagnostics` (warnings, say) are attached where they point."""
    spec, graph, facts = ir.spec, ir.graph, ir.facts
    estimates = {**(facts.companion_estimates or {}), **(facts.estimates or {})}
    outside = facts.parameters_outside_nodes or {}
    nodes = []
    for vertex, data in graph.nodes(data=True):
        role = data["role"]
        if role == "input":
            nodes.append(_input_node(vertex, data, outside.get(vertex)))
        elif role == "output":
            nodes.append(_output_node(vertex, data, outside.get(vertex)))
        elif role == "unknown":
            nodes.append(SceneNode(vertex, data["name"], role, None, ["not declared"]))
        else:
            nodes.append(_model_node(ir, vertex, estimates.get(data["name"])))
    edges = []
    reads = outputs = 0
    for u, v, data in graph.edges(data=True):
        if data["role"] in ("edge", "companion", "feed"):
            ratio = data.get("ratio")
            edge_id = f"edges.{data['index']}"
            edges.append(
                SceneEdge(
                    edge_id,
                    u,
                    v,
                    data["role"],
                    data.get("kind"),
                    _ratio_text(ratio),
                    int(data.get("delay") or 0),
                )
            )
        elif data["role"] == "read":
            edges.append(SceneEdge(f"reads.{reads}", u, v, "read"))
            reads += 1
        else:
            edges.append(SceneEdge(f"outputs.{outputs}", u, v, data["role"]))
            outputs += 1
    edges.sort(key=lambda e: (e.role != "read", e.role == "output", _edge_order(e.id)))
    groups = []
    federation = facts.federation
    if federation is not None:
        for index, group in enumerate(federation.groups):
            if len(group.nodes) > 1:
                groups.append(BatchGroup(index, tuple(f"nodes.{n}" for n in group.nodes)))
    total = facts.parameters
    summary = ", ".join(
        part
        for part in (
            _plural(sum(n.role not in ("input", "output") for n in nodes), "node"),
            _plural(sum(e.role in ("edge", "companion", "feed") for e in edges), "edge"),
            f"{_count(total)} parameters" if total is not None else "",
        )
        if part
    )
    scene = Scene(spec.name, summary, True, nodes, edges, groups)
    fold_reads(scene)
    attach_issues(scene, diagnostics, ir.loaded.source)
    nest_frames(scene)
    return scene


# --------------------------------------------------------------------------- sub-graphs as frames


def nest_frames(scene: Scene) -> None:
    """A frame for every sub-graph, found from the flattened names: only a sub-graph's path puts
    a dot in a name (`nodes.outer.train_a.driver` sits in `outer.train_a`, inside `outer`).

    A batch group whose members lie in different frames cannot be a frame of its own as well
    (frames nest, groups would cut across them): its members say which group they share."""
    frames: dict[str, Frame] = {}

    def frame(path: str) -> Frame:
        if path not in frames:
            parent = path.rsplit(".", 1)[0] if "." in path else None
            if parent is not None:
                frame(parent)
            frames[path] = Frame(path, parent)
            if parent is not None:
                frames[parent].frames.append(path)
        return frames[path]

    for node in scene.nodes:
        if node.role in ("node", "observer", "output") and "." in node.name:
            frame(node.name.rsplit(".", 1)[0]).members.append(node.id)
    if not frames:
        return
    scene.frames = list(frames.values())
    by_id = {n.id: n for n in scene.nodes}
    for f in scene.frames:
        inside = [by_id[i] for i in _members_at_any_depth(f, frames)]
        models = sum(n.role in ("node", "observer") for n in inside)
        outputs = sum(n.role == "output" for n in inside)
        counted = [_plural(models, "node")]
        if f.frames:
            counted.append(_plural(len(f.frames), "sub-graph"))
        if outputs:
            counted.append(_plural(outputs, "output"))
        f.lines = ["graph · " + " · ".join(counted)]
        f.details = {
            "role": "sub-graph",
            "kind": "graph",
            "nodes": models,
            "sub-graphs inside": len(f.frames),
            "outputs": outputs,
        }
        if any("parameters" in n.details for n in inside):  # a valid spec's estimates
            parameters = sum(n.details.get("parameters") or 0 for n in inside)
            f.lines.append(f"{_count(parameters)} params")
            f.details["parameters"] = parameters
            f.details["parameters are"] = "its nodes' and its output heads', at every depth"
    _unframe_cross_groups(scene, by_id)


def _members_at_any_depth(frame: Frame, frames: dict[str, Frame]) -> list[str]:
    found = list(frame.members)
    for inner in frame.frames:
        found.extend(_members_at_any_depth(frames[inner], frames))
    return found


def _unframe_cross_groups(scene: Scene, by_id: dict[str, SceneNode]) -> None:
    inside = {m: f.path for f in scene.frames for m in f.members}
    kept = []
    for group in scene.groups:
        if len({inside.get(m) for m in group.members}) == 1:
            kept.append(group)
            continue
        for member in group.members:
            by_id[member].lines.append(
                f"batch group #{group.index} ×{len(group.members)} (across sub-graphs)"
            )
    scene.groups = kept


def collapsed(scene: Scene, closed: Iterable[str]) -> Scene:
    """The scene with the frames at the paths `closed` drawn closed: each is one node (its path,
    its node and parameter counts) in its parent frame; what was inside it is not drawn, and an
    edge into its inside ends at it. A closed frame inside a closed frame is just not drawn."""
    closed = set(closed)
    if not closed:
        return scene
    frames = {f.path: f for f in scene.frames}
    shut: dict[str, str] = {}  # a frame -> the outermost closed frame holding it (or itself)
    for f in scene.frames:  # outer before inner
        if f.parent is not None and f.parent in shut:
            shut[f.path] = shut[f.parent]
        elif f.path in closed:
            shut[f.path] = f.path
    inside = {m: f.path for f in scene.frames for m in f.members}
    stand_in = {
        node_id: frame_id(shut[frame]) for node_id, frame in inside.items() if frame in shut
    }
    boxes: dict[str, SceneNode] = {}
    nodes = []
    for node in scene.nodes:
        if node.id not in stand_in:
            nodes.append(node)
            continue
        box_id = stand_in[node.id]
        if box_id not in boxes:
            f = frames[shut[inside[node.id]]]
            boxes[box_id] = SceneNode(
                box_id, f.path, "graph", "graph", list(f.lines), dict(f.details)
            )
            nodes.append(boxes[box_id])
        boxes[box_id].issues.extend(node.issues)
    edges = []
    for edge in scene.edges:
        source = stand_in.get(edge.source, edge.source)
        target = stand_in.get(edge.target, edge.target)
        if source == target and source in boxes:  # inside one closed frame
            boxes[source].issues.extend(edge.issues)
            continue
        edges.append(replace(edge, source=source, target=target))
    groups = []
    for group in scene.groups:
        members = tuple(m for m in group.members if m not in stand_in)
        if len(members) > 1:
            groups.append(BatchGroup(group.index, members))
    kept = [  # a closed frame is a node of its parent now; those inside it are not drawn
        replace(
            f,
            members=[*f.members, *(frame_id(c) for c in f.frames if c in shut)],
            frames=[c for c in f.frames if c not in shut],
        )
        for f in scene.frames
        if f.path not in shut
    ]
    return replace(scene, nodes=nodes, edges=edges, groups=groups, frames=kept)


def fold_reads(scene: Scene, limit: int = FOLD_READS) -> None:
    """An input that every gear of a mechanism reads would bury the mechanism under its edges:
    past `limit` readers its reads are folded into a `reads NAME` line in each reader."""
    readers: dict[str, list[SceneEdge]] = {}
    for edge in scene.edges:
        if edge.role == "read":
            readers.setdefault(edge.source, []).append(edge)
    by_id = {n.id: n for n in scene.nodes}
    for source, edges in readers.items():
        if len(edges) <= limit or source not in by_id:
            continue
        by_id[source].lines.append(f"read by {len(edges)} nodes (not drawn)")
        for edge in edges:
            edge.folded = True
            if edge.target in by_id:
                by_id[edge.target].lines.append(f"reads {by_id[source].name}")


def _input_node(vertex: str, data: dict, parameters: int | None) -> SceneNode:
    spec = data["spec"]
    details = {"role": "input", **_dump(spec)}
    lines = [data["kind"]]
    if data["kind"] == "tokens":
        lines = [f"tokens · vocab {spec.vocab}", f"context {spec.context}"]
    else:
        lines = [f"features · {spec.width} wide", f"context {spec.context}"]
    if data.get("width") is not None:
        details["embedding width"] = data["width"]
    if parameters:
        details["parameters"] = parameters
        lines.append(f"{_count(parameters)} params")
    return SceneNode(vertex, data["name"], "input", data["kind"], lines, details)


def _output_node(vertex: str, data: dict, parameters: int | None) -> SceneNode:
    spec = data["spec"]
    details = {"role": "output", **_dump(spec)}
    lines = [data["kind"].replace("_", " ")]
    if getattr(spec, "tie", False):
        lines[0] += " (tied)"
    if data.get("width") is not None:
        details["reads width"] = data["width"]
    if parameters is not None:
        details["parameters"] = parameters
        lines.append(f"{_count(parameters)} params")
    return SceneNode(vertex, data["name"], "output", data["kind"], lines, details)


def _model_node(ir: Any, vertex: str, estimate: dict | None) -> SceneNode:
    data = ir.graph.nodes[vertex]
    kind, node_spec = data["kind"], data["spec"]
    settings = data.get("settings") or {}
    config = data.get("config")
    node = SceneNode(vertex, data["name"], data["role"], kind, group=data.get("group"))
    node.details = {"role": data["role"], "kind": kind}
    described = KINDS.get(kind).describe(ir, vertex)
    _apply_glyph(node, described)
    node.details.update(described.details)
    summary = [kind, *described.lines[:-1]] if described.lines else [kind]
    attention = settings.get("attention")
    if attention is not None and getattr(attention, "kind", None) == "lattice":
        lattice = attention.lattice
        node.lattice = Lattice(tuple(lattice.shape), lattice.boundary, lattice.neighbourhood)
    node.lines.append(" · ".join(summary))
    if described.lines:
        node.lines.append(described.lines[-1])
    if node.lattice is not None:
        node.lines.append(f"lattice {'×'.join(map(str, node.lattice.shape))} heads")
    if estimate is not None:
        node.lines.append(
            f"{_count(estimate['parameters'])} params · {_count(estimate['flops_per_token'])} FLOPs/tok"
        )
        node.details["parameters"] = estimate["parameters"]
        node.details["FLOPs per token"] = estimate["flops_per_token"]
        if "group" in estimate:
            group = f"#{estimate['group']}"
            if estimate.get("members", 1) > 1:
                group += f" ×{estimate['members']} (batched with same-shaped nodes)"
            node.details["batch group"] = group
    resolved = {k: _jsonable(v) for k, v in settings.items() if v is not None}
    if data.get("width") is not None:
        resolved["width"] = data["width"]
    if config is not None:
        for name in ("context", "mlp_width"):
            if hasattr(config, name):
                resolved[name] = getattr(config, name)
    if not resolved:  # kinds the transformer passes do not resolve: show what was written
        resolved = _dump(node_spec)
    node.details["config"] = resolved
    return node


# --------------------------------------------------------------------------- from raw YAML


def scene_from_document(
    doc: Document | None, diagnostics: Iterable[Diagnostic], file: str = ""
) -> Scene:
    """Draw what can still be drawn of a spec that does not validate, with its errors attached.

    `doc` is None when even the YAML could not be read: the scene then holds only the errors."""
    diagnostics = list(diagnostics)
    data = doc.data if doc is not None and isinstance(doc.data, dict) else {}
    name = data.get("name") if isinstance(data.get("name"), str) else (file or "spec")
    nodes: dict[str, SceneNode] = {}
    edges: list[SceneEdge] = []

    def endpoint(vertex: str, label: str) -> str:
        graph = f"nodes.{label.split('.', 1)[0]}"
        if vertex not in nodes and "." in label and graph in nodes and nodes[graph].kind == "graph":
            return graph  # inside a sub-graph that could not be expanded: its box stands for it
        if vertex not in nodes:
            nodes[vertex] = SceneNode(vertex, label, "unknown", None, ["not declared"])
        return vertex

    inputs = _mapping(data.get("inputs"))
    for key, raw in inputs.items():
        raw = _mapping(raw)
        kind = _text(raw.get("kind"))
        lines = [kind or "input"]
        nodes[f"inputs.{key}"] = SceneNode(
            f"inputs.{key}", str(key), "input", kind, lines, {"as written": _plain(raw)}
        )
    declared = _mapping(data.get("nodes"))
    for key, raw in declared.items():
        raw = _mapping(raw)
        kind = _text(raw.get("kind"))
        node_kind = KINDS.get(kind) if kind is not None and kind in KINDS else None
        role = "observer" if node_kind is not None and node_kind.observer else "node"
        node = SceneNode(f"nodes.{key}", str(key), role, kind)
        node.details = {"kind": kind, "as written": _plain(raw)}
        summary = [kind or "node (no kind)"]
        written = node_kind.describe_written(raw) if node_kind is not None else None
        settings = raw
        if written is not None:
            _apply_glyph(node, written)
            summary.extend(written.lines)
            settings = _mapping(written.details.get("settings", raw))
        attention = _mapping(settings.get("attention"))
        shape = _mapping(attention.get("lattice")).get("shape")
        if (
            attention.get("kind") == "lattice"
            and isinstance(shape, list)
            and shape
            and all(_is_int(n) and 1 <= n <= 64 for n in shape)
            and math.prod(shape) <= 4096
        ):
            lattice = _mapping(attention.get("lattice"))
            node.lattice = Lattice(
                tuple(shape), _text(lattice.get("boundary")), _text(lattice.get("neighbourhood"))
            )
        node.lines.append(" · ".join(summary))
        shape_line = [
            f"{label}{settings[key]}"
            for key, label in (("width", "w"), ("heads", "heads "), ("layers", "layers "))
            if _is_int(settings.get(key))
        ]
        if shape_line:
            node.lines.append(" · ".join(shape_line))
        if node.lattice is not None:
            node.lines.append(f"lattice {'×'.join(map(str, node.lattice.shape))} heads")
        nodes[node.id] = node
    outputs = _mapping(data.get("outputs"))
    for key, raw in outputs.items():
        raw = _mapping(raw)
        kind = _text(raw.get("kind"))
        nodes[f"outputs.{key}"] = SceneNode(
            f"outputs.{key}",
            str(key),
            "output",
            kind,
            [(kind or "output").replace("_", " ")],
            {"as written": _plain(raw)},
        )

    only_input = next(iter(inputs)) if len(inputs) == 1 else None
    reads = 0
    for key, raw in declared.items():
        raw = _mapping(raw)
        if nodes[f"nodes.{key}"].role == "observer":
            continue  # an observer reads its host through its edge, never an input
        names = raw.get("input", [only_input] if only_input is not None else [])
        for inp in [names] if isinstance(names, str) else _list(names):
            if isinstance(inp, str):
                source = endpoint(f"inputs.{inp}", inp)
                edges.append(SceneEdge(f"reads.{reads}", source, f"nodes.{key}", "read"))
                reads += 1
    for index, raw in enumerate(_list(data.get("edges"))):
        raw = _mapping(raw)
        source, target = raw.get("from"), raw.get("to")
        if not isinstance(source, str) or not isinstance(target, str):
            continue
        kind = _text(raw.get("kind")) or "message"
        delay = raw.get("delay", 0)
        edges.append(
            SceneEdge(
                f"edges.{index}",
                endpoint(f"nodes.{source}", source),
                endpoint(f"nodes.{target}", target),
                "companion" if kind == "companion" else "edge",
                kind,
                str(raw["ratio"]) if raw.get("ratio") is not None else None,
                delay if _is_int(delay) and delay >= 0 else 0,
            )
        )
    count = 0
    for key, raw in outputs.items():
        sources = _mapping(raw).get("from")
        for source in [sources] if isinstance(sources, str) else _list(sources):
            if isinstance(source, str):
                edges.append(
                    SceneEdge(
                        f"outputs.{count}",
                        endpoint(f"nodes.{source}", source),
                        f"outputs.{key}",
                        "output",
                    )
                )
                count += 1
    errors = sum(d.severity == "error" for d in diagnostics)
    summary = f"{errors} error{'s' * (errors != 1)}: drawn from the YAML as written, not resolved"
    scene = Scene(str(name), summary, False, list(nodes.values()), edges)
    fold_reads(scene)
    attach_issues(scene, diagnostics, doc.source if doc is not None else None)
    nest_frames(scene)
    return scene


# --------------------------------------------------------------------------- diagnostics -> owners


def owner_of(path: tuple[Any, ...]) -> str | None:
    """The scene element a data path belongs to: `("nodes", "sun", "teeth")` -> `nodes.sun`."""
    if len(path) >= 2 and path[0] in ("nodes", "inputs", "outputs", "edges"):
        return f"{path[0]}.{path[1]}"
    return None


def attach_issues(
    scene: Scene, diagnostics: Iterable[Diagnostic], source: SourceMap | None
) -> None:
    """Give each diagnostic to the node or edge whose YAML it points at; the rest to the scene."""
    by_position: dict[tuple[int, int], tuple[Any, ...]] = {}
    if source is not None:
        for spans in (source.value_spans, source.key_spans):
            for path, span in spans.items():
                here = (span.line, span.col)
                if len(path) > len(by_position.get(here, ())):
                    by_position[here] = path
    items = {item.id: item for item in [*scene.nodes, *scene.edges]}
    for diagnostic in diagnostics:
        path = getattr(diagnostic, "path", None) or by_position.get(
            (diagnostic.span.line, diagnostic.span.col), ()
        )
        owner = owner_of(tuple(path))
        target = items.get(owner) if owner else None
        (target.issues if target is not None else scene.issues).append(Issue.of(diagnostic))


# --------------------------------------------------------------------------- small helpers


def _edge_order(edge_id: str) -> int:
    return int(edge_id.rsplit(".", 1)[1])


def _ratio_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else str(value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, Fraction):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float):
        return float(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _dump(model) -> dict[str, Any]:
    return _jsonable(model) if hasattr(model, "model_dump") else {}


def _plain(value: Any) -> Any:
    """Raw YAML data made JSON-able (it is plain data already: dicts, lists, scalars)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    return value


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def _count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _apply_glyph(node: SceneNode, described: Description) -> None:
    """The drawing a kind asks for: a cog (`("cog", teeth, velocity)`) or nested boxes
    (`("nest", levels, branching, width)`)."""
    glyph = described.glyph
    if glyph is None:
        return
    if glyph[0] == "cog":
        node.cog, node.teeth, node.velocity = True, glyph[1], glyph[2]
    elif glyph[0] == "nest":
        node.fractal = Fractal(*glyph[1:])
