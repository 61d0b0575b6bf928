"""Edge features and per-stage edge lists for the federation's message passing.

The layer itself is in `message_layer` (importing torch-geometric costs a second, paid
only by models that have edges).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from runtime.configs import EDGE_FEATURES, EDGE_KINDS  # noqa: F401 (re-exported)


def edge_features(kind: str, ratio: float | None, delay: int) -> list[float]:
    onehot = [1.0 if kind == k else 0.0 for k in EDGE_KINDS]
    return [*onehot, math.log(ratio) if ratio else 0.0, float(delay)]


def stage_edges(
    edges: list[tuple[int, int, int, str, float | None]], nodes: int
) -> tuple[Tensor, Tensor]:
    """Edge index and attributes for one stage.

    Sources are numbered in a stacked bus `[now, 1 step ago, 2 steps ago, ...]`, so an edge with
    delay `d` from node `s` reads source `d * nodes + s`: delays need no special case in propagate.
    """
    index = torch.tensor(
        [[d * nodes + s for s, _, d, _, _ in edges], [t for _, t, _, _, _ in edges]],
        dtype=torch.long,
    )
    attr = torch.tensor([edge_features(k, r, d) for _, _, d, k, r in edges], dtype=torch.float32)
    return index.reshape(2, -1), attr.reshape(-1, EDGE_FEATURES)
