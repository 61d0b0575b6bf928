"""The component registry: named, configurable parts that a spec selects by `kind`.

A component is a pydantic config (the spec's view: fields, ranges, docs) paired with a builder
(the runtime's view: a module class or factory). Registering one makes it selectable in YAML,
documented in the JSON Schema and checked with located errors, all from the one config class:

    from typing import Literal
    from compiler.language.registry import ComponentConfig, register

    class Talking(ComponentConfig):
        '''Talking-heads attention (Shazeer et al. 2020).'''
        kind: Literal["talking_heads"] = "talking_heads"
        mix: float = 1.0

    @register("attention", config=Talking)
    class TalkingHeads(torch.nn.Module):
        ...

Other packages add components through the entry-point group `epicycle.components`: each entry
point names a module (or a callable) that registers its components when loaded. Built-ins and
entry points load on the first lookup, so importing the compiler stays cheap.

Families, and what their builders are called with (besides the config's own fields):

* `attention`, level `scores`: `(heads, kv_heads, head_width, context, members)`; the module's
  `forward(q, k, v, causal, dropout_p)` replaces the fused attention call.
* `attention`, level `mixer`: `(width, heads, layers, context, members, causal, bias)`; the module
  replaces the whole attention sub-layer (`takes_stream` says whether it owns its residual).
* `rotary`: `(head_width, context, theta, scales)`; `forward(x)` rotates queries and keys.
* `optimizer`: `(model)`; returns a `torch.optim.Optimizer`.
* `schedule`: `(optimizer, steps)`; returns a learning-rate scheduler.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError, core_schema

from compiler.language.capabilities import Capabilities

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "epicycle.components"
FAMILIES = ("attention", "rotary", "optimizer", "schedule")
BUILTINS = ("compiler.components",)
# the chosen kind, inserted in error locations; a spec name cannot contain ":", so the tag is never
# mistaken for a key of the data (a component may have a field named like its kind: `lattice`)
TAG_PREFIX = "kind:"
PLACEHOLDER = (
    "x-epicycle-component"  # where a component field's `$ref` goes (see `component_schemas`)
)


class ComponentConfig(BaseModel):
    """Base of a component's config: unknown keys are errors, numbers finite, values frozen."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    def options(self) -> dict[str, Any]:
        """The fields a builder receives (everything but `kind`), as plain Python values."""
        return {k: v for k, v in self.model_dump().items() if k != "kind"}


@dataclass(frozen=True)
class Component:
    family: str
    name: str
    config: type[BaseModel]
    build: Callable[..., Any]
    level: str | None = None  # attention: "scores", "mixer" or "lattice"
    capabilities: Capabilities = Capabilities()  # what a node using it can take part in
    # its rules for the node it sits in: `check(ir, vertex data, head_width) -> diagnostics`
    check: Callable[..., list] | None = None
    # its parameter count from the arguments `build` takes, so a spec is counted without building
    # it (`epicycle validate` imports no torch); None: the estimate builds it on the meta device
    parameters: Callable[..., int] | None = None

    @property
    def summary(self) -> str:
        doc = (self.config.__doc__ or "").strip()
        return " ".join(doc.split("\n\n")[0].split())


class UnknownComponent(LookupError):
    def __init__(self, family: str, name: str, known: list[str]):
        self.family, self.name, self.known = family, name, known
        guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        self.guess = guess[0] if guess else None
        hint = f"did you mean `{self.guess}`? " if self.guess else ""
        super().__init__(
            f"unknown {family} component `{name}`; {hint}known: {', '.join(known) or 'none'}"
        )


@dataclass
class Registry:
    families: dict[str, dict[str, Component]] = field(default_factory=dict)
    loaded: bool = False

    def register(
        self,
        family: str,
        name: str | None = None,
        *,
        config: type[BaseModel],
        level: str | None = None,
        capabilities: Capabilities | None = None,
        replace: bool = False,
        parameters: Callable[..., int] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register a builder (a module class or factory) under `family` and `name`
        (default: the config's `kind` literal)."""

        def decorate(build: Callable[..., Any]) -> Callable[..., Any]:
            chosen = capabilities or Capabilities()
            component = Component(
                family, name or kind_of(config), config, build, level, chosen, None, parameters
            )
            self.add(component, replace=replace)
            return build

        return decorate

    def add(self, component: Component, replace: bool = False) -> None:
        if component.family not in FAMILIES:
            raise ValueError(
                f"unknown component family `{component.family}`; families: {', '.join(FAMILIES)}"
            )
        if kind_of(component.config) != component.name:
            raise ValueError(
                f"component `{component.name}`: its config {component.config.__name__} must declare "
                f'`kind: Literal["{component.name}"]`'
            )
        if component.family == "attention" and component.level not in (
            "scores",
            "mixer",
            "lattice",
        ):
            raise ValueError(
                f"attention component `{component.name}` needs level='scores' or level='mixer'"
            )
        members = self.families.setdefault(component.family, {})
        if component.name in members and not replace and members[component.name] != component:
            raise ValueError(
                f"{component.family} component `{component.name}` is already registered "
                f"(by {members[component.name].build!r}); pass replace=True to override it"
            )
        members[component.name] = component

    def family(self, family: str) -> dict[str, Component]:
        self.load()
        return self.families.get(family, {})

    def get(self, family: str, name: str) -> Component:
        members = self.family(family)
        if name not in members:
            raise UnknownComponent(family, name, sorted(members))
        return members[name]

    def load(self) -> None:
        """Import the built-in components and every installed `epicycle.components` entry point."""
        if self.loaded:
            return
        self.loaded = True
        load_plugins(self, BUILTINS, ENTRY_POINT_GROUP)

    def __iter__(self) -> Iterator[Component]:
        self.load()
        for members in self.families.values():
            yield from members.values()


def load_plugins(registry: Any, builtins: tuple[str, ...], group: str) -> None:
    """Import `builtins` (they register on import), then every installed entry point of `group`:
    a module (registering on import) or a callable, which is given `registry`."""
    for module in builtins:
        importlib.import_module(module)
    for point in entry_points(group=group):
        loaded = point.load()
        if callable(loaded) and not isinstance(loaded, type):
            loaded(registry)
        log.debug("loaded %s plugins from %s", group, point.value)


REGISTRY = Registry()
register = REGISTRY.register


def kind_of(config: type[BaseModel]) -> str:
    info = config.model_fields.get("kind")
    args = typing.get_args(info.annotation) if info is not None else ()
    if len(args) != 1 or not isinstance(args[0], str):
        raise ValueError(f'{config.__name__} must declare `kind: Literal["<name>"]`')
    return args[0]


# --------------------------------------------------------------------------- spec field type


class ComponentField:
    """A spec field holding `{kind: <registered name>, ...}` of one family.

    Validation looks the kind up in the registry at validation time (so components registered
    after import count) and validates the rest with that component's config. Errors carry the
    kind in their location, as pydantic's discriminated unions do, so the front end reports them
    at the right line with the right model's field list.
    """

    def __init__(self, family: str, levels: tuple[str, ...] | None = None):
        self.family, self.levels = family, levels

    def components(self) -> list[Component]:
        return [
            c
            for c in REGISTRY.family(self.family).values()
            if self.levels is None or c.level in self.levels
        ]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda v: v.model_dump() if isinstance(v, BaseModel) else v
            ),
        )

    @property
    def schema_name(self) -> str:
        return f"{self.family.capitalize()}{''.join(level.capitalize() for level in self.levels or ())}Component"

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        # a reference, filled in by `component_schemas` (the spec's `json_schema()` adds them):
        # the registry can grow after the spec's classes are built
        return {PLACEHOLDER: self.schema_name}

    def known(self) -> list[str]:
        """The kinds an error message lists."""
        return sorted(c.name for c in self.components())

    def config(self, name: str) -> type[BaseModel] | None:
        for component in self.components():
            if component.name == name:
                return component.config
        return None

    def validate(self, value: Any) -> BaseModel:
        if isinstance(value, BaseModel) and any(
            isinstance(value, c.config) for c in self.components()
        ):
            return value
        if not isinstance(value, dict):
            raise PydanticCustomError(
                "model_type",
                "expected a mapping with a `kind`, got {type}",
                {"type": type(value).__name__},
            )
        known = self.known()
        tags = ", ".join(f"'{k}'" for k in known)
        if "kind" not in value:
            raise PydanticCustomError(
                "union_tag_not_found",
                "needs a `kind`",
                {"discriminator": "'kind'", "expected_tags": tags},
            )
        kind = value["kind"]
        config = self.config(kind) if isinstance(kind, str) else None
        if config is None:
            raise PydanticCustomError(
                "union_tag_invalid",
                "unknown kind {tag}",
                {"discriminator": "'kind'", "tag": str(kind), "expected_tags": tags},
            )
        try:
            return config.model_validate(value)
        except ValidationError as exc:
            raise _relocated(exc, kind) from None


def _relocated(exc: ValidationError, tag: str) -> ValidationError:
    """The same errors with `kind:<tag>` inserted at the front of each location."""
    details: list[Any] = []
    for error in exc.errors(include_url=False):
        detail: dict[str, Any] = {
            "type": error["type"],
            "loc": (f"{TAG_PREFIX}{tag}", *error["loc"]),
            "input": error.get("input"),
        }
        if error.get("ctx"):
            detail["ctx"] = error["ctx"]
        try:
            ValidationError.from_exception_data("check", [detail])
        except (KeyError, TypeError):  # a project-defined error type (or one reusing a built-in
            # type name with other context): keep its message as it was written
            message = error["msg"].replace("{", "{{").replace("}", "}}")
            detail["type"] = PydanticCustomError(error["type"], message, error.get("ctx"))
            detail.pop("ctx", None)
        details.append(detail)
    return ValidationError.from_exception_data(exc.title, details)


def link_components(schema: dict[str, Any], fields: list[ComponentField]) -> dict[str, Any]:
    """Replace each component field's placeholder in `schema` by a `$ref` to its `$defs` entry
    (made by `component_schemas`). Pydantic checks the references it generates itself, so the
    field types leave a placeholder and the spec's `json_schema()` links them afterwards."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if PLACEHOLDER in node:
                return {"$ref": f"#/$defs/{node[PLACEHOLDER]}"}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    linked = dict(schema)
    linked["$defs"] = {**schema.get("$defs", {}), **component_schemas(fields)}
    return walk(linked)  # node kinds' own component fields are placeholders too


def component_schemas(fields: list[ComponentField]) -> dict[str, Any]:
    """JSON Schema `$defs` for the component fields: a `oneOf` of the registered configs of each,
    discriminated by `kind`, plus the definitions those configs use."""
    from pydantic.json_schema import models_json_schema

    defs: dict[str, Any] = {}
    for spec_field in fields:
        components = spec_field.components()
        refs, schema = models_json_schema(
            [(c.config, "validation") for c in components], ref_template="#/$defs/{model}"
        )
        defs.update(schema.get("$defs", {}))
        defs[spec_field.schema_name] = {
            "oneOf": [refs[(c.config, "validation")] for c in components],
            "discriminator": {
                "propertyName": "kind",
                "mapping": {c.name: refs[(c.config, "validation")]["$ref"] for c in components},
            },
            "description": getattr(
                spec_field,
                "description",
                f"A registered {spec_field.family} component, chosen by `kind`.",
            ),
        }
    return defs
