"""Design 003's token mixers (docs/designs.md): relative force against a literal
pair-tensor reference, causality, the myelinated layer's per-example and straight-through fixes,
members batching, dtypes and meta-device construction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from runtime.attention.mixers import (
    DISTANCE_EPS,
    MIXER_KINDS,
    ROUTE_ATTENDED,
    ROUTE_PASSED,
    ROUTE_SKIPPED,
    ROUTE_VISITED,
    Myelinated,
    RelativeForce,
)
from runtime.transformer import Block, Choice, TransformerConfig

WIDTH, HEADS, TOKENS = 32, 4, 10


def relative_force(causal: bool = True, members: int = 1, **options) -> RelativeForce:
    """A relative-force mixer with every parameter moved off its init, so each term matters."""
    mod = RelativeForce(WIDTH, HEADS, 2, 16, members=members, causal=causal, bias=True, **options)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            scale = 0.3 if name.startswith(("emitter", "receptor", "edge.")) else 0.5
            p.add_(torch.randn_like(p) * scale)
    return mod


def naive_relative_force(mod: RelativeForce, x: torch.Tensor) -> torch.Tensor:
    """The original's construction done literally (pair tensors, loops over heads and hops), with the
    fixes: a proper contraction with each head's direction, A masked before the hop powers."""
    b, n, d = x.shape
    h, hw = mod.heads, d // mod.heads
    e = F.linear(x, mod.emitter.weight, mod.emitter.bias)
    r = F.linear(x, mod.receptor.weight, mod.receptor.bias)
    diff = e[:, :, None, :] - r[:, None, :, :]  # (b, n, n, d)
    magnitude = torch.sqrt(diff.square().sum(-1) + DISTANCE_EPS)
    unit = diff / magnitude[..., None]
    pairs = torch.cat(
        (x[:, :, None, :].expand(b, n, n, d), x[:, None, :, :].expand(b, n, n, d)), -1
    )
    edge_weight = torch.cat((mod.edge.weight[:h], mod.edge.weight[h:]), dim=1)  # (h, 2d)
    v = F.linear(x, mod.value.weight, mod.value.bias)
    hop_mix = torch.softmax(mod.hop_weights, 0)
    balance = torch.sigmoid(mod.balance)
    lower = torch.ones(n, n).tril()
    heads = []
    for head in range(h):
        force = (unit @ mod.direction[head]) * torch.exp(-magnitude)
        direct = torch.sigmoid(pairs @ edge_weight[head] + mod.edge_bias[head])
        if mod.causal:
            direct = direct * lower
        path, topo = direct, hop_mix[0] * direct
        for k in range(1, mod.hop_levels):
            path = path @ direct / math.sqrt(n)
            topo = topo + hop_mix[k] * path
        scores = balance * force + (1 - balance) * topo
        if mod.causal:
            scores = scores.masked_fill(lower == 0, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[..., head * hw : (head + 1) * hw])
    return F.linear(torch.cat(heads, -1), mod.output.weight, mod.output.bias)


def vivid_myelinated(causal: bool, sublayers: int = 4) -> Myelinated:
    """A myelinated layer whose importance reads direction U and whose jump policy reads V, so
    examples built along U and V take different routes (skips, jumps, attention or not)."""
    mod = Myelinated(WIDTH, HEADS, 2, 16, sublayers=sublayers, causal=causal).eval()
    with torch.no_grad():
        for node in mod.nodes:
            node.importance.weight.copy_(4 * U)
            node.importance.bias.zero_()
        mod.policy_hidden.weight.zero_()
        mod.policy_hidden.bias.zero_()
        mod.policy_hidden.weight[0] = 4 * V
        mod.policy_out.weight.zero_()
        mod.policy_out.bias.zero_()
        mod.policy_out.weight[1, 0] = 3.0
    return mod


U = (
    torch.zeros(WIDTH)
    .index_fill_(0, torch.tensor([0]), 1.0)
    .index_fill_(0, torch.tensor([1]), -1.0)
)
V = (
    torch.zeros(WIDTH)
    .index_fill_(0, torch.tensor([2]), 1.0)
    .index_fill_(0, torch.tensor([3]), -1.0)
)


def vivid_batch() -> torch.Tensor:
    along_u = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0, 1.0])
    along_v = torch.tensor([0.0, 1.0, 2.0, 0.0, 1.5, 3.0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 12, WIDTH, generator=g)
    return (x + along_u[:, None, None] * U + along_v[:, None, None] * V).unsqueeze(0)


# --------------------------------------------------------------------------- relative force


@pytest.mark.parametrize("causal", [True, False])
def test_relative_force_matches_the_literal_pair_tensor_reference(causal):
    torch.manual_seed(1)
    mod = relative_force(causal=causal, hop_levels=3)
    x = torch.randn(3, TOKENS, WIDTH)
    got = mod(x.unsqueeze(0))[0]
    torch.testing.assert_close(got, naive_relative_force(mod, x), atol=1e-5, rtol=1e-5)
    # the force term matters: without it the output changes
    with torch.no_grad():
        mod.direction.zero_()
    assert not torch.allclose(mod(x.unsqueeze(0))[0], got, atol=1e-4)


def _assert_causal(mod: torch.nn.Module, seed: int | None = None) -> None:
    x = torch.randn(1, 2, TOKENS, WIDTH)
    changed = x.clone()
    t = 4
    changed[:, :, t + 1 :] = torch.randn_like(changed[:, :, t + 1 :])
    if seed is not None:
        torch.manual_seed(seed)
    before = mod(x)
    if seed is not None:
        torch.manual_seed(seed)
    after = mod(changed)
    torch.testing.assert_close(after[:, :, : t + 1], before[:, :, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, :, t + 1 :], before[:, :, t + 1 :])


def _assert_leaks(mod: torch.nn.Module) -> None:
    x = torch.randn(1, 2, TOKENS, WIDTH)
    changed = x.clone()
    changed[:, :, -1] += 3.0
    assert not torch.allclose(mod(x)[:, :, 0], mod(changed)[:, :, 0])


def test_relative_force_is_causal_and_the_check_detects_leaks():
    torch.manual_seed(2)
    _assert_causal(relative_force(causal=True, hop_levels=3))
    _assert_leaks(relative_force(causal=False, hop_levels=3))


# --------------------------------------------------------------------------- myelinated


def test_myelinated_is_causal_in_eval_and_training_and_the_check_detects_leaks():
    torch.manual_seed(3)
    _assert_causal(vivid_myelinated(causal=True))
    _assert_causal(Myelinated(WIDTH, HEADS, 2, 16, causal=True).train(), seed=7)
    _assert_leaks(vivid_myelinated(causal=False))


@pytest.mark.parametrize("causal", [False, True])
def test_myelinated_eval_is_deterministic_and_batch_equals_each_example_alone(causal):
    mod = vivid_myelinated(causal)
    x = vivid_batch()
    first = mod(x)
    routes = mod.last_route
    assert torch.equal(mod(x), first) and torch.equal(mod.last_route, routes)
    # the batch really takes different routes: skips, jumps, attention and plain visits
    assert {ROUTE_PASSED, ROUTE_SKIPPED, ROUTE_VISITED, ROUTE_ATTENDED} <= set(
        routes.unique().tolist()
    )
    assert len({tuple(r) for r in routes[0, :, -1].tolist()}) >= 3
    for i in range(x.shape[1]):
        alone = mod(x[:, i : i + 1])
        torch.testing.assert_close(alone[0, 0], first[0, i], atol=1e-5, rtol=1e-5)
        assert torch.equal(mod.last_route[0, 0], routes[0, i])


def test_myelinated_key_mask_is_hard_forward_with_a_straight_through_gradient():
    torch.manual_seed(4)
    mod = Myelinated(WIDTH, HEADS, 2, 16, causal=True)
    n = 6
    h = torch.randn(1, 2, n, WIDTH)
    soft = torch.rand(1, 2, n, requires_grad=True)
    hard = (soft > 0.5).float()
    out = mod._attend(h, hard + (soft - soft.detach()))
    q = h.reshape(1, 2, n, HEADS, WIDTH // HEADS).transpose(2, 3)
    keep = (hard[..., None, :] > 0) | torch.eye(n, dtype=torch.bool)
    mask = (keep & torch.ones(n, n, dtype=torch.bool).tril()).unsqueeze(2)
    ref = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(2, 3).reshape(1, 2, n, WIDTH))
    (out * torch.randn_like(out)).sum().backward()
    dropped = hard[0, :, : n - 1] == 0  # the last token is nobody's earlier key
    assert dropped.any() and (soft.grad[0, :, : n - 1][dropped] != 0).all()


def test_importance_predictors_learn_through_the_straight_through_threshold():
    torch.manual_seed(5)
    mod = Myelinated(WIDTH, HEADS, 2, 16, sublayers=3).eval()
    x = torch.randn(1, 2, TOKENS, WIDTH)
    y = mod(x)
    assert (mod.last_route == ROUTE_ATTENDED).all()  # at init every token is important
    (y * torch.randn_like(y)).sum().backward()
    for node in mod.nodes:
        assert node.importance.weight.grad.abs().sum() > 0
        assert node.importance_norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [True, False])
def test_myelinated_trains_every_parameter_including_the_policy(causal):
    torch.manual_seed(6)
    mod = Myelinated(WIDTH, HEADS, 2, 16, sublayers=3, causal=causal).train()
    x = torch.randn(1, 3, TOKENS, WIDTH, requires_grad=True)
    y = mod(x)
    (y * torch.randn_like(y)).sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert mod.policy_out.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- both mixers


def _stack(singles: list[torch.nn.Module], stacked: torch.nn.Module) -> None:
    states = [s.state_dict() for s in singles]
    stacked.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})


@pytest.mark.parametrize("kind", ["relative_force", "myelinated"])
def test_two_members_equal_two_single_modules(kind):
    torch.manual_seed(8)
    if kind == "relative_force":
        singles = [relative_force(hop_levels=2), relative_force(hop_levels=2)]
        stacked = RelativeForce(WIDTH, HEADS, 2, 16, members=2, bias=True, hop_levels=2)
        x = torch.randn(2, 3, TOKENS, WIDTH)
    else:
        singles = [vivid_myelinated(causal=True), Myelinated(WIDTH, HEADS, 2, 16, sublayers=4)]
        stacked = Myelinated(WIDTH, HEADS, 2, 16, members=2, sublayers=4)
        x = torch.cat((vivid_batch(), torch.randn(1, 6, 12, WIDTH)))
    _stack(singles, stacked)
    stacked.eval()
    got = stacked(x)
    for m, single in enumerate(singles):
        single.eval()
        torch.testing.assert_close(got[m], single(x[m : m + 1])[0], atol=1e-5, rtol=1e-5)
        if kind == "myelinated":
            assert torch.equal(stacked.last_route[m], single.last_route[0])


@pytest.mark.parametrize("kind", ["relative_force", "myelinated"])
def test_bfloat16_runs_and_backpropagates(kind):
    torch.manual_seed(9)
    mod = MIXER_KINDS[kind](WIDTH, HEADS, 2, 16, members=2).train()
    x = torch.randn(2, 2, TOKENS, WIDTH)
    reference = mod(x) if kind == "relative_force" else None
    mod = mod.to(torch.bfloat16)
    y = mod(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters() if p.grad is not None)
    if reference is not None:
        torch.testing.assert_close(y.float(), reference, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kind", ["relative_force", "myelinated"])
def test_construction_on_the_meta_device(kind):
    with torch.device("meta"):
        meta = MIXER_KINDS[kind](256, 8, 4, 1024, members=3)
    real = MIXER_KINDS[kind](256, 8, 4, 1024, members=3)
    assert all(p.is_meta for p in meta.parameters())
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [
        (n, p.shape) for n, p in real.named_parameters()
    ]


@pytest.mark.parametrize("kind", ["relative_force", "myelinated"])
def test_bad_shapes_raise_clear_errors(kind):
    with pytest.raises(ValueError, match=r"width 30 must be a positive multiple of heads 4"):
        MIXER_KINDS[kind](30, 4, 2, 16)
    mod = MIXER_KINDS[kind](WIDTH, HEADS, 2, 16, members=2)
    with pytest.raises(ValueError, match=r"expected a stream \(members=2"):
        mod(torch.randn(3, 2, TOKENS, WIDTH))
    with pytest.raises(ValueError, match=r"width=32"):
        mod(torch.randn(2, 2, TOKENS, 16))


def test_option_errors():
    with pytest.raises(ValueError, match="hop_levels"):
        RelativeForce(WIDTH, HEADS, 2, 16, hop_levels=0)
    with pytest.raises(ValueError, match="sublayers"):
        Myelinated(WIDTH, HEADS, 2, 16, sublayers=0)
    with pytest.raises(ValueError, match="sparsity_threshold"):
        Myelinated(WIDTH, HEADS, 2, 16, sparsity_threshold=1.5)


@pytest.mark.parametrize("kind", ["relative_force", "myelinated"])
def test_a_block_runs_each_mixer_in_its_place(kind):
    torch.manual_seed(10)
    build = MIXER_KINDS[kind]
    cfg = TransformerConfig(
        width=WIDTH,
        heads=HEADS,
        layers=2,
        context=16,
        variant=Choice(kind, build, level="mixer"),
    )
    block = Block(cfg, members=2)
    assert isinstance(block.attn, build)
    assert block.takes_stream is build.takes_stream
    assert (block.norm_attn is None) is build.takes_stream
    x = torch.randn(2, 3, TOKENS, WIDTH)
    y = block(x, None)
    assert y.shape == x.shape and torch.isfinite(y).all()


def naive_myelinated(mod: Myelinated, x: torch.Tensor) -> torch.Tensor:
    """The layer's rules for one example `(n, d)`, non-causal, in eval mode, written as the original's
    control flow: a Python pointer over sub-layers, `if`s for skip/attend/jump, and attention as
    an explicit masked softmax over the important keys (each query keeping itself)."""
    n, d = x.shape
    hw = d // mod.heads
    x0 = h = x
    pooled = x0.mean(0)
    policy = torch.softmax(mod.policy_out(F.relu(mod.policy_hidden(pooled))), -1)
    memory = mod.working_memory
    last, s = mod.sublayers - 1, 0
    while s <= last:
        node = mod.nodes[s]
        important = torch.sigmoid(node.importance(node.importance_norm(h)))[:, 0]
        important = important > mod.sparsity_threshold
        level = important.float().mean()
        if s > 0 and level < 0.2:  # skipped: no attention, no jump
            s += 1
            continue
        if level > 0.3:
            normed = node.norm(h)
            q = normed.view(n, mod.heads, hw).transpose(0, 1)  # (heads, n, hw)
            scores = q @ q.transpose(-1, -2) / math.sqrt(hw)
            keys = important[None, :] | torch.eye(n, dtype=torch.bool)
            mixed = torch.softmax(scores.masked_fill(~keys, float("-inf")), -1) @ q
            mixed = mixed.transpose(0, 1).reshape(n, d)
            if node.adapter is not None:
                mixed = node.adapter(mixed)
            h = h + torch.sigmoid(node.gate(normed)) * mixed
            summary = h.mean(0)
            keep = torch.sigmoid(mod.memory_gate(summary))
            memory = keep * memory + (1 - keep) * summary
        if s < last and policy[1] > 0.5:  # eval: jump iff likely, by the likeliest length
            length = int(policy.argmax())
            w = mod.jump_weights[length]
            h = h + w * x0 + (1 - w) * memory
            s = min(s + 1 + length, last)
            continue
        s += 1
    return h + torch.sigmoid(mod.mlp_gate(h)) * mod.mlp_out(F.gelu(mod.mlp_in(mod.mlp_norm(h))))


def test_myelinated_matches_the_seeds_control_flow_example_by_example():
    mod = vivid_myelinated(causal=False)
    x = vivid_batch()
    with torch.no_grad():
        batched = mod(x)[0]
        routes = {tuple(r.tolist()) for r in mod.last_route[0, :, 0]}
        for i in range(x.shape[1]):
            torch.testing.assert_close(
                batched[i], naive_myelinated(mod, x[0, i]), atol=1e-5, rtol=1e-5
            )
    assert len(routes) > 1  # the examples really take different paths through the sub-layers
