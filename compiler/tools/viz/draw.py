"""From a placed scene to a `Figure`: rectangles, circles, polygons, curves and text, nothing more.

The figure is what the SVG and PNG writers emit, each in a few lines, so the two pictures are the
same drawing. Every shape belongs to an `Element` named after the node or edge it draws (the HTML
page makes those clickable). Sizes are in CSS pixels; text widths are estimated from DejaVu Sans's
proportions (the font both Chromium and matplotlib use here), with room to spare.

What a reader sees: boxes tinted by kind (transformer, gear with a cog, fractal with its levels as
nested boxes, lattice layouts as a grid of heads), sub-graphs as frames labelled by their path
(nested to any depth; a closed one as a box with a double outline), batch groups as dashed
frames, edges by kind
(gear trains amber and thick, feedback red and dashed, cross-attention dotted) labelled with their
exact ratio and delay, a legend of what is present, the layout engine, and any located errors.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace

from compiler.tools.viz.layout import FRAME_LABEL, Box, Layout, Point
from compiler.tools.viz.scene import GEAR_TRAIN_KINDS, Frame, Scene, SceneEdge, SceneNode

FONT = "DejaVu Sans, Verdana, Arial, sans-serif"
PAD = 10.0
NAME_SIZE = 13.0
LINE_SIZE = 11.0
NAME_HEIGHT = 19.0
LINE_HEIGHT = 15.0
COG = 24.0
CELL = 13.0
MAX_CELLS = 16
LEAF_WIDTH = 24.0
LEAF_HEIGHT = 18.0
NEST_PAD = 4.0
NEST_LABEL = 13.0
MARGIN = 20.0
HEADER = 62.0
TOGGLE = 16.0  # the open/close button of a sub-graph on the HTML page

KIND_COLOURS = {  # roles; node kinds bring their own (`NodeKind.colour`)
    "input": "#2f855a",
    "output": "#c05621",
    "unknown": "#718096",
    "graph": "#2c5282",  # a sub-graph: its frame, or its box when it is drawn closed
}
OTHER_KIND = "#4a5568"
ERROR = "#e53e3e"
TEXT = "#1a202c"
MUTED = "#4a5568"


@dataclass(frozen=True)
class Style:
    fill: str = "none"
    stroke: str = "none"
    width: float = 1.0
    dash: tuple[float, ...] | None = None
    opacity: float = 1.0


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    style: Style
    rx: float = 0.0


@dataclass(frozen=True)
class Circle:
    cx: float
    cy: float
    r: float
    style: Style


@dataclass(frozen=True)
class Poly:
    points: tuple[Point, ...]
    style: Style
    closed: bool = True


@dataclass(frozen=True)
class Curve:
    points: tuple[Point, ...]  # cubic Bezier control points, 3n + 1
    style: Style


@dataclass(frozen=True)
class Text:
    x: float
    y: float  # baseline
    text: str
    size: float = LINE_SIZE
    colour: str = TEXT
    weight: str = "normal"
    anchor: str = "start"  # start | middle | end


Shape = Rect | Circle | Poly | Curve | Text


@dataclass
class Element:
    cls: str  # node | edge | group | frame | toggle | decoration
    id: str | None = None
    shapes: list[Shape] = field(default_factory=list)
    hit: Curve | None = None  # a wide invisible stroke that makes a thin edge easy to hover


@dataclass
class Figure:
    width: float
    height: float
    title: str
    elements: list[Element]
    engine: str
    offset: Point  # where the layout's origin sits in the figure


# --------------------------------------------------------------------------- measuring


def text_width(text: str, size: float, bold: bool = False) -> float:
    """An over-estimate of DejaVu Sans's advance widths, so boxes never clip their text."""
    total = 0.0
    for ch in text:
        if ch in "il.,:;|!'`ijtfrI ()[]":
            total += 0.32
        elif ch in "mwMW@%":
            total += 0.88
        elif ch.isupper() or ch in "ω×≥":
            total += 0.7
        else:
            total += 0.6
    return total * size * (1.1 if bold else 1.0)


def node_size(node: SceneNode) -> tuple[float, float]:
    width = text_width(node.name, NAME_SIZE, bold=True) + (COG + 6 if node.cog else 0)
    if node.role == "graph":
        width += TOGGLE + 6
    width = max([width] + [text_width(line, LINE_SIZE) for line in node.lines])
    height = PAD + NAME_HEIGHT + LINE_HEIGHT * len(node.lines)
    if node.lattice is not None:
        rows, cols = _grid_drawn(node)
        width = max(width, cols * CELL)
        height += rows * CELL + 6
    if node.fractal is not None:
        w, h = _nest_size(node.fractal.branching, node.fractal.drawn_levels)
        width = max(width, w)
        height += h + 6
        if node.fractal.drawn_levels < node.fractal.levels:
            height += LINE_HEIGHT
    return max(width + 2 * PAD, 120.0), height + PAD


def frame_label_size(frame: Frame) -> tuple[float, float]:
    """The room a frame's top band needs for its button, path and counts: the layouts make the
    frame at least this wide."""
    path = text_width(frame.path, 12, bold=True)
    return 8 + TOGGLE + 6 + path + 10 + text_width(" · ".join(frame.lines), 10) + 8, FRAME_LABEL


def _grid_drawn(node: SceneNode) -> tuple[int, int]:
    rows, cols = node.lattice.grid
    return min(rows, MAX_CELLS), min(cols, MAX_CELLS)


def _nest_size(branching: int, levels: int) -> tuple[float, float]:
    w, h = LEAF_WIDTH, LEAF_HEIGHT
    for _ in range(levels - 1):
        w = branching * w + (branching + 1) * NEST_PAD
        h = h + NEST_LABEL + NEST_PAD
    return w, h


# --------------------------------------------------------------------------- the figure


def draw(
    scene: Scene, placed: Layout, *, show_issues: bool = True, toggles: Collection[str] = ()
) -> Figure:
    """`toggles` are the paths of the sub-graphs that get a button (on the frame, or on the box
    when closed), which the HTML page opens and closes; pictures that cannot be clicked have
    none."""
    legend_rows = _legend(scene)
    issue_lines = _issue_lines(scene) if show_issues else []
    title_w = text_width(scene.title, 18, bold=True) + text_width(scene.summary, 12) + 40
    legend_w = max((sum(_legend_width(i) for i in row) for row in legend_rows), default=0.0)
    width = max(placed.width + 2 * MARGIN, title_w, legend_w + 2 * MARGIN, 520.0)
    ox, oy = MARGIN + max(0.0, (width - 2 * MARGIN - placed.width) / 2), HEADER
    elements: list[Element] = []
    header = Element("decoration")
    header.shapes.append(Text(MARGIN, 30, scene.title, 18, TEXT, "bold"))
    header.shapes.append(Text(MARGIN, 50, scene.summary, 12, ERROR if not scene.valid else MUTED))
    elements.append(header)

    def at(box: Box) -> Box:
        return Box(box.x + ox, box.y + oy, box.w, box.h)

    for frame in sorted(scene.frames, key=lambda f: f.depth):  # outer frames under inner ones
        if frame.path in placed.frames:
            button = frame.path in toggles
            elements.extend(_frame(frame, at(placed.frames[frame.path]), button))
    for group in scene.groups:
        if group.index in placed.groups:
            box = at(placed.groups[group.index])
            element = Element("group", f"groups.{group.index}")
            element.shapes.append(
                Rect(box.x, box.y, box.w, box.h, Style("#f7fafc", "#718096", 1.2, (5, 4)), 10)
            )
            element.shapes.append(Text(box.x + 10, box.y + 15, group.label, 11, MUTED))
            elements.append(element)
    taken = [at(b) for b in placed.boxes.values()]  # where labels must not go
    taken += [
        Box(b.x + ox, b.y + oy, text_width(g.label, 11) + 12, 20)
        for g in scene.groups
        if (b := placed.groups.get(g.index))
    ]
    taken += [  # a frame's label band
        Box(b.x + ox, b.y + oy, b.w, FRAME_LABEL)
        for f in scene.frames
        if (b := placed.frames.get(f.path))
    ]
    for edge in scene.edges:
        route = placed.routes.get(edge.id)
        if route:
            elements.append(_edge(edge, tuple((x + ox, y + oy) for x, y in route), taken))
    for node in scene.nodes:
        elements.append(_node(node, at(placed.boxes[node.id])))
        if node.role == "graph" and node.name in toggles:
            box = at(placed.boxes[node.id])
            elements.append(_toggle(node.id, box.x + PAD, box.y + PAD - 1, opened=False))

    y = oy + placed.height + 24
    footer = Element("decoration")
    for row in legend_rows:
        x = MARGIN
        for item in row:
            footer.shapes.extend(_legend_item(item, x, y))
            x += _legend_width(item)
        y += 22
    footer.shapes.append(Text(MARGIN, y + 4, f"layout: {placed.engine}", 11, MUTED))
    y += 24
    for text, colour, size in issue_lines:
        footer.shapes.append(Text(MARGIN, y, text, size, colour, "bold" if size > 11 else "normal"))
        width = max(width, text_width(text, size) + 2 * MARGIN)
        y += size + 5
    elements.append(footer)
    return _fitted(Figure(width, y + 10, scene.title, elements, placed.engine, (ox, oy)))


def _fitted(figure: Figure) -> Figure:
    """The figure grown (and shifted) so that everything drawn lies inside it with a margin: a
    self-loop's label or a side channel can reach past the layout's own bounds."""
    left, top, right, bottom = _extent(figure.elements)
    dx, dy = max(0.0, MARGIN / 2 - left), max(0.0, MARGIN / 2 - top)
    width = max(figure.width + dx, right + dx + MARGIN / 2)
    height = max(figure.height + dy, bottom + dy + MARGIN / 2)
    if dx or dy:
        for element in figure.elements:
            element.shapes = [_shifted(shape, dx, dy) for shape in element.shapes]
            if element.hit is not None:
                element.hit = _shifted(element.hit, dx, dy)
    offset = (figure.offset[0] + dx, figure.offset[1] + dy)
    return replace(figure, width=width, height=height, offset=offset)


def _extent(elements: list[Element]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of every shape; text by its estimated width and its anchor."""
    xs: list[float] = []
    ys: list[float] = []
    for element in elements:
        for shape in element.shapes:
            if isinstance(shape, Rect):
                xs += [shape.x, shape.x + shape.w]
                ys += [shape.y, shape.y + shape.h]
            elif isinstance(shape, Circle):
                xs += [shape.cx - shape.r, shape.cx + shape.r]
                ys += [shape.cy - shape.r, shape.cy + shape.r]
            elif isinstance(shape, (Poly, Curve)):
                xs += [x for x, _ in shape.points]
                ys += [y for _, y in shape.points]
            else:
                w = text_width(shape.text, shape.size, shape.weight == "bold")
                start = {"start": 0.0, "middle": w / 2, "end": w}[shape.anchor]
                xs += [shape.x - start, shape.x - start + w]
                ys += [shape.y - shape.size, shape.y + shape.size * 0.3]  # ascent, descent
    return (min(xs, default=0.0), min(ys, default=0.0), max(xs, default=0.0), max(ys, default=0.0))


def _shifted(shape: Shape, dx: float, dy: float) -> Shape:
    if isinstance(shape, (Poly, Curve)):
        return replace(shape, points=tuple((x + dx, y + dy) for x, y in shape.points))
    if isinstance(shape, Circle):
        return replace(shape, cx=shape.cx + dx, cy=shape.cy + dy)
    return replace(shape, x=shape.x + dx, y=shape.y + dy)


def _frame(frame: Frame, box: Box, button: bool) -> list[Element]:
    """A sub-graph's frame: a box with its path, and what it holds, in a band along its top."""
    colour = KIND_COLOURS["graph"]
    element = Element("frame", frame.id)
    element.shapes.append(
        Rect(box.x, box.y, box.w, box.h, Style(_tint(colour, 0.95), colour, 1.4), 8)
    )
    x = box.x + 8 + (TOGGLE + 6 if button else 0)
    element.shapes.append(Text(x, box.y + 17, frame.path, 12, colour, "bold"))
    summary = " · ".join(frame.lines)
    after = x + text_width(frame.path, 12, bold=True) + 10
    if after + text_width(summary, 10) < box.right - 6:
        element.shapes.append(Text(after, box.y + 17, summary, 10, MUTED))
    if not button:
        return [element]
    return [element, _toggle(frame.id, box.x + 6, box.y + 5, opened=True)]


def _toggle(frame_id: str, x: float, y: float, *, opened: bool) -> Element:
    """A small square with − (close it) on an open frame, + (open it) on a closed box."""
    colour = KIND_COLOURS["graph"]
    element = Element("toggle", frame_id)
    element.shapes.append(Rect(x, y, TOGGLE, TOGGLE, Style("#ffffff", colour, 1.2), 3))
    element.shapes.append(
        Text(x + TOGGLE / 2, y + 12.5, "−" if opened else "+", 13, colour, "bold", "middle")
    )
    return element


def kind_colour(node: SceneNode) -> str:
    if node.role in ("input", "output", "unknown", "graph"):
        return KIND_COLOURS[node.role]
    from compiler.language.kinds import KINDS

    if node.kind is not None and node.kind in KINDS:
        return KINDS.get(node.kind).colour or OTHER_KIND
    return OTHER_KIND


def _tint(colour: str, amount: float = 0.9) -> str:
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _node(node: SceneNode, box: Box) -> Element:
    colour = kind_colour(node)
    errors = [i for i in node.issues if i.severity == "error"]
    stroke = ERROR if errors else colour
    element = Element("node", node.id)
    dash = (4, 3) if node.role == "unknown" else None
    rx = 14 if node.role in ("input", "output") else 6
    element.shapes.append(
        Rect(
            box.x, box.y, box.w, box.h, Style(_tint(colour), stroke, 3 if errors else 1.6, dash), rx
        )
    )
    if node.role == "graph":  # a closed sub-graph: a box holding more than a node
        element.shapes.append(
            Rect(box.x + 3, box.y + 3, box.w - 6, box.h - 6, Style("none", colour, 0.9), 4)
        )
    x, y = box.x + PAD, box.y + PAD
    if node.role == "graph":
        x += TOGGLE + 6
    if node.cog:
        element.shapes.extend(_cog(x + COG / 2, y + COG / 2 - 3, COG / 2, node.teeth, colour))
        x += COG + 6
    element.shapes.append(Text(x, y + 13, node.name, NAME_SIZE, TEXT, "bold"))
    y += NAME_HEIGHT
    for line in node.lines:
        element.shapes.append(Text(box.x + PAD, y + 11, line, LINE_SIZE, MUTED))
        y += LINE_HEIGHT
    if node.lattice is not None:
        element.shapes.extend(_lattice_grid(node, box, y + 3, colour))
        rows, _ = _grid_drawn(node)
        y += rows * CELL + 6
    if node.fractal is not None:
        w, h = _nest_size(node.fractal.branching, node.fractal.drawn_levels)
        left = box.x + (box.w - w) / 2
        element.shapes.extend(
            _nest(
                left, y + 3, node.fractal.branching, node.fractal.drawn_levels, node.fractal.width
            )
        )
        y += h + 6
        if node.fractal.drawn_levels < node.fractal.levels:
            element.shapes.append(
                Text(
                    box.x + PAD,
                    y + 11,
                    f"levels {node.fractal.drawn_levels}..{node.fractal.levels - 1} not drawn",
                    10,
                    MUTED,
                )
            )
    if node.issues:
        badge = ERROR if errors else "#d69e2e"
        element.shapes.append(Circle(box.right - 2, box.y + 2, 10, Style(badge, "#ffffff", 1.5)))
        element.shapes.append(
            Text(box.right - 2, box.y + 6, str(len(node.issues)), 11, "#ffffff", "bold", "middle")
        )
    return element


def _cog(cx: float, cy: float, r: float, teeth: int | None, colour: str) -> list[Shape]:
    """A gear outline with a hub; more than 16 teeth are drawn as 16 (the label says how many)."""
    n = min(max(teeth or 12, 8), 16)
    points = []
    inner, outer = r * 0.74, r
    for i in range(n):
        for fraction, radius in ((0.0, inner), (0.15, outer), (0.5, outer), (0.65, inner)):
            angle = 2 * math.pi * (i + fraction) / n
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    hub = Circle(cx, cy, r * 0.3, Style("#ffffff", "none"))
    return [Poly(tuple(points), Style(colour, _tint(colour, 0.3), 0.8)), hub]


def _lattice_grid(node: SceneNode, box: Box, top: float, colour: str) -> list[Shape]:
    rows, cols = _grid_drawn(node)
    left = box.x + (box.w - cols * CELL) / 2
    shapes: list[Shape] = []
    if node.lattice.boundary == "periodic":
        shapes.append(
            Rect(
                left - 2,
                top - 2,
                cols * CELL + 4,
                rows * CELL + 4,
                Style("none", colour, 0.8, (2, 2)),
                4,
            )
        )
    for r in range(rows):
        for c in range(cols):
            shapes.append(
                Circle(
                    left + (c + 0.5) * CELL,
                    top + (r + 0.5) * CELL,
                    CELL * 0.32,
                    Style(colour, "none"),
                )
            )
    return shapes


def _nest(x: float, y: float, branching: int, levels: int, width: int | None) -> list[Shape]:
    """Level 0 outermost, each box holding `branching` boxes of the next level, labelled by width."""
    shapes: list[Shape] = []
    palette = ["#6b46c1", "#805ad5", "#9f7aea", "#b794f4", "#d6bcfa"]

    def box(x: float, y: float, level: int) -> None:
        w, h = _nest_size(branching, levels - level)
        colour = palette[min(level, len(palette) - 1)]
        shapes.append(Rect(x, y, w, h, Style(_tint(colour, 0.82), colour, 1.0), 3))
        if width:
            label = str(width // branching**level)
            size = 10.0 if level < levels - 1 else 9.0
            if text_width(label, size) < w - 4:
                baseline = y + 11 if level < levels - 1 else y + h / 2 + 3.5
                anchor_x = x + 4 if level < levels - 1 else x + w / 2
                anchor = "start" if level < levels - 1 else "middle"
                shapes.append(Text(anchor_x, baseline, label, size, "#44337a", "normal", anchor))
        if level + 1 < levels:
            cw, _ = _nest_size(branching, levels - level - 1)
            for j in range(branching):
                box(x + NEST_PAD + j * (cw + NEST_PAD), y + NEST_LABEL, level + 1)

    box(x, y, 0)
    return shapes


# --------------------------------------------------------------------------- edges


def edge_category(edge: SceneEdge) -> str:
    if edge.feedback:
        return "feedback"
    if edge.role in ("read", "output", "companion"):
        return edge.role
    if edge.kind in GEAR_TRAIN_KINDS:
        return "gear train"
    if edge.kind == "cross":
        return "cross"
    return "message"


EDGE_STYLES = {
    "read": Style(stroke="#a0aec0", width=1.2),
    "output": Style(stroke="#a0aec0", width=1.2),
    "message": Style(stroke="#4a5568", width=1.6),
    "gear train": Style(stroke="#b7791f", width=2.6),
    "cross": Style(stroke="#3182ce", width=1.8, dash=(2, 3)),
    "companion": Style(stroke="#2c7a7b", width=1.6, dash=(8, 3, 2, 3)),
    "feedback": Style(stroke="#c53030", width=1.9, dash=(7, 4)),
}
LEGEND_NAMES = {
    "read": "reads an input",
    "message": "message",
    "gear train": "gear train (mesh, arbor, pin-slot)",
    "cross": "cross-attention",
    "companion": "companion",
    "feedback": "feedback / delayed",
    "output": "to an output",
}


def _edge(edge: SceneEdge, route: tuple[Point, ...], taken: list[Box]) -> Element:
    base = EDGE_STYLES[edge_category(edge)]
    errors = any(i.severity == "error" for i in edge.issues)
    style = Style(
        stroke=ERROR if errors else base.stroke, width=base.width + errors, dash=base.dash
    )
    element = Element("edge", edge.id)
    element.shapes.append(Curve(route, style))
    element.shapes.append(_arrowhead(route, style.stroke, 5 + style.width))
    element.hit = Curve(route, Style(stroke="#000000", width=12, opacity=0.0))
    label = edge.label + (" !" if edge.issues else "")
    if label:
        w = text_width(label, 10) + 6
        if edge.source == edge.target:  # beside the loop: its middle is inside the node's box
            middle = bezier_point(route, 0.5)
            x, y = middle[0] + 6 + w / 2, middle[1]
            taken.append(Box(x - w / 2, y - 8, w, 14))
        else:
            x, y = _label_place(route, w, taken)
        element.shapes.append(
            Rect(x - w / 2, y - 8, w, 14, Style("#ffffff", "none", opacity=0.9), 3)
        )
        element.shapes.append(Text(x, y + 3, label, 10, style.stroke, "normal", "middle"))
    return element


def _label_place(route: tuple[Point, ...], w: float, taken: list[Box]) -> Point:
    """The first point along the edge, from its middle outwards, where its label overlaps no box
    and no other label; the middle if there is none."""
    for t in (0.5, 0.42, 0.58, 0.34, 0.66, 0.26, 0.74, 0.18, 0.82):
        x, y = bezier_point(route, t)
        box = Box(x - w / 2, y - 8, w, 14)
        if not any(_overlap(box, other) for other in taken):
            taken.append(box)
            return x, y
    return bezier_point(route, 0.5)


def _overlap(a: Box, b: Box) -> bool:
    return a.x < b.right and b.x < a.right and a.y < b.bottom and b.y < a.bottom


def _arrowhead(route: tuple[Point, ...], colour: str, length: float) -> Poly:
    tip = route[-1]
    back = next((p for p in reversed(route[:-1]) if math.dist(p, tip) > 0.5), route[0])
    angle = math.atan2(tip[1] - back[1], tip[0] - back[0])
    half = length * 0.42
    base = (tip[0] - length * math.cos(angle), tip[1] - length * math.sin(angle))
    left = (base[0] + half * math.sin(angle), base[1] - half * math.cos(angle))
    right = (base[0] - half * math.sin(angle), base[1] + half * math.cos(angle))
    return Poly((tip, left, right), Style(colour, "none"))


def bezier_point(route: tuple[Point, ...], t: float) -> Point:
    """The point at parameter `t` in [0, 1] along the whole curve (segments equally weighted)."""
    segments = max((len(route) - 1) // 3, 1)
    i = min(int(t * segments), segments - 1)
    u = t * segments - i
    p0, p1, p2, p3 = (
        route[3 * i : 3 * i + 4] if len(route) >= 4 else (route[0],) * 2 + (route[-1],) * 2
    )
    a, b, c, d = (1 - u) ** 3, 3 * u * (1 - u) ** 2, 3 * u**2 * (1 - u), u**3
    return (
        a * p0[0] + b * p1[0] + c * p2[0] + d * p3[0],
        a * p0[1] + b * p1[1] + c * p2[1] + d * p3[1],
    )


# --------------------------------------------------------------------------- legend and issues


def _legend(scene: Scene) -> list[list[tuple[str, str]]]:
    items: list[tuple[str, str]] = []
    kinds = []
    for node in scene.nodes:
        key = node.role if node.role in ("input", "output", "unknown") else (node.kind or "node")
        if key not in kinds:
            kinds.append(key)
    items.extend(("node", k) for k in kinds)
    if scene.frames:
        items.append(("frame", "sub-graph"))
    if scene.groups:
        items.append(("group", "batch group"))
    categories = {edge_category(e) for e in scene.edges}
    items.extend(("edge", c) for c in EDGE_STYLES if c in categories)
    rows, row, used = [], [], 0.0
    for item in items:
        w = _legend_width(item)
        if row and used + w > 900:
            rows.append(row)
            row, used = [], 0.0
        row.append(item)
        used += w
    if row:
        rows.append(row)
    return rows


def _legend_label(item: tuple[str, str]) -> str:
    kind, name = item
    if kind == "edge":
        return LEGEND_NAMES[name]
    if name == "graph":
        return "sub-graph (closed)"
    return name if name != "unknown" else "undeclared"


def _legend_width(item: tuple[str, str]) -> float:
    return 52 + text_width(_legend_label(item), 11)


def _legend_item(item: tuple[str, str], x: float, y: float) -> list[Shape]:
    kind, name = item
    label = Text(x + 32, y + 4, _legend_label(item), 11, MUTED)
    if kind == "edge":
        style = EDGE_STYLES[name]
        return [Curve(((x, y), (x + 9, y), (x + 18, y), (x + 26, y)), style), label]
    if kind == "group":
        return [Rect(x, y - 7, 26, 14, Style("#f7fafc", "#718096", 1.2, (5, 4)), 4), label]
    if kind == "frame":
        colour = KIND_COLOURS["graph"]
        return [Rect(x, y - 7, 26, 14, Style(_tint(colour, 0.95), colour, 1.4), 4), label]
    colour = KIND_COLOURS.get(name, OTHER_KIND)
    return [Rect(x, y - 7, 26, 14, Style(_tint(colour), colour, 1.4), 4), label]


def _issue_lines(scene: Scene) -> list[tuple[str, str, float]]:
    issues = scene.all_issues()
    if not issues:
        return []
    errors = sum(i.severity == "error" for i in issues)
    lines = [
        (
            f"{errors} error{'s' * (errors != 1)}, {len(issues) - errors} "
            f"warning{'s' * (len(issues) - errors != 1)}",
            ERROR if errors else "#b7791f",
            12.0,
        )
    ]
    for issue in issues:
        text = f"{issue.where}: {issue.severity}: {issue.message}"
        lines.append((_clip(text, 170), ERROR if issue.severity == "error" else "#b7791f", 11.0))
        if issue.hint:
            lines.append((_clip(f"    help: {issue.hint}", 170), MUTED, 10.5))
    return lines


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
