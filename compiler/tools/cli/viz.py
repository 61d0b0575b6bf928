"""`epicycle viz`: draw a spec's graph, or a trained lattice model's phases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compiler.tools.cli.common import _guarded, _print_diagnostics, _usage, app, err, out
from compiler.tools.outputs import check_file_output, output_directory


@app.command()
@_guarded
def viz(
    file: Annotated[
        str | None, typer.Argument(help="The spec to draw.", show_default=False)
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="The picture: .svg, .png, .mmd (Mermaid) or .html (interactive)."
        ),
    ] = None,
    errors: Annotated[
        bool,
        typer.Option(
            "--errors",
            help="Draw an invalid spec anyway, its errors (and a valid one's warnings) at the "
            "nodes they concern; exits 1 after writing if the spec is invalid.",
        ),
    ] = False,
    layout: Annotated[
        str,
        typer.Option(
            help="auto (Graphviz `dot` if installed), dot or python; "
            "env EPICYCLE_VIZ_LAYOUT sets the default."
        ),
    ] = "auto",
    lattice: Annotated[
        Path | None,
        typer.Option(
            "--lattice",
            help="A checkpoint directory of a lattice model: PNGs of its phases and of the order "
            "parameter over training (from its metrics.jsonl), written to --out (a directory; "
            "default: the checkpoint's).",
        ),
    ] = None,
) -> None:
    """Draw a spec's graph, or (`--lattice DIR`) a trained lattice model's phases."""
    if lattice is not None:
        if file is not None:
            _usage("give a spec or `--lattice CHECKPOINT`, not both")
        _viz_lattice(lattice, output)
        return
    if file is None or output is None:
        _usage("usage: epicycle viz FILE -o OUT.{svg,png,mmd,html}  (or --lattice CHECKPOINT)")
    from compiler.tools.viz import (
        LayoutUnavailable,
        UnknownFormat,
        choose_engine,
        output_format,
        render,
        scene_of,
    )

    try:
        if output_format(output) != ".mmd":
            choose_engine(layout)
    except (UnknownFormat, LayoutUnavailable) as exc:
        _usage(str(exc))
    check_file_output(output, "--out")
    scene, invalid = scene_of(file, errors=errors)
    if invalid is not None:
        _print_diagnostics(invalid.diagnostics)
    try:
        result = render(scene, output, engine=layout, show_issues=errors)
    except LayoutUnavailable as exc:
        _usage(str(exc))
    issues = f", {result.issues} issues shown" if errors else ""
    out.print(
        f"wrote {result.path} ({result.nodes} nodes, {result.edges} edges{issues}; "
        f"layout: {result.engine})",
        markup=False,
        soft_wrap=True,
    )
    if invalid is not None:
        raise typer.Exit(1)


def _viz_lattice(checkpoint: Path, output: Path | None) -> None:
    from compiler.tools.viz.lattice import plot_checkpoint

    if output is None:
        plots = plot_checkpoint(checkpoint, None)
    else:  # with `--lattice`, `--out` is the directory the two PNGs go to
        with output_directory(output, "--out"):
            plots = plot_checkpoint(checkpoint, output)
    out.print(f"wrote {plots.phases}", markup=False)
    if plots.order is not None:
        out.print(f"wrote {plots.order}", markup=False)
    else:
        err.print(f"epicycle: no order-parameter plot: {plots.note}", markup=False)
    for extra in (plots.animation, plots.heads):
        if extra is not None:
            out.print(f"wrote {extra}", markup=False)
    if plots.heads_note is not None:
        err.print(f"epicycle: no phase animation: {plots.heads_note}", markup=False)
