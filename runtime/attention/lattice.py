"""Lattice Oscillator attention (docs/designs.md, design 002): attention heads on an n-dimensional
lattice, each a Kuramoto oscillator coupled to its neighbours, whose phase shapes its scores.

The reading implemented, and why. The authors' code adds `0.1 * cos(phase_h)` to every score of
head `h`: a constant per head, which the softmax cancels, and it advances the phases in a buffer
without gradient, so the coupling never learns. Here the phase term varies over
(query, key) and the phases are differentiable:

    score_h(i, j) = q_i . k_j / sqrt(d_head) + alpha_h * cos(theta_h + nu_h * (i - j))

* `theta_h` is head `h`'s phase after `substeps` Kuramoto updates from a learned initial phase:
  `theta_h += dt * (omega_h + K / |N(h)| * sum_{n in N(h)} exp(-dist(h, n) / lambda) * sin(theta_n - theta_h))`,
  recomputed (and differentiated) every forward pass: a stateless function of the parameters, so a
  model's output depends on its weights and inputs only, and K and lambda receive gradients.
* `nu_h = token_frequency * omega_h` turns the term along the sequence at the head's own
  frequency; `alpha_h` is a learned amplitude.

The phase term is a rank-2 product, `cos(a + b) = cos a cos b - sin a sin b`, so it folds into Q and
K as two extra dimensions (as RoPE folds rotations): no `(tokens x tokens)` bias is ever built and
attention stays one fused `scaled_dot_product_attention` call. The two dimensions are taken from
the head's width (content queries and keys are `d_head - 2` wide, values `d_head`), so the kernel
sees the head width the spec asked for.

In eager mode the small work around the projections (the Kuramoto chain, the phase features, the
slot layout of the projection's rows: ~200 kernels forward and backward) is one pure function,
`slot_terms`, which a GPU runs as one compiled region (`fused_slot_terms`); its eager ops are the
reference the region is tested against. In evaluation mode the chain takes `eval_substeps`
updates where set (AKOrN, Miyato et al., ICLR 2025: more oscillator steps at test time).

`LatticeAttention` is that attention sub-layer, registered as the `lattice` attention component;
a `runtime.transformer.Block` builds it like any other attention choice.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.configs import PHASE_DIMS, LatticeConfig  # noqa: F401 (re-exported)
from runtime.layers import MemberLinear, scaled_init_


def lattice_distances(cfg: LatticeConfig) -> Tensor:
    """`(cells, cells)` distances between neighbouring cells (row-major numbering), `inf` elsewhere."""
    coords = list(itertools.product(*(range(n) for n in cfg.shape)))
    sizes = torch.tensor(cfg.shape, dtype=torch.float64)
    points = torch.tensor(coords, dtype=torch.float64).reshape(-1, len(cfg.shape))
    delta = (points[:, None, :] - points[None, :, :]).abs()
    if cfg.boundary == "periodic":
        delta = torch.minimum(delta, sizes - delta)
    distance = delta.pow(2).sum(-1).sqrt()
    if cfg.radius is not None:
        near = distance <= cfg.radius + 1e-9
    elif cfg.neighbourhood == "von_neumann":
        near = delta.sum(-1) == 1
    else:
        near = delta.max(-1).values <= 1
    near &= distance > 0
    return torch.where(near, distance, torch.full_like(distance, math.inf)).float()


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
    of the parameters, so the fused region (`fused_slot_terms`) and the metrics share it."""
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
    dot product under SDPA's `1/sqrt(head_width)` is `strength * cos(theta + nu * (i - j))`."""
    nu = token_frequency * omega
    position = torch.arange(tokens, device=theta.device, dtype=theta.dtype)
    key_angle = nu[..., None] * position  # (members, heads, tokens)
    query_angle = theta[..., None] + key_angle
    amplitude = (strength * math.sqrt(head_width))[..., None, None]
    query = torch.stack((query_angle.cos(), query_angle.sin()), -1) * amplitude
    key = torch.stack((key_angle.cos(), key_angle.sin()), -1)
    return query, key


def slot_terms(
    weight: Tensor,
    bias: Tensor | None,
    oscillators: tuple[Tensor, ...],
    heads: int,
    content_width: int,
    tokens: int,
    dt: float,
    substeps: int,
    token_frequency: float,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Everything a lattice layer computes besides its projections and attention, as one pure
    function: the query/key projection rows laid out with a zero row at each phase slot, the
    Kuramoto chain, and the phase pairs `(members, tokens, 2 * heads, 2)` (query heads, then key
    heads) that go into the slots. `oscillators` is `(initial_phase, omega, coupling, log_range,
    strength, distance, neighbour)`. Returns `(weight, bias, pairs, theta)`.

    In eager mode these are ~200 small kernels (forward and backward) around three big ones, so
    on a GPU the layer runs this function compiled (`fused_slot_terms`): one region of a few
    fused kernels each way. These eager ops are the reference the region is tested against."""
    initial_phase, omega, coupling, log_range, strength, distance, neighbour = oscillators
    theta = kuramoto_phases(
        initial_phase, omega, coupling, log_range, distance, neighbour, dt, substeps
    )
    head_width = content_width + PHASE_DIMS
    query, key = phase_features(theta, omega, strength, token_frequency, tokens, head_width)
    pairs = torch.cat((query, key), 1).transpose(1, 2)  # (members, tokens, 2 * heads, 2)
    rows = 2 * heads * content_width  # query and key rows; the value rows follow
    slotted = _with_slots(weight[..., :rows, :], 2 * heads, content_width, dim=-2)
    weight = torch.cat((slotted, weight[..., rows:, :]), -2)
    if bias is not None:
        slotted = _with_slots(bias[..., :rows], 2 * heads, content_width, dim=-1)
        bias = torch.cat((slotted, bias[..., rows:]), -1)
    return weight, bias, pairs, theta


@functools.cache
def _compiled_slot_terms():
    return torch.compile(slot_terms, fullgraph=True)


def fused_slot_terms(*args, fused: bool = True, **kwargs):
    """`slot_terms`, compiled into one region when its tensors are on a GPU and the caller is
    eager (inside a compiled model it is traced with the rest); the reference ops elsewhere
    (on the CPU, where a compile per shape costs more than it saves)."""
    if fused and args[0].is_cuda and not torch.compiler.is_compiling():
        return _compiled_slot_terms()(*args, **kwargs)
    return slot_terms(*args, **kwargs)


class LatticeOscillators(nn.Module):
    """The phases of one attention layer's heads, `members` independent lattices at once."""

    def __init__(self, cfg: LatticeConfig, members: int = 1):
        super().__init__()
        self.cfg = cfg
        heads = cfg.cells
        distance = lattice_distances(cfg) if not _meta() else torch.empty(heads, heads)
        # finite distances and a mask: exp(-inf / range) has a NaN gradient in `range`
        self.register_buffer("neighbour", distance.isfinite(), persistent=False)
        self.register_buffer(
            "distance",
            distance.nan_to_num(posinf=0.0) if not _meta() else distance,
            persistent=False,
        )
        low, high = cfg.frequency_range
        omega = torch.empty(members, heads)
        phase = torch.empty(members, heads)
        if not omega.is_meta:
            omega.uniform_(low, high)
            phase.uniform_(0, 2 * math.pi)
        if cfg.frequencies == "learned":
            self.omega = nn.Parameter(omega)
        else:
            self.register_buffer("omega", omega)
        self.initial_phase = nn.Parameter(phase)
        self.coupling = nn.Parameter(torch.full((members, 1), float(cfg.coupling)))
        self.log_range = nn.Parameter(torch.full((members, 1, 1), math.log(cfg.range)))
        self.strength = nn.Parameter(torch.full((members, heads), float(cfg.strength)))
        self.last_phase: Tensor | None = None  # detached, for metrics
        self.last_entropy: Tensor | None = None  # per head, when `record_entropy` is set
        self.record_entropy = False

    def oscillator_tensors(self) -> tuple[Tensor, ...]:
        """What `slot_terms` reads of this layer, in its order."""
        return (
            self.initial_phase,
            self.omega,
            self.coupling,
            self.log_range,
            self.strength,
            self.distance,
            self.neighbour,
        )

    def weights(self) -> Tensor:
        """`(members, heads, heads)` coupling weights `exp(-distance / range)` (0 off the neighbourhood)."""
        return coupling_weights(self.distance, self.neighbour, self.log_range)

    @property
    def substeps(self) -> int:
        """Kuramoto updates this pass takes: `eval_substeps` in eval mode (AKOrN, Miyato et al.
        2025: more oscillator steps at test time than in training), else `substeps`."""
        cfg = self.cfg
        if not self.training and cfg.eval_substeps is not None:
            return cfg.eval_substeps
        return cfg.substeps

    def phases(self) -> Tensor:
        """`(members, heads)` phases after `substeps` Kuramoto updates from the initial phases."""
        theta = kuramoto_phases(
            self.initial_phase,
            self.omega,
            self.coupling,
            self.log_range,
            self.distance,
            self.neighbour,
            self.cfg.dt,
            self.substeps,
        )
        if not torch.compiler.is_compiling():
            self.last_phase = theta.detach()
        return theta

    def phase_features(
        self, tokens: int, head_width: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Query and key features `(members, heads, tokens, 2)` whose dot product, under SDPA's
        `1/sqrt(head_width)` scaling, is `strength * cos(theta + nu * (i - j))`."""
        cfg = self.cfg
        q, k = phase_features(
            self.phases(), self.omega, self.strength, cfg.token_frequency, tokens, head_width
        )
        return q.to(dtype), k.to(dtype)

    def order_parameter(self, theta: Tensor | None = None) -> Tensor:
        """Kuramoto's `r = |mean_h exp(i theta_h)|` per member (1: in sync, ~0: incoherent)."""
        theta = self.phases() if theta is None else theta
        return torch.sqrt(theta.cos().mean(-1) ** 2 + theta.sin().mean(-1) ** 2)

    def coupling_force(self, theta: Tensor | None = None) -> Tensor:
        """`(members, heads)`: each head's pull `K/|N| * sum_n w * sin(theta_n - theta_h)`."""
        theta = self.phases() if theta is None else theta
        pull = (self.weights() * torch.sin(theta[:, None, :] - theta[:, :, None])).sum(-1)
        return self.coupling * pull / self.neighbour.sum(-1).clamp_min(1)

    def coherence(self, theta: Tensor | None = None) -> Tensor:
        """Spatial incoherence per member: the coupling-weighted mean of `1 - cos(theta_n - theta_h)`
        over neighbouring pairs (0: a smooth phase field)."""
        theta = self.phases() if theta is None else theta
        weights = self.weights()
        gap = 1 - torch.cos(theta[:, None, :] - theta[:, :, None])
        return (weights * gap).sum((-1, -2)) / weights.sum((-1, -2)).clamp_min(1e-12)

    def regularisation(self, step: int) -> dict[str, Tensor]:
        """This layer's weighted training terms at training step `step`."""
        cfg, theta = self.cfg, self.phases()
        terms = {}
        if cfg.phase_weight:
            r = self.order_parameter(theta).mean()
            value = 1 - r if cfg.phase_target == "synchrony" else r
            terms["phase"] = cfg.phase_weight * schedule_factor(*cfg.phase_schedule, step) * value
        if cfg.coherence_weight:
            factor = schedule_factor(*cfg.coherence_schedule, step)
            terms["coherence"] = cfg.coherence_weight * factor * self.coherence(theta).mean()
        return terms


class LatticeAttention(nn.Module):
    """Self-attention over heads on a lattice: `softmax(q.k / sqrt(d_head) + phase term) v`, the
    phase term of each head coming from its oscillator (`LatticeOscillators`), one head per cell.

    Queries and keys have `d_head - 2` content dimensions (rotated by RoPE, if given) and the two
    phase dimensions, whose dot product is the phase term; values are content at full head width.
    Attention stays one `scaled_dot_product_attention` call at the head width the spec asked for.
    """

    def __init__(
        self,
        layout: LatticeConfig,
        width: int,
        heads: int,
        layers: int,
        members: int = 1,
        kv_heads: int | None = None,
        causal: bool = True,
        bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if layout.cells != heads or kv_heads not in (None, heads):
            raise ValueError(
                f"a lattice of {layout.cells} cells has one query and one key-value head per cell; "
                f"got {heads} heads and {kv_heads} key-value heads"
            )
        self.members, self.heads, self.causal, self.dropout = members, heads, causal, dropout
        self.head_width = width // heads
        self.content_width = self.head_width - PHASE_DIMS
        h, hw, cw = heads, self.head_width, self.content_width
        self.qkv = MemberLinear(members, width, 2 * h * cw + h * hw, bias)
        self.proj = MemberLinear(members, h * hw, width, bias)
        scaled_init_(self.proj, layers)
        self.lattice = LatticeOscillators(layout, members)
        self.fused_region = True  # False: the reference ops on a GPU too (`fused_slot_terms`)

    def forward(self, x: Tensor, rotary: nn.Module | None) -> Tensor:
        *lead, n, _ = x.shape
        if rotary is None or getattr(rotary, "padded_to", None) == self.head_width:
            q, k, v = self._slotted_qkv(x, rotary)
        else:
            q, k, v = self._concatenated_qkv(x, rotary)
        if self.lattice.record_entropy and not torch.compiler.is_compiling():
            self.lattice.last_entropy = _attention_entropy(q[0], k[0], self.causal)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(*lead, n, self.heads * self.head_width))

    def _slotted_qkv(self, x: Tensor, rotary: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        """Each query and key head is laid out `[content half, cos slot, content half, sin slot]`:
        the projection's rows get a zero row at each slot, so one matmul writes whole aligned
        heads, the phase pairs are added into the slots in place (q, k and v stay views of one
        projection, so the layer holds what plain attention holds), and RoPE (whose tables,
        `padded_to` the head width, leave the slot pair unrotated) turns the content pairs in
        the same pass. Concatenating two dimensions to `d_head - 2`-wide heads instead (the
        first version) made every copy of q, k and of their gradients unaligned; a registered
        rotary component, which knows nothing of slots, takes that path (`_concatenated_qkv`)."""
        h, hw, cw = self.heads, self.head_width, self.content_width
        n = x.shape[-2]
        lattice = self.lattice
        weight, bias, pairs, theta = fused_slot_terms(
            self.qkv.weight,
            self.qkv.bias,
            lattice.oscillator_tensors(),
            h,
            cw,
            n,
            lattice.cfg.dt,
            lattice.substeps,
            lattice.cfg.token_frequency,
            fused=self.fused_region,
        )
        if not torch.compiler.is_compiling():
            lattice.last_phase = theta.detach()
        if self.members == 1:
            qkv = F.linear(x, weight, bias)
        else:
            qkv = torch.bmm(x.reshape(self.members, -1, x.shape[-1]), weight.transpose(1, 2))
            qkv = qkv if bias is None else qkv + bias.unsqueeze(1)
        qkv = qkv.reshape(self.members, -1, n, 3 * h, hw)  # (members, batch, tokens, 3h, hw)
        qk = qkv[..., : 2 * h, :]
        if rotary is not None:
            qk.copy_(rotary.rotate_token_major(qk))
        _phase_slots(qk, cw).add_(pairs[:, None])
        q, k = qk.flatten(0, 1).transpose(1, 2).split((h, h), dim=1)  # (members * batch, h, n, hw)
        v = qkv[..., 2 * h :, :].flatten(0, 1).transpose(1, 2)
        return q, k, v

    def _concatenated_qkv(self, x: Tensor, rotary: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Content queries and keys `d_head - 2` wide, rotated by a registered rotary component,
        each extended by the two phase dimensions; values keep the full head width."""
        h, hw, cw = self.heads, self.head_width, self.content_width
        n = x.shape[-2]
        q, k, v = self.qkv(x).split((h * cw, h * cw, h * hw), dim=-1)
        q = rotary(q.reshape(-1, n, h, cw).transpose(1, 2))
        k = rotary(k.reshape(-1, n, h, cw).transpose(1, 2))
        v = v.reshape(-1, n, h, hw).transpose(1, 2)
        phase_q, phase_k = self.lattice.phase_features(n, hw, q.dtype)  # (members, heads, n, 2)
        batch = q.shape[0] // self.members
        expand = (self.members, batch, h, n, PHASE_DIMS)
        phase_q = phase_q[:, None].expand(expand).reshape(-1, h, n, PHASE_DIMS)
        phase_k = phase_k[:, None].expand(expand).reshape(-1, h, n, PHASE_DIMS)
        return torch.cat((q, phase_q), -1), torch.cat((k, phase_k), -1), v


def _with_slots(values: Tensor, heads: int, content_width: int, dim: int) -> Tensor:
    """Lay `heads` groups of `content_width` entries along `dim` of `values` out as lattice heads
    with a zero at each of the two phase slots: each half of a head ends in one slot,
    `[c_0..c_{m-1}, slot, c_m..c_{2m-1}, slot]`, the layout in which RoPE's halves pair the two
    slots with each other (an odd content width puts both at the end)."""
    x = values.movedim(dim, -1).unflatten(-1, (heads, -1))
    if content_width % 2 == 0:
        x = F.pad(x.unflatten(-1, (2, -1)), (0, 1)).flatten(-2)
    else:
        x = F.pad(x, (0, PHASE_DIMS))
    return x.flatten(-2).movedim(-1, dim)


def _phase_slots(heads: Tensor, content_width: int) -> Tensor:
    """The `(..., 2)` view of the (cos, sin) slots of lattice heads laid out by `_with_slots`."""
    if content_width % 2 == 0:
        return heads.unflatten(-1, (2, -1))[..., -1]
    return heads[..., content_width:]


@torch.no_grad()
def _attention_entropy(q: Tensor, k: Tensor, causal: bool, tokens: int = 256) -> Tensor:
    """Per head, the mean entropy (nats) of one sequence's attention rows over its first `tokens`
    tokens: a metric probe, computed densely on a small window only."""
    q, k = q[:, :tokens].float(), k[:, :tokens].float()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        n = scores.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    p = scores.softmax(-1)
    return -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)


def schedule_factor(kind: str, steps: int, step: int) -> float:
    """A regulariser's weight multiplier at `step`: constant, warm-up, linear or cosine decay."""
    progress = min(max(step, 0), steps) / steps
    if kind == "warmup":
        return progress
    if kind == "anneal":
        return 1 - progress
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def lattice_layers(model: nn.Module) -> list[tuple[str, LatticeOscillators]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LatticeOscillators)]


def lattice_regularisation(model: nn.Module, step: int) -> Tensor:
    """The sum of every lattice layer's weighted training terms (the spec's `training:` weights and
    schedules); add it to the task loss."""
    total = None
    for _, layer in lattice_layers(model):
        for value in layer.regularisation(step).values():
            total = value if total is None else total + value
    if total is None:
        total = next(model.parameters()).new_zeros(())
    return total


@contextlib.contextmanager
def phase_term_off(model: nn.Module) -> Iterator[nn.Module]:
    """The lattice-off ablation (the `lot` project's): inside the block every lattice layer's
    phase-term gain `strength` is 0, so heads attend by content alone with the same weights;
    the gains come back on leaving it."""
    layers = [layer for _, layer in lattice_layers(model)]
    saved = [layer.strength.detach().clone() for layer in layers]
    with torch.no_grad():
        for layer in layers:
            layer.strength.zero_()
    try:
        yield model
    finally:
        with torch.no_grad():
            for layer, strength in zip(layers, saved, strict=True):
                layer.strength.copy_(strength)


@torch.no_grad()
def layer_report(layer: LatticeOscillators, member: int | None = None) -> dict[str, Any]:
    """One lattice layer's numbers, as `GraphModel.report()` gives them (and so metrics.jsonl and
    TensorBoard, one scalar per number): the Kuramoto order parameter, mean |coupling force|,
    spatial incoherence, coupling, range and (after a pass with `record_entropy` set) the mean
    attention entropy; and `heads`, per head: phase (wrapped to [-pi, pi)), coupling force,
    intrinsic frequency, phase-term gain and attention entropy. `member`: one member of a batched
    layer; None: the scalars averaged over members (per-head values only for a single member)."""
    theta = layer.phases()
    force = layer.coupling_force(theta)
    scalars = {
        "order_parameter": layer.order_parameter(theta),
        "coupling_force": force.abs().mean(-1),
        "incoherence": layer.coherence(theta),
        "coupling": layer.coupling.mean(-1),
        "range": layer.log_range.exp().flatten(1).mean(-1),
    }
    pick = (lambda v: v.mean()) if member is None else (lambda v: v[member])
    entry: dict[str, Any] = {name: float(pick(value)) for name, value in scalars.items()}
    entropy = layer.last_entropy  # recorded for the first member only
    if entropy is not None and member in (None, 0):
        entry["attention_entropy"] = float(entropy.mean())
    if member is None and theta.shape[0] > 1:
        return entry
    m = member or 0
    wrapped = torch.remainder(theta[m] + math.pi, 2 * math.pi) - math.pi
    heads = {
        "phase": wrapped,
        "coupling_force": force[m],
        "frequency": layer.omega[m],
        "strength": layer.strength[m],
    }
    if entropy is not None and m == 0:
        heads["attention_entropy"] = entropy
    entry["heads"] = {name: [float(v) for v in values] for name, values in heads.items()}
    return entry


def lattice_metrics(model: nn.Module) -> dict[str, dict[str, Any]]:
    """`layer_report` of every lattice layer of `model` (members averaged), by module path."""
    return {name: layer_report(layer) for name, layer in lattice_layers(model)}


def _meta() -> bool:
    return torch.empty(0).is_meta
