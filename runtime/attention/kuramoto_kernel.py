"""The lattice layer's Kuramoto chain and phase pairs as one Triton kernel forward and two backward
(issue 23), wrapped as the operator `epicycle::lattice_phase_pairs`.

Why. The chain (`kuramoto_phases`) and the phase features (`phase_features`) are a few hundred
numbers per member, yet eagerly they are ~100 tiny kernels forward and backward (~27 once
inductor has fused them), so the layer waits on the host, not on the GPU. Here they are one
launch forward and two backward. The operator is a `triton_op` (`_operator` says why), so a
compiled model launches the same three kernels from inductor's own code; its backward is an
operator too.

Forward, per member `m` (`H` lattice cells, one per head):

    W[h, n] = exp(-distance[h, n] / exp(log_range)) * neighbour[h, n],  deg[h] = max(|N(h)|, 1)
    theta_0 = initial_phase;  theta_{s+1} = theta_s + dt * (omega + K * pull(theta_s))
    pull_h(theta) = sum_n W[h, n] sin(theta_n - theta_h) / deg[h]
    pairs[i, h] = A_h (cos, sin)(theta_S,h + nu_h i),  pairs[i, H + h] = (cos, sin)(nu_h i)

with `nu = token_frequency * omega`, `A = strength * sqrt(head_width)`. One program per (member,
block of tokens) recomputes the chain (`S * H^2` work, far below one pairs block's memory time)
and writes its block. The gaps' sines `sin(theta_n - theta_h)` are taken directly, `H^2` of them
a step, as the reference takes them (`_gaps` says why not `s_n c_h - c_n s_h`).

Backward. With `g`, `k` the upstream gradients of the query and key pairs, `a = theta_S + nu i`:

    dA_h      = sum_i g0 cos a + g1 sin a
    dtheta_S  = sum_i A_h (g1 cos a - g0 sin a)                  (+ theta's own gradient)
    dnu_h     = sum_i i * A_h (g1 cos a - g0 sin a) + sum_i i * (k1 cos nu i - k0 sin nu i)

are reduced over token blocks by kernel (a) into a `(members, blocks, 3, H)` buffer; kernel (b),
one program per member, sums them and runs the chain's adjoint from `lambda_S = dtheta_S` back to
`lambda_0 = d initial_phase` over the stored phases `theta_s` (a runtime loop: code size does not
grow with `substeps`). With `b = lambda_{s+1} / deg` and `C[h, n] = W[h, n] cos(theta_n - theta_h)`:

    lambda_s = lambda_{s+1} + dt K (C^T b - b * C 1)             (the Jacobian of pull, transposed)
    domega  += dt lambda_{s+1},   dK += dt <lambda_{s+1}, pull(theta_s)>
    dlog_range += dt K sum_hn b_h sin(theta_n - theta_h) W[h, n] distance[h, n] / exp(log_range)

(the last is `sum dW * dW/dlog_range`, never building `dW`), and finally `d strength = sqrt(width)
dA`, `d omega += token_frequency dnu`. Everything is computed in float32 whatever the inputs'
dtype; the angles `theta + nu i` are formed in float64 and wrapped to [-pi, pi] before they
become float32 (as `kuramoto.phase_angles` forms them).

On the CPU, and on a GPU without Triton, the op runs the reference ops of `kuramoto.py` in float32
(its backward is their vector-Jacobian product, `torch.func.vjp`). With `TRITON_INTERPRET=1` the kernels run through
Triton's interpreter on CPU tensors too, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor
from torch.library import wrap_triton

from runtime.attention.kuramoto import kuramoto_phases, phase_features

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: the op runs the reference ops
    triton = None

MAX_CELLS = 256
"""The most lattice cells (heads) the kernels take: the coupling matrix is one `(H, H)` tile of
registers (`H` rounded up to a power of two; up to 64 cells without spilling on sm_90, 128 and 256
spill to local memory). Above it the op raises `ValueError` on the kernel path, the fake
implementation too (so also while `torch.compile` traces): the caller falls back to the reference
ops."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    # `tl.sin` and `tl.cos` lower to the GPU's approximate instructions, whose error grows with
    # the angle (`nu * i` reaches hundreds of radians): libdevice's are the reference's to an ulp.
    # Triton's interpreter runs `tl`'s (numpy's, exact) and not libdevice's.
    if _interpreting():

        @triton.jit
        def _sin(x):
            return tl.sin(x)

        @triton.jit
        def _cos(x):
            return tl.cos(x)

    else:

        @triton.jit
        def _sin(x):
            return libdevice.sin(x)

        @triton.jit
        def _cos(x):
            return libdevice.cos(x)


def available(tensor: Tensor) -> bool:
    """Whether `lattice_phase_pairs` runs the Triton kernels for `tensor`'s device: a CUDA tensor
    with Triton importable (or any tensor under Triton's interpreter, `TRITON_INTERPRET=1`)."""
    return triton is not None and (tensor.is_cuda or _interpreting())


def _check_cells(cells: int) -> None:
    if cells > MAX_CELLS:
        raise ValueError(
            f"the fused Kuramoto kernel takes at most {MAX_CELLS} lattice cells, got {cells}: "
            "use the reference ops (`slot_terms`) for larger lattices"
        )


# --------------------------------------------------------------------------------------------
# Reference (CPU, or no Triton): kuramoto.py's ops in float32.


def _reference(phase, omega, coupling, log_range, strength, distance, neighbour, sizes):
    dt, substeps, token_frequency, tokens, head_width = sizes
    phase, omega, coupling, log_range, strength, distance = (
        t.float() for t in (phase, omega, coupling, log_range, strength, distance)
    )
    theta = kuramoto_phases(phase, omega, coupling, log_range, distance, neighbour, dt, substeps)
    query, key = phase_features(theta, omega, strength, token_frequency, tokens, head_width)
    return torch.cat((query, key), 1).transpose(1, 2), theta


def _reference_backward(grad_pairs, grad_theta, tensors, sizes):
    """The reference's vector-Jacobian product (`torch.func.vjp`: a custom op's implementation runs
    below autograd, where `torch.autograd.grad` records nothing)."""
    parameters = [t.float() for t in tensors[:5]]
    grad_theta = torch.zeros_like(parameters[0]) if grad_theta is None else grad_theta.float()
    _, vjp = torch.func.vjp(lambda *p: _reference(*p, *tensors[5:], sizes), *parameters)
    grads = vjp((grad_pairs.float(), grad_theta))
    return tuple(g.to(t.dtype) for g, t in zip(grads, tensors[:5], strict=True))


@torch.library.custom_op("epicycle::lattice_phase_pairs_reference", mutates_args=())
def reference_phase_pairs(
    initial_phase: Tensor,
    omega: Tensor,
    coupling: Tensor,
    log_range: Tensor,
    strength: Tensor,
    distance: Tensor,
    neighbour: Tensor,
    dt: float,
    substeps: int,
    token_frequency: float,
    tokens: int,
    head_width: int,
) -> tuple[Tensor, Tensor]:
    """`lattice_phase_pairs` where the kernels cannot run. An opaque op of its own, so that
    tracing `lattice_phase_pairs` (a `triton_op` is traced into) never traces its backward's
    `torch.func.vjp`, which fake tensors do not take."""
    tensors = (initial_phase, omega, coupling, log_range, strength, distance, neighbour)
    pairs, theta = _reference(*tensors, (dt, substeps, token_frequency, tokens, head_width))
    dtype = initial_phase.dtype
    return pairs.to(dtype, memory_format=torch.contiguous_format, copy=True), theta.to(
        dtype, copy=True
    )


@torch.library.custom_op("epicycle::lattice_phase_pairs_reference_backward", mutates_args=())
def reference_phase_pairs_backward(
    grad_pairs: Tensor,
    grad_theta: Tensor | None,
    initial_phase: Tensor,
    omega: Tensor,
    coupling: Tensor,
    log_range: Tensor,
    strength: Tensor,
    distance: Tensor,
    neighbour: Tensor,
    dt: float,
    substeps: int,
    token_frequency: float,
    tokens: int,
    head_width: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`lattice_phase_pairs_backward` where the kernels cannot run."""
    tensors = (initial_phase, omega, coupling, log_range, strength, distance, neighbour)
    sizes = (dt, substeps, token_frequency, tokens, head_width)
    return _reference_backward(grad_pairs, grad_theta, tensors, sizes)


# --------------------------------------------------------------------------------------------
# Triton kernels.

if triton is not None:

    @triton.jit
    def _cells(H, BH: tl.constexpr):
        """The `(BH,)` cell indices and mask of one member, and the `(BH, BH)` offsets and mask
        of its `H x H` cell pairs.

        No helper takes a pointer: every load and store is in a kernel's own body. Inductor,
        launching the kernels inside a compiled model, reads which arguments they write from
        their Triton IR, and takes any pointer passed into a called function as written; it
        then cloned six inputs and copied them back into the parameters every backward."""
        heads = tl.arange(0, BH)
        inside = heads < H
        tile = heads[:, None] * H + heads[None, :]
        return heads, inside, tile, inside[:, None] & inside[None, :]

    @triton.jit
    def _coupling(distance, near, log_range):
        """`W` and `deg` of one member from its `(BH, BH)` distance and neighbour tiles."""
        near = near.to(tl.float32)
        weights = tl.exp(-distance / tl.exp(log_range)) * near
        degree = tl.maximum(tl.sum(near, 1), 1.0)
        return weights, degree

    @triton.jit
    def _gaps(theta):
        """`theta_n - theta_h` as an `(h, n)` tile. Its sines and cosines are taken directly: the
        product form `s_n c_h - c_n s_h` (H sines instead of H^2) loses the relative precision of
        small gaps, which a nearly synchronised lattice is made of, and the coupling's and the
        range's gradients (sums over those gaps) came out 5e-5 off."""
        return theta[None, :] - theta[:, None]

    @triton.jit
    def _step(theta, omega, coupling, weights, degree, dt):
        """One explicit Euler step of Kuramoto's equation."""
        pull = tl.sum(weights * _sin(_gaps(theta)), 1) / degree
        return theta + dt * (omega + coupling * pull)

    @triton.jit
    def _final_phase(theta, omega, coupling, weights, degree, substeps, dt):
        for _substep in range(substeps):
            theta = _step(theta, omega, coupling, weights, degree, dt)
        return theta

    @triton.jit
    def _angles(theta, nu, index):
        """`(theta + nu i, nu i)` per (token, head), formed in float64 and wrapped to [-pi, pi]
        before they are rounded to float32, as `kuramoto.phase_angles` forms them."""
        position = index.to(tl.float64)
        key = nu.to(tl.float64)[None, :] * position[:, None]
        query = theta.to(tl.float64)[None, :] + key
        return _wrapped(query), _wrapped(key)

    @triton.jit
    def _wrapped(angle):
        # 2 pi as a float32 head and tail: Triton rounds a float literal to float32
        turns = tl.floor(angle * 0.15915494309189535 + 0.5)
        return (angle - turns * 6.2831854820251465 - turns * -1.7484555314695172e-07).to(tl.float32)

    @triton.jit
    def _float32(dt, token_frequency, sqrt_width):
        """The float arguments as float32: Triton's launcher passes a Python float as one, but
        inductor, launching the kernels of a `triton_op` from its own code, passes float64,
        which would turn the chain's loop-carried phases into float64."""
        return (
            tl.full((), dt, tl.float32),
            tl.full((), token_frequency, tl.float32),
            tl.full((), sqrt_width, tl.float32),
        )

    @triton.jit
    def _forward_kernel(
        phase_ptr, omega_ptr, coupling_ptr, log_range_ptr, strength_ptr, distance_ptr,
        neighbour_ptr, pairs_ptr, theta_ptr, H, tokens, substeps, dt, token_frequency,
        sqrt_width, BH: tl.constexpr, BT: tl.constexpr,
    ):  # fmt: skip
        m = tl.program_id(0)
        dt, token_frequency, sqrt_width = _float32(dt, token_frequency, sqrt_width)
        block = tl.program_id(1)
        heads, inside, tile, inside_tile = _cells(H, BH)
        theta = tl.load(phase_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        omega = tl.load(omega_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        coupling = tl.load(coupling_ptr + m).to(tl.float32)
        log_range = tl.load(log_range_ptr + m).to(tl.float32)
        distance = tl.load(distance_ptr + tile, mask=inside_tile, other=0).to(tl.float32)
        near = tl.load(neighbour_ptr + tile, mask=inside_tile, other=0)
        weights, degree = _coupling(distance, near, log_range)
        theta = _final_phase(theta, omega, coupling, weights, degree, substeps, dt)
        tl.store(theta_ptr + m * H + heads, theta, mask=inside & (block == 0))
        strength = tl.load(strength_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        amplitude = strength * sqrt_width
        nu = token_frequency * omega
        index = block * BT + tl.arange(0, BT)
        query_angle, key_angle = _angles(theta, nu, index)
        # pairs[m, i, slot, c] at ((m * tokens + i) * 2H + slot) * 2 + c
        row = (m.to(tl.int64) * tokens + index) * (4 * H)
        where = row[:, None] + 2 * heads[None, :]
        mask = (index < tokens)[:, None] & inside[None, :]
        out = pairs_ptr.dtype.element_ty
        tl.store(pairs_ptr + where, (_cos(query_angle) * amplitude[None, :]).to(out), mask=mask)
        tl.store(pairs_ptr + where + 1, (_sin(query_angle) * amplitude[None, :]).to(out), mask)
        tl.store(pairs_ptr + where + 2 * H, _cos(key_angle).to(out), mask=mask)
        tl.store(pairs_ptr + where + 2 * H + 1, _sin(key_angle).to(out), mask=mask)

    @triton.jit
    def _partials_kernel(
        grad_ptr, phase_ptr, omega_ptr, coupling_ptr, log_range_ptr, strength_ptr, distance_ptr,
        neighbour_ptr, partials_ptr, H, tokens, substeps, dt, token_frequency, sqrt_width,
        BH: tl.constexpr, BT: tl.constexpr,
    ):  # fmt: skip
        m = tl.program_id(0)
        dt, token_frequency, sqrt_width = _float32(dt, token_frequency, sqrt_width)
        block = tl.program_id(1)
        heads, inside, tile, inside_tile = _cells(H, BH)
        theta = tl.load(phase_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        omega = tl.load(omega_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        coupling = tl.load(coupling_ptr + m).to(tl.float32)
        log_range = tl.load(log_range_ptr + m).to(tl.float32)
        distance = tl.load(distance_ptr + tile, mask=inside_tile, other=0).to(tl.float32)
        near = tl.load(neighbour_ptr + tile, mask=inside_tile, other=0)
        weights, degree = _coupling(distance, near, log_range)
        theta = _final_phase(theta, omega, coupling, weights, degree, substeps, dt)
        strength = tl.load(strength_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        amplitude = strength * sqrt_width
        nu = token_frequency * omega
        index = block * BT + tl.arange(0, BT)
        position = index.to(tl.float32)
        query_angle, key_angle = _angles(theta, nu, index)
        row = (m.to(tl.int64) * tokens + index) * (4 * H)
        where = row[:, None] + 2 * heads[None, :]
        mask = (index < tokens)[:, None] & inside[None, :]
        q0 = tl.load(grad_ptr + where, mask=mask, other=0).to(tl.float32)
        q1 = tl.load(grad_ptr + where + 1, mask=mask, other=0).to(tl.float32)
        k0 = tl.load(grad_ptr + where + 2 * H, mask=mask, other=0).to(tl.float32)
        k1 = tl.load(grad_ptr + where + 2 * H + 1, mask=mask, other=0).to(tl.float32)
        query_cos = _cos(query_angle)
        query_sin = _sin(query_angle)
        d_amplitude = tl.sum(q0 * query_cos + q1 * query_sin, 0)
        d_query_angle = amplitude[None, :] * (q1 * query_cos - q0 * query_sin)
        d_key_angle = k1 * _cos(key_angle) - k0 * _sin(key_angle)
        d_theta = tl.sum(d_query_angle, 0)
        d_nu = tl.sum((d_query_angle + d_key_angle) * position[:, None], 0)
        base = partials_ptr + (m * tl.num_programs(1) + block) * (3 * BH) + heads
        tl.store(base, d_amplitude)
        tl.store(base + BH, d_theta)
        tl.store(base + 2 * BH, d_nu)

    @triton.jit
    def _adjoint_kernel(
        partials_ptr, grad_theta_ptr, phase_ptr, omega_ptr, coupling_ptr, log_range_ptr,
        distance_ptr, neighbour_ptr, history_ptr, d_phase_ptr, d_omega_ptr, d_coupling_ptr,
        d_log_range_ptr, d_strength_ptr, H, blocks, substeps, dt, token_frequency, sqrt_width,
        BH: tl.constexpr, HAS_GRAD_THETA: tl.constexpr,
    ):  # fmt: skip
        m = tl.program_id(0)
        dt, token_frequency, sqrt_width = _float32(dt, token_frequency, sqrt_width)
        heads, inside, tile, inside_tile = _cells(H, BH)
        theta = tl.load(phase_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        omega = tl.load(omega_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)
        coupling = tl.load(coupling_ptr + m).to(tl.float32)
        log_range = tl.load(log_range_ptr + m).to(tl.float32)
        distance = tl.load(distance_ptr + tile, mask=inside_tile, other=0).to(tl.float32)
        near = tl.load(neighbour_ptr + tile, mask=inside_tile, other=0)
        weights, degree = _coupling(distance, near, log_range)
        d_amplitude = tl.zeros((BH,), tl.float32)
        adjoint = tl.zeros((BH,), tl.float32)  # d theta_S, then d theta_s going back
        d_nu = tl.zeros((BH,), tl.float32)
        for block in range(blocks):
            base = partials_ptr + (m * blocks + block) * (3 * BH) + heads
            d_amplitude += tl.load(base)
            adjoint += tl.load(base + BH)
            d_nu += tl.load(base + 2 * BH)
        if HAS_GRAD_THETA:
            adjoint += tl.load(grad_theta_ptr + m * H + heads, mask=inside, other=0).to(tl.float32)

        range_weights = weights * distance / tl.exp(log_range)  # dW/dlog_range
        history = history_ptr + m * (substeps + 1) * BH + heads
        tl.store(history, theta)
        for step in range(substeps):
            theta = _step(theta, omega, coupling, weights, degree, dt)
            tl.store(history + (step + 1) * BH, theta)
        tl.debug_barrier()  # the phases stored above, read back by every thread below

        d_omega = tl.zeros((BH,), tl.float32)
        d_coupling = 0.0
        d_log_range = 0.0
        for back in range(substeps):
            theta = tl.load(history + (substeps - 1 - back) * BH)
            gaps = _gaps(theta)
            sines = _sin(gaps)
            pull = tl.sum(weights * sines, 1) / degree
            d_omega += adjoint
            d_coupling += tl.sum(adjoint * pull, 0)
            per_degree = adjoint / degree
            d_log_range += coupling * tl.sum(per_degree * tl.sum(range_weights * sines, 1), 0)
            # the transposed Jacobian of pull: (C^T b)_n - b_n (C 1)_n, C = W cos(gaps)
            slopes = weights * _cos(gaps)
            transposed = tl.sum(per_degree[:, None] * slopes, 0) - per_degree * tl.sum(slopes, 1)
            adjoint = adjoint + dt * coupling * transposed

        at = m * H + heads
        tl.store(d_phase_ptr + at, adjoint.to(d_phase_ptr.dtype.element_ty), mask=inside)
        d_omega = token_frequency * d_nu + dt * d_omega
        tl.store(d_omega_ptr + at, d_omega.to(d_omega_ptr.dtype.element_ty), mask=inside)
        d_strength = (sqrt_width * d_amplitude).to(d_strength_ptr.dtype.element_ty)
        tl.store(d_strength_ptr + at, d_strength, mask=inside)
        tl.store(d_coupling_ptr + m, (dt * d_coupling).to(d_coupling_ptr.dtype.element_ty))
        tl.store(d_log_range_ptr + m, (dt * d_log_range).to(d_log_range_ptr.dtype.element_ty))


def _blocks(cells: int) -> tuple[int, int, int, int]:
    """`(BH, BT, warps, adjoint_warps)`: cells padded to a power of two, a token block of ~2K pairs
    (at least 32 tokens, so that large lattices do not recompute the chain for every few tokens),
    and warps enough to hold the largest tile at ~8-16 elements a thread: without spilling up to
    64 cells on sm_90 (ptxas' resource usage); 128 and 256 cells spill the `(H, H)` tiles."""
    cells = int(cells)  # a compiled model with dynamic shapes specialises on the lattice's size
    _check_cells(cells)
    cells_block = triton.next_power_of_2(cells)
    tokens_block = min(max(2048 // cells_block, 32), 256)  # no `tokens`: it may be symbolic
    tile = max(tokens_block, cells_block) * cells_block
    warps = min(max(tile // 256, 4), 32)
    adjoint_warps = min(max(cells_block * cells_block // 256, 1), 32)
    return cells_block, tokens_block, warps, adjoint_warps


def _inputs(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.contiguous() for t in tensors)


def kernel_forward(tensors: tuple[Tensor, ...], sizes: tuple) -> tuple[Tensor, Tensor]:
    """The forward kernel's `(pairs, theta)` for the op's seven tensors and five sizes."""
    dt, substeps, token_frequency, tokens, head_width = sizes
    tensors = _inputs(tensors)
    phase = tensors[0]
    members, cells = phase.shape
    cells_block, tokens_block, warps, _ = _blocks(cells)
    pairs = phase.new_empty(members, tokens, 2 * cells, 2)
    theta = phase.new_empty(members, cells)
    grid = (members, triton.cdiv(tokens, tokens_block))
    wrap_triton(_forward_kernel)[grid](
        *tensors, pairs, theta, cells, tokens, substeps, dt, token_frequency,
        math.sqrt(head_width), BH=cells_block, BT=tokens_block, num_warps=warps,
    )  # fmt: skip
    return pairs, theta


def kernel_backward(
    grad_pairs: Tensor, grad_theta: Tensor | None, tensors: tuple[Tensor, ...], sizes: tuple
) -> tuple[Tensor, ...]:
    """The two backward kernels' gradients of `initial_phase, omega, coupling, log_range,
    strength` (each in its own dtype)."""
    dt, substeps, token_frequency, tokens, head_width = sizes
    tensors = _inputs(tensors)
    grad_pairs = grad_pairs.contiguous()
    phase = tensors[0]
    members, cells = phase.shape
    cells_block, tokens_block, warps, adjoint_warps = _blocks(cells)
    blocks = triton.cdiv(tokens, tokens_block)
    f32 = dict(device=phase.device, dtype=torch.float32)
    partials = torch.empty(members, blocks, 3, cells_block, **f32)
    history = torch.empty(members, substeps + 1, cells_block, **f32)
    wrap_triton(_partials_kernel)[(members, blocks)](
        grad_pairs, *tensors[:7], partials, cells, tokens, substeps, dt, token_frequency,
        math.sqrt(head_width), BH=cells_block, BT=tokens_block, num_warps=warps,
    )  # fmt: skip
    grads = tuple(torch.empty_like(t) for t in tensors[:5])
    wrap_triton(_adjoint_kernel)[(members,)](
        partials, grad_theta.contiguous() if grad_theta is not None else partials,
        *tensors[:4], *tensors[5:7], history, *grads, cells, blocks, substeps, dt,
        token_frequency, math.sqrt(head_width), BH=cells_block,
        HAS_GRAD_THETA=grad_theta is not None, num_warps=adjoint_warps,
    )  # fmt: skip
    return grads


# --------------------------------------------------------------------------------------------
# The custom ops.


def _phase_pairs(
    initial_phase: Tensor,
    omega: Tensor,
    coupling: Tensor,
    log_range: Tensor,
    strength: Tensor,
    distance: Tensor,
    neighbour: Tensor,
    dt: float,
    substeps: int,
    token_frequency: float,
    tokens: int,
    head_width: int,
) -> tuple[Tensor, Tensor]:
    """`(pairs, theta)` of `slot_terms`: the phase pairs `(members, tokens, 2 * heads, 2)` (query
    heads, then key heads) and the phases `(members, heads)` after `substeps` Kuramoto updates,
    in `initial_phase`'s dtype, computed in float32."""
    tensors = (initial_phase, omega, coupling, log_range, strength, distance, neighbour)
    sizes = (dt, substeps, token_frequency, tokens, head_width)
    if available(initial_phase):
        return kernel_forward(tensors, sizes)
    return reference_phase_pairs(*tensors, *sizes)


def _phase_pairs_backward(
    grad_pairs: Tensor,
    grad_theta: Tensor | None,
    initial_phase: Tensor,
    omega: Tensor,
    coupling: Tensor,
    log_range: Tensor,
    strength: Tensor,
    distance: Tensor,
    neighbour: Tensor,
    dt: float,
    substeps: int,
    token_frequency: float,
    tokens: int,
    head_width: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `initial_phase, omega, coupling, log_range, strength` (each in its dtype) for
    the upstream gradients of `lattice_phase_pairs`' outputs (`grad_theta` may be None)."""
    tensors = (initial_phase, omega, coupling, log_range, strength, distance, neighbour)
    sizes = (dt, substeps, token_frequency, tokens, head_width)
    if available(initial_phase):
        return kernel_backward(grad_pairs, grad_theta, tensors, sizes)
    return reference_phase_pairs_backward(grad_pairs, grad_theta, *tensors, *sizes)


def _phase_pairs_fake(initial_phase, omega, coupling, log_range, strength, distance, neighbour,
                      dt, substeps, token_frequency, tokens, head_width):  # fmt: skip
    members, cells = initial_phase.shape
    if available(initial_phase):
        _check_cells(cells)
    pairs = initial_phase.new_empty(members, tokens, 2 * cells, 2)
    return pairs, initial_phase.new_empty(members, cells)


def _phase_pairs_backward_fake(grad_pairs, grad_theta, *tensors_and_sizes):
    return tuple(torch.empty_like(t) for t in tensors_and_sizes[:5])


def _operator(name: str, fn, fake):
    """`fn` as the operator `epicycle::name`. With Triton, compiling, it is a `triton_op`:
    eagerly it launches the kernels as a custom op does, but `torch.compile` traces into it, so
    inductor calls the kernels from its own generated code with its own launcher, not through
    the Python dispatch of an opaque op (on the H200 that dispatch cost more host time than the
    fused kernels saved, in a compiled layer at 2k tokens); `fn` is then its own fake
    implementation (on fake tensors the kernels launch nothing, and `_check_cells` refuses large
    lattices while tracing as it does when running). Without Triton, and under Triton's
    interpreter (whose kernels take no fake tensors), it is an opaque custom op with `fake`."""
    if triton is not None and not _interpreting():
        return torch.library.triton_op(f"epicycle::{name}", fn, mutates_args=())
    operator = torch.library.custom_op(f"epicycle::{name}", fn, mutates_args=())
    operator.register_fake(fake)
    return operator


reference_phase_pairs.register_fake(_phase_pairs_fake)
reference_phase_pairs_backward.register_fake(_phase_pairs_backward_fake)
lattice_phase_pairs = _operator("lattice_phase_pairs", _phase_pairs, _phase_pairs_fake)
lattice_phase_pairs_backward = _operator(
    "lattice_phase_pairs_backward", _phase_pairs_backward, _phase_pairs_backward_fake
)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:7])
    ctx.sizes = inputs[7:]
    ctx.set_materialize_grads(False)  # theta is often a record only: no zeros made for it


def _backward(ctx, grad_pairs: Tensor | None, grad_theta: Tensor | None):
    if grad_pairs is None:  # only theta was used
        phase, tokens = ctx.saved_tensors[0], ctx.sizes[3]
        grad_pairs = phase.new_zeros(phase.shape[0], tokens, 2 * phase.shape[1], 2)
    grads = lattice_phase_pairs_backward(grad_pairs, grad_theta, *ctx.saved_tensors, *ctx.sizes)
    needed = ctx.needs_input_grad
    return tuple(g if needed[i] else None for i, g in enumerate(grads)) + (None,) * 7


lattice_phase_pairs.register_autograd(_backward, setup_context=_setup_context)
