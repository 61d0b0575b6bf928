"""Perspectives (docs/designs.md, design 000): the frame through which a gear sees the shared input.

The design has each gear observe the one sky from its own perspective. We read that as a
learned change of basis of the input stream, shared by every gear that names the same perspective:

* `rotation`: an orthogonal map `R = exp(A - A^T)` (the exponential of a skew-symmetric matrix is
  a rotation, det +1), starting at the identity; it re-orients the input without rescaling it.
* `projection`: an unconstrained linear map, starting at the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Perspective(nn.Module):
    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind, self.width = kind, width
        if kind == "rotation":
            self.generator = nn.Parameter(torch.zeros(width, width))
        elif kind == "projection":
            self.weight = nn.Parameter(torch.eye(width))
        elif kind != "identity":
            raise ValueError(f"unknown perspective kind {kind!r}")

    def matrix(self) -> Tensor | None:
        if self.kind == "rotation":
            return torch.linalg.matrix_exp(self.generator - self.generator.T)
        if self.kind == "projection":
            return self.weight
        return None


def apply_frames(x: Tensor, frames: Tensor) -> Tensor:
    """`x` is `(members, batch, tokens, width)`, `frames` `(members, width, width)`: `x[m] @ frames[m]^T`."""
    members, width = x.shape[0], x.shape[-1]
    return torch.bmm(x.reshape(members, -1, width), frames.transpose(1, 2)).reshape(x.shape)
