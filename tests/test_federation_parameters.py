"""A federation builds only the parts its edges use: every parameter gets a gradient.

Under DistributedDataParallel a parameter that never receives a gradient is an error (or, with
`find_unused_parameters`, a slower step), and anywhere else it is dead weight in the checkpoint.
So the bus projections are built per group and per direction:

* `to_bus[g]` only if group `g` sends on some edge (a `cross` edge attends to its source's bus row,
  so its source sends too);
* `from_bus[g]` only if group `g` receives on some edge, message or `cross`;
* the message layer only if some edge is not `cross` (cross edges attend, they pass no messages).

The rest stay `nn.Identity`, which is never called. The specs below set the bus narrower than
every node (`message: {width: 24}`), so no projection hides behind an identity of equal widths.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import compiler
from runtime.layers import MemberLinear
from tests.conftest import GALLERY
from tests.test_gallery import random_inputs

# Parameters that no output depends on, on purpose, and why. Checked to be reached another way.
UNUSED_BY_DESIGN = {
    "companions.": "a companion (design 004) observes node states and sends nothing back, so the "
    "outputs never depend on it: it learns from its own reconstruction term in `auxiliary_loss`",
}


def by_design(name: str) -> bool:
    return any(name.startswith(prefix) for prefix in UNUSED_BY_DESIGN)


def without_gradient(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.grad is None]


def summed_outputs_backward(model: nn.Module, batch: int = 1, tokens: int = 5) -> None:
    outputs = model(**random_inputs(model.spec, batch, tokens))
    sum(o.float().sum() for o in outputs.values()).backward()


@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.name)
def test_every_gallery_parameter_gets_a_gradient_from_the_outputs(path):
    model = compiler.build_model(path)
    summed_outputs_backward(model)
    missing = without_gradient(model)
    assert [name for name in missing if not by_design(name)] == []
    if missing:  # the exceptions are trained by the spec's own terms
        model.zero_grad(set_to_none=True)
        outputs = model(**random_inputs(model.spec, 1, 5))
        (sum(o.float().sum() for o in outputs.values()) + model.auxiliary_loss()).backward()
        assert without_gradient(model) == []


HEAD = """
spec: 1
name: parts
seed: 0
defaults:
  transformer: {width: 32, heads: 2, layers: 1}
  message: {width: 24}
inputs:
  tokens: {kind: tokens, vocab: 17, context: 16}
"""

CROSS_ONLY = """
nodes:
  a: {kind: transformer}
  b: {kind: transformer, width: 48}
edges:
  - {from: a, to: b, kind: cross}
outputs:
  logits: {from: b, kind: lm_head}
"""

SPECS = {
    "two transformers joined only by a cross edge": CROSS_ONLY,
    "a cross edge beside a message edge": """
nodes:
  a: {kind: transformer}
  b: {kind: transformer, width: 48}
  c: {kind: transformer, width: 40}
edges:
  - {from: a, to: b, kind: cross}
  - {from: a, to: c}
outputs:
  logits: {from: [b, c], kind: lm_head}
""",
    "a delayed cross edge closing a feedback loop": """
nodes:
  a: {kind: transformer}
  b: {kind: transformer, width: 48}
edges:
  - {from: a, to: b}
  - {from: b, to: a, kind: cross, delay: 1}
feedback: {steps: 3, mode: unroll}
outputs:
  logits: {from: b, kind: lm_head}
""",
    "a delayed cross edge in an equilibrium loop": """
nodes:
  a: {kind: transformer}
  b: {kind: transformer, width: 48}
edges:
  - {from: a, to: b}
  - {from: b, to: a, kind: cross, delay: 1}
feedback: {steps: 20, mode: equilibrium, lipschitz: 0.8}
outputs:
  logits: {from: b, kind: lm_head}
""",
    "a node that only sends (no output reads it)": """
nodes:
  source: {kind: transformer}
  sink: {kind: transformer, width: 48}
edges:
  - {from: source, to: sink}
outputs:
  logits: {from: sink, kind: lm_head}
""",
    "a node that only receives, by a message and a cross edge": """
nodes:
  a: {kind: transformer}
  c: {kind: transformer, width: 40}
  r: {kind: transformer, width: 48}
edges:
  - {from: a, to: r}
  - {from: c, to: r, kind: cross}
outputs:
  logits: {from: [a, c, r], kind: lm_head}
""",
    "attention over incoming messages": """
nodes:
  a: {kind: transformer}
  c: {kind: transformer, width: 40}
  r: {kind: transformer, width: 48}
edges:
  - {from: a, to: r}
  - {from: c, to: r}
  - {from: r, to: a, kind: feedback, delay: 1}
feedback: {steps: 2, mode: unroll}
outputs:
  logits: {from: r, kind: lm_head}
""",
}
ATTENTION_HEAD = HEAD.replace("message: {width: 24}", "message: {width: 24, aggregate: attention}")


def build(body: str) -> nn.Module:
    return compiler.build_model(compiler.load_spec_text(HEAD + body))


def analyze(name: str) -> compiler.IR:
    head = ATTENTION_HEAD if name.startswith("attention") else HEAD
    return compiler.analyze(compiler.load_spec_text(head + SPECS[name]))


@pytest.mark.parametrize("name", SPECS)
def test_every_parameter_gets_a_gradient_from_the_outputs(name):
    model = compiler.build_model(analyze(name))
    summed_outputs_backward(model, batch=2)
    assert without_gradient(model) == []


@pytest.mark.parametrize("name", SPECS)
def test_the_compilers_parameter_count_is_the_built_models(name):
    ir = analyze(name)
    model = compiler.build_model(ir)
    assert sum(p.numel() for p in model.parameters()) == ir.facts.parameters


TRUNCATED = """
nodes:
  a: {kind: transformer}
  r: {kind: transformer, width: 48}
edges:
  - {from: a, to: r}
  - {from: r, to: a, kind: feedback, delay: 1}
feedback: {steps: 3, mode: truncated, backprop_steps: KEPT}
outputs:
  logits: {from: r, kind: lm_head}
"""


def test_truncated_feedback_cuts_the_gradient_of_a_node_that_sends_only_on_delayed_edges():
    """By design: `mode: truncated` backpropagates through the last `backprop_steps` steps. With
    one, the delayed edges read a bus computed without a tape, so `to_bus` of a node that sends
    only on them gets no gradient: truncated backpropagation through time cuts exactly that path.
    (DDP, which wants every parameter's gradient, needs `backprop_steps: 2` here.)"""
    one = build(TRUNCATED.replace("KEPT", "1"))
    summed_outputs_backward(one, batch=2)
    assert without_gradient(one) == [f"federation.to_bus.{group_of(one, 'r')}.weight"]

    two = build(TRUNCATED.replace("KEPT", "2"))
    summed_outputs_backward(two, batch=2)
    assert without_gradient(two) == []


def group_of(model: nn.Module, node: str) -> int:
    return next(g for g, group in enumerate(model.federation.plan.groups) if node in group.nodes)


def test_a_cross_edge_alone_builds_no_message_layer_and_one_projection_each_way():
    model = build(CROSS_ONLY)
    federation, a, b = model.federation, group_of(model, "a"), group_of(model, "b")
    assert list(federation.messages.parameters()) == []
    assert isinstance(federation.to_bus[a], MemberLinear)  # b's tokens attend to a's bus row
    assert isinstance(federation.from_bus[b], MemberLinear)  # and b adds what it read
    assert isinstance(federation.to_bus[b], nn.Identity)  # b sends nothing
    assert isinstance(federation.from_bus[a], nn.Identity)  # a receives nothing


def test_a_batched_member_that_sends_nothing_shares_its_groups_projection():
    """Same-shaped nodes run as one group with stacked weights, so `to_bus` exists for the group
    when any member sends: the silent member's slice gets a zero gradient, not none."""
    model = build("""
nodes:
  p: {kind: transformer}
  q: {kind: transformer}
  r: {kind: transformer, width: 48}
edges:
  - {from: p, to: r}
outputs:
  logits: {from: [q, r], kind: lm_head}
""")
    group = model.federation.plan.groups[group_of(model, "p")]
    assert group.nodes == ("p", "q")
    summed_outputs_backward(model, batch=2)
    assert without_gradient(model) == []
    grad = model.federation.to_bus[group_of(model, "p")].weight.grad
    assert grad[group.nodes.index("p")].abs().sum() > 0
    assert torch.equal(grad[group.nodes.index("q")], torch.zeros_like(grad[0]))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, per head; `(batch, tokens, width)` in and out."""
    batch, tokens, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    future = torch.ones(tokens, tokens, dtype=torch.bool).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (weights @ split(v)).transpose(1, 2).reshape(batch, tokens, width)


def test_a_cross_edge_is_attention_from_the_targets_tokens_to_the_sources_bus_row():
    """embed -> read -> transformer a -> to_bus -> b's tokens attend to it -> from_bus -> b -> head."""
    model = build(CROSS_ONLY).eval()
    federation, a, b = model.federation, group_of(model, "a"), group_of(model, "b")
    with torch.no_grad():  # the cross attention starts small: make its contribution count
        for p in federation.cross.parameters():
            p.normal_(std=0.3)
    tokens = torch.randint(0, 17, (2, 7))

    with torch.no_grad():
        embedded = model.inputs["tokens"](tokens)
        x_a = federation.reads[a][0](embedded)
        y_a = federation.transformers[a](x_a[None])[0]
        row_a = federation.to_bus[a](y_a)  # what a sends: its bus row, (batch, tokens, 24)
        x_b = federation.reads[b][0](embedded)
        cross = federation.cross[str(b)]
        key, value = cross.key_value(row_a).chunk(2, dim=-1)
        attended = cross.out(causal_attention(cross.query(x_b), key, value, cross.heads))
        y_b = federation.transformers[b]((x_b + federation.from_bus[b](attended))[None])[0]
        expected = model.outputs["logits"](y_b)
        got = model(tokens)["logits"]
        without_a = model.outputs["logits"](federation.transformers[b](x_b[None])[0])

    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert (got - without_a).abs().max() > 1e-3  # the edge changes b's output
