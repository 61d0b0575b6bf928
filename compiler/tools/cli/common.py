"""The `epicycle` app and what its commands share: the console streams, error handling and exit
codes, diagnostics printing. The commands live beside this module, one per group, and register
themselves on `app` when `compiler.tools.cli` imports them.

Exit codes: 0 success; 1 a spec (or checkpoint) has errors, printed as `FILE:LINE:COL: error: ...`
on stderr, or the system refused an output path (permissions, a read-only disk); 2 usage errors
(typer/click's own, and an output path of the wrong kind: a file where a directory goes); 3 an
internal error, which is a bug in epicycle (printed as one line; set EPICYCLE_DEBUG=1 for the
traceback). Never a traceback otherwise.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from compiler.language.diagnostics import Diagnostic, SpecError, printable
from compiler.tools.outputs import OutputError

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
        except OutputError as exc:
            err.print(f"epicycle: error: {printable(str(exc), limit=2000)}", markup=False)
            err.print(f"  help: {printable(exc.hint)}", markup=False)
            raise typer.Exit(2 if exc.usage else 1) from None
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


def _version(value: bool) -> None:
    if value:
        out.print(f"epicycle {_installed_version()}", markup=False)
        raise typer.Exit()


def _installed_version() -> str:
    """The version of the installed distribution (pyproject's `version`), read from its metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epicycle")
    except PackageNotFoundError:
        return "(not installed: run `pip install -e .` for the version)"


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """A graph-declared model compiler: YAML topology specs in, PyTorch modules out."""


def _usage(message: str) -> None:
    err.print(f"epicycle: {message}", markup=False)
    raise typer.Exit(2)


def main() -> None:
    app()
