"""What the interop modules share: a file-level diagnostic and the import of an optional package."""

from __future__ import annotations

from typing import Any

from compiler.language.diagnostics import Diagnostic, Span


def _error(file: str, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Span(file, 1, 1), message, hint)


def _require(module: str, purpose: str, package: str | None = None) -> Any:
    """Import an optional dependency, or say which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{purpose} needs the `{package or module}` package: pip install {package or module}"
        ) from None
