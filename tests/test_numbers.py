"""Numbers cannot explode: every exact rational the compiler keeps is bounded.

A ratio is exact (`254/19`), so a hostile one could be made to cost anything: `1e-99999999` as a
fraction has a denominator of 332 million bits, and a product along a long gear train or the
reciprocal of a tiny ratio grows with every edge. Every ratio, as written and as derived (a gear's
velocity, the ratio an edge takes from its two gears), is held to numerator and denominator of
`MAX_BITS` bits; past it the spec is refused, at the value or at the edge where a product grows
too large, before anything large is built. Within the bound, every value converts to a finite,
non-zero float.

The goldens in tests/bad_specs (`ratio_exponent_huge`, `ratio_too_fine`, `ratio_long_digits`,
`ratio_product_too_large`, `gear_train_velocity_overflow`, `gear_reciprocal_overflow`,
`gear_derived_ratio_too_large`) pin the messages; the properties below check the class.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError

from compiler.language.diagnostics import SpecError
from compiler.language.frontend import load_spec_text
from compiler.language.rational import MAX_BITS, size_problem, to_rational
from compiler.language.source import SpecFloat
from compiler.pipeline import analyze

HANG_GUARD_S = 2.0  # not a speed target: a ratio that is not refused quickly is a hang


def _bits(value: Fraction) -> int:
    return max(abs(value.numerator).bit_length(), value.denominator.bit_length())


def _decimal_text(draw) -> str:
    whole = draw(st.text("0123456789", min_size=0, max_size=45))
    fraction = draw(st.one_of(st.none(), st.text("0123456789", min_size=0, max_size=45)))
    if not whole and not fraction:
        whole = "1"
    text = whole + ("" if fraction is None else "." + fraction)
    exponent = draw(
        st.one_of(
            st.none(),
            st.integers(-150, 150),
            st.integers(-(10**12), 10**12),
        )
    )
    return text if exponent is None else f"{text}e{exponent}"


@st.composite
def ratio_texts(draw) -> str:
    """What a person (or a fuzzer) might write as a ratio: long digit strings, huge exponents,
    products and quotients of them."""
    parts = draw(st.lists(st.composite(lambda d: _decimal_text(d))(), min_size=1, max_size=4))
    operators = draw(st.lists(st.sampled_from(["*", "/"]), min_size=len(parts) - 1, max_size=3))
    text = parts[0]
    for operator, part in zip(operators, parts[1:], strict=False):
        text += operator + part
    return text


def _as_yaml_would_read_it(text: str):
    """A plain number becomes a float keeping its text (as the spec reader does), else a string."""
    try:
        return SpecFloat(text) if any(c in text for c in ".eE") and "*" not in text else text
    except ValueError:
        return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratio_texts())
def test_any_ratio_text_is_bounded_or_refused_quickly(text):
    value = _as_yaml_would_read_it(text)
    start = time.perf_counter()
    try:
        exact = to_rational(value)
    except PydanticCustomError as exc:
        assert exc.type in ("rational_syntax", "rational_size", "rational_finite"), exc.type
    else:
        assert _bits(exact) <= MAX_BITS
        if exact:
            assert math.isfinite(float(exact)) and float(exact) != 0.0
    assert time.perf_counter() - start < HANG_GUARD_S, text


def test_a_huge_negative_exponent_is_refused_by_its_exponent_without_building_it():
    start = time.perf_counter()
    with pytest.raises(PydanticCustomError, match="exponent beyond"):
        to_rational(SpecFloat("1e-99999999"))
    assert time.perf_counter() - start < 0.1  # 10**99999999 was never computed


def test_the_bound_is_on_the_reduced_value_so_a_long_but_small_ratio_is_fine():
    assert to_rational(SpecFloat("5e-70")) == Fraction(5, 10**70)  # 232 bits
    assert to_rational("1000000000000000000000000000/1000000000000000000000000000") == 1


def test_every_bounded_value_is_a_finite_nonzero_float():
    largest = Fraction(2**MAX_BITS - 1)
    assert size_problem(largest) is None and size_problem(1 / largest) is None
    assert math.isfinite(float(largest)) and float(1 / largest) > 0
    assert "257 bits" in size_problem(largest + 1)


def _train_spec(pinned: str, first: str, second: str) -> str:
    return f"""
spec: 1
name: fuzzed-train
defaults:
  transformer: {{width: 16, heads: 2, layers: 1}}
inputs:
  t: {{kind: features, width: 4, context: 8}}
nodes:
  a: {{kind: gear, ratio: {pinned}}}
  b: {{kind: gear}}
  c: {{kind: gear}}
  d: {{kind: gear, teeth: 7}}
edges:
  - {{from: a, to: b, kind: mesh, ratio: {first}}}
  - {{from: c, to: b, kind: mesh, ratio: {second}}}
  - {{from: c, to: d}}
outputs:
  y: {{from: [a, b, c, d], kind: regression, width: 4}}
"""


@cache
def _warm_up() -> None:
    """The first analysis imports torch: that is not the ratio's cost."""
    analyze(load_spec_text(_train_spec("1", "2", "3"), "train.yaml"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ratio_texts(), ratio_texts(), ratio_texts(), st.booleans())
def test_a_gear_train_of_any_ratios_validates_or_is_refused_at_a_location(
    pinned, first, second, quoted
):
    """Products along the train (a -> b) and reciprocals walking it backwards (b -> c), and the
    ratio the message edge c -> d derives: within the bound, or a located error; never a crash."""
    texts = [f'"{t}"' if quoted else t for t in (pinned, first, second)]
    _warm_up()
    start = time.perf_counter()
    try:
        ir = analyze(load_spec_text(_train_spec(*texts), "train.yaml"))
    except SpecError as exc:
        assert exc.errors, exc
        for error in exc.errors:
            assert error.span.file == "train.yaml" and error.span.line >= 1, error.format()
    else:
        for _, data in ir.vertices("node"):
            assert _bits(data["velocity"]) <= MAX_BITS
            assert math.isfinite(float(data["velocity"])) and float(data["velocity"]) > 0
        for _, _, edge in ir.spec_edges():
            if edge["ratio"] is not None:
                assert _bits(Fraction(edge["ratio"])) <= MAX_BITS
    assert time.perf_counter() - start < HANG_GUARD_S
