"""Score-level attention variants of design 003 (docs/designs.md) that replace the fused attention.

`runtime.transformer.SelfAttention` projects queries `(members * batch, heads, n, hw)` and keys
and values `(members * batch, kv_heads, n, hw)` (member-major, grouped-query attention when
kv_heads < heads) and hands them to one module of this file, chosen by name from
`ATTENTION_KINDS`. All variants share one interface so the compiler can pick any of them:

    module = ATTENTION_KINDS[name](heads, kv_heads, head_width, context, members=1, **options)
    y = module(q, k, v, causal, dropout_p)       # (members * batch, heads, n, hw)
    loss = module.regularisation()               # an auxiliary loss term, or None

* `sdpa`: plain fused attention (the baseline).
* `sliding_window`: each query sees the `window` nearest keys (Beltagy et al. 2020's local
  attention; the original's `slide_win`).
* `adaptive_span`: Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers", as the sound
  reading of the original's `AdaptiveSpan`.
* `local_global`: the original's "integrated local-global" attention in Longformer's form
  (Beltagy et al. 2020): a sliding window plus global tokens.

Every variant runs through `F.scaled_dot_product_attention` (SDPA), so dropout on the attention
weights (`dropout_p`, applied by the caller in training only), the `1 / sqrt(hw)` scale and the
grouped-query head sharing (`enable_gqa`: query head h reads key/value head
`h // (heads // kv_heads)`) are exactly SDPA's, and CUDA picks a fused kernel where one accepts the
mask (memory-efficient attention takes both boolean and additive float masks, without
materialising the `n x n` scores).

Masks. The window variants use a dense boolean `(n, n)` mask: n^2 bytes (torch stores a bool in a
byte; 16 MiB at n = 4096, 64 MiB at n = 8192). It is built once per (n, window, global tokens,
causal, device) and kept in a small least-recently-used cache shared by every layer and module
(`MASK_CACHE_SIZE` entries), built outside inference mode so that a mask first made during
evaluation can still be saved for a backward pass later. Where the window covers the whole
sequence no mask is passed and SDPA's own causal path (flash attention on CUDA) runs. FlexAttention
block masks would skip the masked blocks' compute, but need `torch.compile` and CUDA to be fast and
differ in their support across versions; the dense mask is the robust choice here.
Adaptive span's mask depends on the learned spans, so it is built every call: an additive float
mask `(members, heads, n, n)`, computed in float32 and cast to the queries' dtype. On the CPU it
is broadcast over the batch (SDPA runs on `(members, batch, heads, n, hw)` views). On CUDA it is
expanded to `(members * batch, heads, n, n)` and grouped key/value heads are repeated, because
only then does SDPA pick its memory-efficient kernel, which adds (and differentiates) the mask
without materialising the scores, in less memory and time than the unfused path that 5-D or
grouped-query inputs fall back to.

Per-member parameters (adaptive span's) carry a leading members dimension only when members > 1,
as everywhere in `runtime.layers`, so a members=M module's state dict sliced at `[m]` loads into a
members=1 module.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_CACHE_SIZE = 8  # boolean window masks kept (each n^2 bytes), shared by all modules


def _int_option(kind: str, name: str, value: object, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"{kind}: `{name}` must be an integer >= {minimum} ({meaning}), got {value!r}"
        )
    return int(value)


def _real_option(
    kind: str,
    name: str,
    value: object,
    low: float,
    high: float | None,
    strict_low: bool,
    meaning: str,
) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        x = float(value)
        ok = (x > low if strict_low else x >= low) and (high is None or x <= high)
    if not ok:
        bound = f"> {low}" if strict_low else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        raise ValueError(
            f"{kind}: `{name}` must be a finite number {bound} ({meaning}), got {value!r}"
        )
    return float(value)


def _window_mask_build(
    n: int, window: int, global_tokens: int, causal: bool, device: torch.device
) -> Tensor | None:
    """`(n, n)` bool, True where query i may attend key j; None where every key is visible (every
    key j <= i when causal), so the caller can use SDPA's unmasked paths.

    Visible: |i - j| < window, or j < global_tokens (every query sees the global tokens), or, when
    not causal, i < global_tokens (global tokens see every key); when causal also j <= i.
    """
    # the farthest pair of non-global tokens is (global_tokens, n - 1)
    if global_tokens >= n or n - 1 - global_tokens < window:
        return None
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    visible = ((i - j).abs() < window) | (j < global_tokens)
    if causal:
        return visible & (j <= i)
    return visible | (i < global_tokens)


@functools.lru_cache(maxsize=MASK_CACHE_SIZE)
def _cached_window_mask(
    n: int, window: int, global_tokens: int, causal: bool, device: torch.device
) -> Tensor | None:
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in any later mode
        return _window_mask_build(n, window, global_tokens, causal, device)


def window_mask(
    n: int, window: int, global_tokens: int, causal: bool, device: torch.device
) -> Tensor | None:
    """The (cached) boolean mask of a sliding window plus global tokens; see `_window_mask_build`."""
    if torch.compiler.is_compiling():  # traced into the graph: nothing to cache there
        return _window_mask_build(n, window, global_tokens, causal, device)
    return _cached_window_mask(n, window, global_tokens, causal, torch.device(device))


class ScoreAttention(nn.Module):
    """Base of the score-level variants: checks the shapes and holds the common settings.

    `heads` query heads, `kv_heads` key/value heads (a divisor of `heads`), `head_width` channels
    per head, `context` the longest sequence, `members` independent sub-models batched member-major
    along the leading dimension.
    """

    kind = "attention"

    def __init__(self, heads: int, kv_heads: int, head_width: int, context: int, members: int = 1):
        super().__init__()
        kind = self.kind
        self.heads = _int_option(kind, "heads", heads, 1, "query heads")
        self.kv_heads = _int_option(kind, "kv_heads", kv_heads, 1, "key/value heads")
        if heads % kv_heads:
            raise ValueError(
                f"{kind}: `heads` ({heads}) must be a multiple of `kv_heads` ({kv_heads}) "
                f"(each key/value head serves heads / kv_heads query heads)"
            )
        self.head_width = _int_option(kind, "head_width", head_width, 1, "channels per head")
        self.context = _int_option(kind, "context", context, 1, "longest sequence")
        self.members = _int_option(kind, "members", members, 1, "batched sub-models")

    def _check(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        if (
            q.dim() != 4
            or k.dim() != 4
            or v.dim() != 4
            or q.shape[1] != self.heads
            or k.shape[1] != self.kv_heads
            or v.shape[1] != self.kv_heads
            or q.shape[0] % self.members
            or k.shape[:3] != (q.shape[0], self.kv_heads, q.shape[2])
            or v.shape[:3] != k.shape[:3]
            or k.shape[-1] != q.shape[-1]
        ):
            raise ValueError(
                f"{self.kind}: expected q (members * batch, {self.heads}, n, hw) and k, v "
                f"(members * batch, {self.kv_heads}, n, hw) with members={self.members}; got "
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
            )

    def _sdpa(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        dropout_p: float,
        mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=causal,
            enable_gqa=self.kv_heads != self.heads,
        )

    def regularisation(self) -> Tensor | None:
        """This variant's auxiliary loss term; None: it has none."""
        return None

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, kv_heads={self.kv_heads}, head_width={self.head_width}, "
            f"members={self.members}"
        )


class SDPAttention(ScoreAttention):
    """Plain scaled dot-product attention (Vaswani et al. 2017) through SDPA's fused kernels."""

    kind = "sdpa"

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0
    ) -> Tensor:
        self._check(q, k, v)
        return self._sdpa(q, k, v, dropout_p, causal=causal)


class LocalGlobalAttention(ScoreAttention):
    """The integrated local-global attention in Longformer's form (Beltagy et al. 2020).

    Each query sees the keys within `window` of it (causal: i - window < j <= i; non-causal:
    |i - j| < window) plus the first `global_tokens` tokens; when not causal the global tokens also
    see every key (Longformer's symmetric global attention). When causal, causality always holds:
    a global token sees only the keys before it, and is seen only by queries after it.

    The original's `IntegratedAttention` also carried a Q-learning "refiner": a host-side table of
    states and actions updated from Python scalars during training that rewrote the window and span
    hyperparameters between steps. It is left out: it makes the forward pass depend on mutable
    host state (not reproducible from the spec and seed, not traceable by `torch.compile`), needs
    a host sync for its reward each step, and a model whose window changes under it cannot be
    batched with its same-shaped siblings. A learned span is what `adaptive_span` provides, with a
    gradient instead of a reward.
    """

    kind = "local_global"

    def __init__(
        self,
        heads: int,
        kv_heads: int,
        head_width: int,
        context: int,
        members: int = 1,
        *,
        window: int,
        global_tokens: int = 1,
    ):
        super().__init__(heads, kv_heads, head_width, context, members)
        self.window = _int_option(
            self.kind, "window", window, 1, "keys each query sees, itself included"
        )
        self.global_tokens = _int_option(
            self.kind, "global_tokens", global_tokens, 0, "leading tokens every query sees"
        )

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0
    ) -> Tensor:
        self._check(q, k, v)
        mask = window_mask(q.shape[-2], self.window, self.global_tokens, causal, q.device)
        if mask is None:
            return self._sdpa(q, k, v, dropout_p, causal=causal)
        return self._sdpa(q, k, v, dropout_p, mask=mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, global_tokens={self.global_tokens}"


class SlidingWindowAttention(LocalGlobalAttention):
    """Sliding-window attention: causal: query i sees keys j with i - window < j <= i; non-causal:
    |i - j| < window. Local-global attention without global tokens."""

    kind = "sliding_window"

    def __init__(
        self,
        heads: int,
        kv_heads: int,
        head_width: int,
        context: int,
        members: int = 1,
        *,
        window: int,
    ):
        super().__init__(
            heads, kv_heads, head_width, context, members, window=window, global_tokens=0
        )

    def extra_repr(self) -> str:
        return f"{ScoreAttention.extra_repr(self)}, window={self.window}"


def _reflect_unit(x: Tensor) -> Tensor:
    """The triangle wave of period 2 that is the identity on [0, 1]: a value in [0, 1] whose
    gradient is +-1 everywhere (a step past either end reflects back inside)."""
    t = torch.remainder(x, 2.0)
    return torch.where(t <= 1.0, t, 2.0 - t)


class AdaptiveSpanAttention(ScoreAttention):
    """Adaptive span (Sukhbaatar et al. 2019; docs/designs.md, design 003), the sound reading of
    `AdaptiveSpan`.

    Each (member, head) learns a span z in [0, max_span] tokens. Key j is weighted for query i by
    the soft mask m(d) = clamp((ramp + z - d) / ramp, 0, 1) of their distance d (i - j when causal,
    where keys after the query are masked; |i - j| when not), and the attention weights are
    proportional to m * exp(score): log m is added to the scores (-inf where m = 0). Keys closer
    than z get full weight, the next `ramp` tokens a linearly falling one, keys at d >= z + ramp
    none, so a head sees at most max_span + ramp - 1 tokens away. m(0) = 1 for every z >= 0, so
    each query always keeps itself and no row of the softmax is empty (no NaN, however small the
    span). The gradient reaches z through the keys on the ramp.

    `sharpen` keeps the original's temperature: scores are divided by
    `1 + temp_scale * (1 - z / max_span)` (a head with a short span gets a flatter softmax over
    its few keys). `span_loss` is Sukhbaatar's L1 penalty: `regularisation()` returns
    `span_loss * sum over members of the mean span over heads, in tokens` (each batched member
    gets the gradient it would get alone), or None when `span_loss` is 0.

    Fixes of the original: it computed `span_len = int(max_span * span_scale.mean().item())`, a host
    sync whose integer result carries no gradient (its span could never learn) and one span for all
    heads, then attended over the *first* span_len tokens only, truncating the sequence and
    changing the output length. Here the span is a per-head parameter with a gradient, the mask is
    soft and relative to each query, and the output keeps every token.

    Parametrisation: the parameter `span` holds each span as a fraction of max_span, read through
    a reflecting triangle wave (identity on [0, 1]), so z stays in range while the gradient stays
    +-1 everywhere. A sigmoid would saturate at the paper's usual start, the full span (init = 1),
    and learn slowly there; a plain clamp has no gradient once a step leaves the range and would
    stick; Sukhbaatar clamps the parameter after each optimizer step, which needs the training
    loop's help. `span` has shape `(members, heads)`, or `(heads,)` when members == 1.
    """

    kind = "adaptive_span"

    def __init__(
        self,
        heads: int,
        kv_heads: int,
        head_width: int,
        context: int,
        members: int = 1,
        *,
        max_span: int | None = None,
        ramp: float = 32,
        init: float = 1.0,
        sharpen: bool = False,
        temp_scale: float = 0.01,
        span_loss: float = 0.0,
    ):
        super().__init__(heads, kv_heads, head_width, context, members)
        kind = self.kind
        self.max_span = _int_option(
            kind,
            "max_span",
            self.context if max_span is None else max_span,
            1,
            "longest span in tokens",
        )
        self.ramp = _real_option(
            kind, "ramp", ramp, 0.0, None, True, "width of the mask's ramp in tokens"
        )
        self.init = _real_option(
            kind, "init", init, 0.0, 1.0, False, "initial span as a fraction of max_span"
        )
        if not isinstance(sharpen, bool):
            raise ValueError(f"{kind}: `sharpen` must be true or false, got {sharpen!r}")
        self.sharpen = sharpen
        self.temp_scale = _real_option(
            kind, "temp_scale", temp_scale, 0.0, None, False, "strength of the sharpening"
        )
        self.span_loss = _real_option(
            kind, "span_loss", span_loss, 0.0, None, False, "weight of the L1 penalty on spans"
        )
        lead = () if members == 1 else (members,)
        self.span = nn.Parameter(torch.empty(*lead, heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every span at `init * max_span` (skipped on the meta device: no values to set)."""
        if not self.span.is_meta:
            with torch.no_grad():
                self.span.fill_(self.init)

    def spans(self) -> Tensor:
        """`(members, heads)` float32 spans in tokens, in [0, max_span], differentiable."""
        fraction = _reflect_unit(self.span.float())
        return self.max_span * fraction.reshape(self.members, self.heads)

    def log_mask(self, n: int, causal: bool, device: torch.device) -> Tensor:
        """`(members, heads, n, n)` float32 `log m(d)`: 0 where a key has full weight, -inf where
        none (and, when causal, for keys after the query)."""
        z = self.spans().to(device)[:, :, None, None]
        i = torch.arange(n, device=device, dtype=torch.float32)[:, None]
        j = torch.arange(n, device=device, dtype=torch.float32)[None, :]
        d = i - j
        # causal: keys after the query are infinitely far (weight 0, whatever the span)
        d = d.masked_fill(d < 0, math.inf) if causal else d.abs()
        m = ((self.ramp + z - d) / self.ramp).clamp(0.0, 1.0)
        # log only where m > 0, so no 0 * inf reaches the gradient of z
        return torch.where(m > 0, m.clamp_min(1e-30).log(), torch.full_like(m, -math.inf))

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, causal: bool, dropout_p: float = 0.0
    ) -> Tensor:
        self._check(q, k, v)
        members, n = self.members, q.shape[-2]
        bias = self.log_mask(n, causal, q.device).to(q.dtype).unsqueeze(1)  # (M, 1, H, n, n)
        qs = q.reshape(members, -1, *q.shape[1:])  # (M, B, H, n, hw)
        if self.sharpen:
            temperature = 1.0 + self.temp_scale * (1.0 - self.spans().to(q.device) / self.max_span)
            qs = qs / temperature.to(q.dtype)[:, None, :, None, None]
        if q.device.type != "cuda":  # one call on (M, B, ...) views, the mask broadcast over B
            ks = k.reshape(members, -1, *k.shape[1:])
            vs = v.reshape(members, -1, *v.shape[1:])
            y = self._sdpa(qs, ks, vs, dropout_p, mask=bias)
            return y.reshape(q.shape[0], *y.shape[2:])
        # CUDA's memory-efficient kernel (which also differentiates the mask) takes 4-D inputs
        # and no grouped-query heads; otherwise SDPA falls back to its unfused math path
        batch = qs.shape[1]
        bias = bias.expand(members, batch, *bias.shape[2:]).reshape(-1, *bias.shape[2:])
        group = self.heads // self.kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(
            qs.reshape(q.shape), k, v, attn_mask=bias, dropout_p=dropout_p
        )

    def regularisation(self) -> Tensor | None:
        """Sukhbaatar's L1 span penalty, `span_loss * sum_members mean_heads z` (tokens); None at 0."""
        if self.span_loss == 0.0:
            return None
        return self.span_loss * self.spans().mean(-1).sum()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, max_span={self.max_span}, ramp={self.ramp:g}, "
            f"sharpen={self.sharpen}, temp_scale={self.temp_scale:g}, span_loss={self.span_loss:g}"
        )


ATTENTION_KINDS: dict[str, type[ScoreAttention]] = {
    "sdpa": SDPAttention,
    "sliding_window": SlidingWindowAttention,
    "adaptive_span": AdaptiveSpanAttention,
    "local_global": LocalGlobalAttention,
}
