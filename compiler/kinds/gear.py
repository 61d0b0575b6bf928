"""`kind: gear`: a transformer whose attention heads turn at an exact angular velocity.

Gear trains: derive every gear's exact angular velocity, and refuse a mechanism that contradicts itself.
Gear trains: derive every gear's exact angular velocity, and refuse a mechanism that contradicts itself.

Velocities are in turns per turn of the driver, as exact `Fraction`s. Along an edge between gears:

    mesh      turns(to) = turns(from) * teeth(from) / teeth(to)      (or the edge's `ratio`)
    arbor     turns(to) = turns(from)                                 (same axle)
    pin_slot  turns(to) = turns(from) * teeth(from) / teeth(to)      (mean rate; 1 for the
              Antikythera k1/k2 pair of 50 teeth, whose pin-and-slot only varies the rate within a turn)

The first gear declared is the driver and turns once (unless it sets `ratio`); every gear with
`ratio:` is pinned; a train connected to neither is driven by its own first gear. Velocities then
propagate breadth-first from all of these; reaching a gear a
second time with a different velocity means two paths through the mechanism disagree, which is
reported with both paths and both products. Rotation direction is not modelled: ratios are magnitudes.

Every velocity, and every ratio derived from two of them, is held to the size bound of written
ratios (`rational.MAX_BITS`): a product along a long train, or the reciprocal met walking a tiny
ratio backwards, that grows past it is refused at the edge where it does, and is not propagated
further, so the exact arithmetic stays small and every velocity converts to a finite float.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated, Any, Literal

import networkx as nx
from pydantic import Field

from compiler.ir import IR, Declared, node_id
from compiler.kinds.transformer import TransformerKind, transformer_config_of
from compiler.language.diagnostics import Diagnostic
from compiler.language.kinds import Capabilities, Description, NodePlan, kind
from compiler.language.rational import PositiveRational, size_problem
from compiler.language.spec import InputNames, Int, Name, TransformerSettings

TRAIN_KINDS = ("mesh", "arbor", "pin_slot")


class GearNode(TransformerSettings):
    """A gear of a mechanism (design 000, the Antikythera federated transformer): a sub-transformer
    whose attention heads rotate at the gear's angular velocity.

    The velocity, in turns per turn of the driver, is exact: `ratio` pins it; otherwise it is derived
    along `mesh` (teeth ratio), `arbor` (same axle) and `pin_slot` edges. The first gear declared is
    the driver (ratio 1 unless it says otherwise); a train not connected to it or to a pinned gear
    is driven by its own first gear.
    """

    kind: Literal["gear"]
    teeth: Annotated[Int, Field(ge=1, le=100_000)] | None = Field(None, description="Tooth count.")
    ratio: PositiveRational | None = Field(
        None,
        description="Turns per turn of the driver, exact (`254/19`). Derived from the train when left out.",
    )
    perspective: Name | None = Field(
        None, description="A frame from `perspectives:` through which the gear sees its inputs."
    )
    input: InputNames | None = Field(
        None, description="The input(s) this gear reads, or [] for none. Default: the only input."
    )


@dataclass(frozen=True)
class Route:
    """How a velocity was reached: the gears passed and the factors multiplied."""

    gears: tuple[str, ...]
    factors: tuple[Fraction, ...]
    origin: str  # "ratio" (pinned by the spec) or "driver" (the train's first gear)

    def describe(self) -> str:
        start = self.gears[0]
        head = f"`{start}` ({'its `ratio`' if self.origin == 'ratio' else 'the driver'})"
        if len(self.gears) == 1:
            return head
        product = " * ".join(str(f) for f in self.factors)
        return f"{head} -> " + " -> ".join(f"`{g}`" for g in self.gears[1:]) + f" ({product})"


def _factor(ir: IR, edge: dict, source: str, target: str) -> Fraction | None:
    if edge["ratio"] is not None:
        return Fraction(edge["ratio"])
    if edge["kind"] == "arbor":
        return Fraction(1)
    teeth_from = ir.graph.nodes[node_id(source)]["spec"].teeth
    teeth_to = ir.graph.nodes[node_id(target)]["spec"].teeth
    if teeth_from and teeth_to:
        return Fraction(teeth_from, teeth_to)
    return Fraction(1) if edge["kind"] == "pin_slot" else None


def solve_trains(ir: IR) -> tuple[dict[str, Fraction], list[Diagnostic]]:
    """Velocities of every gear (by name) and the problems found on the way."""
    spec, found = ir.spec, []
    gears = [name for name, node in spec.nodes.items() if node.kind == Gear.name]
    is_gear = set(gears)
    constraints = nx.MultiGraph()
    constraints.add_nodes_from(gears)
    for u, v, edge in ir.spec_edges():
        if edge["kind"] not in TRAIN_KINDS:
            continue
        a, b = ir.graph.nodes[u]["name"], ir.graph.nodes[v]["name"]
        if ir.graph.nodes[u]["role"] != "node" or ir.graph.nodes[v]["role"] != "node":
            continue  # an unknown endpoint: check_references reports it
        if a not in is_gear or b not in is_gear:
            other = a if a not in is_gear else b
            found.append(
                ir.error(
                    ("edges", edge["index"], "kind"),
                    f"a `{edge['kind']}` edge joins gears, but `{other}` is a {spec.nodes[other].kind}",
                    "make both ends `kind: gear`, or use `kind: message`",
                )
            )
            continue
        factor = _factor(ir, edge, a, b)
        if factor is not None:
            constraints.add_edge(a, b, factor=factor, source=a, index=edge["index"])

    velocity: dict[str, Fraction | None] = {}  # None: reached, but too large to keep
    route: dict[str, Route] = {}
    order = {name: i for i, name in enumerate(gears)}
    reported: set[int] = set()
    for component in sorted(
        nx.connected_components(constraints), key=lambda c: min(order[g] for g in c)
    ):
        for g in sorted(component, key=order.__getitem__):
            if spec.nodes[g].ratio is not None:  # positive: the schema says so
                velocity[g], route[g] = Fraction(spec.nodes[g].ratio), Route((g,), (), "ratio")
        driver = min(component, key=order.__getitem__)
        if driver not in velocity and (
            driver == gears[0] or not any(g in velocity for g in component)
        ):
            velocity[driver], route[driver] = Fraction(1), Route((driver,), (), "driver")
        queue = deque(g for g in sorted(component, key=order.__getitem__) if g in velocity)
        while queue:
            here = queue.popleft()
            for _, there, data in sorted(
                constraints.edges(here, data=True), key=lambda e: e[2]["index"]
            ):
                factor = data["factor"] if data["source"] == here else 1 / data["factor"]
                value = velocity[here] * factor
                step = Route(
                    (*route[here].gears, there), (*route[here].factors, factor), route[here].origin
                )
                if there not in velocity and (problem := size_problem(value)) is not None:
                    found.append(_too_large(ir, data["index"], there, step, problem))
                    reported.add(data["index"])
                    velocity[there], route[there] = None, step  # reached: not walked again
                elif there not in velocity:
                    velocity[there], route[there] = value, step
                    queue.append(there)
                elif velocity[there] is None:
                    continue
                elif velocity[there] != value and data["index"] not in reported:
                    reported.add(data["index"])
                    found.append(
                        ir.error(
                            ("edges", data["index"]),
                            f"the gear train contradicts itself: `{there}` turns {velocity[there]} per driver turn "
                            f"via {route[there].describe()}, but {value} via {step.describe()}",
                            "fix a tooth count or an explicit `ratio`, or break the extra path "
                            "(use `kind: message` for an edge that carries messages but no motion)",
                        )
                    )
    velocity = {g: v for g, v in velocity.items() if v is not None}
    for index, _, _, ratio in _derived_ratios(ir, velocity):
        if (problem := size_problem(ratio)) is not None:
            found.append(
                ir.error(
                    ("edges", index),
                    f"the ratio this edge derives from its gears' velocities {problem}",
                    "give the edge an explicit `ratio`, or bring the two gears' velocities closer",
                )
            )
    return velocity, found


def _too_large(ir: IR, index: int, gear: str, step: Route, problem: str) -> Diagnostic:
    return ir.error(
        ("edges", index),
        f"the velocity of `{gear}` along this edge, via {_short(step)}, {problem}",
        "use smaller tooth counts or ratios along this train, or pin the gear with its own `ratio`",
    )


def _short(step: Route) -> str:
    """The route's gears, elided in the middle when long: the products are what is too large."""
    gears = [f"`{g}`" for g in step.gears]
    return " -> ".join(gears if len(gears) <= 6 else [*gears[:3], "...", *gears[-2:]])


def _derived_ratios(ir: IR, velocity: dict[str, Fraction]):
    """(edge index, from vertex, key, ratio) for each edge between gears that leaves `ratio` unset."""
    graph = ir.graph
    for u, v, key, edge in graph.edges(keys=True, data=True):
        if edge["role"] != "edge" or edge["ratio"] is not None:
            continue
        a, b = velocity.get(graph.nodes[u].get("name")), velocity.get(graph.nodes[v].get("name"))
        if a is not None and b is not None:
            yield edge["index"], (u, v), key, b / a


def check_gear_trains(ir: IR) -> list[Diagnostic]:
    return solve_trains(ir)[1]


def derive_gear_ratios(ir: IR) -> IR:
    """Record each gear's velocity, and give edges between gears their derived ratio when unset."""
    velocity, _ = solve_trains(ir)
    graph = ir.graph.copy()
    for name, value in velocity.items():
        graph.nodes[node_id(name)]["velocity"] = value
    for _, (u, v), key, ratio in _derived_ratios(ir, velocity):
        graph.edges[u, v, key]["ratio"] = ratio
    return ir.with_graph(graph)


def _rotary_rules(ir: IR, vertex: str) -> list[Diagnostic]:
    """A gear's heads turn at its velocity through rotary positions: it needs them, and an
    attention that uses them."""
    data = ir.graph.nodes[vertex]
    name, s, origin = data["name"], data["settings"], data["settings_from"]
    found = []
    if s["position"] != "rope":
        found.append(
            ir.error(
                origin["position"],
                f"gear `{name}` has `position: {s['position']}`, but a gear's heads turn at its velocity "
                "through rotary positions",
                "leave `position` at `rope` for gears, or make the node a `transformer`",
            )
        )
    attention = s["attention"]
    if attention is not None and not component_uses_rotary("attention", attention.kind):
        found.append(
            ir.error(
                (*origin["attention"], "kind"),
                f"gear `{name}` cannot use `{attention.kind}`: a gear's heads turn at its velocity through "
                "rotary positions, which that mixer does not use",
                "use a score-level attention on gears, or make the node a `transformer`",
            )
        )
    return found


def component_uses_rotary(family: str, name: str) -> bool:
    from compiler.language.registry import REGISTRY

    return REGISTRY.get(family, name).level != "mixer"


@kind("gear")
class Gear(TransformerKind):
    Spec = GearNode
    capabilities = Capabilities()
    graph_checks = (check_gear_trains,)
    graph_transforms = (derive_gear_ratios,)
    colour = "#b7791f"
    attributes = {
        "velocity": Declared(
            (Fraction,), "turns per turn of the driver, exact (derive_gear_ratios)"
        )
    }

    def check(self, ir: IR, vertex: str) -> list[Diagnostic]:
        return _rotary_rules(ir, vertex)

    def plan(self, ir: IR, vertex: str) -> NodePlan:
        data = ir.graph.nodes[vertex]
        return NodePlan(
            transformer_config_of(ir, vertex),
            rope_scale=float(data["velocity"]),
            perspective=data["spec"].perspective,
        )

    def describe(self, ir: IR, vertex: str) -> Description:
        described = super().describe(ir, vertex)
        data = ir.graph.nodes[vertex]
        teeth, velocity = data["spec"].teeth, data["velocity"]
        velocity_text = str(velocity.numerator) if velocity.denominator == 1 else str(velocity)
        described.lines.insert(
            0, " · ".join([*([f"{teeth} teeth"] if teeth else []), f"ω {velocity_text}"])
        )
        described.details.update(teeth=teeth, velocity=velocity_text)
        if data["spec"].perspective:
            described.details["perspective"] = data["spec"].perspective
        described.glyph = ("cog", teeth, velocity_text)
        return described

    def describe_written(self, raw: dict[str, Any]) -> Description:
        teeth = raw.get("teeth")
        teeth = teeth if isinstance(teeth, int) and not isinstance(teeth, bool) else None
        ratio = str(raw["ratio"]) if raw.get("ratio") is not None else None
        lines = [*([f"{teeth} teeth"] if teeth else []), *([f"ω {ratio}"] if ratio else [])]
        return Description(lines=lines, glyph=("cog", teeth, ratio))
