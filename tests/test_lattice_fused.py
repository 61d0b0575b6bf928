"""The lattice layer's fused region (issue 23): the Kuramoto chain, the phase features and the slot
layout of the projection, compiled into one region when the layer runs eagerly on a GPU, equal in
fp32 to the eager reference ops (to 1e-5, values and gradients). The CUDA-graph region, its other
fast form, has its own tests (`test_lattice_graphs.py`).

The CPU test traces the region as one graph forward and backward (`aot_eager`: AOTAutograd's
graphs, run by eager kernels, so it needs no C compiler and takes a second); the CUDA tests run
it through inductor and skip without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention import lattice
from runtime.attention.lattice import LatticeConfig
from runtime.transformer import Transformer, TransformerConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    """fp32 comparisons at 1e-5 need fp32 matmuls: a CUDA training run in the same process turns
    TF32 on (`--precision fp32` asks for it), which rounds to 1e-3."""
    kept = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept


def lattice_model(members: int, width: int, bias: bool, device: str = "cpu") -> Transformer:
    cfg = TransformerConfig(
        width=width,
        heads=4,
        layers=1,
        context=64,
        bias=bias,
        attention=LatticeConfig(shape=(2, 2), coupling=0.7, substeps=4),
    )
    torch.manual_seed(0)
    model = Transformer(cfg, members, rope_scales=tuple(1.0 + m for m in range(members)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(device)


def slot_arguments(model: Transformer, tokens: int) -> tuple:
    attn = model.blocks[0].attn
    cfg = attn.lattice.cfg
    return (
        attn.qkv.weight,
        attn.qkv.bias,
        attn.lattice.oscillator_tensors(),
        attn.heads,
        attn.content_width,
        tokens,
        cfg.dt,
        cfg.substeps,
        cfg.token_frequency,
    )


def values_and_gradients(
    fn, model: Transformer, tokens: int, differentiate_theta: bool = True
) -> list[torch.Tensor]:
    """`slot_terms`' outputs and the parameters' gradients of a random projection of them
    (`theta` left out of it where `fn` returns it as a record, detached)."""
    model.zero_grad(set_to_none=True)
    weight, bias, pairs, theta = fn(*slot_arguments(model, tokens))
    outputs = [weight, pairs] + ([theta] if differentiate_theta else [])
    outputs += [bias] if bias is not None else []
    probe = torch.Generator(device=weight.device).manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=probe, device=o.device)).sum() for o in outputs)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [o.detach() for o in outputs] + [theta.detach()] + grads


@pytest.mark.parametrize(
    ("members", "width", "bias"),
    [(1, 64, False), (3, 60, True)],  # width 60: heads of 15, an odd content width of 13
)
def test_the_fused_region_is_one_graph_equal_to_the_reference_ops(members, width, bias):
    torch._dynamo.reset()
    model = lattice_model(members, width, bias)
    region = torch.compile(lattice.slot_terms, fullgraph=True, backend="aot_eager")
    expected = values_and_gradients(lattice.slot_terms, model, 24)
    got = values_and_gradients(region, model, 24)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("region", lattice.REGIONS)
def test_the_layer_runs_the_reference_ops_on_the_cpu(monkeypatch, region):
    """Off the GPU neither region is used (a compile per shape costs a CPU run more than it
    saves, and CUDA graphs need CUDA): `fused_slot_terms` calls the reference ops."""
    used = []
    monkeypatch.setattr(lattice, "_compiled_slot_terms", lambda: used.append("compiled"))
    monkeypatch.setattr(lattice, "graphed_slot_terms", lambda *a: used.append("graphs"))
    model = lattice_model(1, 64, False)
    model.blocks[0].attn.region = region
    model(torch.randn(1, 2, 16, 64)).sum().backward()
    assert used == []


def test_a_region_is_one_of_three():
    model = lattice_model(1, 64, False)
    with pytest.raises(ValueError, match="graphs, compiled, reference; got 'fast'"):
        lattice.fused_slot_terms(*slot_arguments(model, 8), region="fast")


@cuda
@pytest.mark.parametrize(("members", "width", "bias"), [(1, 64, False), (2, 60, True)])
def test_the_region_compiled_by_inductor_equals_the_reference_ops(members, width, bias):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = lattice_model(members, width, bias, "cuda")
    expected = values_and_gradients(lattice.slot_terms, model, 300)
    got = values_and_gradients(lattice.fused_slot_terms, model, 300)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the region was compiled
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(
            g, e, rtol=1e-5, atol=2e-5
        )  # inductor reorders sums: 1.55e-5 seen on an H200


@cuda
@pytest.mark.parametrize("region", ["graphs", "compiled"])
def test_the_fused_layer_equals_the_reference_layer_on_a_gpu(region):
    """The whole layer (RoPE on), fp32, eager: each fast region against the reference ops."""
    torch._dynamo.reset()
    model = lattice_model(2, 64, True, "cuda")
    attn = model.blocks[0].attn
    x = torch.randn(2, 3, 64, 64, device="cuda")  # the context
    results = []
    for each in (region, "reference"):
        attn.region = each
        model.zero_grad(set_to_none=True)
        y = model(x)
        y.square().sum().backward()
        results.append([y.detach()] + [p.grad for p in model.parameters()])
    for g, e in zip(*results, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
