"""Rotary position encodings of design 003 (docs/designs.md), repaired and made relative.

Three encodings behind one interface, so the compiler can pick one by name (`ROTARY_KINDS`):

    Kind(head_width, context, theta=10000.0, scales=(1.0,), **options)
    forward(x)  # x: (members * batch, heads, tokens, head_width) -> same shape and dtype

* `LearnedFrequencyRotary` ("learned_rope"): RoPE (Su et al. 2021, RoFormer) in the half-split
  layout of `transformer.RotaryEmbedding`, with the inverse frequencies a parameter initialised to
  RoPE's `theta ** (-2i / d)` (the original's `learned_freq=True`).
* `GivensRotary` ("givens"): RoPE generalised to any set of disjoint coordinate pairs (Givens
  rotations): pair k turns by `position * inv_freq[k]`.
* `QuaternionRotary` ("quaternion"): the head as consecutive 3-D triples, triple c rotated about a
  unit axis `u_c` by `position * inv_freq[c]` (the rotation of the unit quaternion
  `(cos a/2, sin a/2 u_c)`).

Why these are position encodings at all: each module applies one orthogonal map `R(p)` per position
p (and member), and every `R(p) = exp(p A)` for one fixed skew-symmetric generator `A` (a block of
planar or axis rotations with constant speeds). The same map turns queries and keys, so
`(R(i) q) . (R(j) k) = q . R(j - i) k`: attention scores depend on the offset `i - j` only, and
norms are preserved (the property RoPE is built on).

`scales[m]` multiplies every angle of member m, exactly as in `transformer.RotaryEmbedding`: a gear
turning `s` times as fast rotates its heads `s` times as fast. A single scale is
broadcast over every leading row.

Bugs of the original fixed here:

* Its Givens rotations used one fixed angle per pair at every position. Queries and keys then get
  the same rotation, which cancels in `q . k`: the "encoding" encoded nothing. Here the angle grows
  with the position. It also built a full `d x d` matrix per pair and applied the pairs one after
  another (d/2 matmuls of a d x d matrix); the pairs are disjoint, so all of them are applied at
  once here with one gather, elementwise `cos`/`sin` arithmetic and one inverse gather.
* Its `q_rotation` computed `x + 2 (w (u x x) + u x (u x x))` with the unit axis `u` where the
  quaternion's vector part `v = sin(a/2) u` belongs (the rotation is `x + 2 w (v x x) +
  2 v x (v x x)`, `w = cos(a/2)`); that is not a rotation: at angle 0 it maps a vector x orthogonal
  to `u` to `-x + 2 u x x`, sqrt(5) times longer. It then clamped the update to +-10, which breaks
  norms, and `rotation_matrix` averaged a Givens matrix with the quaternion result,
  which is no longer orthogonal. Here the rotation is the exact quaternion/Rodrigues matrix
  `cos a I + sin a [u]x + 2 sin^2(a/2) u u^T` (`2 sin^2(a/2)` rather than `1 - cos a`: no
  cancellation at small angles), with nothing clamped or averaged.
* Its frequencies were `arange(num_freqs) * 2 pi / theta` (the first one zero); here they start
  from RoPE's geometric spectrum.

Left out on purpose: the original's project-to-3-D-and-back mode (a `d -> 3` projection, a rotation and
a pseudo-inverse back, blended 0.9/0.1 with the input) is not norm-preserving and not relative, so it
is not a rotary encoding; its learned "direction" `sigmoid(p) * 2 - 1` and `rot_count` are subsumed
by learned (signed) frequencies and explicit `pairs`.

Precision: angle tables (`members x tokens x pairs`, tiny) are computed in float64 on CPU and CUDA,
like `RotaryEmbedding`'s precomputed tables, and only their cos/sin are rounded to float32. Float32
products `position * inv_freq` err by half an ulp of the angle, about 1e-5 at position 128 and 5e-4
rad at 8192, so a learned-frequency RoPE at init would not equal RoPE. The rotation itself runs in
float32 for half-precision inputs and the result is cast back to the input's dtype. Keep the
parameters in float32 (autocast does); `model.to(torch.bfloat16)` would round `inv_freq` to 8 bits
and ruin long-range phases, as it would `RotaryEmbedding`'s tables.

On the meta device (`with torch.device("meta")`, used by the compiler to count parameters) nothing
is computed; `reset_parameters()` fills every tensor after `to_empty`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _meta() -> bool:
    return torch.empty(0).is_meta


def _angle_dtype(device: torch.device) -> torch.dtype:
    """float64 for the angle tables where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _geometric_frequencies(count: int, theta: float) -> Tensor:
    """RoPE's inverse frequencies `theta ** (-k / count)`, k < count (float64; with `count = d/2`
    these are bit for bit `RotaryEmbedding`'s `1 / theta ** (arange(0, d, 2) / d)`)."""
    return 1.0 / theta ** (torch.arange(count, dtype=torch.float64) / count)


def _rotate_pairs(x1: Tensor, x2: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Turn each plane `(x1[k], x2[k])` by the angle whose cosine and sine are given; `[x1', x2']`."""
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class _Rotary(nn.Module, ABC):
    """The common part: validation, per-member scales, angle tables and the member reshape.

    Subclasses register `inv_freq` (one angular speed per rotation plane or axis, radians per
    position) and implement `_rotate(shaped, angles)`, where `shaped` is `x` as
    `(members, batch, heads, tokens, head_width)` in the compute dtype and `angles` is
    `(members, 1, 1, tokens, planes)` in the angle dtype.
    """

    inv_freq: Tensor
    scales: Tensor

    def __init__(
        self, head_width: int, context: int, theta: float, scales: Sequence[float], planes: int
    ):
        super().__init__()
        name = type(self).__name__
        if int(context) < 1:
            raise ValueError(f"{name}: context must be at least 1, got {context}")
        if not (math.isfinite(theta) and theta > 0):
            raise ValueError(f"{name}: theta must be a positive number, got {theta}")
        scales = tuple(float(s) for s in scales)
        if not scales or not all(math.isfinite(s) for s in scales):
            raise ValueError(f"{name}: scales must be one or more finite numbers, got {scales}")
        self.head_width, self.context, self.theta = int(head_width), int(context), float(theta)
        self.members, self.scale_values, self.planes = len(scales), scales, planes
        self.register_buffer(
            "scales", torch.empty(len(scales), dtype=torch.float64), persistent=False
        )

    def _register(self, name: str, shape: tuple[int, ...], learned: bool) -> None:
        """A float32 tensor that is a parameter when learned and a (saved) buffer when not, so a
        checkpoint has the same keys either way."""
        tensor = torch.empty(shape)
        if learned:
            self.register_parameter(name, nn.Parameter(tensor))
        else:
            self.register_buffer(name, tensor)

    def reset_parameters(self) -> None:
        """Set every tensor to its initial value (after construction on the meta device and
        `to_empty`; construction elsewhere calls this)."""
        with torch.no_grad():
            self.scales.copy_(torch.tensor(self.scale_values, dtype=torch.float64))
            self.inv_freq.copy_(_geometric_frequencies(self.planes, self.theta))

    def angles(self, tokens: int, device: torch.device) -> Tensor:
        """`(members, tokens, planes)` angles `scales[m] * position * inv_freq[k]` (float64 where
        the device has it), differentiable in `inv_freq`."""
        dtype = _angle_dtype(device)
        positions = torch.arange(tokens, device=device, dtype=dtype)
        speeds = self.inv_freq.to(dtype)
        return self.scales.to(dtype)[:, None, None] * (positions[:, None] * speeds[None, :])

    def forward(self, x: Tensor) -> Tensor:
        """Rotate `x` shaped `(members * batch, heads, tokens, head_width)`; same shape and dtype."""
        name = type(self).__name__
        if x.ndim < 3 or x.shape[-1] != self.head_width:
            raise ValueError(
                f"{name}: expected (members * batch, heads, tokens, {self.head_width}), "
                f"got {tuple(x.shape)}"
            )
        tokens = x.shape[-2]
        if tokens > self.context:
            raise ValueError(f"{name}: {tokens} tokens exceed the context of {self.context}")
        if x.shape[0] % self.members:
            raise ValueError(
                f"{name}: leading size {x.shape[0]} is not a multiple of {self.members} members"
            )
        compute = torch.promote_types(x.dtype, torch.float32)
        shaped = x.reshape(self.members, -1, *x.shape[1:]).to(compute)
        angles = self.angles(tokens, x.device)
        angles = angles.reshape(self.members, *([1] * (x.ndim - 2)), tokens, self.planes)
        return self._rotate(shaped, angles, compute).to(x.dtype).reshape(x.shape)

    @abstractmethod
    def _rotate(self, shaped: Tensor, angles: Tensor, compute: torch.dtype) -> Tensor:
        """`shaped` turned by `angles` (see the class docstring), in dtype `compute`."""

    def extra_repr(self) -> str:
        return (
            f"head_width={self.head_width}, context={self.context}, theta={self.theta}, "
            f"scales={self.scale_values}"
        )


def _even_width(name: str, head_width: int, what: str) -> None:
    if head_width < 2 or head_width % 2:
        raise ValueError(
            f"{name}: {what} rotates coordinate pairs and needs an even head_width, got {head_width}"
        )


class LearnedFrequencyRotary(_Rotary):
    """RoPE in the half-split layout (dims `i` and `i + d/2` form plane i, as in
    `transformer.RotaryEmbedding`) with learned inverse frequencies `inv_freq` of shape `(d/2,)`,
    initialised to RoPE's, so at init it equals `RotaryEmbedding` (to float32 rounding).

    Options: `learned` (default True): `inv_freq` is a parameter; False keeps it a buffer (plain
    RoPE with angles computed on the fly).
    """

    def __init__(
        self,
        head_width: int,
        context: int,
        theta: float = 10000.0,
        scales: Sequence[float] = (1.0,),
        learned: bool = True,
    ):
        _even_width(type(self).__name__, head_width, "RoPE")
        super().__init__(head_width, context, theta, scales, head_width // 2)
        self.learned = bool(learned)
        self._register("inv_freq", (self.planes,), self.learned)
        if not _meta():
            self.reset_parameters()

    def _rotate(self, shaped: Tensor, angles: Tensor, compute: torch.dtype) -> Tensor:
        x1, x2 = shaped.chunk(2, dim=-1)
        return _rotate_pairs(x1, x2, angles.cos().to(compute), angles.sin().to(compute))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, learned={self.learned}"


def _resolve_pairs(
    name: str, head_width: int, pairs: str | Sequence[Sequence[int]]
) -> list[tuple[int, int]]:
    """The planes `(i, j)` of a layout name or an explicit list, checked disjoint and in range."""
    if isinstance(pairs, str):
        if pairs not in ("adjacent", "halves"):
            raise ValueError(
                f"{name}: pairs must be 'adjacent', 'halves' or a list of (i, j) pairs, "
                f"got {pairs!r}"
            )
        _even_width(name, head_width, f"pairs={pairs!r}")
        half = head_width // 2
        if pairs == "adjacent":
            return [(2 * k, 2 * k + 1) for k in range(half)]
        return [(k, k + half) for k in range(half)]
    resolved = [tuple(int(i) for i in pair) for pair in pairs]
    if not resolved or any(len(pair) != 2 for pair in resolved):
        raise ValueError(f"{name}: pairs must be one or more (i, j) pairs, got {pairs!r}")
    used = [i for pair in resolved for i in pair]
    if any(not 0 <= i < head_width for i in used):
        raise ValueError(f"{name}: pair indices must lie in [0, {head_width}), got {pairs!r}")
    if len(set(used)) != len(used):
        raise ValueError(f"{name}: pairs must be disjoint (no index twice), got {pairs!r}")
    return [(pair[0], pair[1]) for pair in resolved]


class GivensRotary(_Rotary):
    """Givens rotations in disjoint coordinate pairs, pair k = `(i_k, j_k)` turning by
    `position * inv_freq[k]` (`inv_freq` of shape `(pairs,)`, initialised to RoPE's spectrum in the
    order the pairs are listed). The original's Givens rotary, made position-dependent and vectorised.

    Options:
      `pairs` (default "adjacent"): "adjacent" = (0, 1), (2, 3), ... (the original's pairs and the
        RoFormer/GPT-J interleaved layout); "halves" = (i, i + d/2) (the GPT-NeoX/LLaMA layout, equal
        to `RotaryEmbedding` at init); or an explicit sequence of disjoint `(i, j)` pairs, in which
        case dims in no pair pass through unchanged and any head_width works.
      `learned` (default True): `inv_freq` is a parameter; False keeps it a buffer.

    All pairs are applied at once: one gather puts the first coordinates of the pairs, then the
    second ones, then the untouched rest side by side; the planes turn elementwise and an inverse
    gather restores the order (both gathers are skipped when the layout is already "halves").
    """

    def __init__(
        self,
        head_width: int,
        context: int,
        theta: float = 10000.0,
        scales: Sequence[float] = (1.0,),
        pairs: str | Sequence[Sequence[int]] = "adjacent",
        learned: bool = True,
    ):
        resolved = _resolve_pairs(type(self).__name__, head_width, pairs)
        super().__init__(head_width, context, theta, scales, len(resolved))
        self.pairs, self.learned = tuple(resolved), bool(learned)
        self.layout = pairs if isinstance(pairs, str) else "explicit"
        used = {i for pair in resolved for i in pair}
        order = [i for i, _ in resolved] + [j for _, j in resolved]
        order += [i for i in range(head_width) if i not in used]
        inverse = [0] * head_width
        for position, index in enumerate(order):
            inverse[index] = position
        self.identity = order == list(range(head_width))
        self.order_values, self.inverse_values = tuple(order), tuple(inverse)
        self.register_buffer("order", torch.empty(head_width, dtype=torch.long), persistent=False)
        self.register_buffer("inverse", torch.empty(head_width, dtype=torch.long), persistent=False)
        self._register("inv_freq", (self.planes,), self.learned)
        if not _meta():
            self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.order.copy_(torch.tensor(self.order_values, dtype=torch.long))
            self.inverse.copy_(torch.tensor(self.inverse_values, dtype=torch.long))

    def _rotate(self, shaped: Tensor, angles: Tensor, compute: torch.dtype) -> Tensor:
        k = self.planes
        gathered = shaped if self.identity else shaped.index_select(-1, self.order)
        x1, x2, rest = gathered.split((k, k, self.head_width - 2 * k), dim=-1)
        turned = _rotate_pairs(x1, x2, angles.cos().to(compute), angles.sin().to(compute))
        out = torch.cat((turned, rest), dim=-1) if rest.shape[-1] else turned
        return out if self.identity else out.index_select(-1, self.inverse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pairs={self.layout!r}, learned={self.learned}"


def spread_axes(count: int) -> Tensor:
    """`(count, 3)` unit vectors spread evenly over the sphere (the golden-angle spiral: heights
    equally spaced in (-1, 1), longitudes advancing by the golden angle), deterministic, float64."""
    k = torch.arange(count, dtype=torch.float64)
    z = 1.0 - (2.0 * k + 1.0) / count
    radius = (1.0 - z * z).clamp_min(0.0).sqrt()
    longitude = k * (math.pi * (3.0 - math.sqrt(5.0)))
    return torch.stack((radius * longitude.cos(), radius * longitude.sin(), z), dim=-1)


def rotation_matrices(axes: Tensor, angles: Tensor) -> Tensor:
    """`(..., C, 3, 3)` rotations by `angles` `(..., C)` about `axes` `(C, 3)` (normalised here):
    the matrix of `x -> q x q*` for the unit quaternion `q = (cos a/2, sin a/2 u)`, i.e. Rodrigues'
    `cos a I + sin a [u]x + 2 sin^2(a/2) u u^T`."""
    u = F.normalize(axes.to(angles.dtype), dim=-1)
    ux, uy, uz = u.unbind(-1)
    zero = torch.zeros_like(ux)
    cross = torch.stack(
        (
            torch.stack((zero, -uz, uy), dim=-1),
            torch.stack((uz, zero, -ux), dim=-1),
            torch.stack((-uy, ux, zero), dim=-1),
        ),
        dim=-2,
    )  # [u]x, so that [u]x v = u x v
    outer = u[:, :, None] * u[:, None, :]
    eye = torch.eye(3, dtype=angles.dtype, device=angles.device)
    a = angles[..., None, None]
    return a.cos() * eye + a.sin() * cross + 2.0 * (a / 2).sin().square() * outer


class QuaternionRotary(_Rotary):
    """3-D rotations of consecutive triples: dims `3c, 3c+1, 3c+2` (c < head_width // 3) turn about
    the unit axis `u_c` by `position * inv_freq[c]`; the last `head_width % 3` dims pass through.

    Parameters: `inv_freq` `(C,)`, initialised to RoPE's geometric spectrum `theta ** (-c / C)`;
    `axes` `(C, 3)`, normalised in the forward pass (so only their directions matter), initialised
    to evenly spread directions (`spread_axes`) so different triples turn in different planes.

    Options: `axes` (default "learned"): "learned" makes the axes parameters, "fixed" keeps them
    buffers; `learned` (default True): `inv_freq` is a parameter, False keeps it a buffer.

    The rotations are built once per (member, position, triple) as 3 x 3 matrices (a table like
    RoPE's cos/sin, 9 numbers a plane instead of 2) and applied as three broadcast multiply-adds.
    """

    def __init__(
        self,
        head_width: int,
        context: int,
        theta: float = 10000.0,
        scales: Sequence[float] = (1.0,),
        axes: str = "learned",
        learned: bool = True,
    ):
        name = type(self).__name__
        if head_width < 3:
            raise ValueError(
                f"{name}: rotates 3-D triples and needs head_width >= 3, got {head_width}"
            )
        if axes not in ("learned", "fixed"):
            raise ValueError(f"{name}: axes must be 'learned' or 'fixed', got {axes!r}")
        super().__init__(head_width, context, theta, scales, head_width // 3)
        self.axes_mode, self.learned = axes, bool(learned)
        self._register("inv_freq", (self.planes,), self.learned)
        self._register("axes", (self.planes, 3), axes == "learned")
        if not _meta():
            self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.axes.copy_(spread_axes(self.planes))

    def _rotate(self, shaped: Tensor, angles: Tensor, compute: torch.dtype) -> Tensor:
        width = 3 * self.planes
        triples = shaped[..., :width].unflatten(-1, (self.planes, 3))  # (..., tokens, C, 3)
        matrices = rotation_matrices(self.axes, angles).to(compute)  # (..., tokens, C, 3, 3)
        turned = (
            matrices[..., 0] * triples[..., 0:1]
            + matrices[..., 1] * triples[..., 1:2]
            + matrices[..., 2] * triples[..., 2:3]
        ).flatten(-2)
        if width == self.head_width:
            return turned
        return torch.cat((turned, shaped[..., width:]), dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axes={self.axes_mode!r}, learned={self.learned}"


ROTARY_KINDS: dict[str, type[_Rotary]] = {
    "learned_rope": LearnedFrequencyRotary,
    "givens": GivensRotary,
    "quaternion": QuaternionRotary,
}
"""Rotary encodings by the name a spec gives; the compiler's plain "rope" stays
`transformer.RotaryEmbedding` (precomputed tables, nothing learned)."""
