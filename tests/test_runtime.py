"""The runtime: batched members equal separate models, and the federation equals its definition."""

from __future__ import annotations

import copy

import pytest
import torch

import compiler
from compiler.passes.estimate import transformer_parameters
from runtime.federation.messages import edge_features
from runtime.transformer import Transformer, TransformerConfig
from tests.conftest import ROOT


def member(
    module: torch.nn.Module, m: int, members: int, cfg: TransformerConfig, scale: float = 1.0
) -> Transformer:
    """A standalone single transformer holding member `m`'s slice of a stacked one."""
    single = Transformer(cfg, members=1, rope_scales=(scale,))
    stacked = dict(module.named_parameters())
    with torch.no_grad():
        for name, p in single.named_parameters():
            p.copy_(stacked[name][m] if members > 1 else stacked[name])
    return single


def slice_linear(module: torch.nn.Module, m: int, members: int):
    if isinstance(module, torch.nn.Identity):
        return lambda x: x
    w = module.weight[m] if members > 1 else module.weight
    b = None if module.bias is None else (module.bias[m] if members > 1 else module.bias)
    return lambda x: torch.nn.functional.linear(x, w, b)


CONFIGS = [
    TransformerConfig(width=32, heads=4, layers=2, context=16),
    TransformerConfig(
        width=32,
        heads=4,
        kv_heads=2,
        layers=1,
        context=16,
        activation="swiglu",
        norm="rmsnorm",
        bias=True,
    ),
    TransformerConfig(
        width=24,
        heads=3,
        layers=1,
        context=16,
        position="learned",
        activation="gelu_tanh",
        bias=True,
    ),
    TransformerConfig(
        width=16, heads=2, layers=1, context=16, position="none", causal=False, activation="geglu"
    ),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_stacked_members_equal_separate_models(cfg):
    torch.manual_seed(0)
    stacked = Transformer(cfg, members=3)
    x = torch.randn(3, 2, 10, cfg.width)
    y = stacked(x)
    for m in range(3):
        torch.testing.assert_close(
            member(stacked, m, 3, cfg)(x[m : m + 1])[0], y[m], rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("cfg", CONFIGS)
def test_the_closed_form_parameter_count_matches_the_module(cfg):
    assert transformer_parameters(cfg) == sum(p.numel() for p in Transformer(cfg).parameters())


def test_attention_is_causal():
    cfg = CONFIGS[0]
    model = Transformer(cfg).eval()
    x = torch.randn(1, 1, 10, cfg.width)
    changed = x.clone()
    changed[..., 6:, :] += 1.0
    torch.testing.assert_close(model(x)[..., :6, :], model(changed)[..., :6, :])


def reference_federation(model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The federation's semantics written out node by node, edge by edge, step by step."""
    fed, plan = model.federation, model.federation.plan
    embedded = {name: module(inputs[name]) for name, module in model.inputs.items()}
    batch, length = next(iter(embedded.values())).shape[:2]
    history: list[dict[int, torch.Tensor]] = []
    states: dict[str, torch.Tensor] = {}

    def source_state(edge, bus):
        if edge.delay == 0:
            return bus[edge.source]
        if edge.delay <= len(history):
            return history[edge.delay - 1][edge.source]
        return torch.zeros(batch, length, plan.bus_width)

    for _ in range(plan.steps):
        bus: dict[int, torch.Tensor] = {}
        for g, group in enumerate(plan.groups):
            members = len(group.nodes)
            for m, (name, index) in enumerate(zip(group.nodes, group.indices, strict=True)):
                x = torch.zeros(batch, length, group.config.width)
                perspective = group.perspectives[m] if group.perspectives else None
                for (inp, _), read in zip(group.inputs, fed.reads[g], strict=True):
                    seen = embedded[inp]
                    if perspective is not None:
                        seen = seen @ fed.perspectives[perspective][inp].matrix().T
                    x = x + slice_linear(read, m, members)(seen)
                weights, messages = [], []
                for edge in plan.edges:
                    if edge.target != index or edge.kind == "cross":
                        continue
                    source = source_state(edge, bus)
                    attr = torch.tensor(edge_features(edge.kind, edge.ratio, edge.delay))
                    messages.append(fed.messages.lin(source) * (1 + fed.messages.film(attr)))
                    if plan.aggregate == "attention":
                        key = fed.messages.key(source)
                        score = (key * fed.messages.query[index]).sum(-1) / plan.bus_width**0.5
                        weights.append(score + fed.messages.edge_bias(attr))
                received = None
                if messages:
                    stacked = torch.stack(messages)
                    if plan.aggregate == "attention":
                        alpha = torch.softmax(torch.stack(weights), dim=0).unsqueeze(-1)
                        received = (alpha * stacked).sum(0)
                    else:
                        received = stacked.sum(0) / (
                            len(messages) if plan.aggregate == "mean" else 1
                        )
                for edge in plan.edges:
                    if edge.target == index and edge.kind == "cross":
                        attended = fed.cross[str(g)](x[None], source_state(edge, bus)[None])[0]
                        received = attended if received is None else received + attended
                if received is not None:
                    x = x + slice_linear(fed.from_bus[g], m, members)(received)
                scale = group.rope_scales[m] if group.rope_scales else 1.0
                y = member(fed.transformers[g], m, members, group.config, scale)(x.unsqueeze(0))[0]
                states[name] = y
                bus[index] = slice_linear(fed.to_bus[g], m, members)(y)
        history = [bus, *history]
    return {
        name: head(
            torch.cat([states[plan.groups[g].nodes[m]] for g, m in model.wiring[name].sources], -1)
        )
        for name, head in model.outputs.items()
    }


@pytest.mark.parametrize("spec", ["federation.yaml", "gear_train.yaml"])
def test_the_batched_federation_equals_its_node_by_node_definition(spec):
    model = compiler.build_model(ROOT / "specs" / spec).eval()
    assert any(len(g.nodes) > 1 for g in model.federation.plan.groups), (
        "the spec should batch a group"
    )
    with (
        torch.no_grad()
    ):  # give perspectives and attention something other than their identity start
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(std=0.05)
    inputs = {
        name: torch.randint(0, inp.vocab, (2, 12))
        if inp.kind == "tokens"
        else torch.randn(2, 12, inp.width)
        for name, inp in model.spec.inputs.items()
    }
    expected = reference_federation(model, inputs)
    with torch.no_grad():
        got = model(**inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def _old_test_the_batched_federation_equals_its_node_by_node_definition():
    model = compiler.build_model(ROOT / "specs" / "federation.yaml").eval()
    assert any(len(g.nodes) > 1 for g in model.federation.plan.groups), (
        "the spec should batch a group"
    )
    tokens = torch.randint(0, 84, (2, 12))
    expected = reference_federation(model, tokens)
    with torch.no_grad():
        got = model(tokens)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def test_truncated_feedback_computes_the_same_values_with_fewer_gradients(tmp_path):
    text = (ROOT / "specs" / "federation.yaml").read_text()
    unroll = compiler.build_model(compiler.load_spec_text(text))
    truncated_text = text.replace(
        "feedback: {steps: 4, mode: unroll}",
        "feedback: {steps: 4, mode: truncated, backprop_steps: 1}",
    )
    assert truncated_text != text
    truncated = compiler.build_model(compiler.load_spec_text(truncated_text))
    truncated.load_state_dict(unroll.state_dict())
    tokens = torch.randint(0, 84, (2, 8))
    a, b = unroll(tokens)["logits"], truncated(tokens)["logits"]
    torch.testing.assert_close(a, b)
    a.square().mean().backward()
    b.square().mean().backward()
    # the delayed edge moon -> sun only matters to gradients through earlier steps
    ga = unroll.federation.transformers[1].blocks[0].mlp.fc.weight.grad
    gb = truncated.federation.transformers[1].blocks[0].mlp.fc.weight.grad
    assert not torch.allclose(ga, gb)


def test_same_spec_and_seed_give_bit_identical_weights_and_leave_global_rng_alone():
    path = ROOT / "specs" / "federation.yaml"
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = compiler.build_model(path).state_dict()
    after = torch.rand(1)
    b = compiler.build_model(path).state_dict()
    assert before == after
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = compiler.build_model(
        compiler.load_spec_text(path.read_text().replace("seed: 0", "seed: 1"))
    ).state_dict()
    assert not torch.equal(a["inputs.tokens.table.weight"], other["inputs.tokens.table.weight"])


def test_inputs_are_checked_at_call_time():
    model = compiler.build_model(ROOT / "specs" / "transformer.yaml")
    with pytest.raises(ValueError, match="context is 256"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(TypeError, match="unknown input `token`"):
        model(token=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="missing input"):
        model()


def test_tied_heads_share_the_embedding_tensor():
    model = compiler.build_model(ROOT / "specs" / "transformer.yaml")
    assert model.outputs["logits"].proj.weight is model.inputs["tokens"].table.weight
    clone = copy.deepcopy(model)
    assert clone.outputs["logits"].proj.weight is clone.inputs["tokens"].table.weight
