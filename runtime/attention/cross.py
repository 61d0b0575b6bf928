"""Cross-attention edges: token-to-token messages between sub-models (docs/designs.md, design 000).

A plain message edge moves each token's state to the same token of another node. A `cross` edge
lets every token of the receiver attend to the sender's tokens (Vaswani et al. 2017, encoder-
decoder attention), causally, so token i reads source tokens <= i and the model stays autoregressive.
Queries come from the receiver's view of its inputs; keys and values from the sender's bus state.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from runtime.layers import init_normal_


class CrossAttention(nn.Module):
    def __init__(self, query_width: int, bus_width: int, heads: int):
        super().__init__()
        self.heads = heads if bus_width % heads == 0 else 1
        self.query = nn.Linear(query_width, bus_width, bias=False)
        self.key_value = nn.Linear(bus_width, 2 * bus_width, bias=False)
        self.out = nn.Linear(bus_width, bus_width, bias=False)
        for linear in (self.query, self.key_value, self.out):
            init_normal_(linear.weight)

    def forward(self, x: Tensor, source: Tensor) -> Tensor:
        """`x`: `(edges, batch, tokens, query_width)`; `source`: `(edges, batch, tokens, bus_width)`."""
        edges, batch, tokens, _ = x.shape
        width = source.shape[-1]
        head_width = width // self.heads

        def split(t: Tensor) -> Tensor:
            return t.reshape(edges * batch, tokens, self.heads, head_width).transpose(1, 2)

        k, v = self.key_value(source).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(split(self.query(x)), split(k), split(v), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(edges, batch, tokens, width))
