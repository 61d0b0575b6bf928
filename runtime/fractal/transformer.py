"""FractalFormer (docs/designs.md, design 001; evintunador/FractalFormer): a transformer that
holds smaller copies of itself, whose weights are slices of its own.

Level 0 is the full model of width `d`. Level `l` holds `k = branching**l` sub-models of width
`d / k`; sub-model `j` of level `l` owns the `j`-th *diagonal block* of every weight matrix (rows
and columns `[j*d_l, (j+1)*d_l)` of the residual width, the same blocks of the attention and MLP
inner widths, and the same slices of norm gains, biases and position tables). Blocks of level `l+1`
sit inside those of level `l`, as Sierpinski's triangles sit in theirs: self-similar, disjoint
within a level. Every sub-model keeps the head count; head widths shrink by `branching` a level,
as in the original (`configs.py`: `head_dim_list`); with `heads: subset`, sub-model `j` instead
owns heads `[j*h/k, (j+1)*h/k)` at full width: the same weight blocks, cut into heads differently,
which keeps attention at the head width fast kernels are built for.

Why everything is a "window": the `k` sub-models of a level, laid side by side, fill exactly the
columns of the full residual stream, so a whole level runs as *one* block-diagonal pass over a
`(batch, tokens, d)` stream: each linear is one batched matmul over its `k` diagonal blocks (views
of the parent's weights, never copies per sub-model), norms normalise each block, and attention runs
all `k * heads` heads in one `scaled_dot_product_attention` call. One sub-model alone is the same
code over a window of one block. The original looped over sub-models in Python. This is the
`blocks` schedule; `runtime.fractal.stacked` runs every level in one full-width pass instead
(`schedule: stacked`), which wins where a step is bound by its number of kernels.

Residual variants (the original's later notebooks), applied after every block:
* `none`: levels are independent models sharing weights;
* `upstream`: each model's stream receives its children's streams (their concatenation is exactly
  its own width), so small models feed the large one (`FractalFormer_UpstreamResidual.ipynb`);
* `downstream`: each model's stream receives its slice of its parent's stream (the mirror image;
  the original names the idea but ships no code for it).
In both, the exchange uses every level's output of the same block, before the exchange.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.fractal.levels import (
    STACK_WIDTH,  # noqa: F401  (re-exported: `FractalConfig.stacked`'s threshold)
    FractalConfig,
    Window,
    diagonal_blocks,
    to_columns,
    to_members,
)
from runtime.fractal.stacked import LevelStack
from runtime.transformer import (
    Block,
    RotaryEmbedding,
    Transformer,
    TransformerConfig,
)


class FractalTransformer(Transformer):
    """The full model is an ordinary `Transformer` (same parameters, same `state_dict`); the other
    levels are block-diagonal passes over those parameters.

    `forward` takes the federation's `(1, batch, tokens, d)` stream and returns the level-0 state
    (under `upstream`, with every level run to feed it). `run(x, windows)` runs chosen sub-models.
    """

    def __init__(self, cfg: TransformerConfig, fractal: FractalConfig):
        super().__init__(cfg, members=1)
        self.fractal = fractal
        k_last = fractal.blocks(fractal.levels - 1)
        whole = (
            cfg.heads % k_last == 0 and cfg.n_kv_heads % k_last == 0
            if fractal.heads == "subset"
            else cfg.width % (cfg.heads * k_last) == 0
        )
        if not whole or cfg.inner_width % k_last:
            raise ValueError(
                f"width {cfg.width} (heads {cfg.heads}) and MLP width {cfg.inner_width} must split into "
                f"{k_last} blocks of whole heads"
            )
        # narrow heads need a rotary table per head width; a subset of heads keeps level 0's
        self.level_rotary = nn.ModuleList(
            RotaryEmbedding(cfg.head_width // fractal.blocks(level), cfg.context, cfg.rope_theta)
            for level in range(1, fractal.levels)
            if cfg.position == "rope" and fractal.heads == "narrow"
        )
        self.level_stack = LevelStack(cfg, fractal)
        subs = [self.sub_config(level) for level in range(fractal.levels)]
        self.level_heads = tuple((sub.heads, sub.n_kv_heads, sub.head_width) for sub in subs)

    # ----------------------------------------------------------------- whole model, every level

    def forward(self, x: Tensor) -> Tensor:
        if self.fractal.residual != "upstream" or self.fractal.levels == 1:
            return super().forward(x)  # level 0 depends on no other level
        if self.stacks(x):
            return self.level_stack.run(self, x[0])[:1]
        return self.run(x[0], self.all_windows(), as_columns=False)[0]

    def stacks(self, x: Tensor) -> bool:
        """Whether all levels at once run stacked for this input (`FractalConfig.stacked`)."""
        return self.fractal.stacked(self.cfg.width, x.device)

    def all_windows(self) -> list[Window]:
        return [
            Window(level, 0, self.fractal.blocks(level)) for level in range(self.fractal.levels)
        ]

    def sub_model_windows(self, level: int, index: int) -> list[Window]:
        """What running sub-model `(level, index)` alone needs: itself, plus its descendants
        (`upstream`) or its ancestors (`downstream`). Its own window is the last."""
        self.check_address(level, index)
        b, levels = self.fractal.branching, self.fractal.levels
        if self.fractal.residual == "upstream":
            below = [
                Window(m, index * b ** (m - level), b ** (m - level))
                for m in range(level + 1, levels)
            ]
            return [*below, Window(level, index, 1)]
        if self.fractal.residual == "downstream":
            return [Window(m, index // b ** (level - m), 1) for m in range(level + 1)]
        return [Window(level, index, 1)]

    def check_address(self, level: int, index: int) -> None:
        f = self.fractal
        if not 0 <= level < f.levels:
            raise ValueError(
                f"level {level} is out of range: this fractal has levels 0..{f.levels - 1}"
            )
        if not 0 <= index < f.blocks(level):
            raise ValueError(
                f"index {index} is out of range: level {level} has sub-models 0..{f.blocks(level) - 1}"
            )

    def columns(self, window: Window) -> tuple[int, int]:
        """The residual-stream columns a window covers."""
        d = self.cfg.width // self.fractal.blocks(window.level)
        return window.first * d, (window.first + window.count) * d

    def run(
        self, x: Tensor, windows: list[Window], offset: int = 0, as_columns: bool = True
    ) -> list[Tensor]:
        """Run `windows` (at most one per level) in lock-step, block by block, exchanging residual
        streams between adjacent levels as `residual` says. `x` is the input stream covering columns
        `[offset, offset + x.shape[-1])`, which must include every window's columns. Returns each
        window's final (normed) state in the order given: `(batch, tokens, count * d_level)`, or
        with `as_columns=False` the sub-model-major `(count, batch, tokens, d_level)` it ran in."""
        states = []
        for w in windows:
            a, b = self.columns(w)
            h = x[..., a - offset : b - offset]
            if self.positions is not None:
                h = h + self.positions.weight[: x.shape[-2], a:b].to(h.dtype)
            if self.cfg.dropout:
                h = F.dropout(h, self.cfg.dropout, self.training)
            states.append(to_members(h, w.count))
        by_level = {w.level: i for i, w in enumerate(windows)}
        step = {"upstream": 1, "downstream": -1}.get(self.fractal.residual)
        for block in self.blocks:
            outs = [
                block(h, self.rotary_of(w.level), self.parts(block, w))
                for h, w in zip(states, windows, strict=True)
            ]
            if step is None:
                states = outs
                continue
            states = []
            for i, w in enumerate(windows):
                other = by_level.get(w.level + step)
                if other is None:
                    states.append(outs[i])
                    continue
                a, b = self.columns(w)
                a_other, _ = self.columns(windows[other])
                received = to_columns(outs[other])[..., a - a_other : b - a_other]
                states.append(outs[i] + to_members(received, w.count))
        finals = [
            window_norm(self.norm_out, h, self.fractal.blocks(w.level), w)
            for h, w in zip(states, windows, strict=True)
        ]
        return [to_columns(h) for h in finals] if as_columns else finals

    def parts(self, block: Block, window: Window) -> WindowParts:
        """`block`'s sub-layers over `window`, for `Block.forward`."""
        level = window.level
        return WindowParts(block, window, self.fractal.blocks(level), self.level_heads[level])

    def rotary_of(self, level: int) -> nn.Module | None:
        """The rotary table of `level`'s heads: level 0's, unless they are narrower."""
        if level == 0 or self.fractal.heads == "subset":
            return self.rotary
        return self.level_rotary[level - 1] if self.level_rotary else None

    # ----------------------------------------------------------------- standalone copies and merging

    def sub_config(self, level: int) -> TransformerConfig:
        """The shape of a standalone transformer equal to a sub-model of `level`."""
        k = self.fractal.blocks(level)
        cfg = self.cfg
        subset = self.fractal.heads == "subset"
        return TransformerConfig(
            width=cfg.width // k,
            heads=cfg.heads // k if subset else cfg.heads,
            layers=cfg.layers,
            context=cfg.context,
            kv_heads=(cfg.kv_heads // k if subset else cfg.kv_heads) if cfg.kv_heads else None,
            mlp_width=cfg.inner_width // k,
            activation=cfg.activation,
            norm=cfg.norm,
            position=cfg.position,
            rope_theta=cfg.rope_theta,
            dropout=cfg.dropout,
            bias=cfg.bias,
            causal=cfg.causal,
        )

    def sub_model_tensors(self, level: int, index: int) -> dict[str, Tensor]:
        """Sub-model `(level, index)`'s weights under a standalone `Transformer`'s names, as views
        into this model's parameters (write into them to merge, read them to extract)."""
        self.check_address(level, index)
        k, cfg = self.fractal.blocks(level), self.cfg
        d = cfg.width // k
        views: dict[str, list[Tensor]] = {}

        def blocks(name: str, weight: Tensor, rows: tuple[int, ...] | None = None) -> None:
            parts = weight.split(rows) if rows else [weight]
            views[name] = [
                diagonal_blocks(p, k)[index] if p.dim() == 2 else p.view(k, -1)[index]
                for p in parts
            ]

        hw = cfg.head_width
        qkv_rows = (cfg.heads * hw, cfg.n_kv_heads * hw, cfg.n_kv_heads * hw)
        fc_rows = (cfg.inner_width,) * (2 if cfg.gated else 1)
        for i, block in enumerate(self.blocks):
            p = f"blocks.{i}."
            blocks(p + "attn.qkv.weight", block.attn.qkv.weight, qkv_rows)
            blocks(p + "attn.proj.weight", block.attn.proj.weight)
            blocks(p + "mlp.fc.weight", block.mlp.fc.weight, fc_rows)
            blocks(p + "mlp.proj.weight", block.mlp.proj.weight)
            if cfg.bias:
                blocks(p + "attn.qkv.bias", block.attn.qkv.bias, qkv_rows)
                blocks(p + "attn.proj.bias", block.attn.proj.bias)
                blocks(p + "mlp.fc.bias", block.mlp.fc.bias, fc_rows)
                blocks(p + "mlp.proj.bias", block.mlp.proj.bias)
            for norm in ("norm_attn", "norm_mlp"):
                for kind in ("weight", "bias"):
                    tensor = getattr(getattr(block, norm), kind)
                    if tensor is not None:
                        blocks(f"{p}{norm}.{kind}", tensor)
        for kind in ("weight", "bias"):
            tensor = getattr(self.norm_out, kind)
            if tensor is not None:
                blocks(f"norm_out.{kind}", tensor)
        if self.positions is not None:
            views["positions.weight"] = [self.positions.weight[:, index * d : (index + 1) * d]]
        return views  # type: ignore[return-value]

    def extract(self, level: int, index: int) -> Transformer:
        """A standalone `Transformer` with copies of sub-model `(level, index)`'s weights. Under
        `residual: none` it computes exactly what the sub-model computes."""
        sub = Transformer(self.sub_config(level)).to(self.norm_out.weight.device)
        state = {
            name: torch.cat(parts, dim=0)
            for name, parts in self.sub_model_tensors(level, index).items()
        }
        sub.load_state_dict(state, strict=True)
        return sub

    @torch.no_grad()
    def implant(self, level: int, index: int, source: Transformer) -> None:
        """Make sub-model `(level, index)` a copy of `source` (model merging: train small models
        alone, then make them the slices of a larger one). Other blocks keep their values."""
        expected = self.sub_config(level)
        if source.cfg != expected:
            raise ValueError(
                f"sub-model ({level}, {index}) has the shape {expected}, but the source has {source.cfg}"
            )
        own = source.state_dict()
        for name, parts in self.sub_model_tensors(level, index).items():
            for part, value in zip(
                parts, own[name].split([p.shape[0] for p in parts]), strict=True
            ):
                part.copy_(value)


class WindowParts:
    """One block's sub-layers over a window of sub-models (`Block.forward`'s parts), reading the
    block's weights through views. The stream is sub-model-major, `(count, batch, tokens,
    d_level)`: each linear is one `bmm` over the window's diagonal weight blocks (as
    `runtime.layers.MemberLinear` does for stacked gears), each norm is per sub-model, and
    attention sees `count * batch` sequences of the level's `heads` `(h, kv, hw)`."""

    def __init__(self, block: Block, window: Window, blocks: int, heads: tuple[int, int, int]):
        self.block, self.window, self.blocks, self.heads = block, window, blocks, heads

    def norm_attn(self, x: Tensor) -> Tensor:
        return window_norm(self.block.norm_attn, x, self.blocks, self.window)

    def norm_mlp(self, x: Tensor) -> Tensor:
        return window_norm(self.block.norm_mlp, x, self.blocks, self.window)

    def attend(self, x: Tensor, rotary: nn.Module | None) -> Tensor:
        attn = self.block.attn
        q, kv = attn.cfg.heads * attn.cfg.head_width, attn.cfg.n_kv_heads * attn.cfg.head_width
        qkv = self.linear(x, attn.qkv, (q, kv, kv))
        return self.linear(attn.attend(qkv, rotary, self.heads), attn.proj)

    def mlp(self, x: Tensor) -> Tensor:
        mlp = self.block.mlp
        hidden = self.linear(x, mlp.fc, (mlp.cfg.inner_width,) * (2 if mlp.cfg.gated else 1))
        return self.linear(mlp.activate(hidden), mlp.proj)

    def linear(self, x: Tensor, linear: nn.Module, rows: tuple[int, ...] = ()) -> Tensor:
        """`x` `(count, batch, tokens, in_k)` through the window's diagonal blocks of `linear`
        (a fused weight's row-stacked `rows` parts, as qkv's three, are each split on its own)."""
        k, w = self.blocks, self.window
        pick = slice(w.first, w.first + w.count)
        weights = linear.weight.split(rows) if rows else (linear.weight,)
        if len(weights) == 1:
            weight = diagonal_blocks(weights[0], k)[pick]
        else:
            weight = torch.cat([diagonal_blocks(p, k)[pick] for p in weights], dim=1)
        flat = x.reshape(w.count, -1, x.shape[-1])
        if linear.bias is None:
            y = torch.bmm(flat, weight.transpose(1, 2))
        else:
            biases = [
                b.view(k, -1)[pick] for b in (linear.bias.split(rows) if rows else (linear.bias,))
            ]
            bias = biases[0] if len(biases) == 1 else torch.cat(biases, -1)
            y = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
        return y.view(*x.shape[:-1], y.shape[-1])


def window_norm(norm: nn.Module, x: Tensor, blocks: int, w: Window) -> Tensor:
    """`norm` (a `MemberNorm` of the full width) applied to each sub-model of the window `w` of a
    level of `blocks` sub-models, with its slice of the gains."""
    d = norm.width // blocks
    if norm.kind == "rmsnorm":
        y = F.rms_norm(x, (d,), None, norm.eps)
    else:
        y = F.layer_norm(x, (d,), None, None, norm.eps)
    shape = (w.count, 1, 1, d)
    y = y * norm.weight.view(blocks, d)[w.first : w.first + w.count].view(shape)
    if norm.bias is not None:
        y = y + norm.bias.view(blocks, d)[w.first : w.first + w.count].view(shape)
    return y


def level_loss(
    level_logits: list[Tensor], targets: Tensor, weights: tuple[float, ...] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Cross-entropy of every sub-model of every level at once.

    `level_logits[l]` is `(batch, tokens, k_l, vocab)`; `targets` `(batch, tokens)`. Returns the
    weighted sum over levels of each level's mean loss over its sub-models, and the per-level means.
    (The original summed over sub-models too, which weighs level `l` by `branching**l`; weights
    `[1, b, b*b, ...]` reproduce that.)
    """
    weights = weights or (1.0,) * len(level_logits)
    per_level = []
    for logits in level_logits:
        by_model = logits.movedim(-2, 0)  # (k, batch, tokens, vocab): contiguous from all_levels
        expanded = targets.unsqueeze(0).expand(by_model.shape[:-1])
        per_level.append(F.cross_entropy(by_model.flatten(0, -2).float(), expanded.reshape(-1)))
    total = sum(w * loss for w, loss in zip(weights, per_level, strict=True))
    return total, per_level
