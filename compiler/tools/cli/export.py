"""`epicycle export`: a spec or checkpoint to torch.export (.pt2) or ONNX."""

from __future__ import annotations

import contextlib
import enum
from pathlib import Path
from typing import Annotated

import typer

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.tools.cli.common import _guarded, app, err, out
from compiler.tools.outputs import check_file_output


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
    check_file_output(output, "--out")  # before the minutes an export can take
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
