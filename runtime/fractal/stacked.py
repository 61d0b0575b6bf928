"""Every level of a FractalFormer in one full-width pass: the `stacked` schedule.

The `blocks` schedule (`FractalTransformer.run`) runs each level as its own block-diagonal pass:
the fewest FLOPs (level `l`'s matmuls cost `1/branching**l` of level 0's), but every operation of a
step is launched once per level, so a step runs several times the full model's kernels
(BENCHMARKS.md has the counts); on a small model each kernel is too small to fill a GPU.

Here the levels are stacked along a leading axis instead, `(levels, batch, tokens, width)`, every
level's stream in the full model's column layout (sub-model `j` of level `l` in its own columns),
and each operation of a block runs once for all levels:

* a linear is one batched matmul over `levels` copies of the full weight, each masked to the
  level's diagonal blocks (`torch.where`, fused with autocast's cast under `torch.compile`): the
  zero blocks make it exactly the level's block-diagonal map, at `levels` times level 0's FLOPs;
* a norm reduces squares over the finest level's column chunks once, then sums chunks per
  sub-model with a small 0/1 matrix per level, so one reduction serves every level's group size;
* attention is one `scaled_dot_product_attention` call over every level's heads. With narrow heads
  (head width `w / branching**l`) each head is zero-padded to level 0's width, keeping RoPE's
  half-split pairs (`[first half, zeros, second half, zeros]`), and its queries are multiplied by
  `sqrt(w / w_l)` so the kernel's `1/sqrt(w)` scale becomes the level's `1/sqrt(w_l)`. Zero
  dimensions add nothing to a dot product and produce zero outputs, so the result is exact; fused
  kernels pad narrow heads to such tiles anyway. Every level has `heads / kv_heads` query heads per
  key-value head, so grouped-query attention maps the concatenated heads correctly;
* residual exchanges (`upstream`, `downstream`) add the neighbouring level's stream: in column
  layout a model's children fill exactly its own columns;
* read-out heads run every sub-model at once: each sub-model's copy of the head weight is masked
  to its columns, and one cross-entropy covers all of them (`member_loss`).

The cost is FLOPs: `levels` times level 0's matmuls instead of `1 + 1/b + 1/b**2 + ...`, and narrow
heads padded. `auto` (the default, `FractalConfig.stacked`) therefore stacks small models on a GPU
only; at the original's size it is the faster schedule (BENCHMARKS.md, fractal levels).
What remains of its cost is not launches:
every level's stream is full width, so its attention, activations and norms cost level 0's
(a profile in BENCHMARKS.md). `level_batch: split` (`run(..., split=True)`) gives each level its
own share of the batch instead, a cheaper step (figures in BENCHMARKS.md). Both
schedules compute the same function of the same parameters (tests compare them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.fractal.levels import FractalConfig
from runtime.ports import LinearHead, PooledHead
from runtime.transformer import MLP, Block, SelfAttention, Transformer, TransformerConfig


def _block_ids(sizes: tuple[int, ...], k: int) -> Tensor:
    """Which of `k` diagonal blocks each row (or column) belongs to, for the row-stacked parts of a
    fused weight (each part split into `k` blocks on its own)."""
    return torch.cat([torch.arange(size) // (size // k) for size in sizes])


class LevelStack(nn.Module):
    """Index tables for the stacked schedule of one fractal (non-persistent buffers: the
    `state_dict` stays the full model's). `run(model, x)` does the pass."""

    def __init__(self, cfg: TransformerConfig, fractal: FractalConfig):
        super().__init__()
        self.cfg, self.fractal = cfg, fractal
        ks = [fractal.blocks(level) for level in range(fractal.levels)]
        self.members_per_level = tuple(ks)
        hw, heads, kv = cfg.head_width, cfg.heads, cfg.n_kv_heads
        # per level: (query heads, key-value heads, head width) of the whole level
        self.level_heads = tuple(
            (k * heads, k * kv, hw // k) if fractal.heads == "narrow" else (heads, kv, hw)
            for k in ks
        )
        self.rope = cfg.position == "rope"
        # on the meta device (the compiler counting parameters) these are shapes only
        tables = {
            **self._linear_tables(ks),
            **self._norm_tables(ks),
            **self._attention_tables(),
            **self._readout_tables(ks),
        }
        for name, table in tables.items():
            self.register_buffer(name, table, persistent=False)

    def _linear_tables(self, ks: list[int]) -> dict[str, Tensor]:
        """Per linear, each row's and column's diagonal block at every level: the mask of level
        `l` is `rows[l, :, None] == cols[l, None, :]`."""
        cfg = self.cfg
        hw, heads, kv = cfg.head_width, cfg.heads, cfg.n_kv_heads
        parts = {
            "qkv": ((heads * hw, kv * hw, kv * hw), cfg.width),
            "proj": ((cfg.width,), heads * hw),
            "fc": ((cfg.inner_width,) * (2 if cfg.gated else 1), cfg.width),
            "down": ((cfg.width,), cfg.inner_width),
        }
        tables = {}
        for name, (rows, cols) in parts.items():
            tables[f"{name}_rows"] = torch.stack([_block_ids(rows, k) for k in ks]).int()
            tables[f"{name}_cols"] = torch.stack([_block_ids((cols,), k) for k in ks]).int()
        return tables

    def _norm_tables(self, ks: list[int]) -> dict[str, Tensor]:
        """Norms reduce over chunks of the finest level's width; `norm_groups[l, i, j]` says
        whether chunks `i` and `j` belong to one sub-model at level `l`."""
        chunks = ks[-1]
        ids = torch.arange(chunks)
        same = torch.stack(
            [ids[:, None] // (chunks // k) == ids[None, :] // (chunks // k) for k in ks]
        )
        widths = torch.tensor([self.cfg.width / k for k in ks]).view(len(ks), 1, 1, 1)
        return {"norm_groups": same.float(), "norm_widths": widths}

    def _attention_tables(self) -> dict[str, Tensor]:
        """Per packed head, the query scale `sqrt(hw / w_l)` and, with RoPE, its level's angles
        (zero in the padding), the scale folded into the query tables."""
        cfg, hw = self.cfg, self.cfg.head_width
        q_heads = [h for h, _, _ in self.level_heads]
        widths = [w for _, _, w in self.level_heads]
        scale = torch.cat(
            [
                torch.full((h,), math.sqrt(hw / w), dtype=torch.float64)
                for h, w in zip(q_heads, widths, strict=True)
            ]
        ).view(-1, 1, 1)
        tables = {"q_scale": scale.float()}
        if not self.rope:
            return tables
        per_head = []
        for h, w in zip(q_heads, widths, strict=True):
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, w, 2, dtype=torch.float64) / w)
            angles = torch.outer(torch.arange(cfg.context, dtype=torch.float64), inv_freq)
            per_head.append(F.pad(angles, (0, (hw - w) // 2)).unsqueeze(0).expand(h, -1, -1))
        angles = torch.cat(per_head)  # (query heads, context, hw/2)
        level_of_kv = torch.cat(
            [torch.full((k,), i) for i, (_, k, _) in enumerate(self.level_heads)]
        )
        first_q = torch.tensor([0, *q_heads]).cumsum(0)[:-1]
        kv_angles = angles[first_q[level_of_kv]]  # a key head turns like its level's query heads
        tables["q_cos"] = (scale * angles.cos()).float()
        tables["q_sin"] = (scale * angles.sin()).float()
        tables["k_cos"] = kv_angles.cos().float()
        tables["k_sin"] = kv_angles.sin().float()
        return tables

    def _readout_tables(self, ks: list[int]) -> dict[str, Tensor]:
        """Sub-model `m` (ordered level by level) reads its level's stream, masked to its columns."""
        level = torch.cat([torch.full((k,), i) for i, k in enumerate(ks)])
        cols = torch.cat(
            [_block_ids((self.cfg.width,), k).unsqueeze(0) == torch.arange(k)[:, None] for k in ks]
        )
        return {"member_level": level, "member_cols": cols.unsqueeze(1)}

    # ----------------------------------------------------------------- the pass

    def run(self, model: Transformer, x: Tensor, split: bool = False) -> Tensor:
        """`x` `(batch, tokens, width)`: the input stream of `model`, the fractal's full model, which
        every level reads (`split`: level `l` reads the `l`-th of `levels` equal shares of the
        batch). Returns every level's final normed state, `(levels, batch (or share), tokens,
        width)`."""
        levels = self.fractal.levels
        if model.positions is not None:
            x = x + model.positions.weight[: x.shape[-2]].to(x.dtype)
        h = split_batch(x, levels, 0.0) if split else x.unsqueeze(0).expand(levels, *x.shape)
        if self.cfg.dropout:
            h = F.dropout(h, self.cfg.dropout, model.training)  # a mask of its own per level
        step = {"upstream": 1, "downstream": -1}.get(self.fractal.residual)
        for block in model.blocks:
            h = block(h, None, LevelParts(self, block))
            if step == 1:  # each model receives its children's streams: the next level's columns
                h = h + F.pad(h[1:], (0, 0, 0, 0, 0, 0, 0, 1))
            elif step == -1:  # each receives its slice of its parent's
                h = h + F.pad(h[:-1], (0, 0, 0, 0, 0, 0, 1, 0))
        return self.norm(model.norm_out, h)

    def norm(self, norm: nn.Module, x: Tensor) -> Tensor:
        """Each sub-model's LayerNorm/RMSNorm over its own columns, every level at once (float32)."""
        levels, chunks = self.norm_groups.shape[:2]
        xs = x.float().reshape(
            *x.shape[:-1], chunks, -1
        )  # (levels, batch, tokens, chunks, d/chunks)
        groups = self.norm_groups.view(levels, 1, 1, chunks, chunks)

        def group_mean(v: Tensor) -> Tensor:
            sums = v.sum(-1).unsqueeze(-2)  # (levels, batch, tokens, 1, chunks)
            return ((sums * groups).sum(-1) / self.norm_widths).unsqueeze(-1)

        if norm.kind == "rmsnorm":
            y = xs * torch.rsqrt(group_mean(xs * xs) + norm.eps)
        else:
            centred = xs - group_mean(xs)
            y = centred * torch.rsqrt(group_mean(centred * centred) + norm.eps)
        y = y.flatten(-2) * norm.weight
        return y if norm.bias is None else y + norm.bias

    def linear(self, x: Tensor, name: str, weight: Tensor, bias: Tensor | None) -> Tensor:
        """`x` `(levels, batch, tokens, in)` through each level's diagonal blocks of `weight`."""
        rows, cols = getattr(self, f"{name}_rows"), getattr(self, f"{name}_cols")
        masked = torch.where(rows.unsqueeze(-1) == cols.unsqueeze(-2), weight, 0.0)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        if bias is None:
            y = torch.bmm(flat, masked.transpose(1, 2))
        else:
            y = torch.baddbmm(bias.view(1, 1, -1), flat, masked.transpose(1, 2))
        return y.view(*x.shape[:-1], y.shape[-1])

    def attention(self, attn: SelfAttention, x: Tensor) -> Tensor:
        """`attn` for every level: one kernel call over all levels' packed heads, each rotated
        by its level's tables (which also hold its query scale)."""
        cfg, hw = self.cfg, self.cfg.head_width
        qkv = self.linear(x, "qkv", attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.split((cfg.heads * hw, cfg.n_kv_heads * hw, cfg.n_kv_heads * hw), dim=-1)
        q = self._pack(q, [h for h, _, _ in self.level_heads])
        k = self._pack(k, [h for _, h, _ in self.level_heads])
        v = self._pack(v, [h for _, h, _ in self.level_heads])
        n = q.shape[-2]
        if self.rope:
            q = _rotate(q, self.q_cos[:, :n], self.q_sin[:, :n])
            k = _rotate(k, self.k_cos[:, :n], self.k_sin[:, :n])
        else:
            q = (q.float() * self.q_scale).to(q.dtype)
        out = attn.scores(q, k, v)
        return self.linear(self._unpack(out), "proj", attn.proj.weight, attn.proj.bias)

    def mlp(self, mlp: MLP, x: Tensor) -> Tensor:
        hidden = self.linear(x, "fc", mlp.fc.weight, mlp.fc.bias)
        return self.linear(mlp.activate(hidden), "down", mlp.proj.weight, mlp.proj.bias)

    def _pack(self, t: Tensor, heads: list[int]) -> Tensor:
        widths = [w for _, _, w in self.level_heads]
        return _PackHeads.apply(t, tuple(heads), tuple(widths), self.cfg.head_width)

    def _unpack(self, out: Tensor) -> Tensor:
        widths = [w for _, _, w in self.level_heads]
        heads = tuple(h for h, _, _ in self.level_heads)
        return _UnpackHeads.apply(out, heads, tuple(widths), self.cfg.head_width)

    # ----------------------------------------------------------------- read-out

    def member_outputs(self, head: nn.Module, states: Tensor) -> Tensor:
        """A linear (or pooled) read-out of every sub-model: `(members, batch, tokens, out)`
        (pooled: `(members, batch, out)`), members ordered level by level. Sub-model `m` reads
        its level's state through the head weight's columns of its own block."""
        if isinstance(head, PooledHead):
            states = head.pool_tokens(states)
        elif not isinstance(head, LinearHead):
            raise TypeError(f"cannot slice a {type(head).__name__} head")
        chosen = states.index_select(0, self.member_level)
        out = head.proj.weight.shape[0]
        # rows padded to a multiple of 8: a vocabulary like 65 characters leaves the matmul's
        # output rows misaligned, and GPUs then take a much slower kernel
        weight = F.pad(head.proj.weight, (0, 0, 0, -out % 8))
        weight = torch.where(self.member_cols, weight, 0.0)  # (members, out, width)
        flat = chosen.reshape(chosen.shape[0], -1, chosen.shape[-1])
        y = torch.bmm(flat, weight.transpose(1, 2))[..., :out]
        if head.proj.bias is not None:
            y = y + head.proj.bias
        return y.reshape(*chosen.shape[:-1], out)

    def member_targets(self, targets: Tensor, split: bool) -> Tensor:
        """Each sub-model's targets, `(members, batch (or share), ...)`."""
        if split:
            shares = split_batch(targets, self.fractal.levels, IGNORED)
            return shares.index_select(0, self.member_level)
        return targets.unsqueeze(0).expand(len(self.member_level), *targets.shape)

    def split_levels(self, members: Tensor) -> list[Tensor]:
        """`(members, ...)` -> per level `(..., k_level, out)` views, the layout `all_levels` serves."""
        return [part.movedim(0, -2) for part in members.split(self.members_per_level)]


class LevelParts:
    """One block's sub-layers for every level at once (`Block.forward`'s parts)."""

    def __init__(self, stack: LevelStack, block: Block):
        self.stack, self.block = stack, block

    def norm_attn(self, x: Tensor) -> Tensor:
        return self.stack.norm(self.block.norm_attn, x)

    def attend(self, x: Tensor, rotary: nn.Module | None) -> Tensor:
        return self.stack.attention(self.block.attn, x)  # each level's rotation is in its tables

    def norm_mlp(self, x: Tensor) -> Tensor:
        return self.stack.norm(self.block.norm_mlp, x)

    def mlp(self, x: Tensor) -> Tensor:
        return self.stack.mlp(self.block.mlp, x)


def _to_heads(t: Tensor, heads: tuple[int, ...], widths: tuple[int, ...], hw: int) -> Tensor:
    """`(levels, batch, tokens, heads_l * w_l)` -> `(batch, sum heads_l, tokens, hw)`: every
    level's heads side by side, each half of a narrow head padded with zeros to `hw / 2`."""
    if all(w == hw for w in widths) and len(set(heads)) == 1:  # no padding: a permutation
        levels, batch, tokens, _ = t.shape
        split = t.view(levels, batch, tokens, heads[0], hw).permute(1, 0, 3, 2, 4)
        return split.reshape(batch, levels * heads[0], tokens, hw)
    parts = []
    for level, (count, w) in enumerate(zip(heads, widths, strict=True)):
        part = t[level].unflatten(-1, (count, 2, w // 2))
        parts.append(F.pad(part, (0, (hw - w) // 2)).flatten(-2))
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous()


def _from_heads(o: Tensor, heads: tuple[int, ...], widths: tuple[int, ...], hw: int) -> Tensor:
    """The inverse of `_to_heads` on the real (unpadded) dimensions."""
    batch, _, tokens, _ = o.shape
    if all(w == hw for w in widths) and len(set(heads)) == 1:
        split = o.view(batch, len(heads), heads[0], tokens, hw).permute(1, 0, 3, 2, 4)
        return split.reshape(len(heads), batch, tokens, heads[0] * hw)
    o = o.transpose(1, 2)  # (batch, tokens, heads, hw)
    levels, first = [], 0
    for count, w in zip(heads, widths, strict=True):
        part = o[:, :, first : first + count].unflatten(-1, (2, hw // 2))[..., : w // 2]
        levels.append(part.flatten(-3))
        first += count
    return torch.stack(levels)


class _PackHeads(torch.autograd.Function):
    """`_to_heads`, whose gradient is `_from_heads` of the gradient: written out, because autograd's
    own backward of the slices, pads and concatenation sums one zero-filled tensor per level
    (a much slower kernel on the GPU, in a profile at the original's size)."""

    @staticmethod
    def forward(ctx, t, heads, widths, hw):  # type: ignore[override]
        ctx.shape = (heads, widths, hw)
        return _to_heads(t, heads, widths, hw)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _from_heads(grad, *ctx.shape), None, None, None


class _UnpackHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, heads, widths, hw):  # type: ignore[override]
        ctx.shape = (heads, widths, hw)
        return _from_heads(o, heads, widths, hw)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _to_heads(grad, *ctx.shape), None, None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE's half-split rotation (with the query scale folded into the tables), in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


IGNORED = -100  # F.cross_entropy's ignore_index


def split_batch(t: Tensor, levels: int, fill: float) -> Tensor:
    """`(batch, ...)` -> `(levels, share, ...)` under `level_batch: split`: level `l` takes the
    `l`-th run of `share = ceil(batch / levels)` sequences. A batch that does not divide is
    padded at its end with rows of `fill` (zero inputs, ignored targets), so the last share is
    short by fewer than `levels` sequences and no sequence is dropped."""
    batch = t.shape[0]
    if batch < levels:
        raise ValueError(
            f"a batch of {batch} sequences cannot give each of {levels} levels a share "
            "(`level_batch: split`); use a batch of at least one sequence per level"
        )
    share = -(-batch // levels)
    if share * levels != batch:
        t = torch.cat([t, t.new_full((share * levels - batch, *t.shape[1:]), fill)])
    return t.view(levels, share, *t.shape[1:])


def member_loss(
    logits: Tensor, targets: Tensor, members_per_level: tuple[int, ...], weights: tuple[float, ...]
) -> tuple[Tensor, list[Tensor]]:
    """`level_loss` for stacked read-outs `(members, batch, tokens, vocab)` and targets `(members,
    batch, tokens)`: one cross-entropy over every sub-model, then each level's mean over its
    members, weighted. Targets of -100 are ignored, as by `F.cross_entropy`."""
    members, vocab = logits.shape[0], logits.shape[-1]
    losses = F.cross_entropy(
        logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction="none"
    ).view(members, -1)
    counted = (targets.reshape(members, -1) != IGNORED).sum(1).clamp_min(1)
    per_member = losses.sum(1) / counted
    per_level = [part.mean() for part in per_member.split(members_per_level)]
    total = sum(w * loss for w, loss in zip(weights, per_level, strict=True))
    return total, per_level
