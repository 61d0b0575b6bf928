"""Fractal nestings that cannot be built: a level too narrow, widths that do not split evenly.

Level `l` of a fractal cuts the base's residual width, each head and the MLP's inner width into
`branching**l` equal blocks; the deepest level, `k = branching**(levels-1)` blocks, decides.
"""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic


def _levels_that_fit(head_width: int, inner: int, branching: int, rope: bool) -> int:
    """The most levels these shapes allow: whole (and, with rotary positions, even) head widths
    and a whole MLP width in every block of the deepest level."""
    levels, k = 1, branching
    while head_width % k == 0 and inner % k == 0 and not (rope and (head_width // k) % 2):
        levels, k = levels + 1, k * branching
    return levels


def check_fractals(ir: IR) -> list[Diagnostic]:
    found: list[Diagnostic] = []
    for _, data in ir.vertices("node"):
        if data["kind"] != "fractal":
            continue
        node, name, path = data["spec"], data["name"], data["path"]
        s, origin, width = data["settings"], data["settings_from"], data["width"]
        levels, branching = node.levels, node.branching
        weights = node.level_weights
        if weights is not None and len(weights) != levels:
            found.append(
                ir.error(
                    (*path, "level_weights"),
                    f"`level_weights` has {len(weights)} entries but fractal `{name}` has {levels} levels",
                    "give one loss weight per level, the full model's first",
                )
            )
        elif weights is not None and not any(weights):
            found.append(
                ir.error(
                    (*path, "level_weights"),
                    "every level weight is 0: training would learn nothing",
                    "give at least one level a positive weight",
                )
            )
        if node.level_batch == "split" and node.residual != "none":
            found.append(
                ir.error(
                    (*path, "level_batch"),
                    f"fractal `{name}` splits the batch among its levels but exchanges residual streams "
                    f"(`residual: {node.residual}`), which needs every level to read the same sequences",
                    "use `level_batch: shared`, or `residual: none`",
                )
            )
        if width is None or width % s["heads"]:
            continue  # reported by check_shapes
        k = branching ** (levels - 1)
        head_width = width // s["heads"]
        inner = max(1, round(s["mlp_ratio"] * width))
        if node.heads == "subset":
            found.extend(_check_subset(ir, data, k, deepest_of(levels, k), inner))
            continue
        fit = _levels_that_fit(head_width, inner, branching, s["position"] == "rope")
        deepest = deepest_of(levels, k)
        if width < k:
            found.append(
                ir.error(
                    (*path, "levels"),
                    f"fractal `{name}` of width {width} would have width 0 at {deepest}",
                    f"these shapes allow at most {fit} level(s); or use a smaller `branching` or a wider base",
                )
            )
            continue
        if width % k:
            found.append(
                ir.error(
                    origin["width"],
                    f"width {width} does not split into {k} equal sub-models at {deepest} of fractal `{name}`",
                    f"make the width a multiple of branching**(levels-1) = {k}, or use at most {fit} level(s)",
                )
            )
            continue
        if head_width % k:
            found.append(
                ir.error(
                    origin["heads"],
                    f"fractal `{name}` has heads of width {head_width} ({width}/{s['heads']}), which do not split "
                    f"into {k} at {deepest}: every sub-model keeps all {s['heads']} heads, each {k} times narrower",
                    f"use fewer heads (a head width that is a multiple of {k}), or at most {fit} level(s)",
                )
            )
            continue
        if s["position"] == "rope" and (head_width // k) % 2:
            found.append(
                ir.error(
                    origin["heads"],
                    f"fractal `{name}` has heads of width {head_width // k} at {deepest}; rotary positions "
                    "need an even head width",
                    f"use fewer heads, at most {fit} level(s), or `position: learned` or `none`",
                )
            )
        if inner % k:
            found.append(
                ir.error(
                    origin["mlp_ratio"],
                    f"the MLP width {inner} of fractal `{name}` does not split into {k} at {deepest}",
                    f"choose `mlp_ratio` so that mlp_ratio * width is a multiple of {k}, or use at most {fit} level(s)",
                )
            )
    return found


def deepest_of(levels: int, k: int) -> str:
    return f"level {levels - 1} ({k} sub-models)"


def _check_subset(ir: IR, data: dict, k: int, deepest: str, inner: int) -> list[Diagnostic]:
    """`heads: subset`: each sub-model of the deepest level takes `heads / k` whole heads (and
    `kv_heads / k` key/value heads)."""
    s, origin, name = data["settings"], data["settings_from"], data["name"]
    found = []
    for key in ("heads", "kv_heads"):
        count = s[key]
        if count is not None and count % k:
            found.append(
                ir.error(
                    origin[key],
                    f"`{key}: {count}` of fractal `{name}` does not split among the {k} sub-models of "
                    f"{deepest}: with `heads: subset` each takes a whole share",
                    f"use a multiple of {k}, fewer levels, or `heads: narrow`",
                )
            )
    if inner % k:
        found.append(
            ir.error(
                origin["mlp_ratio"],
                f"the MLP width {inner} of fractal `{name}` does not split into {k} at {deepest}",
                f"choose `mlp_ratio` so that mlp_ratio * width is a multiple of {k}",
            )
        )
    return found
