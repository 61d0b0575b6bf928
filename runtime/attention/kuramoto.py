"""The Kuramoto oscillators of a lattice layer as reference ops: the coupling weights, the phase
chain and the phase features the heads' scores read. `lattice.py` builds the layer on them and
`kuramoto_kernel.py` fuses them (and runs them where it cannot); both import them from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def coupling_weights(distance: Tensor, neighbour: Tensor, log_range: Tensor) -> Tensor:
    """`(members, heads, heads)`: `exp(-distance / range)` between neighbours, 0 elsewhere."""
    return torch.exp(-distance / log_range.exp()) * neighbour


def kuramoto_phases(
    initial_phase: Tensor,
    omega: Tensor,
    coupling: Tensor,
    log_range: Tensor,
    distance: Tensor,
    neighbour: Tensor,
    dt: float,
    substeps: int,
) -> Tensor:
    """`(members, heads)` phases after `substeps` explicit Euler steps of Kuramoto's equation,
    `theta_h += dt * (omega_h + K/|N(h)| * sum_n w_hn sin(theta_n - theta_h))`: a pure function
    of the parameters, so the fused region (`fused_slot_terms`) and the metrics share it. In
    float32 at least: bf16 phases are 0.03 rad coarse near 2 pi, and the chain adds to them."""
    initial_phase, omega, coupling, log_range, distance = (
        at_least_float32(t) for t in (initial_phase, omega, coupling, log_range, distance)
    )
    weights = coupling_weights(distance, neighbour, log_range)
    degree = neighbour.sum(-1).clamp_min(1)
    theta = initial_phase
    for _ in range(substeps):
        pull = (weights * torch.sin(theta[:, None, :] - theta[:, :, None])).sum(-1) / degree
        theta = theta + dt * (omega + coupling * pull)
    return theta


def phase_features(
    theta: Tensor,
    omega: Tensor,
    strength: Tensor,
    token_frequency: float,
    tokens: int,
    head_width: int,
) -> tuple[Tensor, Tensor]:
    """Query and key features `(members, heads, tokens, 2)`: `sqrt(head_width) * strength *
    (cos, sin)(theta + nu * i)` and `(cos, sin)(nu * j)`, `nu = token_frequency * omega`, whose
    dot product under SDPA's `1/sqrt(head_width)` is `strength * cos(theta + nu * (i - j))`.
    Computed in float32 at least and returned in `strength`'s dtype: in bf16 the positions
    themselves round (to multiples of 8 past 1024), and so would every angle `nu * i`."""
    dtype = strength.dtype
    theta, omega, strength = (at_least_float32(t) for t in (theta, omega, strength))
    query_angle, key_angle = phase_angles(theta, token_frequency * omega, tokens)
    amplitude = (strength * math.sqrt(head_width))[..., None, None]
    query = torch.stack((query_angle.cos(), query_angle.sin()), -1) * amplitude
    key = torch.stack((key_angle.cos(), key_angle.sin()), -1)
    return query.to(dtype), key.to(dtype)


def phase_angles(theta: Tensor, nu: Tensor, tokens: int) -> tuple[Tensor, Tensor]:
    """`(theta + nu * i, nu * i)`, `(members, heads, tokens)`, formed in float64 and wrapped to
    [-pi, pi] before they are rounded to `theta`'s dtype: a float32 angle of hundreds of radians
    (`nu * i` at a few hundred tokens) is 3e-5 coarse, 5e-4 at 8k tokens, and the fused kernels
    (`kuramoto_kernel`, which form them the same way) and these ops would round it differently.
    MPS has no float64: there they are formed in float32."""
    wide = torch.float32 if theta.device.type == "mps" else torch.float64
    position = torch.arange(tokens, device=theta.device, dtype=wide)
    key = nu.to(wide)[..., None] * position
    query = theta.to(wide)[..., None] + key
    return _wrapped(query).to(theta.dtype), _wrapped(key).to(theta.dtype)


def _wrapped(angle: Tensor) -> Tensor:
    return angle - 2 * math.pi * torch.floor(angle / (2 * math.pi) + 0.5)


def at_least_float32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))
