"""Shapes that cannot be built: missing widths, heads that do not divide widths, untieable heads."""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.passes.contract import contract


def _divisors(n: int, limit: int = 12) -> str:
    found = [d for d in range(1, min(n, 4096) + 1) if n % d == 0]
    shown = ", ".join(map(str, found[:limit]))
    return shown + (", ..." if len(found) > limit else "")


@contract(requires=("nodes.settings", "nodes.width", "outputs.width", "inputs.width"), provides=())
def check_shapes(ir: IR) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for _, data in ir.vertices("node"):
        name, s, origin = data["name"], data["settings"], data["settings_from"]
        width = data["width"]
        if width is None and s is None:
            found.append(
                ir.error(
                    (*data["path"], "kind"),
                    f"node `{name}` has no width",
                    "set `width:` on the node, or on the input it reads",
                )
            )
            continue
        if s is None:
            continue  # a kind without transformer settings checks its own shapes
        if width is None:
            found.append(
                ir.error(
                    (*data["path"], "kind"),
                    f"node `{name}` has no width",
                    "set `width:` on the node, in `defaults.transformer`, or on the input it reads",
                )
            )
            continue
        heads, kv = s["heads"], s["kv_heads"]
        if width % heads:
            found.append(
                ir.error(
                    origin["heads"],
                    f"`heads: {heads}` does not divide node `{name}`'s width {width}",
                    f"heads split the width evenly; divisors of {width}: {_divisors(width)}",
                )
            )
            continue
        if kv is not None and heads % kv:
            found.append(
                ir.error(
                    origin["kv_heads"],
                    f"`kv_heads: {kv}` does not divide node `{name}`'s {heads} query heads",
                    f"each key/value head serves a whole number of query heads; divisors of {heads}: {_divisors(heads)}",
                )
            )
        head_width = width // heads
        quaternion = s["rotary"] is not None and s["rotary"].kind == "quaternion"
        if s["position"] == "rope" and head_width % 2 and not quaternion:
            found.append(
                ir.error(
                    origin["heads"],
                    f"node `{name}` has heads of width {head_width} ({width}/{heads}); rotary positions need an even head width",
                    "change `heads` or `width`, or set `position: learned` or `none`",
                )
            )
        found.extend(_component_rules(ir, data, head_width))
        found.extend(_check_components(ir, data, width))
        if round(s["mlp_ratio"] * width) < 1:
            found.append(
                ir.error(origin["mlp_ratio"], f"`mlp_ratio` gives node `{name}` an MLP of width 0")
            )
    for _, data in ir.vertices("output"):
        out = data["spec"]
        if out.kind != "lm_head" or not out.tie or data["width"] is None:
            continue
        vocab_of = out.vocab_of or next(
            (n for n, i in ir.spec.inputs.items() if i.kind == "tokens"), None
        )
        if vocab_of is None or vocab_of not in ir.spec.inputs:
            continue
        table_width = ir.graph.nodes[f"inputs.{vocab_of}"]["width"]
        if table_width != data["width"]:
            found.append(
                ir.error(
                    (*data["path"], "tie"),
                    f"`tie: true` needs the head to read width {table_width} (the `{vocab_of}` embedding), "
                    f"but its sources give width {data['width']}",
                    "read from nodes whose widths add up to the embedding's, set the input's `width:`, or drop `tie`",
                )
            )
    return found


def _component_rules(ir: IR, data: dict, head_width: int) -> list[Diagnostic]:
    """The rules each chosen component brings for the node it sits in (`Component.check`)."""
    from compiler.language.registry import REGISTRY

    found = []
    for family in ("attention", "rotary"):
        chosen = data["settings"][family]
        check = REGISTRY.get(family, chosen.kind).check if chosen is not None else None
        if check is not None:
            found.extend(check(ir, data, head_width))
    return found


def _check_components(ir: IR, data: dict, width: int) -> list[Diagnostic]:
    """Registered components that cannot go together: a rotary choice without rotary
    positions, per-layer head counts that do not divide the width. (What a kind needs of its
    components, it checks itself: a gear's rotary heads, a fractal's slices.)"""
    s, origin, name = data["settings"], data["settings_from"], data["name"]
    attention, rotary, variations = s["attention"], s["rotary"], s["variations"]
    found = []
    mixer = attention is not None and attention.kind in _mixer_kinds()
    if rotary is not None and s["position"] != "rope":
        found.append(
            ir.error(
                origin["rotary"],
                f"node `{name}` chooses `rotary: {{kind: {rotary.kind}}}` but has `position: {s['position']}`",
                "a rotary embedding needs `position: rope` (the default); remove one of the two",
            )
        )
    if mixer and rotary is not None:
        found.append(
            ir.error(
                origin["rotary"],
                f"node `{name}`'s attention `{attention.kind}` mixes tokens itself and applies no rotary "
                "embedding",
                "remove `rotary`, or use a score-level attention (sdpa, sliding_window, adaptive_span, "
                "local_global)",
            )
        )
    if variations is None:
        return found
    where = origin["variations"]
    for i, heads in enumerate(variations.heads or ()):
        at = (*where, "heads", i)
        if width % heads:
            found.append(
                ir.error(
                    at, f"`heads` choice {heads} does not divide node `{name}`'s width {width}"
                )
            )
            continue
        if s["kv_heads"] is not None and heads % s["kv_heads"]:
            found.append(
                ir.error(
                    at,
                    f"`heads` choice {heads} is not a multiple of `kv_heads: {s['kv_heads']}`",
                    "every head count a layer may draw must be a multiple of `kv_heads`",
                )
            )
        head_width = width // heads
        quaternion = rotary is not None and rotary.kind == "quaternion"
        if s["position"] == "rope" and head_width % 2 and not quaternion and not mixer:
            found.append(
                ir.error(
                    at,
                    f"`heads` choice {heads} gives heads of width {head_width}; rotary positions need an "
                    "even head width",
                )
            )
    dropout = variations.dropout
    if dropout is not None and not isinstance(dropout, list) and dropout.min > dropout.max:
        found.append(
            ir.error(
                (*where, "dropout"),
                f"the dropout range runs from {dropout.min} down to {dropout.max}",
                "write it as {min: low, max: high}",
            )
        )
    return found


def _mixer_kinds() -> set[str]:
    from compiler.language.registry import REGISTRY

    return {c.name for c in REGISTRY.family("attention").values() if c.level == "mixer"}
