"""Token mixers of design 003 (docs/designs.md) that replace a Block's whole attention sub-layer.

Two of the original's attention variants are not "scores for q·k" but whole mixers, so they plug in at
the `mixer` level (`runtime.transformer.Block`): `RelativeForce` ("dynamic force interactions")
and `Myelinated` (the original's `MyelinatedLayer`, nodes of Ranvier). Both take a stream shaped
`(members, batch, tokens, width)` and hold `members` independent weight sets through
`MemberLinear`/`MemberNorm` (members == 1: plain shapes), so same-shaped sub-models run as one
batched call. Every per-member parameter that is not a linear layer (directions, hop weights,
jump weights, memory) likewise carries a leading members dimension only when members > 1, so a
members=M module's state dict sliced at `[m]` loads into a members=1 module.

`takes_stream` tells the Block how to call the mixer: False means `x + mixer(norm(x))`; True means
`x = mixer(x)`, the mixer owning its norms and residuals (the myelinated layer does, as in the original).

Neither mixer uses a rotary embedding (the Transformer gives mixers none): relative force is
position-free apart from the causal mask, as in the seed, and the myelinated layer's attention is
the original's parameter-free self-attention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.layers import MemberLinear, MemberNorm, scaled_init_

# |e_i - r_j| is sqrt(clamp(|e_i|^2 + |r_j|^2 - 2 e_i.r_j, 0) + DISTANCE_EPS): finite gradients
# where e_i == r_j, and no negative square from the cancellation of the identity
DISTANCE_EPS = 1e-6

# codes of `Myelinated.last_route`
ROUTE_PASSED, ROUTE_SKIPPED, ROUTE_VISITED, ROUTE_ATTENDED = 0, 1, 2, 3


def _check_heads(kind: str, width: int, heads: int) -> None:
    if heads < 1 or width < 1 or width % heads:
        raise ValueError(
            f"{kind}: width {width} must be a positive multiple of heads {heads} "
            f"(each head gets width / heads value channels)"
        )


def _member_param(members: int, *shape: int) -> nn.Parameter:
    """An uninitialised parameter with a leading members dimension only when members > 1."""
    lead = () if members == 1 else (members,)
    return nn.Parameter(torch.empty((*lead, *shape)))


def _fill_(param: Tensor, values: Tensor | float) -> None:
    """Set a parameter's initial values (every member the same), skipped on the meta device."""
    if param.is_meta:
        return
    with torch.no_grad():
        if isinstance(values, Tensor):
            param.copy_(values.expand_as(param))
        else:
            param.fill_(values)


def _per_member(param: Tensor, members: int) -> Tensor:
    """`param` with its leading members dimension, added when members == 1."""
    return param.unsqueeze(0) if members == 1 else param


def _split_stream(x: Tensor, members: int, width: int, kind: str) -> Tensor:
    """`x` as `(members, batch, tokens, width)`; members == 1 also accepts `(batch, tokens, width)`."""
    if x.dim() < 3 or x.shape[-1] != width or (members > 1 and x.shape[0] != members):
        raise ValueError(
            f"{kind}: expected a stream (members={members}, batch, tokens, width={width}), "
            f"got {tuple(x.shape)}"
        )
    return x.reshape(members, -1, x.shape[-2], width)


def _future(n: int, device: torch.device) -> Tensor:
    """`(n, n)` bool, True where key j lies after query i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """Forward exactly `hard` (soft - soft is exactly 0), backward the gradient of `soft`."""
    return hard + (soft - soft.detach())


class RelativeForce(nn.Module):
    """Design 003's relative-force attention, with the original's bugs fixed.

    Per head h the score of query i for key j is `b * force_h(i, j) + (1 - b) * topo_h(i, j)`
    with `b = sigmoid(balance)`; softmax over j weighs the values (`value`, heads of width / heads
    channels) and `output` projects back. Like the original there are no query/key projections: the
    seed built `q_proj`/`k_proj` and never used them, so they are left out.

    force_h(i, j) = <u_ij, m_h> * exp(-|e_i - r_j|), with emissions `e = emitter(x)`, receptivity
    `r = receptor(x)`, `u_ij = (e_i - r_j) / |e_i - r_j|` and `m_h` the learned `direction` of head
    h. The original's einsum `'bstn,hd->bshtn'` summed the modulator over its width instead of
    contracting it with the direction, and left the result in (batch, query, head, key) order; here
    the contraction is a proper inner product. The original also built the (batch, n, n, width) pair
    tensor; this module never does: `<e_i - r_j, m_h> = <e_i, m_h> - <r_j, m_h>` and
    `|e_i - r_j|^2 = |e_i|^2 + |r_j|^2 - 2 e_i.r_j` (one matmul; clamped at 0, plus a small eps
    before the square root so the gradient stays finite), so memory is O(heads * n^2), not
    O(n^2 * width).

    topo: direct edges `A_h(i, j) = sigmoid(W_a x_i + W_b x_j + c_h)`; the original's Linear on the
    concatenated pair `[x_i, x_j]` is exactly this separable form (`edge` holds `[W_a; W_b]`,
    `edge_bias` holds c), again without a pair tensor. Path k is `A^k / n^((k-1)/2)` (the original
    divides each further hop by sqrt(n), n the sequence length; kept, so a prefix run alone is
    scaled slightly differently than inside a longer sequence, though nothing flows from later
    tokens), and `hop_levels` paths are mixed by `softmax(hop_weights)`.

    Causality fix: the original added its mask only to the final scores, after the hop powers, so a
    two-hop path i -> k -> j routed information from future tokens k > i into query i. In causal
    mode A is masked to j <= i *before* the powers (products of lower-triangular matrices stay
    lower-triangular, so no path passes through the future) and the scores are masked to j <= i.

    Scores are computed in float32 whatever the stream's dtype: the distance identity cancels
    catastrophically in bfloat16, and hop powers sum n terms. The edge bias exists whatever `bias`
    says (it sets the base connectivity of the sigmoid); `bias` governs the four projections.
    """

    takes_stream = False

    def __init__(
        self,
        width: int,
        heads: int,
        layers: int,
        context: int,
        members: int = 1,
        causal: bool = True,
        bias: bool = False,
        hop_levels: int = 3,
    ):
        super().__init__()
        _check_heads("relative_force", width, heads)
        if hop_levels < 1:
            raise ValueError(f"relative_force: hop_levels must be >= 1, got {hop_levels}")
        self.width, self.heads, self.context = width, heads, context
        self.members, self.causal, self.hop_levels = members, causal, hop_levels
        self.emitter = MemberLinear(members, width, width, bias)
        self.receptor = MemberLinear(members, width, width, bias)
        self.direction = _member_param(members, heads, width)
        if not self.direction.is_meta:
            nn.init.normal_(self.direction)  # the original's randn: <u, m_h> is O(1) for unit u
        self.edge = MemberLinear(members, width, 2 * heads)  # [W_a; W_b]
        self.edge_bias = _member_param(members, heads)
        _fill_(self.edge_bias, 0.0)
        self.hop_weights = _member_param(members, hop_levels)
        _fill_(self.hop_weights, 1.0 / hop_levels)
        self.balance = _member_param(members)
        _fill_(self.balance, 0.5)
        self.value = MemberLinear(members, width, width, bias)
        self.output = MemberLinear(members, width, width, bias)
        scaled_init_(self.output, layers)

    def forward(self, x: Tensor) -> Tensor:
        xs = _split_stream(x, self.members, self.width, "relative_force")
        m, b, n, d = xs.shape
        h = self.heads
        e = self.emitter(xs).float()
        r = self.receptor(xs).float()
        direction = _per_member(self.direction, m).float()  # (m, h, d)
        along_e = torch.einsum("mbnd,mhd->mbhn", e, direction)
        along_r = torch.einsum("mbnd,mhd->mbhn", r, direction)
        square = (
            e.square().sum(-1).unsqueeze(-1)
            + r.square().sum(-1).unsqueeze(-2)
            - 2 * (e @ r.transpose(-1, -2))
        )  # (m, b, n, n)
        distance = (square.clamp_min(0) + DISTANCE_EPS).sqrt()
        decay = (torch.exp(-distance) / distance).unsqueeze(2)  # (m, b, 1, n, n)
        force = (along_e.unsqueeze(-1) - along_r.unsqueeze(-2)) * decay  # (m, b, h, n, n)

        ends = self.edge(xs).float().transpose(-1, -2)  # (m, b, 2h, n)
        start, end = ends[:, :, :h], ends[:, :, h:]
        edge_bias = _per_member(self.edge_bias, m).float().view(m, 1, h, 1, 1)
        direct = torch.sigmoid(start.unsqueeze(-1) + end.unsqueeze(-2) + edge_bias)
        future = _future(n, xs.device) if self.causal else None
        if future is not None:
            direct = direct.masked_fill(future, 0.0)  # before the powers: no path via the future
        mix = torch.softmax(_per_member(self.hop_weights, m).float(), -1).view(m, 1, 1, 1, 1, -1)
        path = direct
        topo = mix[..., 0] * direct
        for k in range(1, self.hop_levels):
            path = (path @ direct) / math.sqrt(n)
            topo = topo + mix[..., k] * path

        balance = torch.sigmoid(_per_member(self.balance, m).float()).view(m, 1, 1, 1, 1)
        scores = balance * force + (1 - balance) * topo
        if future is not None:
            scores = scores.masked_fill(future, float("-inf"))
        v = self.value(xs).reshape(m, b, n, h, d // h).transpose(2, 3)
        y = torch.softmax(scores, -1).to(v.dtype) @ v  # (m, b, h, n, d / h)
        return self.output(y.transpose(2, 3).reshape(m, b, n, d)).reshape(x.shape)


class _Node(nn.Module):
    """One sub-layer (node of Ranvier): importance predictor, norm, gate, optional adapter."""

    def __init__(self, members: int, width: int, bias: bool, adapter: bool, layers: int):
        super().__init__()
        self.importance_norm = MemberNorm(members, width, "layernorm", bias)
        self.importance = MemberLinear(members, width, 1, bias=True)
        self.norm = MemberNorm(members, width, "layernorm", bias)
        self.gate = MemberLinear(members, width, 1, bias=True)
        self.adapter = MemberLinear(members, width, width, bias) if adapter else None
        if self.adapter is not None:
            scaled_init_(self.adapter, layers)


class Myelinated(nn.Module):
    """The myelinated layer (nodes of Ranvier): sub-layers that tokens may skip by learned
    importance, layer jumps chosen by a policy, a gated working memory, a final gated MLP.

    The original's rules are kept. Sub-layer s (`nodes[s]`) predicts each token's importance
    `sigmoid(importance(importance_norm(x)))`; tokens above `sparsity_threshold` are important.
    If the mean importance is below 0.2 (and s > 0) the sub-layer is skipped; otherwise, if it is
    above 0.3, the normed stream attends to itself (parameter-free: q = k = v = `norm(x)` split
    into heads, scaled by 1/sqrt(head width)), goes through the adapter on even sub-layers and
    is added gated: `x += sigmoid(gate(norm(x))) * attention`; then the working memory is updated
    `mem = g * mem + (1 - g) * mean(x)` with `g = sigmoid(memory_gate(mean(x)))`. After a visited
    (not skipped) sub-layer a jump may happen, with probability `policy[1]` where
    `policy = softmax(policy_out(relu(policy_hidden(mean(x0)))))` is computed once from the
    layer's input x0, as in the original: a jump of length l (1..3) moves to sub-layer
    `min(s + l, sublayers - 1)` and mixes `x += w_l * x0 + (1 - w_l) * mem` (`jump_weights`);
    otherwise the next sub-layer is s + 1. Finally `x += sigmoid(mlp_gate(x)) *
    mlp_out(gelu(mlp_in(mlp_norm(x))))` (width 4 * width).

    Fixes of the original:
    (a) no prints.
    (b) Deterministic in eval mode: a jump happens iff its probability exceeds 0.5, with the most
        probable length (the original drew coins in eval too). Since the jump probability is
        `policy[1]`, an eval jump has length 2. In training, coins and lengths are drawn from
        torch's RNG (inverse CDF on `torch.rand`, so the draws do not depend on the values).
    (c) Decisions are per example: the original's `.any()`/`.max()` over the batch let one example's
        coin decide for all. Every example (in causal mode, every position: see below) carries
        its own sub-layer pointer and its skip/attend/jump decisions are masks over the batch,
        so the batched output equals running each example alone.
    (d) Unimportant tokens are removed from the keys (the original added its 0/1 importance to the
        scores, which barely changes the softmax); each query always keeps itself, so no row is
        empty, and the causal mask is respected.
    (e) Straight-through gradients: the importance threshold is hard 0/1 forward and the
        sigmoid's gradient backward (the key weights are written as `keep_j * exp(s_ij)`
        normalised, which equals the masked softmax forward), so the predictors learn. The original's
        policy had no gradient path and no RL loss, so it could never learn; its jump coin and
        length choice get the same straight-through treatment (hard forward, backward through
        `policy`), so the task loss trains it.
    (f) No `.item()` and no value-dependent shapes: all decisions are masks.
    (g) Causality: the original's per-example statistics (mean-pooled input for the policy, mean
        importance, memory update) average over the whole sequence, leaking future tokens into
        every position. In causal mode every such mean is the running mean over the position's
        prefix, so each position decides from what it may see: its decisions are the ones the
        seed would take for the sequence ending there (earlier tokens follow their own paths),
        and its working memory is its own. In non-causal mode the means cover the whole sequence
        and all tokens of an example share one path, exactly the original's per-example semantics.

    Skipped and unattended work is masked, not saved: every sub-layer is computed for the whole
    batch and merged with `torch.where`, so compute is not reduced (this keeps shapes static for
    batching, members and compilation). The attention is computed explicitly (memory
    O(heads * n^2)) because the straight-through key weights need a gradient.

    The decision networks (importance predictors, gates, policy, memory gate) keep the original's
    biases whatever `bias` says, since a gate has to be able to learn its base rate; `bias`
    governs the adapters, the MLP and the norms. The policy, jump weights, working memory and
    memory gate exist only with two or more sub-layers: with one there is nowhere to jump, and
    the memory is read only by jumps.

    After each forward, `last_route` (unless compiling) holds, per token and sub-layer, one of
    `ROUTE_PASSED` (jumped over or never reached), `ROUTE_SKIPPED`, `ROUTE_VISITED` (visited
    without attention), `ROUTE_ATTENDED`; shape: the input's leading shape plus `(sublayers,)`.
    """

    takes_stream = True

    def __init__(
        self,
        width: int,
        heads: int,
        layers: int,
        context: int,
        members: int = 1,
        causal: bool = True,
        bias: bool = False,
        sublayers: int = 3,
        sparsity_threshold: float = 0.1,
        policy_width: int = 128,
    ):
        super().__init__()
        _check_heads("myelinated", width, heads)
        if sublayers < 1:
            raise ValueError(f"myelinated: sublayers must be >= 1, got {sublayers}")
        if not 0.0 <= sparsity_threshold <= 1.0:
            raise ValueError(
                f"myelinated: sparsity_threshold must lie in [0, 1], got {sparsity_threshold}"
            )
        if policy_width < 1:
            raise ValueError(f"myelinated: policy_width must be >= 1, got {policy_width}")
        self.width, self.heads, self.context = width, heads, context
        self.members, self.causal = members, causal
        self.sublayers, self.sparsity_threshold = sublayers, sparsity_threshold
        self.nodes = nn.ModuleList(
            _Node(members, width, bias, adapter=i % 2 == 0, layers=layers) for i in range(sublayers)
        )
        if sublayers > 1:
            self.policy_hidden = MemberLinear(members, width, policy_width, bias=True)
            self.policy_out = MemberLinear(members, policy_width, 3, bias=True)
            self.jump_weights = _member_param(members, 3)
            _fill_(self.jump_weights, torch.tensor([0.1, 0.05, 0.01]))
            self.working_memory = _member_param(members, width)
            _fill_(self.working_memory, 0.0)
            self.memory_gate = MemberLinear(members, width, 1, bias=True)
        self.mlp_norm = MemberNorm(members, width, "layernorm", bias)
        self.mlp_gate = MemberLinear(members, width, 1, bias=True)
        self.mlp_in = MemberLinear(members, width, 4 * width, bias)
        self.mlp_out = MemberLinear(members, 4 * width, width, bias)
        scaled_init_(self.mlp_out, layers)
        self.last_route: Tensor | None = None

    def _pool(self, x: Tensor) -> Tensor:
        """Mean over tokens, `(m, b, n, k) -> (m, b, 1, k)`; causal: running mean `(m, b, n, k)`."""
        if not self.causal:
            return x.float().mean(-2, keepdim=True).to(x.dtype)
        count = torch.arange(1, x.shape[-2] + 1, device=x.device, dtype=torch.float32)
        return (x.float().cumsum(-2) / count.unsqueeze(-1)).to(x.dtype)

    def _attend(self, h: Tensor, keep: Tensor) -> Tensor:
        """Parameter-free self-attention of `h` `(m, b, n, d)` over keys with `keep` `(m, b, n)`
        (straight-through 0/1); each query keeps itself, causal mode masks the future."""
        m, b, n, d = h.shape
        heads = self.heads
        q = h.reshape(m, b, n, heads, d // heads).transpose(2, 3)  # (m, b, heads, n, hw)
        scores = (q @ q.transpose(-1, -2)).float() * (d // heads) ** -0.5
        itself = torch.eye(n, dtype=torch.bool, device=h.device)
        weight = torch.where(itself, 1.0, keep.float().unsqueeze(-2)).unsqueeze(2)  # (m,b,1,n,n)
        if self.causal:
            weight = weight.masked_fill(_future(n, h.device), 0.0)
        kept = weight.detach() > 0.5
        top = scores.masked_fill(~kept, float("-inf")).amax(-1, keepdim=True).detach()
        # exp(s - top) for kept keys (<= 1); dropped keys are capped at 1 so that, multiplied by
        # their weight 0, they cannot overflow, yet still give the straight-through gradient
        p = (scores - top).clamp(max=0.0).exp() * weight
        y = (p / p.sum(-1, keepdim=True)).to(h.dtype) @ q
        return y.transpose(2, 3).reshape(m, b, n, d)

    def forward(self, x: Tensor) -> Tensor:
        stream = _split_stream(x, self.members, self.width, "myelinated")
        m, b, n, d = stream.shape
        x0 = h = stream
        steps = n if self.causal else 1  # decisions per position (causal) or per example
        pointer = torch.zeros(m, b, steps, dtype=torch.long, device=h.device)
        route = torch.zeros(m, b, steps, self.sublayers, dtype=torch.uint8, device=h.device)
        last = self.sublayers - 1
        if last > 0:
            policy = torch.softmax(
                self.policy_out(F.relu(self.policy_hidden(self._pool(x0)))).float(), -1
            )  # (m, b, steps, 3)
            jump_prob = policy[..., 1]
            jump_weights = _per_member(self.jump_weights, m).float().view(m, 1, 1, 3)
            memory = _per_member(self.working_memory, m).view(m, 1, 1, d).expand(m, b, steps, d)
            memory = memory.to(h.dtype)
        for s, node in enumerate(self.nodes):
            active = pointer == s
            soft = torch.sigmoid(node.importance(node.importance_norm(h)).float())[..., 0]
            hard = (soft > self.sparsity_threshold).float()
            level = self._pool(hard.unsqueeze(-1))[..., 0]  # mean importance, (m, b, steps)
            skip = active & (level < 0.2) if s > 0 else torch.zeros_like(active)
            proceed = active & ~skip
            attend = proceed & (level > 0.3)
            normed = node.norm(h)
            mixed = self._attend(normed, _straight_through(hard, soft))
            if node.adapter is not None:
                mixed = node.adapter(mixed)
            gate = torch.sigmoid(node.gate(normed))
            h = torch.where(attend.unsqueeze(-1), h + gate * mixed, h)
            target = torch.full_like(pointer, s + 1)
            if last > 0:
                summary = self._pool(h)
                keep = torch.sigmoid(self.memory_gate(summary))
                memory = torch.where(
                    attend.unsqueeze(-1), keep * memory + (1 - keep) * summary, memory
                )
            if s < last:
                if self.training:
                    coin = torch.rand_like(jump_prob) < jump_prob
                    draw = torch.rand_like(jump_prob).unsqueeze(-1)
                    length = (draw >= policy.cumsum(-1)[..., :2]).sum(-1)  # 0, 1, 2
                else:
                    coin = jump_prob > 0.5
                    length = policy.argmax(-1)
                jump = proceed & coin
                coin_st = _straight_through(coin.float(), jump_prob) * proceed.float()
                chosen = _straight_through(F.one_hot(length, 3).float(), policy)
                w = (chosen * jump_weights).sum(-1, keepdim=True).to(h.dtype)
                landing = w * x0 + (1 - w) * memory
                h = h + coin_st.unsqueeze(-1).to(h.dtype) * landing
                target = torch.where(jump, (s + 1 + length).clamp(max=last), target)
            pointer = torch.where(active, target, pointer)
            code = torch.where(
                skip, ROUTE_SKIPPED, torch.where(attend, ROUTE_ATTENDED, ROUTE_VISITED)
            )
            route[..., s] = torch.where(active, code, ROUTE_PASSED).to(torch.uint8)

        lift = torch.sigmoid(self.mlp_gate(h))
        h = h + lift * self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(h))))
        if not torch.compiler.is_compiling():
            self.last_route = route.expand(m, b, n, self.sublayers).reshape(
                *x.shape[:-1], self.sublayers
            )
        return h.reshape(x.shape)


MIXER_KINDS: dict[str, type[nn.Module]] = {
    "relative_force": RelativeForce,
    "myelinated": Myelinated,
}
