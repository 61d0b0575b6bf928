"""Node kinds as plugins: the protocol a kind fills in, its capabilities, and the registry.

A node kind is one registered unit: its pydantic model (the spec's view: fields, ranges, docs),
what it can take part in (`Capabilities`), and hooks that the generic passes, `lower`, the CLI,
training and viz call instead of testing the kind's name:

    from typing import Literal
    from compiler.language.kinds import NodeKind, kind
    from compiler.language.spec import SpecModel

    class MixerSpec(SpecModel):
        '''A stack of token-wise MLPs.'''
        kind: Literal["mixer"]
        width: int

    @kind("mixer")
    class Mixer(NodeKind):
        Spec = MixerSpec
        def plan(self, ir, vertex): ...
        def build(self, group): ...

Other packages add kinds through the entry-point group `epicycle.kinds`: each entry point names a
module (or a callable taking the registry) that registers its kinds when loaded. The built-in
kinds (`compiler.kinds`) and entry points load on the first lookup, so importing is cheap.

The hooks take the compiler's IR and a vertex id; they are typed loosely here because the
language sits below the IR in the pipeline (see `compiler.ir` for the records they read).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from compiler.language.capabilities import Capabilities
from compiler.language.registry import ComponentField, kind_of, load_plugins

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epicycle.kinds"
BUILTINS = (
    "compiler.kinds.transformer",
    "compiler.kinds.gear",
    "compiler.kinds.fractal",
    "compiler.kinds.companion",
)


@dataclass
class Description:
    """What tools show of a node: the compile table's cells, the viz label's lines and its details
    panel, and an optional drawing (`glyph`: `("cog", teeth)` or `("nest", levels, branching,
    width)`) that viz knows how to draw whatever the kind."""

    width: str = ""
    heads: str = ""
    layers: str = ""
    group: str | None = None  # the compile table's batch-group cell, when the kind sets it
    lines: list[str] = field(default_factory=list)  # the viz label, after the kind's name
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # extra lines `epicycle compile` prints
    glyph: tuple | None = None


class NodeKind(abc.ABC):
    """The protocol every node kind fills in. Defaults suit a sub-model with no options of its own.

    * `Spec`: the pydantic model of the node in YAML (with `kind: Literal[name]`).
    * `capabilities`: what it can take part in (see `Capabilities`).
    * `observer`: the node reads one host's states through a `companion` edge, adds a training
      term and sends nothing; it is not a sub-model of the federation.
    * `transformer_settings(node)`: where the node's transformer settings sit, if it has them
      (the settings `defaults.transformer` fills in): `(model, path suffix)`, or None.
    * `declared_width(node)`: the width of a node with no transformer settings.
    * `check(ir, vertex)`: kind-specific rules, as located diagnostics.
    * `sub_models(node)`: runnable sub-models per level (a fractal's), or None.
    * `graph_checks` / `graph_transforms`: whole-graph passes the kind brings (gear trains).
    * `plan(ir, vertex)`: the node's resolved runtime config (`NodePlan`).
    * `build(group)`: the runtime module for a batch group of this kind; no YAML below this line.
    * `parameters(config)`: a closed-form count, the guard before anything is built.
    * `counts_exactly`: `group_parameters(group)` (by default `parameters` times the members) is
      the built module's exact count, so the estimate builds nothing (`epicycle validate` then
      imports no torch); false: the estimate builds the group on the meta device to count it.
    * `flops_per_token(config)`: forward FLOPs a token costs in one step.
    * `describe(ir, vertex)`: what the compile table and viz show (`Description`);
      `describe_written(raw)` the same for a node of a spec that does not validate.
    * What training logs for a node comes from its runtime module: any part of it with a
      `report()` method contributes to `GraphModel.report()` (the runtime knows no kinds).
    """

    name: ClassVar[str]
    Spec: ClassVar[type[BaseModel]]
    capabilities: ClassVar[Capabilities] = Capabilities()
    observer: ClassVar[bool] = False
    graph_checks: ClassVar[tuple[Callable[[Any], list], ...]] = ()
    graph_transforms: ClassVar[tuple[Callable[[Any], Any], ...]] = ()
    colour: ClassVar[str | None] = None  # its boxes' tint in `epicycle viz`
    counts_exactly: ClassVar[bool] = False
    attributes: ClassVar[
        dict[str, str]
    ] = {}  # IR vertex fields its passes write, and what they hold

    @property
    def summary(self) -> str:
        doc = (self.Spec.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split())

    def transformer_settings(self, node: Any) -> tuple[Any, tuple] | None:
        return None

    def declared_width(self, node: Any) -> int | None:
        return getattr(node, "width", None)

    def reads(self, node: Any) -> list[str] | None:
        """The inputs the node reads (None: the only input, if there is one)."""
        return getattr(node, "input", None)

    def check(self, ir: Any, vertex: str) -> list:
        return []

    def sub_models(self, node: Any) -> tuple[int, ...] | None:
        """How many runnable sub-models each level of the node holds (`compile --level`), or
        None for a node without them."""
        return None

    # every kind must say how it is planned, built and counted: registration refuses one that
    # does not (`REQUIRED_HOOKS`), so a missing count can never read as 0
    @abc.abstractmethod
    def plan(self, ir: Any, vertex: str) -> NodePlan: ...

    @abc.abstractmethod
    def build(self, group: Any) -> Any: ...

    @abc.abstractmethod
    def parameters(self, config: Any) -> int: ...

    @abc.abstractmethod
    def flops_per_token(self, config: Any) -> int: ...

    def group_parameters(self, group: Any) -> int:
        """The parameters of a batch group's module (`build(group)`), when `counts_exactly`."""
        return self.parameters(group.config) * len(group.nodes)

    def describe(self, ir: Any, vertex: str) -> Description:
        config = ir.graph.nodes[vertex].get("config")
        width = getattr(config, "width", ir.graph.nodes[vertex].get("width"))
        return Description(width=str(width) if width is not None else "")

    def describe_written(self, raw: dict[str, Any]) -> Description:
        """What viz can show of a node as written, when the spec does not validate: only what
        the raw mapping says, checked here, never trusted."""
        return Description()


@dataclass(frozen=True)
class NodePlan:
    """A node's resolved runtime config and how it batches.

    `config` is hashable and has `width` and `heads` (a cross-attention edge into the node uses
    that many heads); nodes of one kind with equal configs, equal `batch_key`s and the same reads
    run as one group. `options` travel to `build` unchanged (a fractal's levels); `rope_scale` is
    a member's rotary frequency multiplier (a gear's velocity); `perspective` the frame it sees
    its inputs through."""

    config: Any
    batch_key: Any = None
    options: Any = None
    rope_scale: float = 1.0
    perspective: str | None = None


class UnknownKind(LookupError):
    pass


@dataclass
class KindRegistry:
    kinds: dict[str, NodeKind] = field(default_factory=dict)
    loaded: bool = False
    version: int = 0  # bumped on every change, so what is derived from the kinds can be cached

    def register(
        self, name: str | None = None, *, replace: bool = False
    ) -> Callable[[type[NodeKind]], type[NodeKind]]:
        """Decorator: register a `NodeKind` subclass under `name` (default: its Spec's `kind`)."""

        def decorate(cls: type[NodeKind]) -> type[NodeKind]:
            self.add(cls, name, replace=replace)
            return cls

        return decorate

    def add(self, cls: type[NodeKind], name: str | None = None, *, replace: bool = False) -> None:
        if not (isinstance(cls, type) and issubclass(cls, NodeKind)):
            raise TypeError(f"{cls!r} is not a NodeKind subclass")
        spec = getattr(cls, "Spec", None)
        if not (isinstance(spec, type) and issubclass(spec, BaseModel)):
            raise ValueError(f"node kind {cls.__name__} needs `Spec`, a pydantic model")
        declared = kind_of(spec)
        name = name or declared
        if declared != name:
            raise ValueError(
                f'node kind `{name}`: its Spec {spec.__name__} must declare `kind: Literal["{name}"]`'
            )
        if name in self.kinds and not replace and type(self.kinds[name]) is not cls:
            raise ValueError(
                f"node kind `{name}` is already registered (by {type(self.kinds[name]).__name__}); "
                "pass replace=True to override it"
            )
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise TypeError(
                f"node kind `{name}` ({cls.__name__}) must define {', '.join(missing)}: every "
                "kind says how it is planned, built and counted (see NodeKind)"
            )
        cls.name = name
        self.kinds[name] = cls()
        self.version += 1

    def remove(self, name: str) -> None:
        self.kinds.pop(name, None)
        self.version += 1

    def load(self) -> None:
        """Import the built-in kinds and every installed `epicycle.kinds` entry point."""
        if self.loaded:
            return
        self.loaded = True
        load_plugins(self, BUILTINS, ENTRY_POINT_GROUP)

    def get(self, name: str) -> NodeKind:
        self.load()
        if name not in self.kinds:
            raise UnknownKind(f"unknown node kind `{name}`; known: {', '.join(sorted(self.kinds))}")
        return self.kinds[name]

    def __iter__(self) -> Iterator[NodeKind]:
        self.load()
        yield from self.kinds.values()

    def __contains__(self, name: str) -> bool:
        self.load()
        return name in self.kinds


KINDS = KindRegistry()
kind = KINDS.register


@dataclass(frozen=True)
class _KindEntry:
    """A node kind seen through `ComponentField`'s interface (name and config)."""

    name: str
    config: type[BaseModel]


class NodeField(ComponentField):
    """The spec's `nodes:` values: `{kind: <registered node kind>, ...}`, validated against that
    kind's `Spec` at validation time, so kinds registered after import count."""

    def __init__(self) -> None:
        super().__init__("node")

    def components(self) -> list[Any]:
        return [_KindEntry(k.name, k.Spec) for k in KINDS]

    def known(self) -> list[str]:
        return [k.name for k in KINDS]  # the built-ins first, in the order they were designed

    @property
    def schema_name(self) -> str:
        return "Node"

    @property
    def description(self) -> str:
        return "A node, chosen by `kind`: a registered node kind."
