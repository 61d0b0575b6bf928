"""specs/antikythera.yaml: the compiler derives the mechanism's published periods from its tooth counts."""

from __future__ import annotations

from fractions import Fraction

import pytest

import compiler
from tests.conftest import ROOT

SPEC = ROOT / "specs" / "antikythera.yaml"


@pytest.fixture(scope="module")
def velocity() -> dict[str, Fraction]:
    ir = compiler.analyze(SPEC)
    return {d["name"]: d["velocity"] for _, d in ir.vertices("node")}


SYNODIC_MONTHS_PER_YEAR = Fraction(235, 19)  # the Metonic relation: 235 months in 19 years


@pytest.mark.parametrize(
    "gear, turns_per_year, meaning",
    [
        ("b1", Fraction(1), "the main drive wheel turns once a year"),
        ("b3", Fraction(254, 19), "the Moon pointer: 254 sidereal months in 19 years"),
        ("n1", Fraction(5, 19), "the Metonic pointer: 5 spiral turns in 19 years (235 months)"),
        (
            "g1",
            4 / Fraction(223) * SYNODIC_MONTHS_PER_YEAR,
            "the Saros pointer: 4 spiral turns in 223 months",
        ),
        (
            "i1",
            1 / Fraction(3 * 223) * SYNODIC_MONTHS_PER_YEAR,
            "the Exeligmos dial: one turn in 3 Saros",
        ),
        ("o1", Fraction(1, 4), "the Games dial: one turn in a four-year Olympiad cycle"),
        ("q1", Fraction(1, 76), "the Callippic dial: one turn in 76 years (4 Metonic cycles)"),
        ("venus", Fraction(289, 462), "Venus: 289 synodic cycles in 462 years"),
        ("saturn", Fraction(427, 442), "Saturn: 427 synodic cycles in 442 years"),
        ("mars", Fraction(133, 284), "Mars: 133 synodic cycles in 284 years"),
    ],
)
def test_derived_velocities_are_the_published_periods(velocity, gear, turns_per_year, meaning):
    assert velocity[gear] == turns_per_year, meaning


def test_the_pin_and_slot_pair_turns_at_one_rate(velocity):
    assert velocity["k1"] == velocity["k2"]


def test_the_moon_pointer_is_one_synodic_month_ahead_of_the_sun_each_month(velocity):
    """Synodic = sidereal - solar: 254/19 - 1 = 235/19 (the relation behind the Metonic dial)."""
    assert velocity["b3"] - velocity["b1"] == SYNODIC_MONTHS_PER_YEAR


def test_every_gear_is_a_batched_sub_transformer_with_rotating_heads():
    model = compiler.build_model(SPEC)
    plan = model.federation.plan
    assert len(plan.nodes) == 39
    scales = {name: s for g in plan.groups for name, s in zip(g.nodes, g.rope_scales, strict=True)}
    assert scales["b3"] == pytest.approx(254 / 19)
    assert max(len(g.nodes) for g in plan.groups) >= 5  # the planetary pointers run as one call
