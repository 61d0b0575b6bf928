"""Where everything goes: Graphviz's `dot` when it is installed, a layered layout in Python otherwise.

Both engines place the same boxes (sizes come from `draw.node_size`) top to bottom, inputs first and
outputs last, and route edges as cubic Bezier curves (control points `p0 c1 c2 p1 c1 c2 p2 ...`).
An edge that would run upwards (a feedback edge closing a loop through an earlier step) does not
constrain the ranks; the Python engine routes it around the right-hand side of the graph.

The Python engine is the classic layered (Sugiyama) scheme in small steps: longest-path ranks on the
forward edges (batch groups contracted so their members share a rank), dummy points on edges that
span several ranks, barycentre sweeps to order each rank (keeping a batch group's members
together), and x positions by isotonic regression towards the mean of each item's neighbours.

Sub-graphs (`Scene.frames`) are nested boxes. `dot` draws them as nested clusters. The Python
engine lays out each frame's inside on its own, innermost first, and places it in its parent as
one box of that size, so a frame never overlaps anything outside it; an edge between nodes of
different frames is routed where both ends meet (between the two frames' boxes) and, inside
each frame, from a port on the frame's top (or to one on its bottom) to its node.

`EPICYCLE_VIZ_LAYOUT=python` (or `--layout python`) forces the Python engine even where `dot` exists.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field, replace

import networkx as nx

from compiler.tools.viz.scene import Frame, Scene, SceneEdge, SceneNode, frame_id

log = logging.getLogger(__name__)

Point = tuple[float, float]
ENGINES = ("auto", "dot", "python")
ENV = "EPICYCLE_VIZ_LAYOUT"
DOT_TIMEOUT_S = 60
RANK_GAP = 70.0  # vertical room between ranks, where edge labels sit
ITEM_GAP = 34.0
GROUP_PAD = 12.0
GROUP_LABEL = 20.0
DUMMY_WIDTH = 10.0
SIDE_GAP = 26.0
SIDE_STEP = 16.0
FRAME_PAD = 12.0  # around what a sub-graph's frame holds
FRAME_LABEL = 24.0  # the band at a frame's top where its path is written


class LayoutUnavailable(Exception):
    """The requested engine cannot run here (`--layout dot` without Graphviz)."""


@dataclass(frozen=True)
class Box:
    x: float  # top-left corner
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def bottom(self) -> float:
        return self.y + self.h


@dataclass
class Layout:
    boxes: dict[str, Box]
    routes: dict[str, list[Point]]  # edge id -> cubic Bezier control points (3n + 1)
    groups: dict[int, Box]
    width: float
    height: float
    engine: str  # what the output says was used
    side_edges: set[str] = field(default_factory=set)  # routed around the side
    frames: dict[str, Box] = field(default_factory=dict)  # sub-graph path -> its frame


def dot_program() -> str | None:
    return shutil.which("dot")


def choose_engine(requested: str = "auto") -> str:
    """`dot` or `python` for a request of `auto`, `dot` or `python` (`auto` reads the env var)."""
    if requested not in ENGINES:
        raise LayoutUnavailable(f"unknown layout `{requested}`; choose one of {', '.join(ENGINES)}")
    if requested == "auto":
        requested = os.environ.get(ENV, "auto").strip().lower() or "auto"
        if requested not in ENGINES:
            raise LayoutUnavailable(
                f"{ENV}={requested!r} is not a layout; choose one of {', '.join(ENGINES)}"
            )
    if requested == "dot" and dot_program() is None:
        raise LayoutUnavailable(
            "the `dot` layout needs Graphviz's `dot` program, which is not installed "
            "(Debian: apt-get install graphviz); or use `--layout python`"
        )
    if requested == "auto":
        return "dot" if dot_program() is not None else "python"
    return requested


def layout(scene: Scene, sizes: dict[str, tuple[float, float]], engine: str = "auto") -> Layout:
    """Place `scene` with the chosen engine; `auto` falls back to Python if `dot` fails."""
    chosen = choose_engine(engine)
    if chosen == "dot":
        try:
            return dot_layout(scene, sizes)
        except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
            if engine == "dot" or os.environ.get(ENV, "").strip().lower() == "dot":
                raise LayoutUnavailable(f"graphviz `dot` failed: {exc}") from None
            log.warning("graphviz dot failed (%s); using the pure-Python layout", exc)
            result = python_layout(scene, sizes)
            result.engine += f" (graphviz dot failed: {str(exc)[:80]})"
            return result
    return python_layout(scene, sizes)


# --------------------------------------------------------------------------- which edges lead


def forward_and_side(scene: Scene) -> tuple[list[SceneEdge], list[SceneEdge]]:
    """Edges that constrain the ranks (pointing down) and edges routed around (pointing up).

    Same-step edges come first, so a delayed edge closing a loop is the one sent around; an edge
    whose endpoints share a batch group, or that would close a cycle anyway, goes around too."""
    group_of = {m: g.index for g in scene.groups for m in g.members}
    dag = nx.DiGraph()
    dag.add_nodes_from(_unit(n.id, group_of) for n in scene.nodes)
    forward, side = [], []
    for edge in sorted((e for e in scene.edges if not e.folded), key=lambda e: e.feedback):
        a, b = _unit(edge.source, group_of), _unit(edge.target, group_of)
        if a == b or nx.has_path(dag, b, a):
            side.append(edge)
        else:
            dag.add_edge(a, b)
            forward.append(edge)
    return forward, side


def _unit(node_id: str, group_of: dict[str, int]) -> str:
    return f"group {group_of[node_id]}" if node_id in group_of else node_id


# --------------------------------------------------------------------------- graphviz


def dot_version() -> str:
    result = subprocess.run(
        [dot_program() or "dot", "-V"], capture_output=True, text=True, timeout=10, check=False
    )
    text = (result.stderr or result.stdout).strip()
    return text.split("version", 1)[1].split()[0] if "version" in text else "?"


def dot_source(scene: Scene, sizes: dict[str, tuple[float, float]]) -> tuple[str, dict[str, str]]:
    """The DOT text handed to Graphviz (boxes of our sizes, no labels) and its node names."""
    names = {node.id: f"n{i}" for i, node in enumerate(scene.nodes)}
    forward, side = forward_and_side(scene)
    side_ids = {e.id for e in side}
    lines = [
        "digraph epicycle {",
        '  graph [rankdir=TB, nodesep=0.5, ranksep=0.95, splines=spline, margin=0, pad="0.2"];',
        '  node [shape=box, fixedsize=true, label=""];',
        "  edge [arrowhead=none];",
    ]
    if scene.frames:
        lines.insert(2, "  newrank=true;")  # rank=min / rank=max hold across the clusters
    framed = {m for f in scene.frames for m in f.members}
    lines.extend(_dot_block(scene, None, sizes, names, "  "))
    inputs = [names[n.id] for n in scene.nodes if n.role == "input"]
    outputs = [names[n.id] for n in scene.nodes if n.role == "output" and n.id not in framed]
    if inputs:
        lines.append(f"  {{ rank=min; {'; '.join(inputs)}; }}")
    if outputs:
        lines.append(f"  {{ rank=max; {'; '.join(outputs)}; }}")
    first_reader = {}
    for edge in scene.edges:
        if edge.folded:  # one invisible edge keeps a folded input on top of its readers
            first_reader.setdefault(edge.source, edge.target)
    for source, target in first_reader.items():
        lines.append(f"  {names[source]} -> {names[target]} [style=invis];")
    for edge in scene.edges:
        if edge.folded:
            continue
        extra = ", constraint=false" if edge.id in side_ids else ""
        lines.append(f'  {names[edge.source]} -> {names[edge.target]} [id="{edge.id}"{extra}];')
    lines.append("}")
    return "\n".join(lines) + "\n", names


def _dot_block(
    scene: Scene,
    frame: Frame | None,
    sizes: dict[str, tuple[float, float]],
    names: dict[str, str],
    pad: str,
) -> list[str]:
    """The nodes directly in `frame` (the top level for None), its batch groups as clusters, and
    its sub-graphs as clusters nested inside it. A label of our label's length makes dot leave
    room for it; we draw our own text there."""
    members = frame.members if frame is not None else _top_level(scene)
    grouped = {m for g in scene.groups for m in g.members}
    lines = []
    for node_id in members:
        if node_id not in grouped:
            lines.append(f"{pad}{_dot_box(names[node_id], sizes[node_id])}")
    here = set(members)
    for group in scene.groups:
        if group.members[0] not in here:
            continue
        lines.append(
            f'{pad}subgraph cluster_g{group.index} {{ label="{"x" * len(group.label)}"; '
            f'fontsize=11; labeljust=l; margin="{GROUP_PAD:.0f}";'
        )
        lines.extend(f"{pad}  {_dot_box(names[m], sizes[m])}" for m in group.members)
        lines.append(f"{pad}}}")
    index = {f.path: i for i, f in enumerate(scene.frames)}
    for inner in frame.frames if frame is not None else _top_frames(scene):
        child = scene.frames[index[inner]]
        width, height = sizes.get(child.id, (0.0, FRAME_LABEL))
        room = (  # an empty label of the size of ours (in points: one of our pixels each)
            '<<table border="0" cellpadding="0" cellspacing="0"><tr>'
            f'<td fixedsize="true" width="{max(width, 1):.0f}" height="{height:.0f}"></td>'
            "</tr></table>>"
        )
        lines.append(
            f"{pad}subgraph cluster_f{index[inner]} {{ label={room}; "
            f'labeljust=l; margin="{FRAME_PAD:.0f}";'
        )
        lines.extend(_dot_block(scene, child, sizes, names, pad + "  "))
        lines.append(f"{pad}}}")
    return lines


def _dot_box(name: str, size: tuple[float, float]) -> str:
    w, h = size
    return f'{name} [width="{w / 72:.4f}", height="{h / 72:.4f}"];'


def _top_level(scene: Scene) -> list[str]:
    framed = {m for f in scene.frames for m in f.members}
    return [n.id for n in scene.nodes if n.id not in framed]


def _top_frames(scene: Scene) -> list[str]:
    return [f.path for f in scene.frames if f.parent is None]


def dot_layout(scene: Scene, sizes: dict[str, tuple[float, float]]) -> Layout:
    text, names = dot_source(scene, sizes)
    result = subprocess.run(
        [dot_program() or "dot", "-Tjson0"],
        input=text,
        capture_output=True,
        text=True,
        timeout=DOT_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        raise ValueError(result.stderr.strip().splitlines()[-1] if result.stderr else "no output")
    data = json.loads(result.stdout)
    _, _, width, height = (float(v) for v in data["bb"].split(","))
    by_name = {v: k for k, v in names.items()}
    boxes, groups, frames = {}, {}, {}
    for obj in data.get("objects", []):
        if obj["name"].startswith("cluster_"):
            x0, y0, x1, y1 = (float(v) for v in obj["bb"].split(","))
            box = Box(x0, height - y1, x1 - x0, y1 - y0)
            kind, number = obj["name"][len("cluster_")], int(obj["name"][len("cluster_") + 1 :])
            if kind == "g":
                groups[number] = box
            else:
                frames[scene.frames[number].path] = box
        elif obj["name"] in by_name:
            node_id = by_name[obj["name"]]
            x, y = (float(v) for v in obj["pos"].split(","))
            w, h = sizes[node_id]
            boxes[node_id] = Box(x - w / 2, height - y - h / 2, w, h)
    routes = {}
    for edge in data.get("edges", []):
        if "id" not in edge:
            continue
        points = [
            tuple(float(v) for v in token.split(","))
            for token in edge["pos"].split()
            if not token.startswith(("e,", "s,"))
        ]
        routes[edge["id"]] = [(x, height - y) for x, y in points]
    missing = {n.id for n in scene.nodes} - set(boxes)
    if missing:
        raise ValueError(f"dot placed no box for {sorted(missing)[:3]}")
    _, side = forward_and_side(scene)
    return Layout(
        boxes,
        routes,
        groups,
        width,
        height,
        f"graphviz dot {dot_version()}",
        {e.id for e in side},
        frames,
    )


# --------------------------------------------------------------------------- pure Python


def python_layout(scene: Scene, sizes: dict[str, tuple[float, float]]) -> Layout:
    if scene.frames:
        return _nested_layout(scene, sizes)
    return _layered(scene, sizes)


def _nested_layout(scene: Scene, sizes: dict[str, tuple[float, float]]) -> Layout:
    """Each frame's inside laid out on its own (innermost first) and placed in its parent as one
    box; see the module's docstring.

    A forward edge that enters a frame comes in through a port, a point on the top rank of the
    frame's own layout, and one that leaves goes out through a port on its bottom rank, so inside
    the frame it is routed between the boxes like any edge there; its pieces (out of each frame
    around the source, between the outermost two, into each frame around the target) are joined
    at the frames' borders. An edge running upwards across frames is routed between the frames'
    boxes and carried on straight to its nodes."""
    frames = {f.path: f for f in scene.frames}
    chains = scene.frame_chains()
    _, side = forward_and_side(scene)
    upwards = {e.id for e in side}
    blocks: dict[str | None, Layout] = {}
    units: dict[str, tuple[str, str]] = {}  # edge -> the two boxes its middle piece joins

    def lay_out(path: str | None) -> Layout:
        frame = frames.get(path)
        inner = frame.frames if frame is not None else _top_frames(scene)
        for child in inner:
            blocks[child] = lay_out(child)
        depth = 0 if path is None else frames[path].depth
        nodes = [
            n for n in scene.nodes if len(chains[n.id]) == depth and _within(chains[n.id], path)
        ]
        local = dict(sizes)
        for child in inner:
            stand_in = SceneNode(frame_id(child), child, "frame", None)
            nodes.append(stand_in)
            local[stand_in.id] = _frame_size(blocks[child], sizes.get(stand_in.id))
        edges = []
        for edge in scene.edges:
            a, b = (_stand_in(chains[end], end, path, depth) for end in (edge.source, edge.target))
            if a is not None and b is not None:
                if a == b and a != edge.source:
                    continue  # inside one of its sub-graphs
                units[edge.id] = (a, b)
                edges.append(replace(edge, source=a, target=b))
            elif (a or b) and not edge.folded and edge.id not in upwards:
                port = SceneNode(f"~{'out' if a else 'in'}~{edge.id}", "", "port", None)
                nodes.append(port)
                local[port.id] = (DUMMY_WIDTH, 1.0)
                edges.append(replace(edge, source=a or port.id, target=b or port.id))
        ids = {n.id for n in nodes}
        groups = [g for g in scene.groups if all(m in ids for m in g.members)]
        return _inside_its_block(
            _layered(Scene(scene.title, "", True, nodes, edges, groups), local)
        )

    root = lay_out(None)
    placed = Layout({}, {}, {}, root.width, root.height, root.engine)
    pieces: dict[tuple[str | None, str], list[Point]] = {}  # (frame, edge) -> its route there

    def place(path: str | None, dx: float, dy: float) -> None:
        block = blocks[path] if path is not None else root
        placed.side_edges |= block.side_edges
        for item, box in block.boxes.items():
            moved = Box(box.x + dx, box.y + dy, box.w, box.h)
            if item.startswith("graphs.") and item[len("graphs.") :] in blocks:
                child = item[len("graphs.") :]
                placed.frames[child] = moved
                place(child, moved.x + FRAME_PAD, moved.y + FRAME_LABEL)
            elif not item.startswith("~"):  # a port is a point of a route, not a box
                placed.boxes[item] = moved
        for index, box in block.groups.items():
            placed.groups[index] = Box(box.x + dx, box.y + dy, box.w, box.h)
        for edge_id, route in block.routes.items():
            pieces[(path, edge_id)] = [(x + dx, y + dy) for x, y in route]

    place(None, 0.0, 0.0)
    for edge in scene.edges:
        source, target = chains[edge.source], chains[edge.target]
        shared = _shared(source, target)
        middle = pieces.get((shared[-1] if shared else None, edge.id))
        if middle is None:
            continue  # folded, or not routed
        outwards = [pieces.get((path, edge.id)) for path in reversed(source[len(shared) :])]
        inwards = [pieces.get((path, edge.id)) for path in target[len(shared) :]]
        if edge.id in upwards or None in outwards or None in inwards:
            placed.routes[edge.id] = _continued(
                middle,
                edge.source,
                edge.target,
                units[edge.id],
                placed.boxes,
                edge.id in placed.side_edges,
            )
        else:
            placed.routes[edge.id] = _joined([*outwards, middle, *inwards])
    return placed


def _shared(a: list[str], b: list[str]) -> list[str]:
    """The frames around both of two nodes, outermost first."""
    common = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        common.append(x)
    return common


def _joined(pieces: list[list[Point]]) -> list[Point]:
    """One route through pieces that end and start on either side of a frame's border."""
    route = pieces[0]
    for piece in pieces[1:]:
        route = route + _vertical_curve([route[-1], piece[0]])[1:] + piece[1:]
    return route


def _within(chain: list[str], path: str | None) -> bool:
    """Whether a node whose frames are `chain` lies inside the frame `path` (None: the spec)."""
    if path is None:
        return True
    depth = path.count(".") + 1
    return len(chain) >= depth and chain[depth - 1] == path


def _stand_in(chain: list[str], node_id: str, path: str | None, depth: int) -> str | None:
    """What stands for a node in the block of frame `path`: itself if it is directly inside,
    the box of the sub-graph that holds it if it is deeper; None if it is outside the frame."""
    if not _within(chain, path):
        return None
    return node_id if len(chain) == depth else frame_id(chain[depth])


def _inside_its_block(block: Layout) -> Layout:
    """The block moved right so that a side channel run left of its boxes stays inside it (and
    so inside its frame)."""
    left = min((x for route in block.routes.values() for x, _ in route), default=GROUP_PAD)
    dx = max(0.0, GROUP_PAD - left)
    if not dx:
        return block
    return replace(
        block,
        boxes={k: replace(b, x=b.x + dx) for k, b in block.boxes.items()},
        groups={k: replace(b, x=b.x + dx) for k, b in block.groups.items()},
        routes={k: [(x + dx, y) for x, y in r] for k, r in block.routes.items()},
        width=block.width + dx,
    )


def _frame_size(block: Layout, label: tuple[float, float] | None) -> tuple[float, float]:
    """Its inside with a margin, and at least as wide as its label (`sizes[frame id]`)."""
    width = max(block.width + 2 * FRAME_PAD, label[0] if label else 0.0)
    return width, block.height + FRAME_LABEL + FRAME_PAD


def _continued(
    route: list[Point],
    source: str,
    target: str,
    units: tuple[str, str],
    boxes: dict[str, Box],
    upwards: bool,
) -> list[Point]:
    """A route between two frames' boxes carried on, inside each, to the node it leaves or
    enters (from a node's bottom, into a node's top; the other way round for an upward edge)."""
    if units[0] != source:
        box = boxes[source]
        start = (box.x + box.w * 0.8, box.y) if upwards else (box.cx, box.bottom)
        route = _vertical_curve([start, route[0]]) + route[1:]
    if units[1] != target:
        box = boxes[target]
        end = (box.x + box.w * 0.8, box.bottom) if upwards else (box.cx, box.y)
        route = route + _vertical_curve([route[-1], end])[1:]
    return route


def _layered(scene: Scene, sizes: dict[str, tuple[float, float]]) -> Layout:
    forward, side = forward_and_side(scene)
    group_of = {m: g.index for g in scene.groups for m in g.members}
    rank = _ranks(scene, forward, group_of)
    depth = max(rank.values(), default=0) + 1

    # dummy points on long edges: one per intermediate rank
    layers: list[list[str]] = [[] for _ in range(depth)]
    for node in scene.nodes:
        layers[rank[node.id]].append(node.id)
    width_of = {n: sizes[n][0] for n in rank}
    chains: dict[str, list[str]] = {}
    links: list[tuple[str, str]] = []
    for edge in forward:
        chain = [edge.source]
        for r in range(rank[edge.source] + 1, rank[edge.target]):
            dummy = f"~{edge.id}~{r}"
            layers[r].append(dummy)
            width_of[dummy] = DUMMY_WIDTH
            rank[dummy] = r
            chain.append(dummy)
        chain.append(edge.target)
        chains[edge.id] = chain
        links.extend(zip(chain, chain[1:], strict=False))
    up = {item: [] for layer in layers for item in layer}
    down = {item: [] for layer in layers for item in layer}
    for a, b in links:
        down[a].append(b)
        up[b].append(a)

    _order(layers, up, down, group_of)
    x = _place(layers, up, down, width_of, group_of)

    heights = [max((sizes[i][1] for i in layer if i in sizes), default=0.0) for layer in layers]
    tops, y = [], GROUP_PAD + GROUP_LABEL
    for h in heights:
        tops.append(y)
        y += h + RANK_GAP
    boxes = {}
    for node in scene.nodes:
        w, h = sizes[node.id]
        r = rank[node.id]
        boxes[node.id] = Box(x[node.id] - w / 2, tops[r] + (heights[r] - h) / 2, w, h)
    groups = {}
    for group in scene.groups:
        members = [boxes[m] for m in group.members]
        x0 = min(b.x for b in members) - GROUP_PAD
        y0 = min(b.y for b in members) - GROUP_PAD - GROUP_LABEL
        x1 = max(b.right for b in members) + GROUP_PAD
        y1 = max(b.bottom for b in members) + GROUP_PAD
        groups[group.index] = Box(x0, y0, x1 - x0, y1 - y0)

    routes = _forward_routes(forward, chains, boxes, x, tops, heights, rank)
    right = max([b.right for b in boxes.values()] + [b.right for b in groups.values()] + [0.0])
    routes.update(_side_routes(side, boxes, groups, group_of, rank, tops, heights))
    width = max([right] + [p[0] for r in routes.values() for p in r]) + GROUP_PAD + 40
    height = max([b.bottom for b in boxes.values()] + [b.bottom for b in groups.values()] + [0.0])
    return Layout(
        boxes,
        routes,
        groups,
        width,
        height + GROUP_PAD,
        "pure-Python layered",
        {e.id for e in side},
    )


def _ranks(scene: Scene, forward: list[SceneEdge], group_of: dict[str, int]) -> dict[str, int]:
    """Longest-path ranks from the sources; a batch group's members share one; outputs last."""
    dag = nx.DiGraph()
    dag.add_nodes_from(_unit(n.id, group_of) for n in scene.nodes)
    dag.add_edges_from((_unit(e.source, group_of), _unit(e.target, group_of)) for e in forward)
    unit_rank: dict[str, int] = {}
    for unit in nx.topological_sort(dag):
        unit_rank[unit] = max((unit_rank[p] + 1 for p in dag.predecessors(unit)), default=0)
    rank = {n.id: unit_rank[_unit(n.id, group_of)] for n in scene.nodes}
    # a frame's ports out of it (`_nested_layout`) on its bottom rank, as its outputs
    outputs = [n.id for n in scene.nodes if n.role == "output" or n.id.startswith("~out~")]
    if outputs:
        last = max(rank.values())
        for output in outputs:
            if not any(True for _ in dag.successors(output)):
                rank[output] = last
    return rank


def _order(
    layers: list[list[str]],
    up: dict[str, list[str]],
    down: dict[str, list[str]],
    group_of: dict[str, int],
) -> None:
    """Barycentre sweeps down and up; a batch group moves as one unit, its members in bus order."""
    position = {item: i for layer in layers for i, item in enumerate(layer)}

    def sort_layer(layer: list[str], neighbours: dict[str, list[str]]) -> list[str]:
        bary = {}
        for item in layer:
            around = neighbours[item]
            bary[item] = (
                sum(position[n] for n in around) / len(around) if around else position[item]
            )
        units: dict[object, list[str]] = {}
        for item in layer:
            units.setdefault(("g", group_of[item]) if item in group_of else item, []).append(item)
        ordered = sorted(
            units.values(),
            key=lambda members: (
                sum(bary[m] for m in members) / len(members),
                min(position[m] for m in members),
            ),
        )
        return [m for members in ordered for m in members]

    for _ in range(6):
        for r in range(1, len(layers)):
            layers[r] = sort_layer(layers[r], up)
            position.update({item: i for i, item in enumerate(layers[r])})
        for r in range(len(layers) - 2, -1, -1):
            layers[r] = sort_layer(layers[r], down)
            position.update({item: i for i, item in enumerate(layers[r])})


def _place(
    layers: list[list[str]],
    up: dict[str, list[str]],
    down: dict[str, list[str]],
    width_of: dict[str, float],
    group_of: dict[str, int],
) -> dict[str, float]:
    """x of each item's centre: close to its neighbours' mean, never overlapping its rank-mates."""

    def gap(a: str, b: str) -> float:
        same_group = a in group_of and group_of.get(a) == group_of.get(b)
        pad = 0.0 if same_group else GROUP_PAD * ((a in group_of) + (b in group_of))
        base = ITEM_GAP if not (a.startswith("~") or b.startswith("~")) else ITEM_GAP / 2
        return (width_of[a] + width_of[b]) / 2 + base + pad

    x: dict[str, float] = {}
    for layer in layers:
        at = 0.0
        for i, item in enumerate(layer):
            at = at + gap(layer[i - 1], item) if i else width_of[item] / 2
            x[item] = at
    for sweep in range(12):
        order = range(len(layers)) if sweep % 2 == 0 else range(len(layers) - 1, -1, -1)
        for r in order:
            layer = layers[r]
            if not layer:
                continue
            wanted = []
            for item in layer:
                around = up[item] + down[item]
                wanted.append(sum(x[n] for n in around) / len(around) if around else x[item])
            offsets = [0.0]
            for a, b in zip(layer, layer[1:], strict=False):
                offsets.append(offsets[-1] + gap(a, b))
            placed = _isotonic([w - o for w, o in zip(wanted, offsets, strict=True)])
            for item, value, offset in zip(layer, placed, offsets, strict=True):
                x[item] = value + offset
    left = min(x[item] - width_of[item] / 2 for item in x) if x else 0.0
    return {item: value - left + GROUP_PAD for item, value in x.items()}


def _isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence nearest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, n2 = blocks.pop()
            m1, n1 = blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    out = []
    for mean, count in blocks:
        out.extend([mean] * int(count))
    return out


def _forward_routes(
    forward: list[SceneEdge],
    chains: dict[str, list[str]],
    boxes: dict[str, Box],
    x: dict[str, float],
    tops: list[float],
    heights: list[float],
    rank: dict[str, int],
) -> dict[str, list[Point]]:
    """Smooth curves leaving a box's bottom and entering the next box's top, through the dummies."""

    def near_x(edge: SceneEdge, end: str) -> float:
        chain = chains[edge.id]
        return x[chain[1]] if end == "out" else x[chain[-2]]

    out_port, in_port = {}, {}
    for end, ports, key in (("out", out_port, "source"), ("in", in_port, "target")):
        by_node: dict[str, list[SceneEdge]] = {}
        for edge in forward:
            by_node.setdefault(getattr(edge, key), []).append(edge)
        for node_id, edges in by_node.items():
            edges.sort(key=lambda e, end=end: near_x(e, end))
            box = boxes[node_id]
            step = min(16.0, 0.7 * box.w / max(len(edges), 1))
            for i, edge in enumerate(edges):
                ports[edge.id] = box.cx + (i - (len(edges) - 1) / 2) * step
    routes = {}
    for edge in forward:
        chain = chains[edge.id]
        points: list[Point] = [(out_port[edge.id], boxes[edge.source].bottom)]
        for dummy in chain[1:-1]:
            r = rank[dummy]
            points.append((x[dummy], tops[r]))
            points.append((x[dummy], tops[r] + heights[r]))
        points.append((in_port[edge.id], boxes[edge.target].y))
        routes[edge.id] = _vertical_curve(points)
    return routes


def _vertical_curve(points: list[Point]) -> list[Point]:
    """Cubic Beziers through `points`, leaving and entering each one vertically."""
    curve = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        dy = (y1 - y0) / 2
        curve.extend([(x0, y0 + dy), (x1, y1 - dy), (x1, y1)])
    return curve


def _side_routes(
    side: list[SceneEdge],
    boxes: dict[str, Box],
    groups: dict[int, Box],
    group_of: dict[str, int],
    rank: dict[str, int],
    tops: list[float],
    heights: list[float],
) -> dict[str, list[Point]]:
    """Edges that run upwards leave the source's top and enter the target's bottom. Between
    adjacent ranks that is one curve; further apart, the edge runs along the gaps between ranks to
    a vertical channel beside every box it passes (on the nearer side) and back. A self-loop
    bulges out of the box's right side. Channels never share a stretch."""
    routes = {}
    lanes: list[tuple[float, float, float]] = []  # (top, bottom, x) of channel runs taken
    legs: dict[int, int] = {}  # horizontal legs already in each gap
    frames = {n: groups[group_of[n]] for n in boxes if n in group_of and group_of[n] in groups}

    def gap_y(r: int, above: bool) -> float:
        """A height in the gap above rank r (or below it), one lane per leg."""
        key = r if above else r + 1
        k = legs.get(key, 0)
        legs[key] = k + 1
        edge_of_gap = (
            tops[r] - GROUP_LABEL - GROUP_PAD if above else tops[r] + heights[r] + GROUP_PAD
        )
        return edge_of_gap + (-1 if above else 1) * (10 + 7 * k)

    for edge in sorted(side, key=lambda e: abs(rank[e.source] - rank[e.target])):
        a, b = boxes[edge.source], boxes[edge.target]
        ra, rb = rank[edge.source], rank[edge.target]
        if edge.source == edge.target:
            x = a.right + SIDE_GAP
            routes[edge.id] = [
                (a.right, a.cy + a.h / 5),
                (x, a.cy + a.h / 5),
                (x, a.cy - a.h / 5),
                (a.right, a.cy - a.h / 5),
            ]
            continue
        start = (a.x + a.w * 0.8, a.y)
        if ra == rb:  # over the top of their rank
            end = (b.x + b.w * 0.8, b.y)
            y = gap_y(ra, above=True)
            routes[edge.id] = [start, (start[0], y), (end[0], y), end]
            continue
        end = (b.x + b.w * 0.8, b.bottom)
        if ra == rb + 1:
            routes[edge.id] = _vertical_curve([start, end])
            continue
        between = [n for n in boxes if rb < rank[n] < ra]
        right = max(max(boxes[n].right, frames[n].right if n in frames else 0) for n in between)
        left = min(min(boxes[n].x, frames[n].x if n in frames else 1e18) for n in between)
        go_right = right - a.cx <= a.cx - left
        channel = right + SIDE_GAP if go_right else left - SIDE_GAP
        y1, y2 = gap_y(ra, above=True), gap_y(rb, above=False)
        while any(t < y1 + 8 and y2 - 8 < bt and abs(cx - channel) < 1 for t, bt, cx in lanes):
            channel += SIDE_STEP if go_right else -SIDE_STEP
        lanes.append((y2, y1, channel))
        routes[edge.id] = [
            start,
            *_corner(start, (start[0], y1), (channel, y1)),
            *_corner((start[0], y1), (channel, y1), (channel, y2)),
            *_corner((channel, y1), (channel, y2), (end[0], y2)),
            *_corner((channel, y2), (end[0], y2), end),
            *_line((end[0], y2 - 0.0), end),
        ]
    return routes


def _line(p: Point, q: Point) -> list[Point]:
    return [
        (p[0] + (q[0] - p[0]) / 3, p[1] + (q[1] - p[1]) / 3),
        (p[0] + 2 * (q[0] - p[0]) / 3, p[1] + 2 * (q[1] - p[1]) / 3),
        q,
    ]


def _corner(previous: Point, corner: Point, following: Point, radius: float = 8.0) -> list[Point]:
    """Straight from where we are towards `corner`, then a rounded turn towards `following`."""

    def towards(p: Point, q: Point, d: float) -> Point:
        length = max(((q[0] - p[0]) ** 2 + (q[1] - p[1]) ** 2) ** 0.5, 1e-9)
        d = min(d, length / 2)
        return (p[0] + (q[0] - p[0]) * d / length, p[1] + (q[1] - p[1]) * d / length)

    before, after = towards(corner, previous, radius), towards(corner, following, radius)
    return [*_line(previous, before)[:2], before, corner, corner, after]
