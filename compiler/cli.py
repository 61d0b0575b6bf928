"""The `epicycle` command: validate, compile and print the schema of specs.

Exit codes: 0 success; 1 a spec (or checkpoint) has errors, printed as `FILE:LINE:COL: error: ...`
on stderr; 2 usage errors (typer/click's own); 3 an internal error, which is a bug in epicycle
(printed as one line; set EPICYCLE_DEBUG=1 for the traceback). Never a traceback otherwise.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from .diagnostics import Diagnostic, SpecError

app = typer.Typer(
    name="epicycle",
    help="A graph-declared model compiler: YAML topology specs in, PyTorch modules out.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def _print_diagnostics(diagnostics: list[Diagnostic]) -> None:
    for diagnostic in diagnostics:
        err.print(diagnostic.format(), markup=False)


def _guarded(command: F) -> F:
    """Spec errors exit 1 with located messages; anything else is our bug and exits 3, untraced."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SpecError as exc:
            _print_diagnostics(exc.diagnostics)
            raise typer.Exit(1) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            if os.environ.get("EPICYCLE_DEBUG"):
                raise
            err.print(
                f"epicycle: internal error: {type(exc).__name__}: {exc}\n"
                "  help: this is a bug in epicycle, not in your spec; rerun with EPICYCLE_DEBUG=1 "
                "for the traceback and report it",
                markup=False,
            )
            raise typer.Exit(3) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@_guarded
def validate(
    files: Annotated[list[str], typer.Argument(help="Spec files to check.", show_default=False)],
) -> None:
    """Check spec files: exit 0 if every one is valid, 1 if any is not."""
    from .pipeline import analyze

    failed = False
    for file in files:
        try:
            ir = analyze(file)
        except SpecError as exc:
            failed = True
            _print_diagnostics(exc.diagnostics)
            continue
        _print_diagnostics(ir.facts["warnings"])
        out.print(f"{file}: ok ({_count(ir.facts['parameters'])} parameters)", markup=False)
    if failed:
        raise typer.Exit(1)


@app.command("compile")
@_guarded
def compile_(
    file: Annotated[str, typer.Argument(help="The spec to compile.", show_default=False)],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write weights (safetensors, spec embedded) here."),
    ] = None,
    smoke: Annotated[bool, typer.Option(help="Run one forward pass on random inputs.")] = True,
    tokens: Annotated[int, typer.Option(min=1, help="Sequence length of the smoke run.")] = 16,
    device: Annotated[str, typer.Option(help="Device for the weights and smoke run.")] = "cpu",
    budget: Annotated[
        float | None,
        typer.Option(
            min=0, help="Memory budget in GiB (default: the device's free memory; 0: no guard)."
        ),
    ] = None,
    level: Annotated[
        int | None,
        typer.Option(help="Fractal specs: run the smoke forward on a sub-model of this level."),
    ] = None,
    index: Annotated[int, typer.Option(help="Fractal specs: which sub-model of `--level`.")] = 0,
    fractal: Annotated[
        str | None,
        typer.Option(help="Fractal specs: the fractal node (default: the only one)."),
    ] = None,
) -> None:
    """Compile a spec: print its per-node table, run a smoke forward, optionally save weights."""
    import torch

    from .checkpoint import save_checkpoint
    from .pipeline import analyze, build_model

    ir = analyze(file)
    _print_diagnostics(ir.facts["warnings"])
    out.print(_table(ir))
    for line in _component_lines(ir):
        out.print(line, markup=False)
    for line in _fractal_lines(ir):
        out.print(line, markup=False)
    if level is not None:
        _check_sub_model_address(ir, fractal, level, index)
    if not smoke and out_dir is None:
        return
    from .resources import check_resources

    budget_bytes = None if budget is None else int(budget * 2**30)
    if budget_bytes != 0:
        check_resources(
            ir, device=device, budget=budget_bytes, batch=2, tokens=min(tokens, ir.facts["context"])
        )
    model = build_model(ir, device=device, budget=0)
    if smoke:
        model.eval()
        inputs = _random_inputs(ir, min(tokens, ir.facts["context"]), device)
        start = time.perf_counter()
        with torch.no_grad():
            if level is None:
                result = model(**inputs)
            else:
                result = model.fractal(fractal).sub_model(level, index)(**inputs)
        elapsed = time.perf_counter() - start
        if level is not None:
            out.print(f"sub-model ({level}, {index}):", markup=False)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
        finite = all(bool(torch.isfinite(v).all()) for v in result.values())
        if not finite:
            raise SpecError([Diagnostic(ir.span(()), "the smoke forward produced NaN or Inf")])
        out.print(f"smoke forward: {shapes} in {elapsed * 1000:.1f} ms", markup=False)
    if out_dir is not None:
        try:
            path = save_checkpoint(model, out_dir)
        except OSError as exc:
            raise SpecError(
                [
                    Diagnostic(
                        ir.span(()), f"cannot write weights to {out_dir}: {exc.strerror or exc}"
                    )
                ]
            ) from None
        out.print(f"wrote {path}", markup=False)


@app.command()
@_guarded
def schema(
    output: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to a file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of spec files (for yaml-language-server and other editors)."""
    from .spec import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")


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
    from .registry import FAMILIES, REGISTRY

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


def _table(ir) -> Table:
    table = Table(
        title=f"{ir.spec.name}  (spec sha256 {ir.loaded.digest[:12]})", title_justify="left"
    )
    for column in (
        "node",
        "kind",
        "batch group",
        "width",
        "heads",
        "layers",
        "parameters",
        "FLOPs/token",
    ):
        table.add_column(
            column, justify="left" if column in ("node", "kind", "batch group") else "right"
        )
    for name, row in ir.facts["estimates"].items():
        data = ir.graph.nodes[f"nodes.{name}"]
        cfg = data["config"]
        group = f"#{row['group']} x{row['members']}" if row["members"] > 1 else f"#{row['group']}"
        heads = f"{cfg.heads}/{cfg.kv_heads}kv" if cfg.kv_heads else str(cfg.heads)
        table.add_row(
            name,
            data["kind"],
            group,
            str(cfg.width),
            heads,
            str(cfg.layers),
            _count(row["parameters"]),
            _count(row["flops_per_token"]),
        )
    for part, count in ir.facts["parameters_outside_nodes"].items():
        table.add_row(part, "", "", "", "", "", _count(count), "")
    table.add_row("total", "", "", "", "", "", _count(ir.facts["parameters"]), "", end_section=True)
    return table


def _component_lines(ir) -> list[str]:
    """Each node's chosen components and, with `variations`, what every layer drew."""
    lines = []
    for name in ir.facts["estimates"]:
        cfg = ir.graph.nodes[f"nodes.{name}"]["config"]
        chosen = [
            f"{what} {choice.name}({', '.join(f'{k}={v}' for k, v in choice.options)})"
            for what, choice in (("attention", cfg.variant), ("rotary", cfg.rotary))
            if choice is not None
        ]
        if chosen:
            lines.append(f"{name}: " + "; ".join(chosen))
        for i, layer in enumerate(cfg.layer_settings):
            lines.append(
                f"{name} layer {i}: activation {layer.activation}, heads {layer.heads}, "
                f"dropout {layer.dropout:g}, norm {layer.norm}"
            )
    return lines


def _fractal_lines(ir) -> list[str]:
    lines = []
    for name, node in ir.spec.nodes.items():
        if node.kind != "fractal":
            continue
        width = ir.graph.nodes[f"nodes.{name}"]["width"]
        levels = ", ".join(
            f"{node.branching**level} x width {width // node.branching**level}"
            for level in range(node.levels)
        )
        lines.append(
            f"fractal {name} (residual {node.residual}): levels 0..{node.levels - 1}: {levels}"
        )
    return lines


def _check_sub_model_address(ir, fractal: str | None, level: int, index: int) -> None:
    """`--level/--index` must name a sub-model; errors point at the fractal in the spec."""
    fractals = [n for n, node in ir.spec.nodes.items() if node.kind == "fractal"]
    if fractal is None and len(fractals) != 1:
        where = ir.span(("nodes",), key=True)
        message = (
            "`--level` needs a fractal node, and this spec has none"
            if not fractals
            else f"this spec has fractal nodes {', '.join(fractals)}; choose one with `--fractal`"
        )
        raise SpecError([Diagnostic(where, message)])
    name = fractal or fractals[0]
    if name not in fractals:
        raise SpecError(
            [
                Diagnostic(
                    ir.span(("nodes",), key=True),
                    f"`--fractal {name}` names no fractal node",
                    f"fractal nodes: {', '.join(fractals) or 'none'}",
                )
            ]
        )
    node = ir.spec.nodes[name]
    if not 0 <= level < node.levels:
        raise SpecError(
            [
                Diagnostic(
                    ir.span(("nodes", name, "levels")),
                    f"`--level {level}` is out of range: fractal `{name}` has levels 0..{node.levels - 1}",
                    "level 0 is the full model; pass a level in that range",
                )
            ]
        )
    count = node.branching**level
    if not 0 <= index < count:
        raise SpecError(
            [
                Diagnostic(
                    ir.span(("nodes", name, "branching"))
                    if "branching" in node.model_fields_set
                    else ir.span(("nodes", name, "levels")),
                    f"`--index {index}` is out of range: level {level} of fractal `{name}` has sub-models "
                    f"0..{count - 1}",
                    "pass an index in that range",
                )
            ]
        )


def _count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _random_inputs(ir, tokens: int, device: str) -> dict:
    import torch

    generator = torch.Generator().manual_seed(ir.spec.seed)
    inputs = {}
    for name, spec in ir.spec.inputs.items():
        if spec.kind == "tokens":
            inputs[name] = torch.randint(0, spec.vocab, (2, tokens), generator=generator).to(device)
        else:
            inputs[name] = torch.randn(2, tokens, spec.width, generator=generator).to(device)
    return inputs


def main() -> None:
    app()


if __name__ == "__main__":
    main()
