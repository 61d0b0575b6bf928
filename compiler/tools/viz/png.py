"""A `Figure` as PNG, drawn by matplotlib's Agg backend from the same shapes as the SVG.

One figure pixel is one CSS pixel at 100 dpi (so 1 px = 0.72 pt for line widths and font sizes);
the image is saved at `scale` times that for sharp text.
"""

from __future__ import annotations

from pathlib import Path

from compiler.tools.viz.draw import Circle, Curve, Figure, Poly, Rect, Style, Text

PT = 0.72  # points per CSS pixel at 100 dpi
MAX_PIXELS = 8000


def write_png(figure: Figure, path: str | Path, *, scale: float = 2.0) -> None:
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "PNG output needs matplotlib: pip install matplotlib (or `.[examples]`); "
            "SVG, Mermaid and HTML need nothing extra"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import patches
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.path import Path as MplPath

    fig = MplFigure(figsize=(figure.width / 100, figure.height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, figure.width)
    ax.set_ylim(figure.height, 0)
    ax.axis("off")

    def line_kwargs(style: Style) -> dict:
        kwargs = {
            "facecolor": style.fill if style.fill != "none" else "none",
            "edgecolor": style.stroke if style.stroke != "none" else "none",
            "linewidth": style.width * PT if style.stroke != "none" else 0,
            "alpha": style.opacity if style.opacity < 1 else None,
        }
        if style.dash:
            kwargs["linestyle"] = (0, tuple(d for d in style.dash))
        return kwargs

    z = 0
    for element in figure.elements:
        for shape in element.shapes:
            z += 1
            if isinstance(shape, Rect):
                patch = patches.FancyBboxPatch(
                    (shape.x, shape.y),
                    shape.w,
                    shape.h,
                    boxstyle=patches.BoxStyle.Round(pad=0, rounding_size=shape.rx)
                    if shape.rx
                    else patches.BoxStyle.Square(pad=0),
                    zorder=z,
                    **line_kwargs(shape.style),
                )
                ax.add_patch(patch)
            elif isinstance(shape, Circle):
                ax.add_patch(
                    patches.Circle(
                        (shape.cx, shape.cy), shape.r, zorder=z, **line_kwargs(shape.style)
                    )
                )
            elif isinstance(shape, Poly):
                ax.add_patch(
                    patches.Polygon(
                        shape.points, closed=shape.closed, zorder=z, **line_kwargs(shape.style)
                    )
                )
            elif isinstance(shape, Curve):
                codes = [MplPath.MOVETO] + [MplPath.CURVE4] * (len(shape.points) - 1)
                style = Style("none", shape.style.stroke, shape.style.width, shape.style.dash)
                ax.add_patch(
                    patches.PathPatch(
                        MplPath(shape.points, codes),
                        zorder=z,
                        capstyle="round",
                        **line_kwargs(style),
                    )
                )
            elif isinstance(shape, Text):
                ax.text(
                    shape.x,
                    shape.y,
                    shape.text,
                    fontsize=shape.size * PT,
                    color=shape.colour,
                    fontweight=shape.weight,
                    ha={"start": "left", "middle": "center", "end": "right"}[shape.anchor],
                    va="baseline",
                    family="DejaVu Sans",
                    zorder=z,
                )
    scale = min(scale, MAX_PIXELS / max(figure.width, figure.height))  # huge graphs stay openable
    fig.savefig(str(path), dpi=100 * scale, facecolor="#ffffff")
