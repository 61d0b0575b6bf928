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

from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from .message_passing import EDGE_FEATURES


class EdgeConditionedMessage(MessagePassing):
    def __init__(self, width: int, aggregate: str = "sum"):
        super().__init__(aggr=aggregate, node_dim=-2)
        self.lin = nn.Linear(width, width, bias=False)
        self.film = nn.Linear(EDGE_FEATURES, width)
        nn.init.normal_(self.lin.weight, std=0.02)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(
        self, x_source: Tensor, edge_index: Tensor, edge_attr: Tensor, targets: int
    ) -> Tensor:
        """`x_source`: `(batch, tokens, sources, width)`; returns `(batch, tokens, targets, width)`."""
        return self.propagate(
            edge_index,
            x=(self.lin(x_source), None),
            edge_attr=edge_attr,
            size=(x_source.size(-2), targets),
        )

    def message(self, x_j: Tensor, edge_attr: Tensor) -> Tensor:
        return x_j * (1.0 + self.film(edge_attr.to(x_j.dtype)))
