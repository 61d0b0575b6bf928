"""How benchmarks/equilibrium_solvers.py makes its loop contractive: the gain search.

The benchmark's map is a compiled loop whose delayed edge reads `gain * z`; the gain is chosen so
the spectral radius of J_f at the fixed point is a target (0.8). The radius of a normalised loop
hardly moves with the gain until the gain is small, and there is no fixed point above some gain,
so the search is in log gain, brackets downward and then closes by regula falsi. Here the radius
is a known function of the gain; the benchmark measures it at each trial gain's fixed point.
"""

from __future__ import annotations

import math
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from equilibrium_solvers import calibrated_gain, goals, interleaved  # noqa: E402


def saturating(gain: float) -> float:
    """A radius that grows like gain^0.8 when small and levels off at 1.2 (a normalised stream),
    with no fixed point at all above gain 0.4."""
    if gain > 0.4:
        return math.inf
    power = gain**0.8
    return 1.2 * power / (power + 0.05)


def test_the_search_finds_the_gain_whose_radius_is_the_target():
    *_, (gain, radius) = tried = calibrated_gain(saturating, 0.8)
    assert radius == saturating(gain)
    assert abs(radius / 0.8 - 1) <= 0.02
    assert tried[0] == (1.0, math.inf) and math.isclose(tried[1][0], 0.1)  # down by ten until below
    assert len(tried) <= 12


def test_a_loop_already_below_the_target_keeps_the_full_gain():
    tried = calibrated_gain(lambda gain: 0.5 * gain, 0.8)
    assert tried == [(1.0, 0.5), (1.0, 0.5)]


def test_out_of_attempts_the_closest_radius_is_chosen():
    *tried, chosen = calibrated_gain(saturating, 0.8, within=1e-9, attempts=4)
    assert len(tried) == 4
    assert chosen == min(tried, key=lambda t: abs(math.log(t[1] / 0.8)))


def row(solver: str, forward: int, ms: float, converged: bool = True) -> dict:
    return {
        "solver": solver,
        "converged": converged,
        "forward_iterations": forward,
        "backward_iterations": forward,
        "forward_ms": ms,
        "backward_ms": 2 * ms,
    }


def test_the_goals_compare_converged_rows_only():
    rows = [
        row("ours fixed_point", 50, 10.0),
        row("ours anderson", 20, 6.0),
        row("ours anderson m=10 mix=0.5", 30, 6.0),
        row("torchdeq anderson", 30, 12.0),
        row("torchdeq fixed_point", 50, 8.0, converged=False),
    ]
    found = goals(rows)
    assert found["anderson_over_fixed_point_forward_iterations"] == 0.4
    assert found["anderson_m10_mix0.5_over_fixed_point_backward_iterations"] == 0.6  # a sweep row
    assert found["ours_over_torchdeq_anderson_m10_mix0.5_forward_ms"] == 0.5
    assert found["ours_over_torchdeq_anderson_backward_ms"] == 0.5
    assert found["ours_over_torchdeq_fixed_point_forward_ms"] is None  # theirs did not converge
    assert found["ours_over_torchdeq_broyden_forward_ms"] is None  # no rows


def test_solvers_compared_are_timed_in_turn_the_order_reversed_every_other_round():
    calls = []
    solves = [lambda: calls.append("ours"), lambda: calls.append("torchdeq")]
    samples = interleaved(solves, "cpu", repeats=3)
    assert calls == ["ours", "torchdeq", "torchdeq", "ours", "ours", "torchdeq"]
    assert [len(s) for s in samples] == [3, 3]
