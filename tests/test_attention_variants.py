"""Score-level attention variants (runtime.attention.variants) against naive references.

The references compute `q . k / sqrt(d)`, build their masks with Python loops over (i, j), take an
explicit softmax (adaptive span: `m * exp(score)` normalised, the paper's form) and multiply by v,
one (member, batch, head) at a time, reading key/value head `h // (heads // kv_heads)`.
"""

from __future__ import annotations

import math

import pytest
import torch

from runtime.attention.variants import (
    ATTENTION_KINDS,
    AdaptiveSpanAttention,
    LocalGlobalAttention,
    SDPAttention,
    SlidingWindowAttention,
    window_mask,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HW = 8


def qkv(members, batch, heads, kv_heads, n, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(members * batch, heads, n, HW, generator=g)
    k = torch.randn(members * batch, kv_heads, n, HW, generator=g)
    v = torch.randn(members * batch, kv_heads, n, HW, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def naive(q, k, v, members, weight):
    """`weight(member, head, i, j)`: a key's mask multiplier (0: hidden, 1: full), or
    (multiplier, temperature); attention is `mult * exp(score / temperature)`, normalised."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    rows, heads, n, d = q.shape
    group = heads // k.shape[1]
    batch = rows // members
    out = torch.zeros(rows, heads, n, v.shape[-1], dtype=torch.float64)
    for r in range(rows):
        member = r // batch
        for h in range(heads):
            kh = h // group
            for i in range(n):
                logits, mults = [], []
                for j in range(n):
                    w = weight(member, h, i, j)
                    mult, temp = w if isinstance(w, tuple) else (w, 1.0)
                    s = float(q[r, h, i] @ k[r, kh, j]) / math.sqrt(d) / temp
                    logits.append(s)
                    mults.append(mult)
                top = max(s for s, m in zip(logits, mults, strict=True) if m > 0)
                e = [m * math.exp(s - top) for s, m in zip(logits, mults, strict=True)]
                total = sum(e)
                for j in range(n):
                    out[r, h, i] += e[j] / total * v[r, kh, j]
    return out


def causal_ok(causal, i, j):
    return j <= i or not causal


def window_weight(window, global_tokens, causal):
    def weight(member, h, i, j):
        if causal:
            seen = j <= i and (i - j < window or j < global_tokens)
        else:
            seen = abs(i - j) < window or j < global_tokens or i < global_tokens
        return 1.0 if seen else 0.0

    return weight


def span_weight(spans, max_span, ramp, causal, sharpen=False, temp_scale=0.0):
    def weight(member, h, i, j):
        if causal and j > i:
            return 0.0
        z = float(spans[member][h])
        mult = min(max((ramp + z - abs(i - j)) / ramp, 0.0), 1.0)
        temp = 1.0 + temp_scale * (1.0 - z / max_span) if sharpen else 1.0
        return mult, temp

    return weight


def set_spans(module, fractions):
    with torch.no_grad():
        module.span.copy_(torch.tensor(fractions, dtype=torch.float32).reshape(module.span.shape))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("members", [1, 2])
def test_sdpa_matches_naive(causal, heads, kv_heads, members):
    q, k, v = qkv(members, 2, heads, kv_heads, 6)
    y = SDPAttention(heads, kv_heads, HW, 16, members)(q, k, v, causal)
    ref = naive(q, k, v, members, lambda m, h, i, j: float(causal_ok(causal, i, j)))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
@pytest.mark.parametrize("window", [1, 3])
def test_sliding_window_matches_naive(causal, heads, kv_heads, window):
    q, k, v = qkv(2, 2, heads, kv_heads, 9)
    y = SlidingWindowAttention(heads, kv_heads, HW, 16, members=2, window=window)(q, k, v, causal)
    ref = naive(q, k, v, 2, window_weight(window, 0, causal))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("window,global_tokens", [(2, 2), (3, 1), (1, 0)])
def test_local_global_matches_naive(causal, heads, kv_heads, window, global_tokens):
    q, k, v = qkv(1, 2, heads, kv_heads, 10)
    mod = LocalGlobalAttention(heads, kv_heads, HW, 16, window=window, global_tokens=global_tokens)
    ref = naive(q, k, v, 1, window_weight(window, global_tokens, causal))
    torch.testing.assert_close(mod(q, k, v, causal).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
@pytest.mark.parametrize("sharpen", [False, True])
def test_adaptive_span_matches_naive(causal, heads, kv_heads, sharpen):
    n, max_span, ramp = 10, 6, 2.5
    mod = AdaptiveSpanAttention(
        heads, kv_heads, HW, 16, members=2, max_span=max_span, ramp=ramp, sharpen=sharpen,
        temp_scale=0.7,
    )  # fmt: skip
    fractions = [[0.0, 0.3, 0.55, 1.0], [0.9, 0.1, 0.45, 0.7]]
    set_spans(mod, fractions)
    spans = [[f * max_span for f in row] for row in fractions]
    q, k, v = qkv(2, 2, heads, kv_heads, n)
    y = mod(q, k, v, causal)
    ref = naive(q, k, v, 2, span_weight(spans, max_span, ramp, causal, sharpen, 0.7))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
@pytest.mark.parametrize("causal", [True, False])
def test_members_run_independently(kind, causal):
    """Member 1 of a members=2 module equals a members=1 module holding member 1's parameters."""
    options = {"sliding_window": {"window": 3}, "local_global": {"window": 2, "global_tokens": 1}}
    options["adaptive_span"] = {"max_span": 8, "ramp": 2, "sharpen": True, "temp_scale": 0.5}
    build = ATTENTION_KINDS[kind]
    both = build(4, 2, HW, 16, members=2, **options.get(kind, {}))
    alone = build(4, 2, HW, 16, members=1, **options.get(kind, {}))
    if kind == "adaptive_span":
        set_spans(both, [[0.1, 0.2, 0.3, 0.4], [0.9, 0.6, 0.5, 0.05]])
        assert both.span.shape == (2, 4) and alone.span.shape == (4,)
        alone.load_state_dict({name: p[1] for name, p in both.state_dict().items()})
    q, k, v = qkv(2, 3, 4, 2, 12)
    y = both(q, k, v, causal)
    torch.testing.assert_close(y[3:], alone(q[3:], k[3:], v[3:], causal), atol=1e-6, rtol=1e-6)
    if kind == "adaptive_span":  # member 0's spans differ: same inputs, other outputs
        assert not torch.allclose(y[:3], alone(q[:3], k[:3], v[:3], causal), atol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_window_covering_the_sequence_is_plain_attention(causal):
    q, k, v = qkv(1, 2, 4, 2, 7)
    plain = SDPAttention(4, 2, HW, 16)(q, k, v, causal)
    for window in (7, 8, 50):
        assert window_mask(7, window, 0, causal, q.device) is None
        y = SlidingWindowAttention(4, 2, HW, 16, window=window)(q, k, v, causal)
        torch.testing.assert_close(y, plain, atol=1e-6, rtol=1e-6)
    # every key global, or global tokens plus window reaching the end: plain attention too
    assert window_mask(7, 1, 7, causal, q.device) is None
    assert window_mask(7, 3, 4, causal, q.device) is None
    y = LocalGlobalAttention(4, 2, HW, 16, window=3, global_tokens=4)(q, k, v, causal)
    torch.testing.assert_close(y, plain, atol=1e-6, rtol=1e-6)
    # no global tokens: local-global is the sliding window
    y = LocalGlobalAttention(4, 2, HW, 16, window=2, global_tokens=0)(q, k, v, causal)
    ref = SlidingWindowAttention(4, 2, HW, 16, window=2)(q, k, v, causal)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)


def test_window_masks_are_cached_and_usable_after_inference():
    with torch.inference_mode():
        first = window_mask(33, 4, 2, True, torch.device("cpu"))
    again = window_mask(33, 4, 2, True, torch.device("cpu"))
    assert again is first and not first.is_inference()
    assert first.dtype == torch.bool and first.shape == (33, 33)
    assert window_mask(33, 4, 2, False, torch.device("cpu")) is not first
    # a mask first made in inference mode is saved for backward by a later training step
    q, k, v = qkv(1, 1, 2, 2, 33)
    q.requires_grad_(True)
    LocalGlobalAttention(2, 2, HW, 64, window=4, global_tokens=2)(q, k, v, True).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _perturbed_rows(mod, causal, key, n=16):
    """Query positions whose output changes when the value at position `key` is changed."""
    q, k, v = qkv(1, 1, 2, 1, n)
    before = mod(q, k, v, causal)
    v2 = v.clone()
    v2[:, :, key] += 10.0
    after = mod(q, k, v2, causal)
    changed = (after - before).abs().amax(dim=(0, 1, 3)) > 1e-6
    return {i for i in range(n) if changed[i]}


def test_local_global_visibility_by_perturbation():
    mod = LocalGlobalAttention(2, 1, HW, 16, window=3, global_tokens=2)
    # causal: a global key reaches every later query, however far
    assert _perturbed_rows(mod, True, key=1) == set(range(1, 16))
    # causal: a non-global key reaches only the window after it
    assert _perturbed_rows(mod, True, key=5) == {5, 6, 7}
    # non-causal: a global key reaches every query; a far key reaches its window and the globals
    assert _perturbed_rows(mod, False, key=0) == set(range(16))
    assert _perturbed_rows(mod, False, key=15) == {0, 1, 13, 14, 15}
    assert _perturbed_rows(mod, False, key=8) == {0, 1, 6, 7, 8, 9, 10}
    # causal: global query 0 never sees later keys
    assert 0 not in _perturbed_rows(mod, True, key=10)


def test_sliding_window_visibility_by_perturbation():
    mod = SlidingWindowAttention(2, 1, HW, 16, window=4)
    assert _perturbed_rows(mod, True, key=0) == {0, 1, 2, 3}
    assert _perturbed_rows(mod, False, key=8) == set(range(5, 12))


@pytest.mark.parametrize("causal", [True, False])
def test_adaptive_span_gradients_reach_spans(causal):
    mod = AdaptiveSpanAttention(4, 2, HW, 16, members=2, max_span=8, ramp=3, init=0.5)
    q, k, v = qkv(2, 2, 4, 2, 12)
    y = mod(q, k, v, causal)
    (y * torch.randn_like(y)).sum().backward()
    assert mod.span.grad is not None and mod.span.grad.shape == (2, 4)
    assert (mod.span.grad.abs() > 0).all()


def test_adaptive_span_loss_is_positive_and_differentiable():
    mod = AdaptiveSpanAttention(4, 4, HW, 16, members=2, max_span=10, init=0.4, span_loss=0.01)
    set_spans(mod, [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    loss = mod.regularisation()
    expected = 0.01 * 10 * (sum([0.1, 0.2, 0.3, 0.4]) / 4 + sum([0.5, 0.6, 0.7, 0.8]) / 4)
    assert loss.item() > 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(mod.span.grad, torch.full((2, 4), 0.01 * 10 / 4))
    assert AdaptiveSpanAttention(4, 4, HW, 16).regularisation() is None
    assert SDPAttention(4, 4, HW, 16).regularisation() is None
    assert SlidingWindowAttention(4, 4, HW, 16, window=2).regularisation() is None
    assert LocalGlobalAttention(4, 4, HW, 16, window=2).regularisation() is None


@pytest.mark.parametrize("causal", [True, False])
def test_adaptive_span_zero_span_keeps_the_diagonal(causal):
    """Span 0 with a sub-token ramp leaves each query only itself: no empty row, no NaN."""
    mod = AdaptiveSpanAttention(4, 2, HW, 16, max_span=4, ramp=0.5, init=0.0, span_loss=1.0)
    q, k, v = qkv(1, 2, 4, 2, 9)
    q.requires_grad_(True)
    y = mod(q, k, v, causal)
    torch.testing.assert_close(y, v.repeat_interleave(2, dim=1), atol=1e-6, rtol=0)
    (y.sum() + mod.regularisation()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(mod.span.grad).all()


def test_adaptive_span_stays_in_range_and_keeps_the_length():
    mod = AdaptiveSpanAttention(4, 4, HW, 64, max_span=8, ramp=2)
    set_spans(mod, [1.3, -0.2, 2.5, 0.6])  # a reflecting parametrisation: back inside [0, 1]
    torch.testing.assert_close(mod.spans(), torch.tensor([[5.6, 1.6, 4.0, 4.8]]))
    mod.span.grad = None
    mod.spans().sum().backward()
    torch.testing.assert_close(mod.span.grad, torch.tensor([-8.0, -8.0, 8.0, 8.0]))
    # the original truncated the sequence to the span; every token keeps its output here
    q, k, v = qkv(1, 2, 4, 4, 40)
    assert mod(q, k, v, True).shape == (2, 4, 40, HW)
    assert AdaptiveSpanAttention(4, 4, HW, 64).max_span == 64  # default: the context


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
@pytest.mark.parametrize("causal", [True, False])
def test_bfloat16_close_to_float32(device, kind, causal):
    options = {"sliding_window": {"window": 5}, "local_global": {"window": 4, "global_tokens": 2}}
    options["adaptive_span"] = {"max_span": 12, "ramp": 4, "init": 0.5, "sharpen": True}
    mod = ATTENTION_KINDS[kind](4, 2, HW, 32, members=2, **options.get(kind, {})).to(device)
    q, k, v = qkv(2, 2, 4, 2, 24, device=device)
    ref = mod(q, k, v, causal)
    y = mod(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_matches_naive_on_each_device(device):
    q, k, v = qkv(2, 1, 4, 2, 8, device=device)
    mod = AdaptiveSpanAttention(4, 2, HW, 16, members=2, max_span=5, ramp=2).to(device)
    set_spans(mod, [[0.2, 0.4, 0.6, 0.8], [1.0, 0.0, 0.5, 0.3]])
    spans = (mod.spans()).tolist()
    ref = naive(q, k, v, 2, span_weight(spans, 5, 2, True))
    torch.testing.assert_close(mod(q, k, v, True).double().cpu(), ref, atol=1e-5, rtol=1e-5)
    lg = LocalGlobalAttention(4, 2, HW, 16, 2, window=2, global_tokens=1)
    ref = naive(q, k, v, 2, window_weight(2, 1, False))
    torch.testing.assert_close(lg(q, k, v, False).double().cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_meta_device_construction(kind):
    options = {"sliding_window": {"window": 128}, "local_global": {"window": 128}}
    with torch.device("meta"):
        mod = ATTENTION_KINDS[kind](16, 4, 64, 4096, members=3, **options.get(kind, {}))
    assert all(p.is_meta for p in mod.parameters())
    if kind == "adaptive_span":
        assert mod.span.shape == (3, 16)
        mod.to_empty(device="cpu")
        mod.reset_parameters()
        torch.testing.assert_close(mod.spans(), torch.full((3, 16), 4096.0))


@pytest.mark.parametrize(
    "kind,options,message",
    [
        ("sliding_window", {"window": 0}, "`window` must be an integer >= 1"),
        ("sliding_window", {"window": 2.5}, "`window` must be an integer >= 1"),
        ("local_global", {"window": 0}, "`window` must be an integer >= 1"),
        (
            "local_global",
            {"window": 2, "global_tokens": -1},
            "`global_tokens` must be an integer >= 0",
        ),
        ("adaptive_span", {"ramp": 0}, "`ramp` must be a finite number > 0"),
        ("adaptive_span", {"ramp": -3.0}, "`ramp` must be a finite number > 0"),
        ("adaptive_span", {"max_span": 0}, "`max_span` must be an integer >= 1"),
        ("adaptive_span", {"init": 1.5}, "`init` must be a finite number >= 0.0 and <= 1.0"),
        ("adaptive_span", {"span_loss": -1.0}, "`span_loss` must be a finite number >= 0"),
        ("adaptive_span", {"temp_scale": float("nan")}, "`temp_scale` must be a finite number"),
        ("adaptive_span", {"sharpen": 1}, "`sharpen` must be true or false"),
    ],
)
def test_invalid_options_raise(kind, options, message):
    with pytest.raises(ValueError, match=message) as info:
        ATTENTION_KINDS[kind](4, 2, HW, 16, **options)
    assert info.value.args[0].startswith(f"{kind}: ")


def test_invalid_shapes_raise():
    with pytest.raises(ValueError, match="must be a multiple of `kv_heads`"):
        SDPAttention(4, 3, HW, 16)
    mod = SDPAttention(4, 2, HW, 16, members=2)
    q, k, v = qkv(1, 3, 4, 2, 5)  # 3 rows do not split into 2 members
    with pytest.raises(ValueError, match="expected q"):
        mod(q, k, v, True)
    with pytest.raises(TypeError):
        ATTENTION_KINDS["sdpa"](4, 2, HW, 16, window=3)


def test_kind_names():
    assert set(ATTENTION_KINDS) == {"sdpa", "sliding_window", "adaptive_span", "local_global"}
    for name, cls in ATTENTION_KINDS.items():
        assert cls.kind == name
