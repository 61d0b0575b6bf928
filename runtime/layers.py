"""Layers that hold `members` independent copies of their weights and run them in one call.

Same-shaped sub-models of a federation (16 gears of one shape, say) are one module whose every
weight carries a leading member dimension; activations carry the same leading dimension
`(members, batch, tokens, width)`, and each linear layer is one batched matmul. This is the
"stacked weights" batching of the design without the per-call weight copies that
`torch.func.stack_module_state` would make: the stack *is* the parameter.

With `members == 1` the weights have the ordinary shapes of `nn.Linear`/`nn.LayerNorm`
(`(out, in)`, `(width,)`) and the fused single-model kernels are used, so a plain transformer's
`state_dict` looks like any other PyTorch model's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_normal_(tensor: Tensor, std: float = 0.02) -> None:
    """Normal init, skipped on the meta device: there are no values to set, and meta-device init
    runs through Python decompositions (about a millisecond a call), which dominated estimates."""
    if not tensor.is_meta:
        nn.init.normal_(tensor, mean=0.0, std=std)


def init_zeros_(tensor: Tensor) -> None:
    if not tensor.is_meta:
        nn.init.zeros_(tensor)


class MemberLinear(nn.Module):
    """`y[m] = x[m] @ W[m].T + b[m]` for each member `m`; `x` is `(members, ..., in)`."""

    def __init__(self, members: int, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        lead = () if members == 1 else (members,)
        self.weight = nn.Parameter(torch.empty(*lead, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(*lead, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        init_normal_(self.weight, std)
        if self.bias is not None:
            init_zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.members == 1:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(self.members, -1, self.in_features)
        if self.bias is None:
            y = torch.bmm(flat, self.weight.transpose(1, 2))
        else:
            y = torch.baddbmm(self.bias.unsqueeze(1), flat, self.weight.transpose(1, 2))
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"members={self.members}, in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MemberNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) or RMSNorm (Zhang & Sennrich 2019) with per-member gains."""

    def __init__(
        self,
        members: int,
        width: int,
        kind: str = "layernorm",
        bias: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.members, self.width, self.kind, self.eps = members, width, kind, eps
        lead = () if members == 1 else (members,)
        self.weight = nn.Parameter(torch.ones(*lead, width))
        self.bias = (
            nn.Parameter(torch.zeros(*lead, width)) if bias and kind == "layernorm" else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.members == 1:
            if self.kind == "rmsnorm":
                return F.rms_norm(x, (self.width,), self.weight, self.eps)
            return F.layer_norm(x, (self.width,), self.weight, self.bias, self.eps)
        if self.kind == "rmsnorm":
            y = F.rms_norm(x, (self.width,), None, self.eps)
        else:
            y = F.layer_norm(x, (self.width,), None, None, self.eps)
        shape = (self.members,) + (1,) * (x.dim() - 2) + (self.width,)
        y = y * self.weight.view(shape)
        return y if self.bias is None else y + self.bias.view(shape)


class MemberEmbedding(nn.Module):
    """A learned table per member, e.g. GPT-2's absolute positions; `forward(n)` gives its first n rows."""

    def __init__(self, members: int, rows: int, width: int):
        super().__init__()
        lead = () if members == 1 else (members,)
        self.members = members
        self.weight = nn.Parameter(torch.empty(*lead, rows, width))
        init_normal_(self.weight)

    def forward(self, n: int) -> Tensor:
        table = self.weight[..., :n, :]
        # (members, 1, n, width): broadcasts over the batch of a (members, batch, n, width) stream
        return table.unsqueeze(-3) if self.members > 1 else table.unsqueeze(0).unsqueeze(0)


def scaled_init_(linear: MemberLinear, layers: int) -> None:
    """GPT-2's init for projections into the residual stream: std 0.02 / sqrt(2 * layers)."""
    linear.reset_parameters(std=0.02 / math.sqrt(2 * layers))
