"""A decoder-only transformer (Vaswani et al. 2017; GPT-2 layout, Radford et al. 2019), in members.

One screen per idea, as in nanoGPT: `SelfAttention`, `MLP`, `Block`, `Transformer`. Every module
takes a stream shaped `(members, batch, tokens, width)` and holds `members` independent sets of
weights (see `runtime.layers`); a single model is `members == 1`. Attention runs through
`F.scaled_dot_product_attention`, which dispatches to flash or memory-efficient kernels.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.attention.lattice import LatticeAttention
from runtime.configs import Choice, LayerSettings, TransformerConfig  # noqa: F401 (re-exported)
from runtime.layers import MemberEmbedding, MemberLinear, MemberNorm, scaled_init_


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, RoFormer), rotating halves of each head (the GPT-NeoX/LLaMA layout).

    `scales` multiplies every frequency of member `m` by `scales[m]`: a gear turning 254/19 times
    per driver turn has heads whose phases advance 254/19 times as fast along the sequence (see
    docs/designs.md, design 000: heads tuned to the gear ratio). Scales of 1 are plain RoPE.
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
        keeps its two phase dimensions beside its content (see `LatticeAttention`)."""
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
        if cfg.attention is not None:
            raise ValueError(
                "a lattice layout's attention is `LatticeAttention` (`attention_layer`)"
            )
        self.cfg = cfg
        hw, h, kv = cfg.head_width, cfg.heads, cfg.n_kv_heads
        self.members = members
        self.qkv = MemberLinear(members, cfg.width, (h + 2 * kv) * hw, cfg.bias)
        self.proj = MemberLinear(members, h * hw, cfg.width, cfg.bias)
        scaled_init_(self.proj, cfg.layers)
        # a registered score-level attention (sliding window, adaptive span, ...)
        self.core = (
            cfg.variant.make(
                heads=h, kv_heads=kv, head_width=hw, context=cfg.context, members=members
            )
            if cfg.variant is not None
            else None
        )

    def forward(self, x: Tensor, rotary: RotaryEmbedding | None) -> Tensor:
        return self.proj(self.attend(self.qkv(x), rotary))

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


# a lattice layout in a config written by hand, without its registered component: the built-in one
LATTICE = Choice("lattice", LatticeAttention, level="lattice")


def attention_layer(cfg: TransformerConfig, members: int) -> nn.Module:
    """The attention sub-layer `cfg` chose, built from its registered component: a token mixer
    (design 003) or the lattice layout (design 002); else `SelfAttention`, whose scores are a
    registered score-level attention or the fused kernel."""
    choice = cfg.variant
    if choice is None and cfg.attention is not None:
        choice = LATTICE
    if choice is None or choice.level == "scores":
        return SelfAttention(cfg, members)
    if choice.level == "lattice":
        return choice.make(
            layout=cfg.attention,
            width=cfg.width,
            heads=cfg.heads,
            kv_heads=cfg.n_kv_heads,
            layers=cfg.layers,
            members=members,
            causal=cfg.causal,
            bias=cfg.bias,
            dropout=cfg.dropout,
        )
    return choice.make(  # a token mixer
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        context=cfg.context,
        members=members,
        causal=cfg.causal,
        bias=cfg.bias,
    )


class Block(nn.Module):
    """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.

    `forward` is the one definition of the block: `parts` (default: this block's own modules)
    says how each sub-layer is computed, so the fractal schedules run this same forward over views
    of its weights rather than a copy of it."""

    def __init__(self, cfg: TransformerConfig, members: int):
        super().__init__()
        mixer = cfg.variant is not None and cfg.variant.level == "mixer"
        self.attn = attention_layer(cfg, members)
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

        # token mixers (relative force, myelinated layer) apply no rotary embedding
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
