"""Exact ratios: `223/19`, `13.368`, products of tooth ratios; a grammar that cannot execute."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.language.rational import RationalSyntaxError, parse_rational


@pytest.mark.parametrize(
    "text, value",
    [
        ("223/19", Fraction(223, 19)),
        ("13.368", Fraction(13368, 1000)),
        ("254 / 19", Fraction(254, 19)),
        ("(38/64) * (48/24)", Fraction(38 * 48, 64 * 24)),
        ("64/38*48/24", Fraction(64 * 48, 38 * 24)),
        ("-3/4", Fraction(-3, 4)),
        ("7", Fraction(7)),
        (".5", Fraction(1, 2)),
        ("3.", Fraction(3)),
    ],
)
def test_ratios_are_exact(text, value):
    assert parse_rational(text) == value


@pytest.mark.parametrize(
    "text, problem",
    [
        ("1/0", "division by zero"),
        ("2**8", "unexpected `*`"),
        ("(1/2", "missing `)`"),
        ("abc", "unexpected character `a`"),
        ("__import__('os')", "unexpected character `_`"),
        ("1e5", "unexpected character `e`"),
        ("", "an empty ratio"),
        ("1/", "where a number was expected"),
        ("(" * 40 + "1" + ")" * 40, "nested deeper"),
        ("9" * 40, "more than 30 digits"),
    ],
)
def test_bad_ratios_say_what_is_wrong(text, problem):
    with pytest.raises(RationalSyntaxError) as info:
        parse_rational(text)
    assert problem in info.value.message


def test_the_result_cannot_grow_without_bound():
    with pytest.raises(RationalSyntaxError, match="more than the 256 allowed"):
        parse_rational("*".join(["999999999999999999999999999"] * 4))


@settings(max_examples=200, deadline=None)
@given(st.fractions(min_value=Fraction(1, 10**6), max_value=10**6, max_denominator=10**6))
def test_any_fraction_round_trips(value):
    assert parse_rational(f"{value.numerator}/{value.denominator}") == value


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789./*()- e_ax", max_size=60))
def test_any_text_parses_or_fails_cleanly(text):
    try:
        assert isinstance(parse_rational(text), Fraction)
    except RationalSyntaxError as exc:
        assert 0 <= exc.offset <= len(text)
