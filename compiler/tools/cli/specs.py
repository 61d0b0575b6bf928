"""`epicycle validate` and `epicycle compile`: check specs, print a compiled spec's per-node
table, run a smoke forward and save weights."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.table import Table

from compiler.language.diagnostics import Diagnostic, Span, SpecError, did_you_mean, printable
from compiler.language.kinds import KINDS
from compiler.tools.cli.common import _guarded, _print_diagnostics, _usage, app, out
from compiler.tools.outputs import OutputError, check_directory_output, output_directory

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="PATH=VALUE",
        help="Set one field of the spec for this run (repeatable), e.g. --set nodes.body.width=64 "
        "or --set edges.0.delay=1; the value is YAML, validated like the file.",
        show_default=False,
    ),
]


def _overrides(sets: list[str] | None) -> list:
    """The `--set` values parsed; one that is not PATH=VALUE is a usage error (exit 2)."""
    from compiler.language.overrides import OverrideSyntaxError, parse_overrides

    try:
        return parse_overrides(sets or [])
    except OverrideSyntaxError as exc:
        _usage(str(exc))
        raise  # unreachable: `_usage` exits


@app.command()
@_guarded
def validate(
    files: Annotated[list[str], typer.Argument(help="Spec files to check.", show_default=False)],
    sets: SetOption = None,
) -> None:
    """Check spec files: exit 0 if every one is valid, 1 if any is not."""
    from compiler.pipeline import analyze

    overrides = _overrides(sets)
    failed = False
    for file in files:
        try:
            ir = analyze(file, overrides=overrides)
        except SpecError as exc:
            failed = True
            _print_diagnostics(exc.diagnostics)
            continue
        _print_diagnostics(ir.facts.warnings)
        out.print(f"{printable(file)}: ok ({_count(ir.facts.parameters)} parameters)", markup=False)
    if failed:
        raise typer.Exit(1)


def _equilibrium_summary(federation) -> str | None:
    """One line on the smoke forward's fixed-point solve (and the Lipschitz bound's measurement)."""
    report, plan = federation.solve_report(), federation.plan
    if report is None:
        return None
    state = "solved" if report["residual"] < plan.tolerance else "NOT solved"
    line = (
        f"equilibrium: {state} in {report['iterations']} of {plan.steps} iterations "
        f"(relative change {report['residual']:.2g}, tolerance {plan.tolerance:g})"
    )
    if report.get("lipschitz") is not None:
        line += (
            f"; ||J|| at the fixed point {report['lipschitz']:.3g} "
            f"(bound {plan.lipschitz:g}, gain {report['feedback_gain']:.3g})"
        )
    return line


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
    index: Annotated[
        int | None,
        typer.Option(
            help="Fractal specs: which sub-model of `--level` (default 0).", show_default=False
        ),
    ] = None,
    fractal: Annotated[
        str | None,
        typer.Option(help="Fractal specs: the fractal node (default: the only one)."),
    ] = None,
    sets: SetOption = None,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            metavar="PATH",
            help="A node or sub-graph, by its dotted path (e.g. outer.inner). A sub-graph is "
            "compiled alone, a model of its own (its inputs and outputs the model's): its table, "
            "smoke forward and --out are its own. A node prints its row, the smoke forward runs "
            "the whole model, and --out is refused (a node alone has no outputs).",
        ),
    ] = None,
) -> None:
    """Compile a spec: print its per-node table, run a smoke forward, optionally save weights."""
    import torch

    from compiler.language.standalone import Surroundings, load_sub_graph
    from compiler.pipeline import analyze, build_model
    from compiler.tools.checkpoint import save_checkpoint

    if node is not None and level is not None:
        _usage("--node and --level each choose the table to print: give one of them")
    if node is not None and (fractal is not None or index is not None):
        given = "--fractal" if fractal is not None else "--index"
        _usage(f"{given} chooses a fractal's sub-model for --level, which --node does not take")
    index = 0 if index is None else index
    if out_dir is not None:  # refused before the work, not after it
        check_directory_output(out_dir, "--out")
    overrides = _overrides(sets)
    ir = analyze(file, overrides=overrides)
    _print_diagnostics(ir.facts.warnings)
    if level is not None:  # the sub-model's own table, once the model is built
        fractal = _check_sub_model_address(ir, fractal, level, index)
    elif node is not None and _nodes_under(ir, node) == {node}:  # a node: its row
        if out_dir is not None:
            _usage(
                f"--out with --node {node}: `{node}` is a node, and a node alone is no model (it "
                "has no outputs); drop --node to write the whole model, or name a sub-graph"
            )
        out.print(_table(ir, {node}, node))
    elif node is not None:  # a sub-graph: from here on, the model is the sub-graph alone
        around = Surroundings(bus_width=ir.facts.bus_width, context=ir.facts.context)
        sub_graph = load_sub_graph(file, node, overrides, around=around)
        whole, ir = ir, analyze(sub_graph)
        _print_diagnostics([d for d in ir.facts.warnings if d not in whole.facts.warnings])
        out.print(_table(ir))
        for line in (*_kind_notes(ir), _capability_line(ir), _alone_line(whole, ir, node)):
            out.print(line, markup=False)
    else:
        out.print(_table(ir))
        for line in _kind_notes(ir):
            out.print(line, markup=False)
        out.print(_capability_line(ir), markup=False)
    if not smoke and out_dir is None and level is None:
        return
    from compiler.resources import check_resources

    budget_bytes = None if budget is None else int(budget * 2**30)
    if budget_bytes != 0:
        check_resources(
            ir, device=device, budget=budget_bytes, batch=2, tokens=min(tokens, ir.facts.context)
        )
    model = build_model(ir, device=device, budget=0)
    if level is not None:
        out.print(_sub_model_table(ir, model.node(fractal).fractal, level, index))
        for line in _kind_notes(ir):  # the levels there are, to choose others from
            out.print(line, markup=False)
        out.print(_capability_line(ir), markup=False)
    if smoke:
        model.eval()
        from compiler.tools.inputs import random_inputs

        inputs = random_inputs(ir.spec, tokens=min(tokens, ir.facts.context), device=device)
        start = time.perf_counter()
        with torch.no_grad():
            if level is None:
                result = model(**inputs)
            else:
                result = model.node(fractal).fractal.sub_model(level, index)(**inputs)
        elapsed = time.perf_counter() - start
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
        finite = all(bool(torch.isfinite(v).all()) for v in result.values())
        if not finite:
            raise SpecError([Diagnostic(ir.span(()), "the smoke forward produced NaN or Inf")])
        out.print(f"smoke forward: {shapes} in {elapsed * 1000:.1f} ms", markup=False)
        solve = _equilibrium_summary(model.federation)
        if solve:
            out.print(solve, markup=False)
    if out_dir is not None:
        with output_directory(out_dir, "--out"):
            try:
                path = save_checkpoint(model, out_dir)
            except OSError as exc:
                raise OutputError(
                    "--out",
                    str(out_dir),
                    f"cannot write the weights: {exc.strerror or exc}",
                    "choose a directory on a disk you can write to, with free space",
                ) from None
        out.print(f"wrote {path}", markup=False)


def _nodes_under(ir, path: str) -> set[str]:
    """The nodes at `path` (one node, or every node of the sub-graph there, at any depth); an
    unknown path is a located error on the command line, with the nearest known path."""
    names = set(ir.facts.estimates) | set(ir.facts.companions)
    picked = {n for n in names if n == path or n.startswith(path + ".")}
    if picked:
        return picked
    known = names | {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    guess = did_you_mean(path, known)
    raise SpecError(
        [
            Diagnostic(
                Span("command line: --node", 1, 1),
                f"no node or sub-graph `{path}` in {ir.spec.name}",
                (f"did you mean `{guess}`? " if guess else "")
                + "the paths are the node column of `epicycle compile` (sub-graphs: the part "
                "before a dot)",
            )
        ]
    )


def _alone_line(whole, alone, path: str) -> str:
    """A sub-graph compiled alone against its rows in the whole model's table: its nodes and
    output heads are the same parts, on the same bus, unless an edge across its border was a
    node's only way on or off the bus; alone it also has inputs and a message layer of its own,
    which the whole model has once for all its nodes."""
    mine = _node_and_head_parameters(alone, "")
    rows = _node_and_head_parameters(whole, path + ".")
    same = (
        f"as in the rows of `{path}` in {whole.spec.name}"
        if mine == rows
        else f"against {_count(rows)} in the rows of `{path}` in {whole.spec.name} (alone, "
        "a node that only the edges from outside reach has no projection off the bus, one that "
        "only sends out of it none onto it)"
    )
    rest = [
        f"{part} {_count(n)}"
        for part, n in alone.facts.parameters_outside_nodes.items()
        if not part.startswith("outputs.")
    ]
    line = f"`{path}` alone: {_count(alone.facts.parameters)} parameters; its nodes and output "
    line += f"heads {_count(mine)}, {same}"
    return line + (f"; its own {', '.join(rest)}" if rest else "")


def _node_and_head_parameters(ir, prefix: str) -> int:
    """The parameters of the node rows and output heads whose paths start with `prefix`."""
    facts = ir.facts
    rows = {**facts.estimates, **facts.companion_estimates}
    heads = {
        part[len("outputs.") :]: n
        for part, n in facts.parameters_outside_nodes.items()
        if part.startswith("outputs.")
    }
    return sum(row["parameters"] for name, row in rows.items() if name.startswith(prefix)) + sum(
        n for name, n in heads.items() if name.startswith(prefix)
    )


def _table(ir, only: set[str] | None = None, path: str | None = None) -> Any:
    """The per-node table; with `only`, just those nodes' rows and their total (`--node`)."""
    from rich.table import Table  # only `compile` draws a table

    title = f"{ir.spec.name}  (spec sha256 {ir.loaded.digest[:12]})"
    table = Table(title=title + (f", {path}" if path else ""), title_justify="left")
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
    for name, row in ir.facts.estimates.items():
        if only is not None and name not in only:
            continue
        vertex = f"nodes.{name}"
        described = KINDS.get(ir.graph.nodes[vertex]["kind"]).describe(ir, vertex)
        group = f"#{row['group']} x{row['members']}" if row["members"] > 1 else f"#{row['group']}"
        table.add_row(
            name,
            ir.graph.nodes[vertex]["kind"],
            described.group or group,
            described.width,
            described.heads,
            described.layers,
            _count(row["parameters"]),
            _count(row["flops_per_token"]),
        )
    for name in ir.facts.companions:
        if only is not None and name not in only:
            continue
        row, vertex = ir.facts.companion_estimates[name], f"nodes.{name}"
        described = KINDS.get(ir.graph.nodes[vertex]["kind"]).describe(ir, vertex)
        table.add_row(
            name,
            ir.graph.nodes[vertex]["kind"],
            described.group or "",
            described.width,
            described.heads,
            described.layers,
            _count(row["parameters"]),
            _count(row["flops_per_token"]),
        )
    if only is not None:
        within = sum(ir.facts.estimates[n]["parameters"] for n in only if n in ir.facts.estimates)
        within += sum(
            ir.facts.companion_estimates[n]["parameters"] for n in only if n in ir.facts.companions
        )
        table.add_row(f"total of {path}", "", "", "", "", "", _count(within), "", end_section=True)
        return table
    flops = ir.facts.flops_outside_nodes
    for part, count in ir.facts.parameters_outside_nodes.items():
        table.add_row(
            part, "", "", "", "", "", _count(count), _count(flops[part]) if part in flops else ""
        )
    table.add_row("total", "", "", "", "", "", _count(ir.facts.parameters), "", end_section=True)
    return table


def _sub_model_table(ir, view, level: int, index: int) -> Table:
    """Sub-model `(level, index)` of a fractal on its own: its shape and the parameters it uses,
    counted from the slices of the full model's weights that it reads (its blocks, its columns of
    each input's table or projection and of each output head)."""
    from rich.table import Table

    from runtime.ports import TokenInput

    fractal = view.fractal
    shape = fractal.sub_config(level)
    a, b = fractal.columns(fractal.sub_model_windows(level, index)[-1])
    table = Table(
        title=f"sub-model ({level}, {index}) of {view.node} in {ir.spec.name}  "
        f"(spec sha256 {ir.loaded.digest[:12]})",
        title_justify="left",
    )
    for column in ("part", "width", "heads", "layers", "parameters"):
        table.add_column(column, justify="left" if column == "part" else "right")
    body = sum(
        part.numel() for parts in fractal.sub_model_tensors(level, index).values() for part in parts
    )
    heads = f"{shape.heads}/{shape.kv_heads}kv" if shape.kv_heads else str(shape.heads)
    table.add_row(view.node, str(shape.width), heads, str(shape.layers), _count(body))
    total, tables = body, set()
    for name, _ in view.inputs:
        embedding = view.model.inputs[name]
        if isinstance(embedding, TokenInput):  # its table's columns [a, b)
            tables.add(id(embedding.table.weight))
            count = embedding.table.weight[:, a:b].numel()
        else:  # its projection's rows [a, b) and their biases
            count = embedding.proj.weight[a:b].numel()
            count += 0 if embedding.proj.bias is None else b - a
        table.add_row(f"inputs.{name}", str(b - a), "", "", _count(count))
        total += count
    for name in view.outputs:
        head = view.model.outputs[name].proj
        tied = id(head.weight) in tables
        count = 0 if tied else head.weight[:, a:b].numel()
        count += 0 if head.bias is None else head.bias.numel()
        table.add_row(f"outputs.{name}" + (" (tied)" if tied else ""), "", "", "", _count(count))
        total += count
    table.add_row("total", "", "", "", _count(total), end_section=True)
    return table


def _capability_line(ir) -> str:
    """What the whole model supports, and what rules the rest out (`model_capabilities`)."""
    from compiler.passes.check_capabilities import model_capabilities

    limits = model_capabilities(ir)
    line = "supports: " + (", ".join(n for n, found in limits.items() if not found) or "none")
    ruled_out = [f"{n} ({found[0].reason})" for n, found in limits.items() if found]
    return line + ("; not " + "; not ".join(ruled_out) if ruled_out else "")


def _kind_notes(ir) -> list[str]:
    """What each node's kind adds below the table (a fractal's levels and schedule)."""
    return [
        note
        for vertex, data in ir.vertices("node")
        for note in KINDS.get(data["kind"]).describe(ir, vertex).notes
    ]


def _check_sub_model_address(ir, fractal: str | None, level: int, index: int) -> str:
    """`--level/--index` must name a sub-model; errors point at the fractal in the spec. Returns
    the fractal's name."""
    fractals = [
        n for n, node in ir.spec.nodes.items() if KINDS.get(node.kind).sub_models(node) is not None
    ]
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
    counts = KINDS.get(node.kind).sub_models(node)
    if not 0 <= level < len(counts):
        raise SpecError(
            [
                Diagnostic(
                    ir.span(("nodes", name, "levels")),
                    f"`--level {level}` is out of range: fractal `{name}` has levels 0..{len(counts) - 1}",
                    "level 0 is the full model; pass a level in that range",
                )
            ]
        )
    count = counts[level]
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
    return name


def _count(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
