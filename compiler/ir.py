"""The graph IR: a networkx MultiDiGraph of the spec's inputs, nodes and outputs.

Vertex ids are the spec paths `inputs.NAME`, `nodes.NAME`, `outputs.NAME` (the three namespaces
of a spec are separate, so an input and a node may share a name). Every vertex and edge carries
`path`, its place in the loaded data, which is how any pass turns a finding into `file:line:col`.

Vertex and edge attributes are declared records (`VertexRecord`, `EdgeRecord`): each field is
named once with what it holds and which pass writes it; a key that is not declared (a typo, or a
pass writing what no record has) is an error where it is written or read, and a node kind's own
attributes are declared by the kind (`NodeKind.attributes`: a gear's `velocity`). Which pass
provides which field is checked by the driver (`compiler.passes.contract`).

A node of an observer kind (`kind: companion`) lives in the nodes' namespace but is not a
sub-model of the federation: it observes one host through a `kind: companion` edge and sends
nothing, so it gets the role `observer`, its edge the role `companion`, and the passes that plan the federation (which walk
`node` vertices and `edge` edges) never see them.

An edge written `from: outputs.NAME` starts at that output's vertex and has the role `feed`: the
output's values, fed back `delay` steps later (the passes that plan the federation's bus never see
it; `plan` turns it into a `FeedPlan`).

An edge or output naming something that does not exist gets an `unknown` vertex, so building never
fails and `check_references` can report every dangling name at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, ClassVar, NamedTuple

import networkx as nx

from compiler.language.diagnostics import Diagnostic, Span
from compiler.language.frontend import LoadedSpec
from compiler.language.kinds import KINDS
from compiler.language.salvage import Withheld
from compiler.language.spec import FED_BACK

NONE = type(None)
ANY = None  # a field whose values are checked by the pass writing them (pydantic, runtime configs)


class Declared(NamedTuple):
    """A record field: the types its values may have (None: any) and what it holds."""

    types: tuple[type, ...] | None
    what: str


class Record(dict):
    """A dict whose keys are declared fields: `record["width"]` and `record.width` both read one,
    and writing or reading an undeclared key raises at once."""

    FIELDS: ClassVar[dict[str, Declared]] = {}

    def fields(self) -> dict[str, Declared]:
        return self.FIELDS

    def _known(self, key: str) -> None:
        if key not in self.fields():
            raise KeyError(
                f"{type(self).__name__} has no field `{key}`; its fields: {', '.join(self.fields())}"
            )

    def __setitem__(self, key: str, value: Any) -> None:
        self._known(key)
        types = self.fields()[key].types
        if types is not None and not isinstance(value, types):
            raise TypeError(
                f"{type(self).__name__}.{key} holds {' or '.join(t.__name__ for t in types)}, "
                f"not {type(value).__name__} ({self.fields()[key].what})"
            )
        super().__setitem__(key, value)

    def __getitem__(self, key: str) -> Any:
        self._known(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._known(key)
        return super().get(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as missing:
            raise AttributeError(str(missing)) from None


class VertexRecord(Record):
    FIELDS: ClassVar[dict[str, Declared]] = {
        "role": Declared((str,), "input | node | observer | output | unknown (build_ir)"),
        "name": Declared((str,), "the spec's name (build_ir)"),
        "kind": Declared((str, NONE), "the spec's `kind`, None for an unknown vertex (build_ir)"),
        "spec": Declared(ANY, "the validated pydantic object (build_ir)"),
        "path": Declared((tuple,), "where it was written, for file:line:col (build_ir)"),
        "settings": Declared(
            (dict, NONE),
            "resolved transformer settings, or None for a kind without (resolve_defaults)",
        ),
        "settings_from": Declared(
            (dict, NONE), "the path each setting was written at (resolve_defaults)"
        ),
        "width": Declared((int, NONE), "the stream width, None while unknown (infer_widths)"),
        "layer_settings": Declared(
            (tuple,), "what each layer drew from `variations` (sample_variations)"
        ),
        "config": Declared(ANY, "the kind's resolved runtime config (plan)"),
        "group": Declared((int,), "the batch group it runs in (plan)"),
        "context": Declared((int,), "an input's longest sequence (plan)"),
    }

    def fields(self) -> dict[str, Declared]:
        KINDS.load()
        if _declared[0] != KINDS.version:
            declared = dict(self.FIELDS)
            for node_kind in KINDS:
                declared.update(node_kind.attributes)
            _declared[:] = [KINDS.version, declared]
        return _declared[1]


_declared: list = [-1, {}]  # (registry version, the vertex fields with every kind's own)


class EdgeRecord(Record):
    FIELDS: ClassVar[dict[str, Declared]] = {
        "role": Declared((str,), "read | edge | companion | output | feed (build_ir)"),
        "path": Declared((tuple,), "where it was written (build_ir)"),
        "kind": Declared((str, NONE), "the spec edge's kind (build_ir)"),
        "delay": Declared((int,), "feedback steps of delay (build_ir)"),
        "ratio": Declared(
            (Fraction, NONE),
            "the exact ratio, given or derived along a gear train (build_ir, gear)",
        ),
        "index": Declared((int,), "its place in the spec's `edges` (build_ir)"),
        "position": Declared((int,), "an output's source position (build_ir)"),
    }


class IRGraph(nx.MultiDiGraph):
    """The IR's graph: networkx topology with declared records as attributes."""

    node_attr_dict_factory = VertexRecord
    edge_attr_dict_factory = EdgeRecord


def input_id(name: str) -> str:
    return f"inputs.{name}"


def node_id(name: str) -> str:
    return f"nodes.{name}"


def output_id(name: str) -> str:
    return f"outputs.{name}"


def fed_back_output(source: str) -> str | None:
    """The output an edge's `from` feeds back (`outputs.NAME` -> NAME), or None for a node."""
    return source[len(FED_BACK) :] if source.startswith(FED_BACK) else None


@dataclass(frozen=True)
class Facts:
    """Whole-model results, each written by the pass named (None until it has run; the driver
    checks the order, see `compiler.passes.contract`)."""

    bus_width: int | None = None  # infer_widths: the message bus's width
    context: int | None = None  # plan: the longest input sequence
    federation: Any = None  # plan: the runtime's `FederationPlan`
    address: dict[str, tuple[int, int]] | None = None  # plan: node -> (group, member)
    companions: dict[str, tuple] | None = None  # plan: observer -> (host address, config)
    estimates: dict[str, dict] | None = None  # estimate: per node, parameters and FLOPs
    companion_estimates: dict[str, dict] | None = None  # estimate: the same per observer
    parameters_outside_nodes: dict[str, int] | None = None  # estimate: inputs, heads, messages
    flops_outside_nodes: dict[str, int] | None = None  # estimate: FLOPs/token of the feeds
    parameters: int | None = None  # estimate: the total
    warnings: list[Diagnostic] = field(default_factory=list)  # the driver: non-fatal findings


@dataclass(frozen=True)
class IR:
    loaded: LoadedSpec
    graph: nx.MultiDiGraph
    facts: Facts = field(default_factory=Facts)

    @property
    def spec(self):
        return self.loaded.spec

    @property
    def withheld(self) -> Withheld:
        """What failed validation and is left out of this IR (empty for a spec that validated):
        a check that finds something missing asks it first, so as not to echo that failure."""
        return self.loaded.withheld

    def span(self, path: tuple[Any, ...], *, key: bool = False) -> Span:
        return self.loaded.source.span(path, key=key)

    def error(
        self, path: tuple[Any, ...], message: str, hint: str | None = None, *, key: bool = False
    ) -> Diagnostic:
        return Diagnostic(self.span(path, key=key), message, hint)

    def warning(self, path: tuple[Any, ...], message: str, hint: str | None = None) -> Diagnostic:
        return Diagnostic(self.span(path, key=True), message, hint, severity="warning")

    def with_graph(self, graph: nx.MultiDiGraph) -> IR:
        return replace(self, graph=graph)

    def with_facts(self, **facts: Any) -> IR:
        return replace(self, facts=replace(self.facts, **facts))

    def vertices(self, role: str) -> list[tuple[str, dict[str, Any]]]:
        """Vertices of one role, in the order the spec declares them."""
        return [(v, d) for v, d in self.graph.nodes(data=True) if d["role"] == role]

    def spec_edges(self) -> list[tuple[str, str, dict[str, Any]]]:
        edges = [(u, v, d) for u, v, d in self.graph.edges(data=True) if d["role"] == "edge"]
        return sorted(edges, key=lambda e: e[2]["index"])


def build_ir(loaded: LoadedSpec) -> IR:
    spec = loaded.spec
    g = IRGraph()
    for name, inp in spec.inputs.items():
        g.add_node(
            input_id(name), role="input", name=name, kind=inp.kind, spec=inp, path=("inputs", name)
        )
    for name, node in spec.nodes.items():
        role = "observer" if KINDS.get(node.kind).observer else "node"
        g.add_node(
            node_id(name), role=role, name=name, kind=node.kind, spec=node, path=("nodes", name)
        )
    for name, out in spec.outputs.items():
        g.add_node(
            output_id(name),
            role="output",
            name=name,
            kind=out.kind,
            spec=out,
            path=("outputs", name),
        )

    def endpoint(vertex: str, name: str, path: tuple[Any, ...]) -> str:
        if vertex not in g:
            g.add_node(vertex, role="unknown", name=name, kind=None, spec=None, path=path)
        return vertex

    only_input = next(iter(spec.inputs)) if len(spec.inputs) == 1 else None
    for name, node in spec.nodes.items():
        declared = KINDS.get(node.kind).reads(node)
        reads = declared if declared is not None else ([only_input] if only_input else [])
        for position, inp in enumerate(reads):
            path = ("nodes", name, "input", position) if declared is not None else ("nodes", name)
            g.add_edge(endpoint(input_id(inp), inp, path), node_id(name), role="read", path=path)
    for index, edge in enumerate(spec.edges):
        path = ("edges", index)
        fed = fed_back_output(edge.source)
        if fed is not None:
            u = endpoint(output_id(fed), fed, (*path, "from"))
            role = "feed"
        else:
            u = endpoint(node_id(edge.source), edge.source, (*path, "from"))
            role = "companion" if edge.kind == "companion" else "edge"
        v = endpoint(node_id(edge.to), edge.to, (*path, "to"))
        g.add_edge(
            u,
            v,
            role=role,
            kind=edge.kind,
            delay=edge.delay,
            ratio=edge.ratio,
            index=index,
            path=path,
        )
    for name, out in spec.outputs.items():
        for position, source in enumerate(out.source):
            path = ("outputs", name, "from", position)
            g.add_edge(
                endpoint(node_id(source), source, path),
                output_id(name),
                role="output",
                path=path,
                position=position,
            )
    return IR(loaded=loaded, graph=g)
