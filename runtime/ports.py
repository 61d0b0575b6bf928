"""A graph model's inputs (embeddings of what the user feeds) and outputs (read-out heads)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from runtime.layers import init_normal_, init_zeros_


class TokenInput(nn.Module):
    """Token ids `(batch, tokens)` to vectors `(batch, tokens, width)`."""

    def __init__(self, vocab: int, width: int, context: int):
        super().__init__()
        self.vocab, self.context = vocab, context
        self.table = nn.Embedding(vocab, width)
        init_normal_(self.table.weight)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(ids)


class FeatureInput(nn.Module):
    """Real features `(batch, tokens, features)` to vectors `(batch, tokens, width)`."""

    def __init__(self, features: int, width: int, context: int):
        super().__init__()
        self.context = context
        self.proj = nn.Linear(features, width)
        init_normal_(self.proj.weight)
        init_zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class LinearHead(nn.Module):
    """Per-token read-out; `tie_to` shares an embedding table's weight (Press & Wolf 2017)."""

    def __init__(
        self, width: int, out: int, bias: bool = False, tie_to: nn.Embedding | None = None
    ):
        super().__init__()
        self.proj = nn.Linear(width, out, bias=bias)
        init_normal_(self.proj.weight)
        if bias:
            init_zeros_(self.proj.bias)
        if tie_to is not None:
            self.proj.weight = tie_to.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PooledHead(nn.Module):
    """Sequence classification: mean or last-token pooling, then a linear map to class logits."""

    def __init__(self, width: int, classes: int, pool: str):
        super().__init__()
        self.pool = pool
        self.proj = nn.Linear(width, classes)
        init_normal_(self.proj.weight)
        init_zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool_tokens(x))

    def pool_tokens(self, x: Tensor) -> Tensor:
        """`(..., tokens, width)` -> `(..., width)`: the mean or the last token's state."""
        return x.mean(dim=-2) if self.pool == "mean" else x[..., -1, :]


def check_context(name: str, module: nn.Module, value: Tensor) -> None:
    """An input longer than its spec's `context` is refused by name (tables have no rows for it)."""
    context = getattr(module, "context", None)
    if context is not None and value.shape[1] > context:
        raise ValueError(
            f"input `{name}` has {value.shape[1]} tokens but the spec's context is {context}"
        )


def concat_states(states: list[Tensor]) -> Tensor:
    return states[0] if len(states) == 1 else torch.cat(states, dim=-1)
