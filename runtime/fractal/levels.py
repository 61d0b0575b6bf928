"""A fractal's levels (design 001, FractalFormer): its config, the windows of sub-models a pass
computes, and the views of the full model's weights every schedule reads a level through.

Sub-model `j` of level `l` owns the `j`-th diagonal block of every weight matrix; `to_members` and
`to_columns` move between the full stream's column layout and a sub-model-major stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from runtime.configs import RESIDUALS, STACK_WIDTH, FractalConfig  # noqa: F401 (re-exported)


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
