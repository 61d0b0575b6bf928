"""A time axis, by example: `time:` makes the graph recurrent over time steps with fresh inputs,
delayed edges carry the state from one step to the next, and streaming equals the whole run."""

from __future__ import annotations

import pytest
import torch

import compiler
from compiler.passes.check_capabilities import model_capabilities
from tests.conftest import ROOT

GEARS = ROOT / "specs" / "recurrent_gears.yaml"

TWO_NODES = """
spec: 1
name: orbit
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  date: {kind: features, width: 3, context: 8}
nodes:
  sun: {kind: transformer}
  moon: {kind: transformer}
edges:
  - {from: sun, to: moon}
  - {from: moon, to: sun, kind: feedback, delay: 1}
time: {}
outputs:
  longitude: {from: [sun, moon], kind: regression, width: 2}
"""


@pytest.fixture(scope="module")
def gears():
    return compiler.build_model(GEARS).eval()


def test_the_forward_over_a_sequence_equals_streaming_it_step_by_step(gears):
    dates = torch.randn(2, 7, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = gears(date=dates)["longitude"]
        state = gears.init_state(batch=2, tokens=5)
        streamed = []
        for t in range(7):
            state, outputs = gears.step(state, date=dates[:, t])
            streamed.append(outputs["longitude"])
    assert whole.shape == (2, 7, 5, 6)
    torch.testing.assert_close(torch.stack(streamed, 1), whole, rtol=0, atol=1e-6)


def test_chunks_with_the_state_carried_equal_the_whole_sequence(gears):
    dates = torch.randn(2, 9, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = gears(date=dates)["longitude"]
        state = gears.init_state(2, 4)
        state, first = gears.scan(state, date=dates[:, :4])
        state = tuple(s.detach() for s in state)  # truncated backpropagation's cut
        state, second = gears.scan(state, date=dates[:, 4:])
    torch.testing.assert_close(torch.cat([first["longitude"], second["longitude"]], 1), whole)


def test_the_state_carries_earlier_steps_into_later_ones(write_spec):
    model = compiler.build_model(write_spec(TWO_NODES))
    dates = torch.randn(1, 4, 3, 3, requires_grad=True)
    model(date=dates)["longitude"][:, 3].sum().backward()
    per_step = dates.grad.abs().sum(dim=(0, 2, 3))
    assert (per_step > 0).all()  # step 3 reads steps 0..2 through the delayed edge


def test_without_a_delayed_edge_every_step_stands_alone(write_spec):
    text = TWO_NODES.replace("  - {from: moon, to: sun, kind: feedback, delay: 1}\n", "")
    ir = compiler.analyze(write_spec(text))
    assert [w.message.split(":")[0] for w in ir.facts.warnings] == [
        "a time axis without delayed edges carries no state"
    ]
    model = compiler.build_model(ir)
    dates = torch.randn(1, 3, 3, 3, requires_grad=True)
    model(date=dates)["longitude"][:, 2].sum().backward()
    assert dates.grad[:, :2].abs().sum() == 0 and dates.grad[:, 2].abs().sum() > 0


def test_a_time_axis_is_not_also_iterated_by_feedback(spec_errors):
    message = spec_errors(TWO_NODES + "feedback: {steps: 3}\n")
    assert "spec.yaml:16:1: error: `feedback:` iterates the graph within one step" in message


def test_kinds_that_cannot_step_through_time_are_refused_where_written(spec_errors):
    text = TWO_NODES.replace(
        "  moon: {kind: transformer}",
        "  moon: {kind: fractal, levels: 2, base: {width: 16, heads: 2, layers: 1}}",
    ).replace("  - {from: sun, to: moon}\n", "")
    assert "error: `moon` is a `fractal` node, which cannot step through a time axis" in (
        spec_errors(text)
    )


def test_inputs_without_their_time_axis_are_refused_by_name(write_spec):
    model = compiler.build_model(write_spec(TWO_NODES))
    with pytest.raises(ValueError, match=r"input `date` has shape \(2, 5, 3\); with a time axis"):
        model(date=torch.randn(2, 5, 3))


def test_streaming_asks_for_a_time_axis(write_spec):
    plain = TWO_NODES.replace("time: {}\n", "feedback: {steps: 2}\n")
    model = compiler.build_model(write_spec(plain))
    with pytest.raises(TypeError, match="this spec declares none"):
        model.step((), date=torch.randn(1, 2, 3))


def test_a_time_axis_rules_out_export_and_says_why():
    limits = model_capabilities(compiler.analyze(GEARS))
    assert [limit.path for limit in limits["export"]] == [("time",)]
    assert not limits["fullgraph"]
    # CUDA graphs are ruled out by its rotation perspectives alone, not by the time axis
    assert {limit.path[0] for limit in limits["cuda_graphs"]} == {"perspectives"}
