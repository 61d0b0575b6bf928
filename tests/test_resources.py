"""The resource guard refuses, with the numbers, a model that cannot fit, before allocating anything."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

import compiler
from compiler.resources import estimate_memory
from compiler.tools.cli import app
from tests.conftest import ROOT

TEN_B = ROOT / "tests" / "fixtures" / "ten_billion.yaml"


def test_a_ten_billion_parameter_model_is_refused_under_a_small_budget_without_allocating():
    start = time.perf_counter()
    with pytest.raises(compiler.SpecError) as info:
        compiler.build_model(TEN_B, budget=2**30)
    assert time.perf_counter() - start < 10
    message = info.value.format()
    assert "this model needs about 39.62 GiB (parameters 39.62 GiB in float32)" in message
    assert "but the budget is 1.00 GiB (the budget you set)" in message


def test_training_and_activations_add_to_the_estimate():
    ir = compiler.analyze(ROOT / "specs" / "transformer.yaml")
    inference = estimate_memory(ir)
    training = estimate_memory(ir, training=True, batch=8, tokens=256)
    assert inference.total == 4 * ir.facts.parameters
    assert training.training_state == 3 * inference.parameters
    cfg = ir.graph.nodes["nodes.body"]["config"]
    assert training.activations == 4 * 8 * 256 * cfg.layers * (34 * cfg.width + 5 * cfg.heads * 256)


def test_compile_reports_an_exceeded_budget_and_zero_turns_the_guard_off():
    runner = CliRunner()
    refused = runner.invoke(
        app, ["compile", str(ROOT / "specs" / "transformer.yaml"), "--budget", "0.001"]
    )
    assert refused.exit_code == 1
    assert "but the budget is 1.0 MiB (the budget you set)" in refused.stderr
    allowed = runner.invoke(
        app, ["compile", str(ROOT / "specs" / "transformer.yaml"), "--budget", "0"]
    )
    assert allowed.exit_code == 0, allowed.output


HUGE_TABLE = """spec: 1
name: huge_table
inputs:
  text: {kind: tokens, vocab: 16777216, context: 64, width: 1048576}
nodes:
  body: {kind: transformer, width: 64, heads: 2, layers: 1}
outputs:
  logits: {from: body, kind: lm_head, tie: false}
"""

HUGE_HEAD = """spec: 1
name: huge_head
inputs:
  text: {kind: tokens, vocab: 100, context: 64}
nodes:
  body: {kind: transformer, width: 131072, heads: 1, layers: 1}
outputs:
  label: {from: body, kind: classification, classes: 16777216}
"""


@pytest.mark.parametrize(
    ("text", "line", "part"),
    [(HUGE_TABLE, 4, "inputs.text"), (HUGE_HEAD, 8, "outputs.label")],
    ids=["an embedding of 2^24 x 2^20", "a classification head of 131072 x 2^24"],
)
def test_every_parameter_counts_so_a_huge_table_or_head_is_refused_where_it_is(text, line, part):
    start = time.perf_counter()
    with pytest.raises(compiler.SpecError) as info:
        compiler.analyze(compiler.load_spec_text(text, "huge.yaml"))
    assert time.perf_counter() - start < 2
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.span.line == line
    assert "beyond what epicycle will build (at most 2,000,000,000,000)" in diagnostic.message
    assert f"the largest part, `{part}`" in diagnostic.message


def test_validate_refuses_a_huge_embedding_with_exit_1(tmp_path):
    spec = tmp_path / "huge.yaml"
    spec.write_text(HUGE_TABLE)
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 1
    assert f"{spec}:4:" in result.output and "17,592,186,044,416" in result.output
