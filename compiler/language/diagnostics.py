"""The one error type of the compiler, and the located diagnostics it carries.

Every problem found in a spec, from a stray tab to a gear train that contradicts itself, ends up
as a `Diagnostic`: a span (`file:line:col`, 1-based, as compilers and linters print them), a
message in the spec's own vocabulary, and a help line saying what to do. Passes return lists of
diagnostics; the driver raises `SpecError` when any is an error. The CLI prints them; library code
never does.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

Severity = Literal["error", "warning"]

MAX_SHOWN_CHARS = 400  # of one message or help line; a value pasted into a spec can be megabytes
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """`text` safe to print on a terminal: control characters (ANSI escapes, NUL, a carriage
    return, bidirectional overrides) written as escapes (`\\x1b`), and anything longer than
    `limit` cut in the middle, saying how much was left out. Messages echo the user's input
    (names, values, file names), and an escape sequence in a spec must not reach the terminal."""
    shown = "".join(_escape(ch) for ch in text)
    if len(shown) <= limit:
        return shown
    head, tail = shown[: limit * 3 // 4], shown[-(limit // 8) :]
    return f"{head}... [{len(shown) - len(head) - len(tail):,} characters left out] ...{tail}"


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    if ch in _BIDI_CONTROLS or unicodedata.category(ch) == "Cc":
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return ch


@dataclass(frozen=True)
class Span:
    """A position in a source file; line and column are 1-based."""

    file: str
    line: int
    col: int
    # where the file was included from, when a sub-graph's spec file holds this position
    via: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{printable(self.file)}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    span: Span
    message: str
    hint: str | None = None
    severity: Severity = "error"

    def format(self) -> str:
        """The one place a diagnostic becomes text: what it echoes is escaped and cut short."""
        text = f"{self.span}: {self.severity}: {printable(self.message)}"
        if self.span.via:
            text += f" ({printable(self.span.via)})"
        if self.hint:
            text += f"\n  help: {printable(self.hint)}"
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

    word = str(word)

    def comparable(choice: str) -> bool:
        """A much shorter or longer name is another word, however many letters it shares (`time`
        is not what `optimizer` meant, though difflib scores them 0.62), unless one holds the
        other (`tanh` for `gelu_tanh`)."""
        if word in choice or choice in word:
            return True
        return abs(len(choice) - len(word)) * 2 <= max(len(choice), len(word))

    near = [str(c) for c in choices if comparable(str(c))]
    matches = difflib.get_close_matches(word, near, n=1, cutoff=0.6)
    return matches[0] if matches else None
