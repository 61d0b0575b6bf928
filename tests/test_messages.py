"""What messages echo of the input: control characters escaped, long values cut short, the file's
encoding named, the limit that was passed stated as it is. Escaping and cutting happen in one
place, `Diagnostic.format`, so every message of every pass gets them (goldens for single cases
are in tests/bad_specs: `ansi_escape_in_a_node_name`, `utf16_*`, `utf32_*`, ...)."""

from __future__ import annotations

import time
import unicodedata

from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from compiler.language.diagnostics import MAX_SHOWN_CHARS, Diagnostic, Span, printable
from compiler.tools.cli import app
from tests.conftest import TINY

runner = CliRunner()


def validate(path):
    return runner.invoke(app, ["validate", str(path)])


def is_terminal_safe(text: str) -> bool:
    return all(ch == "\n" or (ord(ch) >= 0x20 and not 0x7F <= ord(ch) < 0xA0) for ch in text)


def test_an_ansi_escape_in_a_name_is_shown_escaped(write_spec):
    spec = write_spec(TINY.replace("body: {kind: transformer", '"x\\e[2J\\e]0;t\\a": {kind: gear'))
    result = validate(spec)
    assert result.exit_code == 1
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "`x\\x1b[2J\\x1b]0;t\\x07` is not a valid name" in result.stderr


def test_a_nul_and_a_carriage_return_in_a_value_are_shown_escaped(write_spec):
    result = validate(write_spec(TINY.replace("width: 32", 'width: "3\\0\\r2"')))
    assert result.exit_code == 1
    assert "got a string ('3\\x00\\r2')" in result.stderr
    assert is_terminal_safe(result.stderr)


def test_a_megabyte_value_is_cut_in_the_middle_saying_how_much(write_spec):
    big = "w" * (1 << 20)
    result = validate(write_spec(TINY.replace("width: 32", f'width: "{big}"')))
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert len(line) < 600
    assert "`width` must be a whole number, got a string ('www" in line
    assert "characters left out] ...www" in line and line.endswith("')")


def test_sixty_thousand_plain_edges_are_not_called_an_alias_bomb(write_spec):
    edges = "edges:\n" + "  - {from: body, to: body, delay: 1}\n" * 60_000
    start = time.perf_counter()
    result = validate(write_spec(TINY + edges))
    assert time.perf_counter() - start < 2
    assert result.exit_code == 1
    assert "alias" not in result.stderr
    assert "the spec holds more than 200,000 values" in result.stderr


def test_aliases_that_multiply_are_named_as_such(write_spec):
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 7)
    )
    result = validate(write_spec(text))
    assert "aliases expand the spec to more than 200,000 values here" in result.stderr


def test_utf16_without_a_byte_order_mark_is_named_by_its_nul_bytes(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_bytes(TINY.encode("utf-16-le"))
    result = validate(spec)
    assert result.exit_code == 1
    assert result.stderr.startswith(
        f"{spec}:1:1: error: this file is UTF-16 (little-endian); save it as UTF-8"
    )
    assert "binary" not in result.stderr


def test_a_binary_file_is_still_called_binary(tmp_path):
    blob = tmp_path / "weights.yaml"
    blob.write_bytes(bytes(range(256)) * 4)
    assert "this is a binary file" in validate(blob).stderr


def test_the_file_name_is_escaped_too():
    shown = Diagnostic(Span("a\x1b[1mb.yaml", 1, 1), "m").format()
    assert shown == "a\\x1b[1mb.yaml:1:1: error: m"


@given(st.text(max_size=3000))
def test_printable_output_is_terminal_safe_and_bounded(text):
    shown = printable(text)
    assert is_terminal_safe(shown.replace("\n", ""))
    assert "\n" not in shown
    assert len(shown) <= MAX_SHOWN_CHARS + 60
    ordinary = all(ch == " " or unicodedata.category(ch)[0] not in "CZ" for ch in text)
    if len(text) <= MAX_SHOWN_CHARS and ordinary:
        assert shown == text  # letters, digits, symbols and spaces pass unchanged
