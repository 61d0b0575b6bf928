"""Shapes that cannot be built: missing widths, heads that do not divide widths, untieable heads."""

from __future__ import annotations

from ..diagnostics import Diagnostic
from ..ir import IR


def _divisors(n: int, limit: int = 12) -> str:
    found = [d for d in range(1, min(n, 4096) + 1) if n % d == 0]
    shown = ", ".join(map(str, found[:limit]))
    return shown + (", ..." if len(found) > limit else "")


def check_shapes(ir: IR) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for _, data in ir.vertices("node"):
        name, s, origin = data["name"], data["settings"], data["settings_from"]
        width = data["width"]
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
        if data["kind"] == "gear" and s["position"] != "rope":
            found.append(
                ir.error(
                    origin["position"],
                    f"gear `{name}` has `position: {s['position']}`, but a gear's heads turn at its velocity "
                    "through rotary positions",
                    "leave `position` at `rope` for gears, or make the node a `transformer`",
                )
            )
        if s["position"] == "rope" and head_width % 2:
            found.append(
                ir.error(
                    origin["heads"],
                    f"node `{name}` has heads of width {head_width} ({width}/{heads}); rotary positions need an even head width",
                    "change `heads` or `width`, or set `position: learned` or `none`",
                )
            )
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
