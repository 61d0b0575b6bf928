"""Fill every node's unset transformer settings from `defaults.transformer`, then built-in defaults.

The result, `settings`, is a plain dict per node with every field present (`width` may still be
None when neither the node nor the defaults set it: `infer_widths` and `check_shapes` handle that),
and `settings_from`, the path each value was written at (both None for a kind without transformer
settings: its hook `transformer_settings` says where they sit, a fractal's in its `base`), so later errors point at the right line:
a bad `heads` inherited from `defaults` is reported at `defaults.transformer.heads`.
"""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.kinds import KINDS
from compiler.language.spec import TransformerSettings
from compiler.passes.contract import contract

BUILTIN = {
    "width": None,
    "heads": 4,
    "kv_heads": None,
    "layers": 2,
    "mlp_ratio": 4.0,
    "activation": "gelu",
    "norm": "layernorm",
    "position": "rope",
    "rope_theta": 10000.0,
    "dropout": 0.0,
    "bias": False,
    "causal": True,
    "attention": None,
    "rotary": None,
    "variations": None,
}
assert set(BUILTIN) == set(TransformerSettings.model_fields), (
    "every transformer setting needs a built-in default"
)


@contract(requires=(), provides=("nodes.settings", "nodes.settings_from"))
def resolve_defaults(ir: IR) -> IR:
    graph = ir.graph.copy()
    defaults = ir.spec.defaults.transformer
    for vertex, data in ir.vertices("node"):
        located = KINDS.get(data["kind"]).transformer_settings(data["spec"])
        if located is None:  # a kind without transformer settings
            graph.nodes[vertex]["settings"] = graph.nodes[vertex]["settings_from"] = None
            continue
        own_settings, own_path = located[0], (*data["path"], *located[1])
        settings, origin = {}, {}
        for key, builtin in BUILTIN.items():
            own, inherited = getattr(own_settings, key), getattr(defaults, key)
            if own is not None:
                settings[key], origin[key] = own, (*own_path, key)
            elif inherited is not None:
                settings[key], origin[key] = inherited, ("defaults", "transformer", key)
            else:
                settings[key], origin[key] = builtin, (*data["path"], "kind")
        graph.nodes[vertex]["settings"] = settings
        graph.nodes[vertex]["settings_from"] = origin
    return ir.with_graph(graph)
