"""A `Figure` as SVG text: one `<g class="node|edge" data-id="...">` per element, no external refs."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from compiler.tools.viz.draw import FONT, Circle, Curve, Element, Figure, Poly, Rect, Style, Text


def to_svg(figure: Figure, *, element_ids: bool = True) -> str:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{figure.width:.0f}" '
        f'height="{figure.height:.0f}" viewBox="0 0 {figure.width:.1f} {figure.height:.1f}" '
        f"font-family={quoteattr(FONT)}>",
        f"<title>{escape(figure.title)}</title>",
        f'<rect width="{figure.width:.1f}" height="{figure.height:.1f}" fill="#ffffff"/>',
    ]
    for element in figure.elements:
        parts.append(_element(element, element_ids))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _element(element: Element, ids: bool) -> str:
    attrs = f' class="{element.cls}"'
    if ids and element.id is not None:
        attrs += f" data-id={quoteattr(element.id)}"
    body = [_shape(s) for s in element.shapes]
    if element.hit is not None:
        body.append(_shape(element.hit, cls="hit"))
    return f"<g{attrs}>" + "".join(body) + "</g>"


def _style(style: Style) -> str:
    text = f'fill="{style.fill}" stroke="{style.stroke}"'
    if style.stroke != "none":
        text += f' stroke-width="{style.width:g}"'
    if style.dash:
        text += f' stroke-dasharray="{",".join(f"{d:g}" for d in style.dash)}"'
    if style.opacity < 1:
        text += f' opacity="{style.opacity:g}"'
    return text


def _shape(shape, cls: str | None = None) -> str:
    extra = f' class="{cls}"' if cls else ""
    if isinstance(shape, Rect):
        return (
            f'<rect x="{shape.x:.1f}" y="{shape.y:.1f}" width="{shape.w:.1f}" '
            f'height="{shape.h:.1f}" rx="{shape.rx:g}" {_style(shape.style)}{extra}/>'
        )
    if isinstance(shape, Circle):
        return (
            f'<circle cx="{shape.cx:.1f}" cy="{shape.cy:.1f}" r="{shape.r:.1f}" '
            f"{_style(shape.style)}{extra}/>"
        )
    if isinstance(shape, Poly):
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in shape.points)
        tag = "polygon" if shape.closed else "polyline"
        return f'<{tag} points="{points}" {_style(shape.style)}{extra}/>'
    if isinstance(shape, Curve):
        return f'<path d="{path_data(shape.points)}" {_style(shape.style)}{extra}/>'
    if isinstance(shape, Text):
        weight = ' font-weight="bold"' if shape.weight == "bold" else ""
        anchor = f' text-anchor="{shape.anchor}"' if shape.anchor != "start" else ""
        return (
            f'<text x="{shape.x:.1f}" y="{shape.y:.1f}" font-size="{shape.size:g}" '
            f'fill="{shape.colour}"{weight}{anchor}{extra}>{escape(shape.text)}</text>'
        )
    raise TypeError(f"not a shape: {shape!r}")


def path_data(points) -> str:
    (x0, y0), rest = points[0], points[1:]
    d = [f"M{x0:.1f},{y0:.1f}"]
    for i in range(0, len(rest) - 2, 3):
        (x1, y1), (x2, y2), (x3, y3) = rest[i : i + 3]
        d.append(f"C{x1:.1f},{y1:.1f} {x2:.1f},{y2:.1f} {x3:.1f},{y3:.1f}")
    return " ".join(d)
