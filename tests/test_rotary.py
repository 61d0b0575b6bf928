"""Design 003's rotary encodings (docs/designs.md): rotations, relativity, RoPE equality.

References here are written independently of the module: RoPE with complex numbers, the quaternion
rotation with an explicit Hamilton product.
"""

from __future__ import annotations

import pytest
import torch

from runtime.attention.rotary import (
    ROTARY_KINDS,
    GivensRotary,
    LearnedFrequencyRotary,
    QuaternionRotary,
)
from runtime.transformer import RotaryEmbedding

# (kind, options, head_width): every layout, odd widths where the kind allows them
CASES = [
    ("learned_rope", {}, 16),
    ("learned_rope", {"learned": False}, 10),
    ("givens", {"pairs": "adjacent"}, 16),
    ("givens", {"pairs": "halves"}, 16),
    ("givens", {"pairs": ((4, 1), (0, 7), (8, 3))}, 11),
    ("quaternion", {}, 14),
    ("quaternion", {"axes": "fixed", "learned": False}, 12),
]
IDS = [
    "learned_rope",
    "learned_rope-frozen-10",
    "givens-adjacent",
    "givens-halves",
    "givens-explicit-11",
    "quaternion-14",
    "quaternion-fixed-frozen-12",
]


def build(kind: str, options: dict, head_width: int, context: int = 32, scales=(1.0,), **kw):
    return ROTARY_KINDS[kind](head_width, context, scales=scales, **options, **kw)


def perturb(module, seed: int = 0):
    """Move frequencies (and axes) away from their initial values, so properties are not checked
    only at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.inv_freq.mul_(1 + 0.3 * torch.randn(module.inv_freq.shape, generator=g))
        if isinstance(module, QuaternionRotary):
            module.axes.add_(0.5 * torch.randn(module.axes.shape, generator=g))
    return module


def randn(*shape, seed: int = 0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_rope(
    x: torch.Tensor, theta: float, scale: float = 1.0, layout: str = "halves", freqs=None
):
    """RoPE with complex numbers in float64: plane k is `x[k] + i x[k + d/2]` ("halves") or
    `x[2k] + i x[2k+1]` ("adjacent"), multiplied by `exp(i * scale * position * freqs[k])`,
    `freqs[k] = theta^(-2k/d)` unless given."""
    *lead, n, d = x.shape
    x = x.double()
    if layout == "halves":
        pairs = torch.stack(x.chunk(2, dim=-1), dim=-1)
    else:
        pairs = x.reshape(*lead, n, d // 2, 2)
    z = torch.view_as_complex(pairs.contiguous())
    if freqs is None:
        freqs = torch.tensor([theta ** (-2 * k / d) for k in range(d // 2)], dtype=torch.float64)
    freqs = torch.as_tensor(freqs).detach().double()
    angle = scale * torch.arange(n, dtype=torch.float64)[:, None] * freqs
    w = z * torch.polar(torch.ones_like(angle), angle)
    if layout == "halves":
        return torch.cat((w.real, w.imag), dim=-1)
    return torch.stack((w.real, w.imag), dim=-1).reshape(*lead, n, d)


def hamilton(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quaternion product of `(..., 4)` tensors `(w, x, y, z)`."""
    pw, px, py, pz = p.unbind(-1)
    qw, qx, qy, qz = q.unbind(-1)
    return torch.stack(
        (
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ),
        dim=-1,
    )


@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_every_head_vector_keeps_its_norm(kind, options, hw):
    module = perturb(build(kind, options, hw, scales=(1.0, 2.5, 0.75)))
    x = randn(6, 2, 32, hw)
    y = module(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)
    assert (y - x).abs().max() > 0.1  # and it did rotate


@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_scores_depend_only_on_the_offset(kind, options, hw):
    """The same query at every position against the same key at every position: the score matrix
    is Toeplitz (score(i, j) == score(i + s, j + s)) and not constant (position is encoded, unlike
    the original's fixed-angle Givens rotation, which cancels in q . k)."""
    module = perturb(build(kind, options, hw, scales=(1.0, 2.0, 0.5)), seed=1)
    n = 24
    q = randn(6, 2, 1, hw, seed=2).expand(6, 2, n, hw)
    k = randn(6, 2, 1, hw, seed=3).expand(6, 2, n, hw)
    scores = module(q) @ module(k).transpose(-1, -2)  # (rows, heads, n, n)
    for shift in (1, 2, 5, 11):
        torch.testing.assert_close(
            scores[..., shift:, shift:], scores[..., :-shift, :-shift], atol=1e-4, rtol=0
        )
    assert (scores[..., 0, :] - scores[..., 0, :1]).abs().amax(-1).min() > 1e-2


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_matches_complex_reference_at_init(theta):
    """`transformer.RotaryEmbedding`, `LearnedFrequencyRotary` and `GivensRotary(pairs="halves")`
    at init all equal RoPE written with complex numbers (per member scale included).

    The learned kinds store `inv_freq` as a float32 parameter: they equal the reference at their
    stored frequencies to 1e-6, and the exact one within the float32 rounding of the frequencies,
    `|x| * scale * position * inv_freq * 2^-24` (a few 1e-6 here)."""
    hw, context, scales = 32, 64, (1.0, 3.0)
    x = randn(4, 3, context, hw)

    def reference(freqs=None):
        parts = zip(x.chunk(2), scales, strict=True)
        return torch.cat([reference_rope(part, theta, s, freqs=freqs) for part, s in parts])

    expected = reference()
    torch.testing.assert_close(
        RotaryEmbedding(hw, context, theta, scales)(x).double(), expected, atol=1e-6, rtol=0
    )
    freqs = torch.tensor([theta ** (-2 * k / hw) for k in range(hw // 2)], dtype=torch.float64)
    rounding = freqs.float().double() - freqs
    bound = x.double().abs().amax() * max(scales) * (context - 1) * rounding.abs().amax() * 2
    for module in (
        LearnedFrequencyRotary(hw, context, theta, scales),
        GivensRotary(hw, context, theta, scales, pairs="halves"),
    ):
        torch.testing.assert_close(module.inv_freq, freqs.float(), atol=0, rtol=0)
        out = module(x).double()
        torch.testing.assert_close(out, reference(module.inv_freq), atol=1e-6, rtol=0)
        torch.testing.assert_close(out, expected, atol=float(bound) + 1e-6, rtol=0)


def test_givens_adjacent_at_init_is_interleaved_rope():
    x = randn(2, 2, 40, 24)
    expected = reference_rope(x, 10000.0, layout="adjacent")
    out = GivensRotary(24, 40, pairs="adjacent")(x)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_givens_halves_is_learned_rope():
    a, b = GivensRotary(16, 20, pairs="halves"), LearnedFrequencyRotary(16, 20)
    perturb(a, seed=4)
    b.load_state_dict(a.state_dict())
    x = randn(3, 2, 20, 16)
    torch.testing.assert_close(a(x), b(x), atol=1e-7, rtol=0)


def test_explicit_pairs_turn_only_their_planes():
    """Pair k = (i, j) turns `x[i] + i x[j]` by `position * inv_freq[k]`; other dims pass."""
    pairs = ((4, 1), (0, 7), (8, 3))
    module = perturb(GivensRotary(9, 16, pairs=pairs), seed=5)
    x = randn(2, 3, 16, 9)
    y = module(x)
    untouched = [2, 5, 6]
    assert torch.equal(y[..., untouched], x[..., untouched])
    position = torch.arange(16, dtype=torch.float64)[:, None]
    for k, (i, j) in enumerate(pairs):
        angle = position * module.inv_freq[k].double().detach()
        z = torch.complex(x[..., i : i + 1].double(), x[..., j : j + 1].double())
        w = z * torch.polar(torch.ones_like(angle), angle)
        torch.testing.assert_close(y[..., i : i + 1].double(), w.real, atol=1e-6, rtol=0)
        torch.testing.assert_close(y[..., j : j + 1].double(), w.imag, atol=1e-6, rtol=0)


def basis_matrices(module: QuaternionRotary, tokens: int) -> torch.Tensor:
    """`(tokens, triples, 3, 3)`: rotate the basis vectors e_b placed in every triple; column b of
    triple c's matrix at position p is the rotated e_b."""
    c = module.head_width // 3
    x = torch.zeros(3, 1, tokens, module.head_width)
    for b in range(3):
        x[b, 0, :, b : 3 * c : 3] = 1.0
    y = module(x)[:, 0, :, : 3 * c].reshape(3, tokens, c, 3)  # (b, p, c, i)
    return y.permute(1, 2, 3, 0)  # (p, c, i, b)


def test_quaternion_rotations_are_proper_orthogonal():
    module = perturb(QuaternionRotary(13, 20), seed=6)
    matrices = basis_matrices(module, 20).double()
    eye = torch.eye(3, dtype=torch.float64).expand_as(matrices)
    torch.testing.assert_close(matrices.transpose(-1, -2) @ matrices, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        torch.linalg.det(matrices),
        torch.ones(matrices.shape[:2], dtype=torch.float64),
        atol=1e-5,
        rtol=0,
    )
    x = randn(2, 2, 20, 13)
    assert torch.equal(module(x)[..., 12], x[..., 12])  # 13 % 3 == 1 dim passes through


def test_quaternion_matches_hamilton_product():
    """Triple c at position p equals `q v q*` with `q = (cos a/2, sin a/2 u_c)`, a = p * inv_freq[c]
    and u_c the normalised axis."""
    module = perturb(QuaternionRotary(12, 16, scales=(1.0, 2.0)), seed=7)
    x = randn(4, 2, 16, 12)
    y = module(x).double()
    u = torch.nn.functional.normalize(module.axes.detach().double(), dim=-1)  # (C, 3)
    position = torch.arange(16, dtype=torch.float64)[:, None]
    for m, scale in enumerate((1.0, 2.0)):
        a = scale * position * module.inv_freq.detach().double()  # (tokens, C)
        q = torch.cat(((a / 2).cos()[..., None], (a / 2).sin()[..., None] * u), dim=-1)
        conj = q * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
        v = x[2 * m : 2 * m + 2].double().unflatten(-1, (4, 3))  # (rows, heads, tokens, C, 3)
        pure = torch.cat((torch.zeros_like(v[..., :1]), v), dim=-1)
        turned = hamilton(hamilton(q, pure), conj)
        torch.testing.assert_close(
            turned[..., 0], torch.zeros_like(turned[..., 0]), atol=1e-12, rtol=0
        )
        torch.testing.assert_close(
            y[2 * m : 2 * m + 2], turned[..., 1:].flatten(-2), atol=1e-5, rtol=0
        )


def test_quaternion_leaves_its_axis_fixed():
    module = perturb(QuaternionRotary(9, 30), seed=8)
    u = torch.nn.functional.normalize(module.axes.detach(), dim=-1).flatten()
    x = u.expand(1, 1, 30, 9).clone()
    torch.testing.assert_close(module(x), x, atol=1e-6, rtol=0)


def test_quaternion_initial_axes_are_unit_and_spread():
    axes = QuaternionRotary(30, 8).axes.detach()
    torch.testing.assert_close(axes.norm(dim=-1), torch.ones(10), atol=1e-6, rtol=0)
    cosines = axes @ axes.T - 2 * torch.eye(10)
    assert cosines.max() < 0.9  # no two (nearly) parallel axes
    assert torch.equal(axes, QuaternionRotary(30, 8).axes.detach())  # deterministic


@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_member_scale_is_a_faster_clock(kind, options, hw):
    """Member m with scale s at position t equals a single-member module at position s * t."""
    scales, tokens = (1.0, 2.0, 3.0), 10
    multi = perturb(build(kind, options, hw, context=40, scales=scales), seed=9)
    single = build(kind, options, hw, context=40)
    single.load_state_dict(multi.state_dict())
    x = randn(3 * 2, 2, tokens, hw, seed=10)
    out = multi(x).reshape(3, 2, 2, tokens, hw)
    for m, s in enumerate(scales):
        stretch = int(s)
        y = randn(2, 2, stretch * tokens, hw, seed=11)
        y[:, :, ::stretch] = x.reshape(3, 2, 2, tokens, hw)[m]
        torch.testing.assert_close(single(y)[:, :, ::stretch], out[m], atol=2e-6, rtol=0)


@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_one_scale_broadcasts_over_rows(kind, options, hw):
    module = perturb(build(kind, options, hw), seed=12)
    x = randn(5, 2, 12, hw)
    whole = module(x)
    for row in range(5):
        torch.testing.assert_close(whole[row : row + 1], module(x[row : row + 1]))


@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_gradients_reach_the_learned_tensors(kind, options, hw):
    module = perturb(build(kind, options, hw, scales=(1.0, 1.5)), seed=13)
    x = randn(4, 2, 16, hw, seed=14).requires_grad_()
    (module(x) * randn(4, 2, 16, hw, seed=15)).sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()
    learned = dict(module.named_parameters())
    expected = set()
    if options.get("learned", True):
        expected.add("inv_freq")
    if kind == "quaternion" and options.get("axes", "learned") == "learned":
        expected.add("axes")
    assert set(learned) == expected
    assert "inv_freq" in module.state_dict()  # same checkpoint keys whether learned or not
    for name, parameter in learned.items():
        assert parameter.grad is not None and parameter.grad.isfinite().all(), name
        assert parameter.grad.abs().max() > 0, name


def test_gradients_are_correct_in_float64():
    module = perturb(QuaternionRotary(7, 6, scales=(1.0, 2.0)), seed=16).double()
    givens = perturb(GivensRotary(6, 6, pairs="adjacent"), seed=17).double()
    x = randn(2, 1, 6, 7, seed=18, dtype=torch.float64).requires_grad_()

    def quaternion(inputs, inv_freq, axes):
        params = {"inv_freq": inv_freq, "axes": axes}
        return torch.func.functional_call(module, params, (inputs,))

    def pairs(inputs, inv_freq):
        return torch.func.functional_call(givens, {"inv_freq": inv_freq}, (inputs[..., :6],))

    leaves = [p.detach().clone().requires_grad_() for p in (module.inv_freq, module.axes)]
    assert torch.autograd.gradcheck(quaternion, (x, *leaves))
    assert torch.autograd.gradcheck(pairs, (x, givens.inv_freq.detach().clone().requires_grad_()))


@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_meta_device_construction(kind, options, hw):
    with torch.device("meta"):
        module = build(kind, options, hw, context=64, scales=(1.0, 2.0))
        out = module(torch.empty(4, 3, 64, hw))
    assert out.is_meta and out.shape == (4, 3, 64, hw)
    assert all(t.is_meta for t in (*module.parameters(), *module.buffers()))
    module.to_empty(device="cpu")
    module.reset_parameters()
    fresh = build(kind, options, hw, context=64, scales=(1.0, 2.0))
    x = randn(4, 3, 64, hw)
    assert torch.equal(module(x), fresh(x))


@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_bfloat16_in_bfloat16_out(kind, options, hw):
    module = perturb(build(kind, options, hw, scales=(1.0, 2.0)), seed=19)
    x = randn(4, 2, 32, hw).bfloat16()
    out = module(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.float(), module(x.float()), atol=1e-2, rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("kind", "options", "hw"), CASES, ids=IDS)
def test_cuda_matches_cpu(kind, options, hw):
    module = perturb(build(kind, options, hw, scales=(1.0, 2.0)), seed=20)
    x = randn(4, 2, 32, hw)
    expected = module(x)
    cuda = module.cuda()
    torch.testing.assert_close(cuda(x.cuda()).cpu(), expected, atol=1e-5, rtol=0)
    out = cuda(x.cuda().bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), expected, atol=5e-2, rtol=2e-2)


def test_registry_names_and_common_signature():
    assert {
        "learned_rope": LearnedFrequencyRotary,
        "givens": GivensRotary,
        "quaternion": QuaternionRotary,
    } == ROTARY_KINDS
    for cls in ROTARY_KINDS.values():
        module = cls(12, 8, 500.0, (1.0, 2.0))  # (head_width, context, theta, scales)
        assert (module.head_width, module.context, module.theta) == (12, 8, 500.0)
        assert module.members == 2
        torch.testing.assert_close(
            module.inv_freq[:2].double(),
            torch.tensor([1.0, 500.0 ** (-1 / module.planes)], dtype=torch.float64),
        )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LearnedFrequencyRotary(7, 8), "even head_width"),
        (lambda: GivensRotary(9, 8), "even head_width"),
        (lambda: GivensRotary(9, 8, pairs="halves"), "even head_width"),
        (lambda: GivensRotary(8, 8, pairs="strided"), "pairs must be"),
        (lambda: GivensRotary(8, 8, pairs=((0, 1), (1, 2))), "disjoint"),
        (lambda: GivensRotary(8, 8, pairs=((0, 8),)), r"\[0, 8\)"),
        (lambda: GivensRotary(8, 8, pairs=()), "one or more"),
        (lambda: QuaternionRotary(2, 8), "head_width >= 3"),
        (lambda: QuaternionRotary(6, 8, axes="random"), "axes must be"),
        (lambda: QuaternionRotary(6, 0), "context"),
        (lambda: GivensRotary(6, 8, theta=-1.0), "theta"),
        (lambda: GivensRotary(6, 8, scales=()), "scales"),
    ],
)
def test_bad_options_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_inputs_raise():
    module = GivensRotary(8, 8, scales=(1.0, 2.0))
    with pytest.raises(ValueError, match="exceed the context"):
        module(torch.zeros(2, 1, 9, 8))
    with pytest.raises(ValueError, match="multiple of 2 members"):
        module(torch.zeros(3, 1, 4, 8))
    with pytest.raises(ValueError, match="expected"):
        module(torch.zeros(2, 1, 4, 6))


def test_long_positions_stay_exact():
    """Angle tables in float64: at position 4095 the learned RoPE still equals the reference at its
    own frequencies (a float32 product position * inv_freq would be off by up to 2.4e-4 rad)."""
    module = LearnedFrequencyRotary(8, 4096)
    x = randn(1, 1, 4096, 8)
    expected = reference_rope(x, 10000.0, freqs=module.inv_freq)
    torch.testing.assert_close(module(x).double(), expected, atol=2e-6, rtol=0)
