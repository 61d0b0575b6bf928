"""`epicycle schema`, `epicycle components` and `epicycle kinds`: what a spec can say."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from compiler.tools.cli.common import _guarded, app, err, out


@app.command()
@_guarded
def schema(
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to a file instead of stdout.")
    ] = None,
    markdown: Annotated[
        bool,
        typer.Option(
            "--markdown", help="The readable reference (docs/spec.md) instead of the JSON Schema."
        ),
    ] = False,
) -> None:
    """Print the JSON Schema of spec files (for yaml-language-server and other editors), or with
    --markdown the spec reference: every field with its type, default and meaning."""
    if markdown:
        from compiler.language.reference import spec_reference

        text = spec_reference()
    else:
        from compiler.language.spec import json_schema

        text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        from compiler.tools.outputs import write_file

        write_file(output, text, "--out")


@app.command()
@_guarded
def components(
    family: Annotated[
        str | None,
        typer.Argument(
            help="attention, rotary, optimizer or schedule (default: all).", show_default=False
        ),
    ] = None,
) -> None:
    """List the registered components a spec can choose by `kind`, with their options."""
    from rich.table import Table

    from compiler.language.registry import FAMILIES, REGISTRY

    if family is not None and family not in FAMILIES:
        err.print(
            f"epicycle: unknown component family `{family}`; families: {', '.join(FAMILIES)}",
            markup=False,
        )
        raise typer.Exit(2)
    for name in [family] if family else FAMILIES:
        table = Table(title=f"{name} components", title_justify="left", show_lines=True)
        for column in ("kind", "what it is", "options"):
            table.add_column(column, overflow="fold")
        for component in REGISTRY.family(name).values():
            kind = component.name + (f"\n({component.level})" if component.level else "")
            table.add_row(kind, component.summary, _options(component.config))
        out.print(table)


@app.command()
@_guarded
def kinds() -> None:
    """List the registered node kinds a spec can use, with their options and capabilities."""
    from rich.table import Table

    from compiler.language.capabilities import Capabilities
    from compiler.language.kinds import KINDS

    table = Table(title="node kinds", title_justify="left", show_lines=True)
    for column in ("kind", "what it is", "options", "capabilities"):
        table.add_column(column, overflow="fold")
    for node_kind in KINDS:
        caps = node_kind.capabilities
        shown = [
            f"{'yes' if getattr(caps, name) else 'no '} {name}"
            for name in Capabilities.names()
            if name != "in_fractal"
        ]
        if node_kind.observer:
            shown.insert(0, "observer (reads a host through a companion edge)")
        table.add_row(node_kind.name, node_kind.summary, _options(node_kind.Spec), "\n".join(shown))
    out.print(table)


def _options(config) -> str:
    """`name = default: description` per field of a component's config (`kind` left out)."""
    lines = []
    for field_name, info in config.model_fields.items():
        if field_name == "kind":
            continue
        default = (
            "required"
            if info.is_required()
            else f"= {info.get_default(call_default_factory=True)!r}"
        )
        lines.append(
            f"{field_name} {default}" + (f": {info.description}" if info.description else "")
        )
    return "\n".join(lines) or "-"
