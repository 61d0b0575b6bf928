"""A fractal's levels (design 001, FractalFormer): its config, the windows of sub-models a pass
computes, and the views of the full model's weights every schedule reads a level through.

Sub-model `j` of level `l` owns the `j`-th diagonal block of every weight matrix; `to_members` and
`to_columns` move between the full stream's column layout and a sub-model-major stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RESIDUALS = ("none", "upstream", "downstream")
STACK_WIDTH = 256  # `schedule: auto` stacks the levels of fractals up to this width on a GPU


@dataclass(frozen=True)
class FractalConfig:
    levels: int
    branching: int
    residual: str = "none"
    level_weights: tuple[float, ...] = ()  # loss weight per level; empty = all 1
    heads: str = (
        "narrow"  # narrow: every sub-model keeps all heads, narrower; subset: a share of them
    )
    schedule: str = "auto"  # how all levels run at once: stacked | blocks | auto (see `stacked`)
    level_batch: str = (
        "shared"  # shared: every level trains on the whole batch; split: a share each
    )

    def blocks(self, level: int) -> int:
        """Sub-models at `level`."""
        return self.branching**level

    def weights(self) -> tuple[float, ...]:
        return self.level_weights or (1.0,) * self.levels

    def stacked(self, width: int, device: torch.device) -> bool:
        """Whether all levels run as one stacked pass (`runtime.fractal.stacked`) rather than one
        block-diagonal pass per level. `auto` stacks on a GPU up to width STACK_WIDTH, where one
        pass of level 0's kernel count beats `levels` passes (BENCHMARKS.md, fractal levels);
        wider models and the CPU keep `blocks`, since stacking costs `levels` times level 0's
        matmul FLOPs against 1.75x for blocks."""
        if self.schedule == "auto":
            return device.type == "cuda" and width <= STACK_WIDTH
        return self.schedule == "stacked"


@dataclass(frozen=True)
class Window:
    """Blocks `[first, first + count)` of a level: which sub-models a pass computes."""

    level: int
    first: int
    count: int


def to_members(x: Tensor, count: int) -> Tensor:
    """`(batch, tokens, count * d)` side-by-side streams -> sub-model-major `(count, batch, tokens, d)`."""
    return x.unflatten(-1, (count, -1)).permute(2, 0, 1, 3).contiguous()


def to_columns(x: Tensor) -> Tensor:
    """The inverse of `to_members`."""
    return x.permute(1, 2, 0, 3).flatten(-2)


def diagonal_blocks(weight: Tensor, k: int) -> Tensor:
    """`(out, in)` -> `(k, out/k, in/k)`: the `k` diagonal blocks, as a view of `weight`."""
    o, i = weight.shape[0] // k, weight.shape[1] // k
    return (
        weight.unflatten(0, (k, o)).unflatten(2, (k, i)).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    )
