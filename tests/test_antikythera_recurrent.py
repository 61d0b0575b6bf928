"""specs/antikythera_recurrent.yaml: the mechanism of antikythera.yaml made recurrent over days.

The same gears turn at the same velocities; a time axis carries the dials' delayed edges and the
predicted longitudes from one run of dates to the next, and the whole sequence at once equals
stepping through it."""

from __future__ import annotations

import pytest
import torch

import compiler
from tests.conftest import ROOT

MECHANISM = ROOT / "specs" / "antikythera.yaml"
RECURRENT = ROOT / "specs" / "antikythera_recurrent.yaml"
POINTERS = ("b1", "b3", "mercury", "venus", "mars", "jupiter", "saturn")  # longitude's gears


def velocities(ir) -> dict[str, object]:
    return {d["name"]: d["velocity"] for _, d in ir.vertices("node")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """39 gears of width 32 on a few dates: one thread is fastest, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(one_thread):
    return compiler.build_model(RECURRENT).eval()


def test_every_gear_of_the_mechanism_turns_at_its_velocity_over_a_time_axis():
    mechanism, recurrent = compiler.analyze(MECHANISM), compiler.analyze(RECURRENT)
    assert recurrent.facts.warnings == []
    assert recurrent.spec.time is not None and recurrent.spec.feedback is None
    assert velocities(recurrent) == velocities(mechanism)  # all 39 gears, exact ratios
    assert len(velocities(recurrent)) == 39


def test_the_predicted_longitudes_feed_the_pointer_gears_and_are_all_it_adds(model):
    plan = model.federation.plan
    fed = {plan.nodes[f.target]: (f.output, f.width, f.delay) for f in plan.feeds}
    assert fed == {gear: ("longitude", 14, 1) for gear in POINTERS}
    gears = compiler.analyze(MECHANISM).facts.parameters
    assert sum(p.numel() for p in model.parameters()) - gears == len(POINTERS) * 14 * 32


def test_the_whole_sequence_equals_stepping_through_it_date_run_by_date_run(model):
    dates = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(date=dates)
        state = model.init_state(batch=2, tokens=4)
        stepped = []
        for t in range(5):
            state, outputs = model.step(state, date=dates[:, t])
            stepped.append(outputs)
    assert whole["longitude"].shape == (2, 5, 4, 14) and whole["dials"].shape == (2, 5, 4, 10)
    for name in whole:
        streamed = torch.stack([o[name] for o in stepped], 1)
        torch.testing.assert_close(streamed, whole[name], rtol=0, atol=1e-6)


def test_a_step_starts_from_what_the_dials_showed_the_step_before(model):
    """Scoring step 1 reaches the fed-back projections and step 0's dates; step 0 alone reads
    nothing fed back (zero before the first step)."""
    dates = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    feeds = model.federation.feeds
    model.zero_grad(set_to_none=True)
    model(date=dates)["longitude"][:, 0].square().sum().backward()
    assert all(f.weight.grad is None or f.weight.grad.abs().sum() == 0 for f in feeds)
    model.zero_grad(set_to_none=True)
    dates.grad = None
    model(date=dates)["longitude"][:, 1].square().sum().backward()
    assert all(f.weight.grad.abs().sum() > 0 for f in feeds)
    assert dates.grad[:, 0].abs().sum() > 0  # through the delayed edges and the fed-back outputs
