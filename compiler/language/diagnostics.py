"""The one error type of the compiler, and the located diagnostics it carries.

Every problem found in a spec, from a stray tab to a gear train that contradicts itself, ends up
as a `Diagnostic`: a span (`file:line:col`, 1-based, as compilers and linters print them), a
message in the spec's own vocabulary, and a help line saying what to do. Passes return lists of
diagnostics; the driver raises `SpecError` when any is an error. The CLI prints them; library code
never does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Span:
    """A position in a source file; line and column are 1-based."""

    file: str
    line: int
    col: int
    # where the file was included from, when a sub-graph's spec file holds this position
    via: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    span: Span
    message: str
    hint: str | None = None
    severity: Severity = "error"

    def format(self) -> str:
        text = f"{self.span}: {self.severity}: {self.message}"
        if self.span.via:
            text += f" ({self.span.via})"
        if self.hint:
            text += f"\n  help: {self.hint}"
        return text


class SpecError(Exception):
    """A spec (or a checkpoint made from one) that cannot be compiled, with every reason found."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = sorted(
            diagnostics, key=lambda d: (d.span.file, d.span.line, d.span.col, d.message)
        )
        super().__init__(self.format())

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]

    def format(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)


def raise_if_errors(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    """Raise `SpecError` if any diagnostic is an error; otherwise hand back the warnings."""
    diagnostics = list(diagnostics)
    if any(d.severity == "error" for d in diagnostics):
        raise SpecError(diagnostics)
    return diagnostics


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The nearest known name to a misspelt one, for help lines."""
    import difflib

    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None
