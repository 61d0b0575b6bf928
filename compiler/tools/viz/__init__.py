"""Seeing the graph (`epicycle viz`): a spec drawn as SVG, PNG, Mermaid or a self-contained HTML page.

    scene = scene_of("specs/gear_train.yaml")          # what to draw (scene.py)
    result = render(scene, "gear_train.html")          # where it goes (layout.py) and how it looks

The pipeline is scene (drawing-neutral, from the IR or, for an invalid spec, from the raw YAML)
-> layout (Graphviz `dot` when installed, else pure Python) -> figure (draw.py: shapes) -> SVG,
PNG (matplotlib), or the HTML page (the SVG with inline JS and CSS; for a spec with sub-graphs,
one drawing per set of open sub-graphs, `views.py`). Mermaid text is written from
the scene alone: Mermaid lays the graph out when it is rendered. `lattice.py` plots a trained
lattice model's phases and its order parameter over training (`epicycle viz --lattice DIR`).
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from compiler.language.diagnostics import SpecError
from compiler.tools.viz.layout import ENGINES, LayoutUnavailable, choose_engine, layout
from compiler.tools.viz.scene import Issue, Scene, scene_from_document, scene_from_ir

FORMATS = (".svg", ".png", ".mmd", ".html")
MERMAID_ENGINE = "none: Mermaid lays the graph out when it is rendered"

__all__ = [
    "ENGINES",
    "FORMATS",
    "Issue",
    "LayoutUnavailable",
    "Rendered",
    "Scene",
    "UnknownFormat",
    "choose_engine",
    "figure_of",
    "output_format",
    "render",
    "scene_of",
]


class UnknownFormat(ValueError):
    """The output's extension is none of `FORMATS`."""


@dataclass(frozen=True)
class Rendered:
    path: Path
    format: str
    engine: str  # the layout used, as the output states it
    nodes: int  # drawn: a read folded into its reader's box is not an edge of the picture
    edges: int
    issues: int


def output_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        shown = f"`{suffix}`" if suffix else "no extension"
        raise UnknownFormat(
            f"cannot draw to {path}: {shown} is not a known format; "
            f"name the output with one of {', '.join(FORMATS)}"
        )
    return suffix


def scene_of(path: str | Path, *, errors: bool = False) -> tuple[Scene, SpecError | None]:
    """The scene of a spec file and, for an invalid one drawn with `errors`, its `SpecError`.

    Without `errors`, an invalid spec raises its `SpecError`. With it, the spec is drawn from its
    raw YAML with every diagnostic attached, and a valid spec's warnings are attached too."""
    from compiler.language.source import read_spec_file
    from compiler.language.subgraphs import expand
    from compiler.pipeline import analyze

    try:
        ir = analyze(path)
    except SpecError as exc:
        if not errors:
            raise
        try:
            doc = read_spec_file(path)
        except SpecError:
            doc = None  # not even YAML: the page shows the errors alone
        if doc is not None:
            # its sub-graphs flattened, as validation reads them, so they are framed; where the
            # error is in a sub-graph, each is drawn as one box, as written
            with suppress(SpecError):
                doc = expand(doc)
        return scene_from_document(doc, exc.diagnostics, str(path)), exc
    return scene_from_ir(ir, ir.facts.warnings if errors else ()), None


def figure_of(
    scene: Scene,
    engine: str = "auto",
    *,
    show_issues: bool = True,
    toggles: Collection[str] = (),
):
    """`toggles`: the paths of the sub-graphs that get an open/close button (on the HTML page)."""
    from compiler.tools.viz.draw import draw, frame_label_size, node_size

    sizes = {node.id: node_size(node) for node in scene.nodes}
    sizes.update({frame.id: frame_label_size(frame) for frame in scene.frames})
    placed = layout(scene, sizes, engine)
    return draw(scene, placed, show_issues=show_issues, toggles=toggles)


def render(
    scene: Scene, out: str | Path, *, engine: str = "auto", show_issues: bool = True
) -> Rendered:
    """Draw `scene` to `out` (its extension picks the format); the file is replaced atomically."""
    out = Path(out)
    kind = output_format(out)
    nodes, edges = len(scene.nodes), sum(not edge.folded for edge in scene.edges)
    if kind == ".mmd":
        from compiler.tools.viz.mermaid import to_mermaid

        used = MERMAID_ENGINE
        _write(out, to_mermaid(scene).encode("utf-8"))
    else:
        if kind == ".html":  # the page's first view: its sub-graphs open as `views` says
            from compiler.tools.viz.html import to_html
            from compiler.tools.viz.views import plan_views, view_scene

            views = plan_views(scene)
            first = view_scene(scene, views.default)
            figure = figure_of(first, engine, show_issues=show_issues, toggles=views.openable)
        else:
            figure = figure_of(scene, engine, show_issues=show_issues)
        used = figure.engine
        nodes = sum(element.cls == "node" for element in figure.elements)
        edges = sum(element.cls == "edge" for element in figure.elements)
        if kind == ".svg":
            from compiler.tools.viz.svg import to_svg

            _write(out, to_svg(figure).encode("utf-8"))
        elif kind == ".html":
            page = to_html(scene, figure, views, engine=engine, show_issues=show_issues)
            _write(out, page.encode("utf-8"))
        else:
            from compiler.tools.viz.png import write_png

            _write_with(out, lambda tmp: write_png(figure, tmp))
    return Rendered(out, kind, used, nodes, edges, len(scene.all_issues()) if show_issues else 0)


def _write(out: Path, data: bytes) -> None:
    _write_with(out, lambda tmp: tmp.write_bytes(data))


def _write_with(out: Path, write) -> None:
    """All or nothing, by the output-path rule of every command (`compiler.tools.outputs`)."""
    from compiler.tools.outputs import write_with

    write_with(out, write, "--out")
