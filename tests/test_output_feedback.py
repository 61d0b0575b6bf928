"""Outputs that feed back, by example: an edge `from: outputs.NAME` with `delay: d` adds what
output NAME gave d steps earlier, through its declared `projection`, to the receiving node's
input. Under a time axis the output of time step t reaches the node at step t + d; under
`feedback:` the output of iteration k reaches the node at iteration k + d."""

from __future__ import annotations

import copy

import pytest
import torch

import compiler
from compiler.language.diagnostics import SpecError
from compiler.lower import lower

ORBIT = """
spec: 1
name: orbit
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  date: {kind: features, width: 3, context: 8}
nodes:
  sun: {kind: transformer}
  moon: {kind: transformer, width: 8}
edges:
  - {from: sun, to: moon}
  - {from: outputs.longitude, to: sun, delay: 1, projection: linear}
time: {}
outputs:
  longitude: {from: moon, kind: regression, width: 2}
"""


def build(text: str) -> torch.nn.Module:
    return compiler.build_model(compiler.load_spec_text(text)).eval()


def dates(steps: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, steps, 5, 3, generator=torch.Generator().manual_seed(seed))


def test_the_output_of_one_step_reaches_the_node_at_the_next_step_only():
    model = build(ORBIT)
    sun = model.node("sun")
    seen = []
    hook = sun.module.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    with torch.no_grad():
        model(date=dates(2))
        before = list(seen)
        seen.clear()
        model.outputs["longitude"].proj.weight.mul_(3.0)  # the head gives other values
        model(date=dates(2))
    hook.remove()
    # step 0: nothing was fed back yet, so the sun's state does not depend on the head
    torch.testing.assert_close(seen[0], before[0], rtol=0, atol=0)
    # step 1: the sun reads what the (changed) head gave at step 0
    assert not torch.allclose(seen[1], before[1])


def test_the_projection_adapts_the_output_width_to_the_node_width():
    model = build(ORBIT)
    (projection,) = model.federation.feeds
    assert tuple(projection.weight.shape) == (16, 2)  # longitude's 2 values -> the sun's 16
    logits = ORBIT.replace("features, width: 3", "tokens, vocab: 11").replace(
        "regression, width: 2", "lm_head"
    )
    logits = logits.replace("outputs.longitude", "outputs.next").replace("longitude:", "next:")
    (projection,) = build(logits).federation.feeds
    assert tuple(projection.weight.shape) == (16, 11)  # an lm_head's logits over its vocabulary


def test_the_whole_sequence_equals_stepping_through_it_with_an_output_fed_back():
    model = build(ORBIT.replace("delay: 1, projection", "delay: 2, projection"))
    inputs = dates(6, seed=1)
    with torch.no_grad():
        whole = model(date=inputs)["longitude"]
        state = model.init_state(batch=2, tokens=5)
        streamed = []
        for t in range(6):
            state, outputs = model.step(state, date=inputs[:, t])
            streamed.append(outputs["longitude"])
    torch.testing.assert_close(torch.stack(streamed, 1), whole, rtol=0, atol=1e-6)


def test_chunks_carry_the_fed_back_output_in_the_state():
    model = build(ORBIT)
    inputs = dates(6, seed=2)
    with torch.no_grad():
        whole = model(date=inputs)["longitude"]
        state, first = model.scan(model.init_state(2, 5), date=inputs[:, :3])
        state, second = model.scan(state, date=inputs[:, 3:])
    torch.testing.assert_close(torch.cat([first["longitude"], second["longitude"]], 1), whole)


ITERATED = """
spec: 1
name: iterated
defaults:
  transformer: {width: 16, heads: 2, layers: 1}
inputs:
  x: {kind: features, width: 3, context: 8}
nodes:
  a: {kind: transformer}
  b: {kind: transformer}
edges:
  - {from: a, to: b}
  - {from: outputs.y, to: a, delay: 1, projection: linear}
feedback: {steps: 3}
outputs:
  y: {from: b, kind: regression, width: 4}
"""


def test_feedback_iterations_feed_each_iterations_output_into_the_next():
    model = build(ITERATED)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x=x)["y"]
        model.federation.feeds[0].weight.zero_()  # cut the loop through the head
        cut = model(x=x)["y"]
    assert not torch.allclose(y, cut)  # three iterations, each reading the last one's output


def test_truncated_feedback_keeps_gradients_through_the_last_steps_only():
    model = compiler.build_model(
        compiler.load_spec_text(
            ITERATED.replace("{steps: 3}", "{steps: 3, mode: truncated, backprop_steps: 2}")
        )
    )
    x = torch.randn(2, 5, 3)
    model(x=x)["y"].square().mean().backward()
    assert model.federation.feeds[0].weight.grad.abs().sum() > 0  # step 2 read step 1's output


def test_the_projection_is_counted_like_every_other_parameter():
    ir = compiler.analyze(compiler.load_spec_text(ORBIT))
    with torch.device("meta"):
        model = lower(ir)
    assert ir.facts.parameters_outside_nodes["feeds"] == 2 * 16
    assert ir.facts.parameters == sum(p.numel() for p in model.parameters())


def refusal(text: str) -> str:
    with pytest.raises(SpecError) as refused:
        compiler.analyze(compiler.load_spec_text(text))
    return str(refused.value)


def test_an_undelayed_edge_from_an_output_is_a_loop_through_the_head():
    message = refusal(ORBIT.replace("delay: 1, projection", "projection"))
    assert "<string>:13:12: error: edge outputs.longitude -> sun starts at an output" in message
    assert "add `delay: 1`" in message


def test_an_unknown_output_is_refused_with_a_guess():
    message = refusal(ORBIT.replace("from: outputs.longitude", "from: outputs.longtude"))
    assert "13:12: error: no output named `longtude`" in message
    assert "did you mean `longitude`?" in message


def test_an_edge_from_an_output_must_declare_its_projection():
    message = refusal(ORBIT.replace(", projection: linear", ""))
    assert "needs `projection`" in message and "add `projection: linear`" in message
    message = refusal(ORBIT.replace("projection: linear", "projection: mlp"))
    assert "13:62: error: `projection` cannot be `mlp`" in message


def test_equilibrium_feedback_cannot_feed_outputs_back():
    message = refusal(ITERATED.replace("{steps: 3}", "{steps: 8, mode: equilibrium}"))
    assert "13:12: error:" in message and "`mode: equilibrium` solves for the nodes'" in message


def test_a_pooled_output_has_no_tokens_to_feed_back():
    text = ITERATED.replace("regression, width: 4", "classification, classes: 3")
    assert "only per-token outputs (lm_head, regression)" in refusal(text)


def test_a_projection_on_an_edge_between_nodes_is_refused():
    text = ITERATED.replace("{from: a, to: b}", "{from: a, to: b, projection: linear}")
    assert "12:22: error: edge a -> b starts at a node: `projection`" in refusal(text)


def test_an_edge_from_an_output_is_a_plain_edge_without_a_ratio():
    message = refusal(
        ITERATED.replace("delay: 1, projection", "kind: mesh, ratio: 2, delay: 1, projection")
    )
    assert "`kind: mesh` is for edges between nodes" in message
    assert "a ratio conditions messages between nodes' states" in message


def test_a_companion_takes_no_fed_back_output():
    text = ITERATED.replace(
        "  b: {kind: transformer}",
        "  b: {kind: transformer}\n  geo: {kind: companion, rows: 8, hidden: 32, heads: 2}",
    ).replace(
        "  - {from: a, to: b}", "  - {from: a, to: b}\n  - {from: b, to: geo, kind: companion}"
    )
    text = text.replace("to: a, delay: 1", "to: geo, delay: 1")
    assert "`geo` is a `kind: companion` node, which observes its host" in refusal(text)


def test_a_model_that_feeds_outputs_back_traces_as_one_graph_and_copies_whole():
    model = build(ITERATED)
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        expected = model(x=x)["y"]
        traced = torch.compile(model, fullgraph=True, backend="eager")  # dynamo, no codegen
        torch.testing.assert_close(traced(x=x)["y"], expected)
        copied = copy.deepcopy(model)
        assert copied.federation.read_back.__self__ is copied  # its own heads, not the original's
        torch.testing.assert_close(copied(x=x)["y"], expected)


def write_part(folder) -> None:
    """`part.yaml`: ITERATED as a sub-graph (the including spec schedules the feedback)."""
    part = ITERATED.replace("name: iterated", "name: part").replace("feedback: {steps: 3}\n", "")
    (folder / "part.yaml").write_text(part, encoding="utf-8")


def test_a_sub_graph_feeds_its_own_output_back_by_its_path(tmp_path):
    write_part(tmp_path)
    top = tmp_path / "top.yaml"
    top.write_text(
        "spec: 1\nname: top\ninputs: {x: {kind: features, width: 3, context: 8}}\n"
        "nodes: {g: {kind: graph, spec: part.yaml}}\nfeedback: {steps: 3}\n"
        "outputs: {z: {from: g.b, kind: regression, width: 1}}\n",
        encoding="utf-8",
    )
    ir = compiler.analyze(top)
    (feed,) = ir.facts.federation.feeds
    assert (feed.output, ir.facts.federation.nodes[feed.target]) == ("g.y", "g.a")


def test_a_sub_graph_named_outputs_would_make_an_edge_ambiguous(tmp_path):
    write_part(tmp_path)
    top = tmp_path / "top.yaml"
    top.write_text(
        "spec: 1\nname: top\ninputs: {x: {kind: features, width: 3, context: 8}}\n"
        "nodes: {outputs: {kind: graph, spec: part.yaml}, c: {kind: transformer, width: 8}}\n"
        "edges: [{from: outputs.a, to: c, delay: 1, projection: linear}]\n"
        "feedback: {steps: 3}\noutputs: {a: {from: c, kind: regression, width: 1}}\n",
        encoding="utf-8",
    )
    with pytest.raises(SpecError, match="rename the sub-graph"):
        compiler.analyze(top)
