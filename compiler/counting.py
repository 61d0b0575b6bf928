"""Parameter counts of the runtime's building blocks, in closed form.

`epicycle validate` counts a spec's parameters without building it, so it never imports torch:
each count here mirrors one runtime module's `__init__` (the module named in its docstring), and
`tests/test_parameter_counts.py` holds every count equal to the built module's, for every gallery
spec and every built-in component. A count that drifts from its module fails there, not silently.
"""

from __future__ import annotations

from typing import Any


def linear(inputs: int, outputs: int, bias: bool, members: int = 1) -> int:
    """`runtime.layers.MemberLinear` (and `nn.Linear`, members 1)."""
    return members * (inputs * outputs + (outputs if bias else 0))


def norm(width: int, kind: str, bias: bool, members: int = 1) -> int:
    """`runtime.layers.MemberNorm`: a gain, and a shift for a biased layernorm."""
    return members * width * (2 if bias and kind == "layernorm" else 1)


def lattice_oscillators(layout: Any, members: int) -> int:
    """`runtime.attention.lattice.LatticeOscillators`: per head an initial phase and a strength
    (and a frequency when learned), per lattice a coupling and a range."""
    per_head = 3 if layout.frequencies == "learned" else 2
    return members * (per_head * layout.cells + 2)


def lattice_attention(
    *, layout: Any, width: int, heads: int, bias: bool, members: int = 1, **_: Any
) -> int:
    """`runtime.attention.lattice.LatticeAttention`: content queries and keys 2 dimensions
    narrower than the values (the phase term fills them), the output projection, the lattice."""
    head_width = width // heads
    content = head_width - 2
    qkv = linear(width, 2 * heads * content + heads * head_width, bias, members)
    return (
        qkv
        + linear(heads * head_width, width, bias, members)
        + lattice_oscillators(layout, members)
    )


def adaptive_span(*, heads: int, members: int = 1, **_: Any) -> int:
    """`runtime.attention.variants.AdaptiveSpanAttention`: one learned span per head."""
    return members * heads


def relative_force(
    *, width: int, heads: int, members: int = 1, bias: bool = False, hop_levels: int = 3, **_: Any
) -> int:
    """`runtime.attention.mixers.RelativeForce`: emitter, receptor, value and output maps, a
    direction per head, the edge map and bias, the hop weights and the balance."""
    maps = 4 * linear(width, width, bias)
    per_member = maps + heads * width + linear(width, 2 * heads, False) + heads + hop_levels + 1
    return members * per_member


def myelinated(
    *,
    width: int,
    members: int = 1,
    bias: bool = False,
    sublayers: int = 3,
    policy_width: int = 128,
    **_: Any,
) -> int:
    """`runtime.attention.mixers.Myelinated`: per sub-layer two norms, an importance and a gate
    (an adapter on every other one), the jump policy and working memory when there are several,
    and the gated MLP."""
    node = 2 * norm(width, "layernorm", bias) + 2 * linear(width, 1, True)
    nodes = sum(node + (linear(width, width, bias) if i % 2 == 0 else 0) for i in range(sublayers))
    policy = 0
    if sublayers > 1:
        policy = linear(width, policy_width, True) + linear(policy_width, 3, True)
        policy += 3 + width + linear(width, 1, True)
    mlp = norm(width, "layernorm", bias) + linear(width, 1, True)
    mlp += linear(width, 4 * width, bias) + linear(4 * width, width, bias)
    return members * (nodes + policy + mlp)


def no_parameters(**_: Any) -> int:
    """Components that hold no parameters (fused attention, windows, RoPE's fixed tables)."""
    return 0


def learned_frequencies(*, head_width: int, learned: bool = True, **_: Any) -> int:
    """`runtime.attention.rotary.LearnedFrequencyRotary` and `GivensRotary` (named layouts):
    one rate per plane of two coordinates, learned or fixed."""
    return head_width // 2 if learned else 0


def quaternion(*, head_width: int, axes: str = "learned", learned: bool = True, **_: Any) -> int:
    """`runtime.attention.rotary.QuaternionRotary`: a rate and an axis per triple."""
    planes = head_width // 3
    return (planes if learned else 0) + (3 * planes if axes == "learned" else 0)


def residual_mlp(inputs: int, hidden: int, outputs: int, depth: int) -> int:
    """`runtime.companion._ResidualMLP`."""
    return (
        linear(inputs, hidden, True)
        + depth * 2 * linear(hidden, hidden, True)
        + linear(hidden, outputs, True)
    )


def companion(c: Any) -> int:
    """`runtime.companion.GeoCompanion`: encoder, lens (when trained), the spectral-alpha layers
    (a layernorm, qkv, output and an alpha per mode each), decoder."""
    encoder = residual_mlp(c.input_width, c.hidden, c.rows * c.sphere_dim, c.depth)
    lens = c.sphere_dim * c.lens_dim if c.lens_trainable else 0
    d = c.lens_dim
    layer = 2 * d + linear(d, 3 * d, True) + linear(d, d, True) + d
    decoder = residual_mlp(c.rows * c.lens_dim, c.hidden, c.input_width, c.depth)
    return encoder + lens + c.layers * layer + decoder


# a mixer that owns the norm and residual around it (the module's own `takes_stream`): the block
# builds no norm before it
myelinated.takes_stream = True  # type: ignore[attr-defined]
