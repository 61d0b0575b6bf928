"""The compiler counts a spec's parameters without building it (`compiler.counting`); these tests
hold every count to the module the back end builds, part by part, so a count cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compiler
from compiler.lower import lower

GALLERY = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def built_on_meta(ir):
    with torch.device("meta"):
        return lower(ir)


def built_parts(ir, model) -> dict[str, int]:
    """What the estimate reports outside the nodes, counted on the built modules."""
    parts = {f"inputs.{n}": numel(m) for n, m in model.inputs.items()}
    tables = {id(p) for m in model.inputs.values() for p in m.parameters()}
    for name, head in model.outputs.items():
        parts[f"outputs.{name}"] = sum(p.numel() for p in head.parameters() if id(p) not in tables)
    federation = model.federation
    if federation.has_bus:
        parts["messages"] = numel(federation.messages)
    parts["cross"] = numel(federation.cross)
    parts["perspectives"] = numel(federation.perspectives)
    parts["feeds"] = numel(federation.feeds)
    return {k: v for k, v in parts.items() if v or k.startswith(("inputs", "outputs"))}


@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.name)
def test_the_count_of_every_part_is_the_built_modules(path):
    ir = compiler.analyze(path)
    model = built_on_meta(ir)
    assert ir.facts.parameters == numel(model)
    assert ir.facts.parameters_outside_nodes == built_parts(ir, model)
    federation = model.federation
    for g, group in enumerate(ir.facts.federation.groups):
        own = numel(federation.transformers[g]) + numel(federation.reads[g])
        if federation.has_bus:
            own += numel(federation.to_bus[g]) + numel(federation.from_bus[g])
        for name in group.nodes:
            assert ir.facts.estimates[name]["parameters"] == own // len(group.nodes), name
    for name, module in model.companions.items():
        assert ir.facts.companion_estimates[name]["parameters"] == numel(module)


VARIANTS = {
    "every attention and rotary component, in gears of several members": """
spec: 1
name: counted
defaults: {transformer: {width: 48, heads: 4, layers: 2, bias: true}}
inputs: {text: {kind: tokens, vocab: 50, context: 32}}
nodes:
  a: {kind: gear, teeth: 12, attention: {kind: adaptive_span}, rotary: {kind: learned_rope}}
  b: {kind: gear, teeth: 24, attention: {kind: adaptive_span}, rotary: {kind: learned_rope}}
  c: {kind: transformer, rotary: {kind: quaternion, axes: fixed}}
  d: {kind: transformer, rotary: {kind: givens, pairs: halves, learned: false}}
  e: {kind: transformer, position: learned, attention: {kind: myelinated, sublayers: 1}}
  f: {kind: transformer, position: learned, attention: {kind: relative_force, hop_levels: 2}}
edges:
  - {from: a, to: b, kind: mesh}
  - {from: b, to: c, kind: cross}
  - {from: c, to: d}
  - {from: d, to: e}
  - {from: e, to: f}
outputs:
  logits: {from: f, kind: lm_head, tie: false}
  score: {from: a, kind: classification, classes: 7}
""",
    "feature inputs, perspectives and attention-weighted messages": """
spec: 1
name: counted
defaults: {transformer: {width: 32, heads: 4, layers: 1}, message: {aggregate: attention}}
feedback: {steps: 2}
inputs: {x: {kind: features, width: 5, context: 16}}
perspectives: {turned: {kind: rotation}, seen: {kind: projection}}
nodes:
  a: {kind: gear, teeth: 10, width: 24, perspective: turned}
  b: {kind: gear, teeth: 20, perspective: seen}
  c: {kind: gear, teeth: 40, perspective: seen}
edges:
  - {from: a, to: b}
  - {from: b, to: a, delay: 1}
  - {from: b, to: c, kind: mesh}
outputs:
  y: {from: [b, c], kind: regression, width: 3}
""",
    "outputs fed back through their projections": """
spec: 1
name: counted
defaults: {transformer: {width: 24, heads: 2, layers: 1}}
feedback: {steps: 2}
inputs: {text: {kind: tokens, vocab: 30, context: 16}}
nodes:
  a: {kind: transformer}
  b: {kind: transformer, width: 16}
edges:
  - {from: a, to: b}
  - {from: outputs.next, to: a, delay: 1, projection: linear}
  - {from: outputs.angle, to: b, delay: 1, projection: linear}
outputs:
  next: {from: b, kind: lm_head}
  angle: {from: [a, b], kind: regression, width: 4}
""",
}


@pytest.mark.parametrize("text", VARIANTS.values(), ids=list(VARIANTS))
def test_components_ports_and_bus_are_counted_exactly(text):
    ir = compiler.analyze(compiler.load_spec_text(text))
    model = built_on_meta(ir)
    assert ir.facts.parameters == numel(model)
    assert ir.facts.parameters_outside_nodes == built_parts(ir, model)
