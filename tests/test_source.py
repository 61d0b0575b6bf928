"""The YAML reader: located, YAML 1.2 scalars, and safe against everything a file can hold."""

from __future__ import annotations

import time

import pytest

from compiler.language.diagnostics import SpecError
from compiler.language.source import MAX_DEPTH, SpecFloat, parse_spec_text


def error_of(text: str | bytes) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec_text(text, "s.yaml")
    assert len(info.value.diagnostics) == 1
    return info.value.diagnostics[0].format()


def test_every_key_and_value_remembers_its_line_and_column():
    doc = parse_spec_text("a:\n  bb: 3\n  cc: [1, {d: x}]\n", "s.yaml")
    assert doc.data == {"a": {"bb": 3, "cc": [1, {"d": "x"}]}}
    assert str(doc.source.span(("a", "bb"), key=True)) == "s.yaml:2:3"
    assert str(doc.source.span(("a", "bb"))) == "s.yaml:2:7"
    assert str(doc.source.span(("a", "cc", 1, "d"))) == "s.yaml:3:15"
    # a path that goes deeper than the data points at the deepest part that exists
    assert str(doc.source.span(("a", "cc", 1, "d", "nope"))) == "s.yaml:3:15"


def test_scalars_follow_yaml_1_2_not_1_1():
    doc = parse_spec_text("a: yes\nb: no\nc: 1e30\nd: true\ne: ~\nf: 0x10\ng: 013\nh: .inf\n")
    assert doc.data["a"] == "yes" and doc.data["b"] == "no"  # no Norway problem
    assert isinstance(doc.data["c"], float) and doc.data["c"] == 1e30
    assert doc.data["d"] is True and doc.data["e"] is None
    assert doc.data["f"] == 16 and doc.data["g"] == 13
    assert doc.data["h"] == float("inf")


def test_floats_keep_the_digits_they_were_written_with():
    value = parse_spec_text("r: 13.368").data["r"]
    assert isinstance(value, SpecFloat) and value.text == "13.368" and value == 13.368


def test_keys_are_names_taken_as_written():
    assert parse_spec_text("1: a\ntrue: b\n").data == {"1": "a", "true": "b"}


def test_duplicate_keys_are_refused_naming_both_lines():
    assert error_of("a: 1\nb: 2\na: 3\n") == (
        "s.yaml:3:1: error: duplicate key `a` (first set at line 1)\n"
        "  help: each key may appear once in a mapping; remove one of them"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a: !!python/object/apply:os.system ['echo pwned']\n",
        "a: !!python/name:os.system\n",
        "a: !custom 3\n",
        "a: !!binary aGVsbG8=\n",
        "a: !!set {x, y}\n",
        "!!python/object:collections.OrderedDict {}\n",
    ],
)
def test_tags_that_build_objects_are_refused(text):
    assert "is not allowed" in error_of(text)


def test_standard_scalar_tags_are_plain_data():
    assert parse_spec_text("a: !!str 12\nb: !!int '7'\nc: !!float 3\n").data == {
        "a": "12",
        "b": 7,
        "c": 3.0,
    }


def test_anchors_aliases_and_merge_keys_share_settings():
    doc = parse_spec_text("base: &b {w: 1, h: 2}\nx:\n  <<: *b\n  h: 5\n")
    assert doc.data["x"] == {"w": 1, "h": 5}


def test_an_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    start = time.perf_counter()
    assert "aliases expand the spec to more than 200,000 values" in error_of("\n".join(lines))
    assert time.perf_counter() - start < 2


def test_a_recursive_alias_is_refused():
    assert "nesting deeper" in error_of("a: &a [*a]\n") or "alias" in error_of("a: &a [*a]\n")


@pytest.mark.parametrize("opener", ["[", "{a: "])
def test_deep_nesting_is_refused_before_recursing(opener):
    closer = "]" if opener == "[" else "}"
    text = opener * 20_000 + closer * 20_000
    start = time.perf_counter()
    assert f"nesting deeper than {MAX_DEPTH} levels" in error_of(text)
    assert time.perf_counter() - start < 2


def test_tabs_get_a_message_about_tabs():
    assert "tab character" in error_of("a:\n\tb: 1\n")


def test_files_that_are_not_text():
    assert "binary file" in error_of(b"spec: 1\n\x00\x01\x02")
    assert error_of(b"spec: 1\nname: caf\xe9\n").startswith(
        "s.yaml:2:10: error: the file is not UTF-8"
    )
    assert "the file is empty" in error_of(b"")
    assert "only comments" in error_of("# nothing here\n")


def test_several_documents_are_refused():
    assert "more than one YAML document" in error_of("a: 1\n---\nb: 2\n")


def test_malformed_yaml_is_located():
    assert error_of("a: [1, 2\nb: 3\n").startswith("s.yaml:")


def test_overlong_numbers_are_refused_not_parsed():
    assert "too long" in error_of("a: " + "9" * 5000 + "\n")
