"""FLOPs per token beyond the nodes, by example: the projection of an output fed back
(`from: outputs.NAME`, `projection: linear`) costs 2 FLOPs per weight per token each time a step
adds it, as every matmul is counted; the table shows it on the `feeds` row."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import compiler
from compiler.tools.cli import app
from tests.conftest import ROOT
from tests.test_output_feedback import ITERATED  # `a -> b`, y (width 4) fed back into a

SKETCH = ROOT / "specs" / "seed000_sketch.yaml"
FEEDS = (
    "  - {from: outputs.sun_state, to: sun, delay: 1, projection: linear}\n",
    "  - {from: outputs.moon_state, to: moon, delay: 1, projection: linear}\n",
    "  - {from: outputs.mars_state, to: mars, delay: 1, projection: linear}\n",
)


def test_the_sketch_s_fed_back_outputs_add_2_flops_per_multiply_add_of_their_projections():
    """Three outputs of width 2 fed back into nodes of width 32, once per time step: 2 x 32
    multiply-adds per token each."""
    text = SKETCH.read_text()
    assert all(line in text for line in FEEDS)
    without = text
    for line in FEEDS:
        without = without.replace(line, "")
    fed = compiler.analyze(compiler.load_spec_text(text))
    unfed = compiler.analyze(compiler.load_spec_text(without))
    assert fed.facts.estimates == unfed.facts.estimates  # the nodes cost what they cost
    assert unfed.facts.flops_outside_nodes == {}
    assert fed.facts.flops_outside_nodes == {"feeds": 3 * 2 * (2 * 32)}


@pytest.mark.parametrize(("delay", "uses"), [(1, 2), (2, 1)])
def test_a_feed_is_counted_once_per_step_that_adds_it(delay, uses):
    """Unrolled, the first `delay` steps have no output of `delay` steps before to project: three
    steps with `delay: 1` project twice, with `delay: 2` once; a forward hook counts the calls."""
    text = ITERATED.replace("delay: 1, projection", f"delay: {delay}, projection")
    ir = compiler.analyze(compiler.load_spec_text(text))
    assert ir.facts.flops_outside_nodes == {"feeds": uses * 2 * (4 * 16)}
    model = compiler.build_model(ir).eval()
    calls = []
    model.federation.feeds[0].register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(x=torch.randn(1, 4, 3))
    assert len(calls) == uses


def test_the_table_shows_the_feeds_flops_beside_their_parameters():
    shown = CliRunner().invoke(app, ["compile", str(SKETCH), "--no-smoke"])
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if line.startswith("│ feeds "))
    assert row.replace(" ", "").endswith("│192│384│")
