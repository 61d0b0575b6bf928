"""Repeat templates, by example: `r{i}` with `repeat: N` is N nodes, and an edge pattern or an
indexed edge is the edges between them. Nothing is evaluated; errors point at the template."""

from __future__ import annotations

import pytest
import torch

import compiler
from tests.conftest import ROOT

HEAD = """
spec: 1
name: t
defaults:
  transformer: {width: 32, heads: 2, layers: 1}
inputs:
  tokens: {kind: tokens, vocab: 11, context: 8}
"""


def edges_of(write_spec, body: str) -> list[tuple[str, str]]:
    ir = compiler.analyze(write_spec(HEAD + body))
    return [(e.source, e.to) for e in ir.spec.edges]


RING_BY_HAND = """
spec: 1
name: ring
seed: 0
defaults:
  transformer: {width: 64, heads: 4, layers: 1}
  message: {aggregate: mean}
inputs:
  tokens: {kind: tokens, vocab: 84, context: 128}
nodes:
  r0: {kind: transformer}
  r1: {kind: transformer}
  r2: {kind: transformer}
  r3: {kind: transformer}
  r4: {kind: transformer}
  r5: {kind: transformer}
edges:
  - {from: r0, to: r1, kind: feedback, delay: 1}
  - {from: r1, to: r2, kind: feedback, delay: 1}
  - {from: r2, to: r3, kind: feedback, delay: 1}
  - {from: r3, to: r4, kind: feedback, delay: 1}
  - {from: r4, to: r5, kind: feedback, delay: 1}
  - {from: r5, to: r0, kind: feedback, delay: 1}
feedback: {steps: 3, mode: unroll}
outputs:
  logits: {from: [r0, r1, r2, r3, r4, r5], kind: lm_head}
"""


def test_the_shipped_ring_is_the_ring_written_out_by_hand(write_spec):
    templated = compiler.build_model(ROOT / "specs" / "ring.yaml").eval()
    by_hand = compiler.build_model(write_spec(RING_BY_HAND)).eval()
    shapes = {k: v.shape for k, v in templated.state_dict().items()}
    assert shapes == {k: v.shape for k, v in by_hand.state_dict().items()}
    for name, value in templated.state_dict().items():
        torch.testing.assert_close(value, by_hand.state_dict()[name], rtol=0, atol=0)
    tokens = torch.randint(0, 84, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(templated(tokens)["logits"], by_hand(tokens)["logits"])


def test_a_repeated_node_is_its_copies_in_place(write_spec):
    ir = compiler.analyze(
        write_spec(
            HEAD
            + """
            nodes:
              first: {kind: transformer}
              planet_{i}: {repeat: 3, kind: transformer, layers: 2}
              last: {kind: transformer}
            edges:
              - {from: first, to: "planet_{i}"}
              - {from: "planet_{i}", to: last}
            outputs:
              y: {from: last, kind: lm_head}
            """.replace("\n            ", "\n")
        )
    )
    assert list(ir.spec.nodes) == ["first", "planet_0", "planet_1", "planet_2", "last"]
    assert all(ir.spec.nodes[f"planet_{i}"].layers == 2 for i in range(3))


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("chain", [("r0", "r1"), ("r1", "r2"), ("r2", "r3")]),
        ("ring", [("r0", "r1"), ("r1", "r2"), ("r2", "r3"), ("r3", "r0")]),
        ("star", [("r0", "r1"), ("r0", "r2"), ("r0", "r3")]),
        (
            "all_to_all",
            [(f"r{a}", f"r{b}") for a in range(4) for b in range(4) if a != b],
        ),
    ],
)
def test_edge_patterns_wire_the_copies(write_spec, pattern, expected):
    delay = ", kind: feedback, delay: 1" if pattern in ("ring", "all_to_all") else ""
    body = f"""
nodes:
  r{{i}}: {{repeat: 4, kind: transformer}}
edges:
  - {{pattern: {pattern}, over: "r{{i}}"{delay}}}
{"feedback: {steps: 2}" if delay else ""}
outputs:
  y: {{from: r0, kind: lm_head}}
"""
    assert edges_of(write_spec, body) == expected


@pytest.mark.parametrize(
    ("direction", "expected"),
    [
        ("out", [("hub", "r0"), ("hub", "r1")]),
        ("in", [("r0", "hub"), ("r1", "hub")]),
    ],
)
def test_a_star_has_a_center_and_a_direction(write_spec, direction, expected):
    body = f"""
nodes:
  hub: {{kind: transformer}}
  r{{i}}: {{repeat: 2, kind: transformer}}
edges:
  - {{pattern: star, over: "r{{i}}", center: hub, direction: {direction}}}
outputs:
  y: {{from: [hub, "r{{i}}"], kind: lm_head}}
"""
    assert edges_of(write_spec, body) == expected


def test_indexed_edges_skip_what_falls_outside_unless_they_wrap(write_spec):
    nodes = """
nodes:
  a{i}: {repeat: 3, kind: transformer}
  b{i}: {repeat: 3, kind: transformer}
"""
    tail = """
outputs:
  y: {from: "b{i}", kind: lm_head}
"""
    skip = nodes + '\nedges:\n  - {from: "a{i}", to: "b{i+1}"}\n' + tail
    assert edges_of(write_spec, skip) == [("a0", "b1"), ("a1", "b2")]
    wrap = nodes + '\nedges:\n  - {from: "a{i}", to: "b{i-1}", wrap: true}\n' + tail
    assert edges_of(write_spec, wrap) == [("a0", "b2"), ("a1", "b0"), ("a2", "b1")]


def test_an_output_reads_every_copy_of_a_template(write_spec):
    ir = compiler.analyze(
        write_spec(
            HEAD
            + """
nodes:
  r{i}: {repeat: 3, kind: transformer}
outputs:
  y: {from: "r{i}", kind: lm_head}
"""
        )
    )
    assert ir.spec.outputs["y"].source == ["r0", "r1", "r2"]


ERRORS = {
    "repeat zero": (
        "nodes:\n  r{i}: {repeat: 0, kind: transformer}\noutputs:\n  y: {from: r0, kind: lm_head}\n",
        "spec.yaml:8:18: error: `repeat: 0` must be a whole number from 1 to 4096",
    ),
    "repeat absurd": (
        "nodes:\n  r{i}: {repeat: 100000000, kind: transformer}\n"
        "outputs:\n  y: {from: r0, kind: lm_head}\n",
        "spec.yaml:8:18: error: `repeat: 100000000` must be a whole number from 1 to 4096",
    ),
    "repeat not a number": (
        "nodes:\n  r{i}: {repeat: six, kind: transformer}\noutputs:\n  y: {from: r0, kind: lm_head}\n",
        "error: `repeat: 'six'` must be a whole number",
    ),
    "no placeholder": (
        "nodes:\n  r: {repeat: 2, kind: transformer}\noutputs:\n  y: {from: r, kind: lm_head}\n",
        "spec.yaml:8:3: error: node `r` has `repeat:` but its name has no `{i}`",
    ),
    "no count": (
        "nodes:\n  r{i}: {kind: transformer}\noutputs:\n  y: {from: r0, kind: lm_head}\n",
        "spec.yaml:8:3: error: node `r{i}` names copies with `{i}` but says not how many",
    ),
    "collision": (
        "nodes:\n  r1: {kind: transformer}\n  r{i}: {repeat: 3, kind: transformer}\n"
        "outputs:\n  y: {from: r0, kind: lm_head}\n",
        "spec.yaml:9:3: error: copy `r1` of template `r{i}` has the name of another node",
    ),
    "unknown template": (
        "nodes:\n  r{i}: {repeat: 2, kind: transformer}\nedges:\n"
        '  - {pattern: chain, over: "q{i}"}\noutputs:\n  y: {from: r0, kind: lm_head}\n',
        "spec.yaml:10:28: error: `over: q{i}` names no repeated node",
    ),
    "an expression": (
        "nodes:\n  r{i}: {repeat: 2, kind: transformer}\nedges:\n"
        '  - {from: "r{i}", to: "r{2*i}"}\noutputs:\n  y: {from: r0, kind: lm_head}\n',
        "spec.yaml:10:24: error: `r{2*i}` is not a copy's name",
    ),
    "unknown pattern": (
        "nodes:\n  r{i}: {repeat: 2, kind: transformer}\nedges:\n"
        '  - {pattern: mesh, over: "r{i}"}\noutputs:\n  y: {from: r0, kind: lm_head}\n',
        "spec.yaml:10:15: error: unknown edge pattern 'mesh'",
    ),
    "pattern with ends": (
        "nodes:\n  r{i}: {repeat: 2, kind: transformer}\nedges:\n"
        '  - {pattern: chain, over: "r{i}", from: r0}\noutputs:\n  y: {from: r0, kind: lm_head}\n',
        "error: a `pattern: chain` edge draws its own ends; it takes no `from`",
    ),
    "a copy's own mistake": (
        "nodes:\n  r{i}: {repeat: 2, kind: transformer, heads: 3}\n"
        "outputs:\n  y: {from: r0, kind: lm_head}\n",
        "spec.yaml:8:47: error: `heads: 3` does not divide node `r0`",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_template_mistakes_are_located_at_the_template(spec_errors, case):
    body, expected = ERRORS[case]
    assert expected in spec_errors(HEAD + body)


def test_a_ring_without_delay_is_the_usual_undelayed_loop(spec_errors):
    body = (
        "nodes:\n  r{i}: {repeat: 3, kind: transformer}\nedges:\n"
        '  - {pattern: ring, over: "r{i}"}\noutputs:\n  y: {from: r0, kind: lm_head}\n'
    )
    message = spec_errors(HEAD + body)
    assert "spec.yaml:10:5: error: these edges form a loop with no delay" in message
