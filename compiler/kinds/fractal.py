"""`kind: fractal` (FractalFormer): a transformer holding smaller copies of itself at every level.

Fractal nestings that cannot be built: a level too narrow, widths that do not split evenly.
Fractal nestings that cannot be built: a level too narrow, widths that do not split evenly.

Level `l` of a fractal cuts the base's residual width, each head and the MLP's inner width into
`branching**l` equal blocks; the deepest level, `k = branching**(levels-1)` blocks, decides.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from compiler.ir import IR
from compiler.kinds.transformer import TransformerKind, transformer_config_of
from compiler.language.diagnostics import Diagnostic
from compiler.language.kinds import Capabilities, Description, NodePlan, kind
from compiler.language.spec import InputNames, Int, Real, SpecModel, TransformerSettings


class FractalBase(TransformerSettings):
    """The full (level-0) model of a fractal; its sub-models take slices of its weights."""

    kind: Literal["transformer"] = Field("transformer", description="The base is a transformer.")


class FractalNode(SpecModel):
    """FractalFormer (design 001): a transformer holding `branching` smaller copies of itself at every
    level, whose weights are the diagonal blocks of its own (see `runtime.fractal.transformer`).

    Level 0 is `base`; level `l` holds `branching**l` sub-models of width `width / branching**l`, each
    runnable alone. With `heads: narrow` every sub-model keeps `heads`, head widths shrinking by
    `branching` a level; with `heads: subset` each takes its share of the heads at full width.
    """

    kind: Literal["fractal"]
    levels: Annotated[Int, Field(ge=1, le=16)] = Field(
        description="Levels of nesting, counting the full model (1 = a plain transformer)."
    )
    branching: Annotated[Int, Field(ge=2, le=64)] = Field(
        2, description="Sub-models each model holds at the next level."
    )
    base: FractalBase = Field(
        FractalBase(),
        description="The full model's settings (inherited from `defaults.transformer`).",
    )
    residual: Literal["none", "upstream", "downstream"] = Field(
        "none",
        description="`upstream`: after every block each model's stream receives its children's; `downstream`: "
        "each receives its slice of its parent's; `none`: levels share weights only.",
    )
    heads: Literal["narrow", "subset"] = Field(
        "narrow",
        description="`narrow` (the original): every sub-model keeps all `heads`, each `branching` times "
        "narrower a level; `subset`: sub-model j takes its own share of the heads at full width (heads and "
        "kv_heads must divide by branching**(levels-1)); same weight blocks, faster attention.",
    )
    schedule: Literal["auto", "stacked", "blocks"] = Field(
        "auto",
        description="How all levels run at once (same results): `stacked`, one full-width pass for every "
        "level (level 0's number of kernels, `levels` times its matmul FLOPs: fastest for small models on a "
        "GPU); `blocks`, one block-diagonal pass per level (fewest FLOPs); `auto`, stacked on a GPU up to "
        "width 256, else blocks.",
    )
    level_batch: Literal["shared", "split"] = Field(
        "shared",
        description="What each level trains on when all train at once: `shared` (the original), the whole "
        "batch; `split`, its own share of the batch's sequences (level 0 the first), so a step of all levels "
        "costs close to one of the full model alone, each level seeing 1/levels of the data (evaluation "
        "still scores every level on every sequence). Needs `residual: none` (exchanging streams needs the "
        "same sequences).",
    )
    level_weights: (
        Annotated[list[Annotated[Real, Field(ge=0, le=1e6)]], Field(min_length=1, max_length=16)]
        | None
    ) = Field(
        None,
        description="Loss weight of each level when all are trained at once (one per level). Default: all 1.",
    )
    input: InputNames | None = Field(
        None, description="The input(s) the fractal reads, or [] for none. Default: the only input."
    )


def _levels_that_fit(head_width: int, inner: int, branching: int, rope: bool) -> int:
    """The most levels these shapes allow: whole (and, with rotary positions, even) head widths
    and a whole MLP width in every block of the deepest level."""
    levels, k = 1, branching
    while head_width % k == 0 and inner % k == 0 and not (rope and (head_width // k) % 2):
        levels, k = levels + 1, k * branching
    return levels


def check_fractal(ir: IR, vertex: str) -> list[Diagnostic]:
    data = ir.graph.nodes[vertex]
    found = _check_components(ir, data)
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
        return found  # reported by check_shapes
    k = branching ** (levels - 1)
    head_width = width // s["heads"]
    inner = max(1, round(s["mlp_ratio"] * width))
    if node.heads == "subset":
        found.extend(_check_subset(ir, data, k, deepest_of(levels, k), inner))
        return found
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
        return found
    if width % k:
        found.append(
            ir.error(
                origin["width"],
                f"width {width} does not split into {k} equal sub-models at {deepest} of fractal `{name}`",
                f"make the width a multiple of branching**(levels-1) = {k}, or use at most {fit} level(s)",
            )
        )
        return found
    if head_width % k:
        found.append(
            ir.error(
                origin["heads"],
                f"fractal `{name}` has heads of width {head_width} ({width}/{s['heads']}), which do not split "
                f"into {k} at {deepest}: every sub-model keeps all {s['heads']} heads, each {k} times narrower",
                f"use fewer heads (a head width that is a multiple of {k}), or at most {fit} level(s)",
            )
        )
        return found
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


def _check_components(ir: IR, data: dict) -> list[Diagnostic]:
    """A fractal's sub-models are slices of the base's weights: every component of the base must
    say that it slices (`in_fractal`), and per-layer variations have no slices at all."""
    from compiler.language.registry import REGISTRY

    s, origin, name = data["settings"], data["settings_from"], data["name"]
    found = []
    for family in ("attention", "rotary"):
        chosen = s[family]
        if chosen is None or REGISTRY.get(family, chosen.kind).capabilities.in_fractal:
            continue
        if REGISTRY.get(family, chosen.kind).level == "lattice":
            found.append(
                ir.error(
                    origin[family],
                    f"fractal `{name}` cannot use a lattice attention layout: its sub-models' slices "
                    "of a lattice are not defined",
                    "use plain attention in a fractal's base",
                )
            )
            continue
        found.append(_unsliceable(ir, origin, name, family))
    if s["variations"] is not None:
        found.append(_unsliceable(ir, origin, name, "variations"))
    return found


def _unsliceable(ir: IR, origin: dict, name: str, field: str) -> Diagnostic:
    return ir.error(
        origin[field],
        f"fractal `{name}` cannot use `{field}` here: its sub-models are slices of the "
        "base's weights, and slices of this component are not defined",
        f"remove `{field}` from the fractal's base",
    )


@kind("fractal")
class Fractal(TransformerKind):
    # Its levels run inside one module on the stream it reads: messages from other nodes would
    # reach level 0 only, leaving the sub-models and `residual` inert, so they are refused.
    Spec = FractalNode
    capabilities = Capabilities(
        receives_messages=False, feedback=False, batched=False, time_steps=False
    )
    colour = "#6b46c1"

    def transformer_settings(self, node: Any) -> tuple[Any, tuple]:
        return node.base, ("base",)

    def check(self, ir: IR, vertex: str) -> list[Diagnostic]:
        return check_fractal(ir, vertex)

    def sub_models(self, node: Any) -> tuple[int, ...]:
        return tuple(node.branching**level for level in range(node.levels))

    def plan(self, ir: IR, vertex: str) -> NodePlan:
        from runtime.configs import FractalConfig

        node = ir.graph.nodes[vertex]["spec"]
        levels = FractalConfig(
            node.levels,
            node.branching,
            node.residual,
            tuple(float(w) for w in node.level_weights or ()),
            node.heads,
            node.schedule,
            node.level_batch,
        )
        # a fractal is a group of its own: its levels are its batch
        return NodePlan(transformer_config_of(ir, vertex), batch_key=vertex, options=levels)

    def build(self, group: Any) -> Any:
        from runtime.fractal.transformer import FractalTransformer

        return FractalTransformer(group.config, group.options)

    def describe(self, ir: IR, vertex: str) -> Description:
        described = super().describe(ir, vertex)
        node, width = ir.graph.nodes[vertex]["spec"], ir.graph.nodes[vertex]["width"]
        levels = [
            f"level {level}: {node.branching**level} × width {width // node.branching**level}"
            for level in range(node.levels)
        ]
        described.lines.insert(0, f"{node.levels} levels × {node.branching}")
        described.details.update(levels=levels, residual=node.residual)
        sizes = ", ".join(
            f"{node.branching**level} x width {width // node.branching**level}"
            for level in range(node.levels)
        )
        described.notes.append(
            f"fractal {ir.graph.nodes[vertex]['name']} (residual {node.residual}, schedule "
            f"{node.schedule}, level_batch {node.level_batch}): levels 0..{node.levels - 1}: {sizes}"
        )
        described.glyph = ("nest", node.levels, node.branching, width)
        return described

    def describe_written(self, raw: dict[str, Any]) -> Description:
        base = raw.get("base") if isinstance(raw.get("base"), dict) else {}
        levels, branching = raw.get("levels"), raw.get("branching", 2)
        written = Description(details={"settings": base})
        if _small_int(levels, 1, 16) and _small_int(branching, 2, 64):
            width = base.get("width") if _small_int(base.get("width"), 1, 1 << 20) else None
            written.lines.append(f"{levels} levels × {branching}")
            written.glyph = ("nest", levels, branching, width)
        return written


def _small_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
