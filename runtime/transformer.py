"""A decoder-only transformer (Vaswani et al. 2017; GPT-2 layout, Radford et al. 2019), in members.

One screen per idea, as in nanoGPT: `SelfAttention`, `MLP`, `Block`, `Transformer`. Every module
takes a stream shaped `(members, batch, tokens, width)` and holds `members` independent sets of
weights (see `runtime.layers`); a single model is `members == 1`. Attention runs through
`F.scaled_dot_product_attention`, which dispatches to flash or memory-efficient kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.attention.lattice import PHASE_DIMS, LatticeConfig, LatticeOscillators
from runtime.layers import MemberEmbedding, MemberLinear, MemberNorm, scaled_init_


@dataclass(frozen=True)
class Choice:
    """A registered component chosen by the spec (see `compiler.language.registry`): its name, its level
    (attention: `scores` or `mixer`), its builder and its options, hashable so that nodes choosing
    the same component with the same options still batch together."""

    name: str
    build: Callable[..., nn.Module]
    options: tuple[tuple[str, Any], ...] = ()
    level: str | None = None

    def make(self, **context: Any) -> nn.Module:
        return self.build(**context, **dict(self.options))


@dataclass(frozen=True)
class LayerSettings:
    """What one layer drew from the spec's `variations` (design 003's randomised layers)."""

    activation: str
    heads: int
    dropout: float
    norm: str


@dataclass(frozen=True)
class TransformerConfig:
    """A resolved transformer: every field has its final value (the compiler fills them in)."""

    width: int
    heads: int
    layers: int
    context: int
    kv_heads: int | None = None
    mlp_width: int | None = None
    activation: str = "gelu"
    norm: str = "layernorm"
    position: str = "rope"
    rope_theta: float = 10000.0
    dropout: float = 0.0
    bias: bool = False
    causal: bool = True
    attention: LatticeConfig | None = None  # a lattice layout (design 002); None: plain attention
    variant: Choice | None = None  # a registered attention component; None: fused SDPA
    rotary: Choice | None = (
        None  # a registered rotary embedding; None: RoPE (when position is rope)
    )
    layer_settings: tuple[LayerSettings, ...] = ()  # per layer, when the spec has `variations`

    def layer(self, index: int) -> TransformerConfig:
        """The config layer `index` is built with: this one, with what that layer drew."""
        if not self.layer_settings:
            return self
        drawn = self.layer_settings[index]
        return replace(
            self,
            activation=drawn.activation,
            heads=drawn.heads,
            kv_heads=self.kv_heads if self.kv_heads not in (None, drawn.heads) else None,
            dropout=drawn.dropout,
            norm=drawn.norm,
            layer_settings=(),
        )

    @property
    def head_width(self) -> int:
        return self.width // self.heads

    @property
    def content_width(self) -> int:
        """Width of each head's content queries and keys (lattice heads give 2 to the phase term)."""
        return self.head_width - (PHASE_DIMS if self.attention is not None else 0)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def inner_width(self) -> int:
        return self.mlp_width or 4 * self.width

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, RoFormer), rotating halves of each head (the GPT-NeoX/LLaMA layout).

    `scales` multiplies every frequency of member `m` by `scales[m]`: a gear turning 254/19 times
    per driver turn has heads whose phases advance 254/19 times as fast along the sequence (design
    000: attention-head arrays tuned to the gear ratio). Scales of 1 are plain RoPE.
    """

    def __init__(
        self,
        head_width: int,
        context: int,
        theta: float,
        scales: tuple[float, ...] = (1.0,),
        padded_to: int | None = None,
    ):
        """`padded_to`: rotate vectors that wide whose halves each end in one dimension the
        rotation leaves alone (angle 0), around the `head_width` rotated ones: how a lattice head
        keeps its two phase dimensions beside its content (see `SelfAttention._lattice_qkv`)."""
        super().__init__()
        self.members = len(scales)
        self.padded_to = padded_to
        shape = (len(scales), context, (padded_to or head_width) // 2)
        if torch.empty(0).is_meta:  # counting on the meta device: shapes only, nothing to compute
            self.register_buffer("cos", torch.empty(shape), persistent=False)
            self.register_buffer("sin", torch.empty(shape), persistent=False)
            return
        inv_freq = 1.0 / theta ** (torch.arange(0, head_width, 2, dtype=torch.float64) / head_width)
        positions = torch.arange(context, dtype=torch.float64)
        scale = torch.tensor(scales, dtype=torch.float64)
        angles = scale[:, None, None] * torch.outer(
            positions, inv_freq
        )  # (members, context, head_width/2)
        if padded_to is not None:
            angles = F.pad(angles, (0, (padded_to - head_width) // 2))
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def rotate_token_major(self, x: Tensor) -> Tensor:
        """Rotate `x` shaped `(members, batch, tokens, heads, head_width)`: the layout a projection
        writes, so the rotation reads and writes memory in order (no transposed copy)."""
        n = x.shape[2]
        cos = self.cos[:, None, :n, None].to(x.dtype)
        sin = self.sin[:, None, :n, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate `x` shaped `(members * batch, heads, tokens, head_width)`."""
        n = x.shape[-2]
        cos, sin = self.cos[:, :n].to(x.dtype), self.sin[:, :n].to(x.dtype)
        shaped = x.reshape(self.members, -1, *x.shape[1:])  # (members, batch, heads, tokens, hw)
        cos, sin = cos[:, None, None], sin[:, None, None]
        x1, x2 = shaped.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).reshape(x.shape)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, members: int):
        super().__init__()
        self.cfg = cfg
        hw, cw, h, kv = cfg.head_width, cfg.content_width, cfg.heads, cfg.n_kv_heads
        self.members = members
        self.qkv = MemberLinear(members, cfg.width, (h + kv) * cw + kv * hw, cfg.bias)
        self.proj = MemberLinear(members, h * hw, cfg.width, cfg.bias)
        scaled_init_(self.proj, cfg.layers)
        self.lattice = (
            LatticeOscillators(cfg.attention, members) if cfg.attention is not None else None
        )
        # a registered score-level attention (design 003: sliding window, adaptive span, ...)
        self.core = (
            cfg.variant.make(
                heads=h, kv_heads=kv, head_width=hw, context=cfg.context, members=members
            )
            if cfg.variant is not None
            else None
        )

    def forward(self, x: Tensor, rotary: RotaryEmbedding | None) -> Tensor:
        if self.lattice is None:
            return self.proj(self.attend(self.qkv(x), rotary))
        cfg = self.cfg
        *lead, n, _ = x.shape
        q, k, v = self._lattice_qkv(x, rotary)
        if self.lattice.record_entropy and not torch.compiler.is_compiling():
            self.lattice.last_entropy = _attention_entropy(q[0], k[0], cfg.causal)
        y = self.scores(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(*lead, n, cfg.heads * cfg.head_width))

    def attend(
        self, qkv: Tensor, rotary: nn.Module | None, heads: tuple[int, int, int] | None = None
    ) -> Tensor:
        """Attention over the fused projection `qkv`, `(*lead, tokens, (h + 2 kv) * hw)` ->
        `(*lead, tokens, h * hw)`. `heads` `(h, kv, hw)` defaults to this layer's; a fractal's
        sub-models read the same weights as fewer or narrower heads."""
        cfg = self.cfg
        *lead, n, _ = qkv.shape
        h, kv, hw = heads or (cfg.heads, cfg.n_kv_heads, cfg.head_width)
        q, k, v = qkv.reshape(-1, n, h + 2 * kv, hw).transpose(1, 2).split((h, kv, kv), dim=1)
        if rotary is not None:
            q, k = rotary(q), rotary(k)
        return self.scores(q, k, v).transpose(1, 2).reshape(*lead, n, h * hw)

    def scores(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`softmax(q k^T / sqrt(d)) v` over heads `(sequences, heads, tokens, hw)`: the registered
        score-level attention, or the fused kernel (grouped-query when keys have fewer heads)."""
        dropout = self.cfg.dropout if self.training else 0.0
        if self.core is not None:
            return self.core(q, k, v, self.cfg.causal, dropout)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=self.cfg.causal,
            dropout_p=dropout,
            enable_gqa=k.shape[1] != q.shape[1],
        )

    def _lattice_qkv(self, x: Tensor, rotary: nn.Module | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys of `d_head - 2` content dimensions (rotated by RoPE if set) and the two
        phase dimensions of `runtime.attention.lattice`, whose dot product is the phase term; values are
        content at full head width.

        Each query and key head is laid out `[content half, cos slot, content half, sin slot]`:
        the projection's rows get a zero row at each slot, so one matmul writes whole aligned
        heads, the phase features are added into the slots, and RoPE (whose tables leave the slot
        pair unrotated) turns the content pairs in the same pass. Concatenating two dimensions to
        `d_head - 2`-wide heads instead (the first version) made every copy of q, k and of their
        gradients unaligned. A registered rotary component, which knows nothing of slots, takes
        `_lattice_qkv_concat`.
        """
        cfg = self.cfg
        h, hw, cw = cfg.heads, cfg.head_width, cfg.content_width
        if rotary is not None and getattr(rotary, "padded_to", None) != hw:
            return self._lattice_qkv_concat(x, rotary)
        n = x.shape[-2]
        weight, bias = self.qkv.weight, self.qkv.bias
        rows = 2 * h * cw  # query and key rows; the value rows follow
        slotted = _with_slots(weight[..., :rows, :], 2 * h, cw, dim=-2, phase=False)
        weight = torch.cat((slotted, weight[..., rows:, :]), -2)
        if bias is not None:
            slotted = _with_slots(bias[..., :rows], 2 * h, cw, dim=-1, phase=False)
            bias = torch.cat((slotted, bias[..., rows:]), -1)
        if self.members == 1:
            qkv = F.linear(x, weight, bias)
        else:
            qkv = torch.bmm(x.reshape(self.members, -1, cfg.width), weight.transpose(1, 2))
            qkv = qkv if bias is None else qkv + bias.unsqueeze(1)
        qkv = qkv.reshape(self.members, -1, n, 3 * h, hw)  # (members, batch, tokens, 3h, hw)
        phase_q, phase_k = self.lattice.phase_features(n, hw, qkv.dtype)  # (members, h, n, 2)
        phase = torch.cat((phase_q, phase_k), 1).transpose(1, 2).flatten(-2)  # (members, n, 2h*2)
        phase = _with_slots(phase, 2 * h, cw, dim=-1, phase=True).unflatten(-1, (2 * h, hw))
        qk = qkv[..., : 2 * h, :]
        qk = (qk if rotary is None else rotary.rotate_token_major(qk)) + phase[:, None]
        q, k = qk.flatten(0, 1).transpose(1, 2).split((h, h), dim=1)  # (members * batch, h, n, hw)
        v = qkv[..., 2 * h :, :].flatten(0, 1).transpose(1, 2)
        return q, k, v

    def _lattice_qkv_concat(self, x: Tensor, rotary: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """Content queries and keys `d_head - 2` wide, rotated by a registered rotary component,
        each extended by the two phase dimensions; values keep the full head width."""
        cfg = self.cfg
        n = x.shape[-2]
        h, hw, cw = cfg.heads, cfg.head_width, cfg.content_width
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


def _with_slots(values: Tensor, heads: int, content_width: int, dim: int, phase: bool) -> Tensor:
    """Lay `heads` groups along `dim` of `values` out as lattice heads with two phase slots: each
    half of a head ends in one slot, `[c_0..c_{m-1}, slot, c_m..c_{2m-1}, slot]`, the layout in
    which RoPE's halves pair the two slots with each other (an odd content width puts both at
    the end). Groups hold `content_width` content entries (zeros go in the slots) or, with
    `phase`, the two phase entries (cos, sin), zeros going everywhere else."""
    x = values.movedim(dim, -1).unflatten(-1, (heads, -1))
    if content_width % 2 == 0:
        x = x.unflatten(-1, (2, -1))  # content (2, m) or phase (2, 1)
        x = F.pad(x, (content_width // 2, 0) if phase else (0, 1)).flatten(-2)
    else:
        x = F.pad(x, (content_width, 0) if phase else (0, PHASE_DIMS))
    return x.flatten(-2).movedim(-1, dim)


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


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swiglu": F.silu,  # gated: silu(a) * b (Shazeer 2020)
    "geglu": F.gelu,  # gated: gelu(a) * b
}


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, members: int):
        super().__init__()
        self.cfg = cfg
        self.act = _ACTIVATIONS[cfg.activation]
        self.fc = MemberLinear(
            members, cfg.width, cfg.inner_width * (2 if cfg.gated else 1), cfg.bias
        )
        self.proj = MemberLinear(members, cfg.inner_width, cfg.width, cfg.bias)
        scaled_init_(self.proj, cfg.layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.activate(self.fc(x)))

    def activate(self, h: Tensor) -> Tensor:
        """The nonlinearity between the two linears; gated: `act(a) * b` (Shazeer 2020)."""
        if self.cfg.gated:
            a, b = h.chunk(2, dim=-1)
            return self.act(a) * b
        return self.act(h)


class Parts(Protocol):
    """What `Block.forward` computes its sub-layers with. A block is its own default; the fractal
    schedules (`runtime.fractal`) supply views of the same weights: a window of sub-models'
    diagonal blocks, or every level at once."""

    def norm_attn(self, x: Tensor) -> Tensor: ...

    def attend(self, x: Tensor, rotary: nn.Module | None) -> Tensor: ...

    def norm_mlp(self, x: Tensor) -> Tensor: ...

    def mlp(self, x: Tensor) -> Tensor: ...


class Block(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    `forward` is the one definition of the block: `parts` (default: this block's own modules)
    says how each sub-layer is computed, so the fractal schedules run this same forward over views
    of its weights rather than a copy of it."""

    def __init__(self, cfg: TransformerConfig, members: int):
        super().__init__()
        mixer = cfg.variant is not None and cfg.variant.level == "mixer"
        if mixer:  # a registered token mixer replaces the attention sub-layer (design 003)
            self.attn = cfg.variant.make(
                width=cfg.width,
                heads=cfg.heads,
                layers=cfg.layers,
                context=cfg.context,
                members=members,
                causal=cfg.causal,
                bias=cfg.bias,
            )
        else:
            self.attn = SelfAttention(cfg, members)
        # a mixer that owns its norms and residual (the myelinated layer) takes the stream itself
        self.takes_stream = mixer and getattr(self.attn, "takes_stream", False)
        self.uses_rotary = not mixer
        self.norm_attn = (
            None if self.takes_stream else MemberNorm(members, cfg.width, cfg.norm, cfg.bias)
        )
        self.norm_mlp = MemberNorm(members, cfg.width, cfg.norm, cfg.bias)
        self.mlp = MLP(cfg, members)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, rotary: nn.Module | None, parts: Parts | None = None) -> Tensor:
        p = self if parts is None else parts
        if not self.takes_stream:
            x = x + self._drop(p.attend(p.norm_attn(x), rotary))
        else:  # a mixer that owns its norm and residual (the myelinated layer)
            x = self.attn(x)
        return x + self._drop(p.mlp(p.norm_mlp(x)))

    def attend(self, x: Tensor, rotary: nn.Module | None) -> Tensor:
        return self.attn(x, rotary) if self.uses_rotary else self.attn(x)

    def _drop(self, x: Tensor) -> Tensor:
        # skipped outright at rate 0: F.dropout(p=0) in training mode still launches a kernel
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


class Transformer(nn.Module):
    """`members` decoder stacks of one shape; `(members, batch, tokens, width)` in and out.

    The input is an already-embedded stream: embedding tables belong to the spec's inputs, which
    several nodes may share. `rope_scales` gives each member's rotary frequency multiplier.
    """

    def __init__(
        self, cfg: TransformerConfig, members: int = 1, rope_scales: tuple[float, ...] | None = None
    ):
        super().__init__()
        self.cfg, self.members = cfg, members
        scales = rope_scales or (1.0,) * members
        if len(scales) != members:
            raise ValueError(f"{members} members need {members} rotary scales, got {len(scales)}")
        if len(set(scales)) == 1:
            scales = scales[:1]  # one table broadcast over members
        layer_cfgs = [cfg.layer(i) for i in range(cfg.layers)]

        def rotary_for(width: int) -> nn.Module:
            if cfg.rotary is not None:
                return cfg.rotary.make(
                    head_width=width, context=cfg.context, theta=cfg.rope_theta, scales=scales
                )
            if cfg.attention is not None:  # a lattice head: content and phase side by side
                return RotaryEmbedding(
                    width, cfg.context, cfg.rope_theta, scales, padded_to=cfg.head_width
                )
            return RotaryEmbedding(width, cfg.context, cfg.rope_theta, scales)

        # token mixers (design 003's relative force, myelinated layer) apply no rotary embedding
        mixes = cfg.variant is not None and cfg.variant.level == "mixer"
        rope = cfg.position == "rope" and not mixes
        self.rotary = rotary_for(cfg.content_width) if rope else None
        # layers whose drawn head count gives another head width get a rotary of that width
        other = sorted({c.content_width for c in layer_cfgs} - {cfg.content_width})
        self.rotary_by_width = (
            nn.ModuleDict({str(w): rotary_for(w) for w in other}) if rope and other else None
        )
        self.positions = (
            MemberEmbedding(members, cfg.context, cfg.width) if cfg.position == "learned" else None
        )
        self.blocks = nn.ModuleList(Block(c, members) for c in layer_cfgs)
        self._rotary_keys = tuple(
            str(c.content_width) if c.content_width != cfg.content_width else None
            for c in layer_cfgs
        )
        self.norm_out = MemberNorm(members, cfg.width, cfg.norm, cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.positions is not None:
            x = x + self.positions(x.shape[-2]).to(x.dtype)
        if self.cfg.dropout:
            x = F.dropout(x, self.cfg.dropout, self.training)
        for block, key in zip(self.blocks, self._rotary_keys, strict=True):
            rotary = (
                self.rotary if key is None or self.rotary is None else self.rotary_by_width[key]
            )
            x = block(x, rotary)
        return self.norm_out(x)
