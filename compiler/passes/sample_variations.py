"""Draw each layer's settings from a node's `variations` (docs/designs.md, design 003).

The draws come from a generator seeded by the spec's `seed` and the node's name (through SHA-256,
not Python's salted `hash`), so one spec always builds the same layers, on any machine, and
renaming or adding another node leaves this node's layers alone. Per layer, the listed fields are
drawn in a fixed order: activation, heads, dropout, norm.
"""

from __future__ import annotations

import hashlib
import random

from compiler.ir import IR
from compiler.passes.contract import contract


def layer_generator(seed: int, node: str) -> random.Random:
    digest = hashlib.sha256(f"epicycle-variations/{seed}/{node}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@contract(requires=("nodes.settings",), provides=("nodes.layer_settings",))
def sample_variations(ir: IR) -> IR:
    from runtime.configs import LayerSettings

    graph = ir.graph.copy()
    for vertex, data in ir.vertices("node"):
        s = data["settings"]
        graph.nodes[vertex]["layer_settings"] = ()
        variations = s["variations"] if s is not None else None
        if variations is None:
            continue
        rng = layer_generator(ir.spec.seed, data["name"])
        drawn = []
        for _ in range(s["layers"]):
            activation = rng.choice(variations.activation) if variations.activation else None
            heads = rng.choice(variations.heads) if variations.heads else None
            dropout = variations.dropout
            if isinstance(dropout, list):
                dropout = rng.choice(dropout)
            elif dropout is not None:
                dropout = round(rng.uniform(dropout.min, dropout.max), 6)
            norm = rng.choice(variations.norm) if variations.norm else None
            drawn.append(
                LayerSettings(
                    activation=activation or s["activation"],
                    heads=heads or s["heads"],
                    dropout=float(s["dropout"] if dropout is None else dropout),
                    norm=norm or s["norm"],
                )
            )
        graph.nodes[vertex]["layer_settings"] = tuple(drawn)
    return ir.with_graph(graph)
