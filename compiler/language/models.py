"""Walking the spec's pydantic models: the field a key names, the members of a union, the
registry marker of a component field. The front end explains errors with these, and `--set`
overrides find the field a path addresses; neither imports the other for them."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from compiler.language.registry import ComponentField


def unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def union_members(annotation: Any) -> list[Any]:
    annotation = unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [unwrap(a) for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def component_field(annotation: Any) -> ComponentField | None:
    """The registry marker of a field typed `Annotated[Any, ComponentField(...)] | None`."""
    candidates = [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        candidates = list(typing.get_args(annotation))
    for candidate in candidates:
        if typing.get_origin(candidate) is typing.Annotated:
            for meta in candidate.__metadata__:
                if isinstance(meta, ComponentField):
                    return meta
    return None


def kind_of(model: Any) -> str | None:
    if isinstance(model, type) and issubclass(model, BaseModel) and "kind" in model.model_fields:
        args = typing.get_args(unwrap(model.model_fields["kind"].annotation))
        return args[0] if args else None
    return None


def find_field(model: type[BaseModel], name: Any) -> Any:
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def field_names(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def field_description(model: type[BaseModel] | None, name: str) -> str | None:
    field = find_field(model, name) if model is not None else None
    return field.description if field is not None else None
