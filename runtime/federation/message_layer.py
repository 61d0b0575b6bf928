"""Messages between sub-models along the spec's edges, as a torch-geometric `MessagePassing` layer.

The federation graph is small (nodes are whole transformers) but every token position carries its
own copy of it, so node features are `(batch, tokens, nodes, width)` with `node_dim=-2`, and one
`propagate` call moves the messages of every edge for every token in parallel.

Edge-conditioned message (FiLM-style modulation, Perez et al. 2018, of a shared linear map):

    m_{j->i} = (W x_j) * (1 + gamma(e_{ji}))        h_i = AGG_{j in N(i)} m_{j->i}

where `e_{ji}` holds the edge's kind (one-hot), `log(ratio)` and its delay. `gamma` starts at zero, so
a fresh model sends plain `W x_j` along every edge and learns how kind and ratio reshape it. There is
no additive term: a source whose state is zero (a delayed edge before its first step) sends nothing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing
from torch_geometric.utils import softmax

from runtime.federation.messages import EDGE_FEATURES
from runtime.layers import init_normal_, init_zeros_


class EdgeConditionedMessage(MessagePassing):
    """`aggregate` is `sum`, `mean`, or `attention`: softmax weights over a node's incoming edges,

        a_{j->i} = softmax_j( <K x_j, q_i> / sqrt(width) + b(e_{ji}) )      h_i = sum_j a_{j->i} m_{j->i}

    with a learned query `q_i` per receiving node and a bias from the edge's features (GAT-style
    attention, Velickovic et al. 2018, with dot-product scores), computed for every token.
    """

    def __init__(self, width: int, aggregate: str = "sum", nodes: int = 0):
        super().__init__(aggr="sum" if aggregate == "attention" else aggregate, node_dim=-2)
        self.attention = aggregate == "attention"
        self.lin = nn.Linear(width, width, bias=False)
        self.film = nn.Linear(EDGE_FEATURES, width)
        init_normal_(self.lin.weight)
        init_zeros_(self.film.weight)
        init_zeros_(self.film.bias)
        if self.attention:
            self.key = nn.Linear(width, width, bias=False)
            self.query = nn.Parameter(torch.zeros(nodes, width))
            self.edge_bias = nn.Linear(EDGE_FEATURES, 1)
            init_normal_(self.key.weight)
            init_zeros_(self.edge_bias.weight)
            init_zeros_(self.edge_bias.bias)

    def propagate(self, edge_index: Tensor, size=None, **kwargs: Tensor) -> Tensor:
        """torch-geometric's own `MessagePassing.propagate`, unchanged. Defining it here keeps
        torch-geometric from generating a specialised `propagate` from its jinja template: that
        writes a `*_propagate_*.py` module into the system temp folder for every new process and
        imports it from there (a file outside the requested output, and code run from /tmp).
        Without the template the same collect-message-aggregate steps run, and
        `torch.compile(fullgraph=True)` traces them just as well."""
        return MessagePassing.propagate(self, edge_index, size=size, **kwargs)

    def forward(
        self, x_source: Tensor, edge_index: Tensor, edge_attr: Tensor, targets: int
    ) -> Tensor:
        """`x_source`: `(batch, tokens, sources, width)`; returns `(batch, tokens, targets, width)`."""
        keys = self.key(x_source) if self.attention else None
        return self.propagate(
            edge_index,
            x=(self.lin(x_source), None),
            keys=(keys, None) if keys is not None else None,
            edge_attr=edge_attr,
            size=(x_source.size(-2), targets),
        )

    def message(
        self, x_j: Tensor, edge_attr: Tensor, keys_j: Tensor | None, index: Tensor
    ) -> Tensor:
        message = x_j * (1.0 + self.film(edge_attr.to(x_j.dtype)))
        if keys_j is None:
            return message
        query = self.query.index_select(0, index).to(x_j.dtype)  # (edges, width)
        score = (keys_j * query).sum(-1, keepdim=True) / math.sqrt(x_j.shape[-1])
        score = score + self.edge_bias(edge_attr.to(x_j.dtype))
        weight = softmax(score, index, num_nodes=self.query.shape[0], dim=-2)
        return message * weight
