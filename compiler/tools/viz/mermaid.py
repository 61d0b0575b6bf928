"""The scene as a Mermaid flowchart (`.mmd`), for READMEs and issues: GitHub renders it inline.

Mermaid lays the graph out itself. Kinds become classes (colours as in the SVG), gear-train edges
are thick (`==>`), feedback edges dotted and red, cross-attention dotted and blue; batch groups are
subgraphs; a sub-graph (`kind: graph`) is a subgraph titled by its path, holding its nodes and its
own sub-graphs, to any depth; a fractal is nested subgraphs, one per sub-model down to the drawn depth; a lattice layout
is a grid of heads in its node's label.
"""

from __future__ import annotations

from compiler.tools.viz.draw import EDGE_STYLES, KIND_COLOURS, _tint, edge_category, kind_colour
from compiler.tools.viz.scene import Frame, Scene, SceneNode

ARROWS = {"gear train": "==>", "feedback": "-.->", "cross": "-.->", "companion": "-.->"}
MAX_GRID = 16


def to_mermaid(scene: Scene) -> str:
    ids = {node.id: f"n{i}" for i, node in enumerate(scene.nodes)}
    lines = [f"%% {scene.title}: {scene.summary} (epicycle viz)", "flowchart TD"]
    classes = {}
    for node in scene.nodes:
        name = _class_name(node)
        colour = kind_colour(node)
        classes[name] = f"fill:{_tint(colour)},stroke:{colour},color:#1a202c"
    nested = [n for n in scene.nodes if n.fractal is not None]
    if nested:
        colour = kind_colour(nested[0])
        classes["fractal_leaf"] = f"fill:{_tint(colour, 0.75)},stroke:{colour},color:#1a202c"
    classes["error"] = "fill:#fff5f5,stroke:#e53e3e,stroke-width:3px,color:#1a202c"
    classes["unknown"] = (
        f"fill:{_tint(KIND_COLOURS['unknown'])},stroke:#718096,stroke-dasharray:4 3"
    )
    for name, style in classes.items():
        lines.append(f"  classDef {name} {style}")
    framed = {m for f in scene.frames for m in f.members}
    top = [n.id for n in scene.nodes if n.id not in framed]
    lines.extend(_block(scene, top, [f for f in scene.frames if f.parent is None], ids, "  "))
    styles = []
    index = 0
    for edge in scene.edges:
        if edge.folded:
            continue
        category = edge_category(edge)
        arrow = ARROWS.get(category, "-->")
        label = edge.label or (edge.kind if category in ("cross", "companion") else "")
        text = f'|"{_escape(label)}"|' if label else ""
        lines.append(f"  {ids[edge.source]} {arrow}{text} {ids[edge.target]}")
        style = EDGE_STYLES[category]
        colour = "#e53e3e" if edge.issues else style.stroke
        css = f"stroke:{colour},stroke-width:{style.width:g}px"
        if style.dash:
            css += f",stroke-dasharray:{' '.join(f'{d:g}' for d in style.dash)}"
        styles.append(f"  linkStyle {index} {css}")
        index += 1
    lines.extend(styles)
    for issue in scene.issues:
        lines.append(f"  %% {issue.where}: {issue.severity}: {issue.message}")
    return "\n".join(lines) + "\n"


def _block(
    scene: Scene, members: list[str], frames: list[Frame], ids: dict[str, str], indent: str
) -> list[str]:
    """Nodes (a batch group's as a subgraph of their own), then each sub-graph as a subgraph
    holding its own block, to any depth."""
    grouped = {m: g for g in scene.groups for m in g.members}
    lines: list[str] = []
    written: set[str] = set()
    for node_id in members:
        if node_id in written:
            continue
        group = grouped.get(node_id)
        if group is None:
            lines.extend(_node(scene.node(node_id), ids[node_id], indent))
            written.add(node_id)
            continue
        lines.append(f'{indent}subgraph group{group.index}["{_escape(group.label)}"]')
        lines.append(f"{indent}  direction LR")
        for member in group.members:
            lines.extend(_node(scene.node(member), ids[member], indent + "  "))
            written.add(member)
        lines.append(f"{indent}end")
    index = {f.path: i for i, f in enumerate(scene.frames)}
    for frame in frames:
        name = f"graph{index[frame.path]}"
        title = f"<b>{_escape(frame.path)}</b><br/>{_escape(' · '.join(frame.lines))}"
        lines.append(f'{indent}subgraph {name}["{title}"]')
        inner = [scene.frame(path) for path in frame.frames]
        lines.extend(_block(scene, frame.members, inner, ids, indent + "  "))
        lines.append(f"{indent}end")
        colour = KIND_COLOURS["graph"]
        lines.append(f"{indent}style {name} fill:{_tint(colour, 0.95)},stroke:{colour}")
    return lines


def _class_name(node: SceneNode) -> str:
    if node.role in ("input", "output", "unknown"):
        return node.role
    return "".join(c if c.isalnum() else "_" for c in node.kind or "node")


def _label(node: SceneNode) -> str:
    parts = [f"<b>{_escape(node.name)}</b>", *(_escape(line) for line in node.lines)]
    if node.lattice is not None:
        rows, cols = node.lattice.grid
        row = "●" * min(cols, MAX_GRID)
        parts.extend([row] * min(rows, MAX_GRID))
    for issue in node.issues:
        parts.append(f"⚠ {_escape(issue.message)}")
    return "<br/>".join(parts)


def _node(node: SceneNode, mid: str, indent: str) -> list[str]:
    cls = "error" if any(i.severity == "error" for i in node.issues) else _class_name(node)
    if node.fractal is not None:
        return _fractal(node, mid, indent, cls)
    if node.role in ("input", "output"):  # stadium-shaped, as the rounded boxes of the SVG
        return [f'{indent}{mid}(["{_label(node)}"]):::{cls}']
    return [f'{indent}{mid}["{_label(node)}"]:::{cls}']


def _fractal(node: SceneNode, mid: str, indent: str, cls: str) -> list[str]:
    """Nested subgraphs: the fractal holds `branching` sub-models, each holding `branching` more."""
    fractal = node.fractal
    lines = [f'{indent}subgraph {mid}["{_label(node)}"]']

    def level(path: str, depth: int, pad: str) -> None:
        width = fractal.width // fractal.branching**depth if fractal.width else None
        name = f"{mid}_{path}"
        title = f"level {depth}" + (f" · width {width}" if width else "")
        if depth == fractal.drawn_levels - 1:
            lines.append(f'{pad}{name}["{title}"]:::fractal_leaf')
            return
        lines.append(f'{pad}subgraph {name}["{title}"]')
        for j in range(fractal.branching):
            level(f"{path}{j}", depth + 1, pad + "  ")
        lines.append(f"{pad}end")

    if fractal.drawn_levels > 1:
        for j in range(fractal.branching):
            level(str(j), 1, indent + "  ")
    else:
        lines.append(f'{indent}  {mid}_0["level 0"]:::fractal_leaf')
    lines.append(f"{indent}end")
    tint = kind_colour(node)
    colour = "#e53e3e" if cls == "error" else tint
    lines.append(f"{indent}style {mid} fill:{_tint(tint)},stroke:{colour}")
    return lines


def _escape(text: str) -> str:
    return (
        str(text)
        .replace("&", "#amp;")
        .replace('"', "#quot;")
        .replace("<", "#lt;")
        .replace(">", "#gt;")
        .replace("|", "#124;")
    )
