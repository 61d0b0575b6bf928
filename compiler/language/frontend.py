"""Front end: a spec file becomes a validated `Spec`, or located diagnostics saying what to fix.

Pydantic reports errors as a location tuple and a type; this module turns each into a sentence in
the spec's vocabulary ("unknown key `widht` in `nodes.sun`") at the `file:line:col` the
`SourceMap` recorded, with a help line: the nearest known key, the allowed choices, the bound.
"""

from __future__ import annotations

import hashlib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydantic
from pydantic import BaseModel

from compiler.language.diagnostics import Diagnostic, SpecError, did_you_mean
from compiler.language.registry import TAG_PREFIX, ComponentField
from compiler.language.salvage import Withheld, broken_paths, salvage
from compiler.language.source import Document, SourceMap, parse_spec_text, read_spec_file
from compiler.language.spec import SPEC_VERSION, Spec, _type_name

if typing.TYPE_CHECKING:
    from compiler.language.overrides import Override

MAX_REPORTED = 50


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with everything needed to point back into its file.

    `text` is the spec as compiled, which a checkpoint stores: the file's own text, or, with
    `overrides` (`--set path=value`, see `compiler.language.overrides`), the effective document
    written out as YAML. `withheld` is empty except in the partial spec of a document that did
    not validate (`InvalidDocument.salvaged`)."""

    spec: Spec
    source: SourceMap
    text: str
    overrides: tuple[str, ...] = ()
    withheld: Withheld = Withheld()

    @property
    def file(self) -> str:
        return self.source.file

    @property
    def digest(self) -> str:
        """SHA-256 of the spec's text: stored with weights to tell which spec made them."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class InvalidDocument(SpecError):
    """A document that does not validate. `salvaged` is what did validate (every broken part,
    and what depended on it, withheld), for the graph passes to check too; None when nothing
    sound is left to check."""

    def __init__(self, diagnostics: list[Diagnostic], salvaged: LoadedSpec | None = None):
        super().__init__(diagnostics)
        self.salvaged = salvaged


def load_spec(path: str | Path, overrides: Sequence[str | Override] = ()) -> LoadedSpec:
    return _validated(read_spec_file(path), overrides)


def load_spec_text(
    text: str, file: str = "<string>", overrides: Sequence[str | Override] = ()
) -> LoadedSpec:
    return _validated(parse_spec_text(text, file), overrides)


def _validated(doc: Document, overrides: Sequence[str | Override]) -> LoadedSpec:
    if not overrides:
        return validate_document(doc)
    from compiler.language.overrides import apply_overrides

    effective, applied = apply_overrides(doc, overrides)
    return replace(validate_document(effective), overrides=applied)


def validate_document(doc: Document) -> LoadedSpec:
    """The validated spec, or `InvalidDocument` with every located problem of the document."""
    data, source = doc.data, doc.source
    if not isinstance(data, dict):
        raise SpecError(
            [
                Diagnostic(
                    source.span(()),
                    f"a spec is a mapping of sections, got {_type_name(data)}",
                    "start the file with `spec: 1`, then `name:`, `inputs:`, `nodes:` and `outputs:`",
                )
            ]
        )
    diagnostics = _check_version(data, source)
    if diagnostics:  # a missing or quoted version: read the rest as this version's
        data = {**data, "spec": SPEC_VERSION}
    try:
        spec = Spec.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        diagnostics += _explain_all(errors, data, source)
        removed, meant = broken_paths(errors, lambda loc: _field_names(_model_at(loc[:-1])))
        if "spec" not in doc.data or doc.data["spec"] != SPEC_VERSION:
            removed.add(("spec",))
        saved = salvage(data, source, removed, meant)
        salvaged = (
            LoadedSpec(
                Spec.model_construct(**saved.data), saved.source, doc.text, withheld=saved.withheld
            )
            if saved is not None
            else None
        )
        raise InvalidDocument(diagnostics, salvaged) from None
    loaded = LoadedSpec(spec=spec, source=source, text=doc.text)
    if diagnostics:
        raise InvalidDocument(
            diagnostics, replace(loaded, withheld=Withheld(frozenset({("spec",)})))
        )
    return loaded


def _check_version(data: dict[str, Any], source: SourceMap) -> list[Diagnostic]:
    """A missing or quoted `spec:` is reported and the rest read as this version; a version this
    epicycle does not read stops validation, since the rest may be another language."""
    if "spec" not in data:
        return [
            Diagnostic(
                source.span(()),
                "missing `spec:` (the spec language version)",
                f"add `spec: {SPEC_VERSION}` as the first line",
            )
        ]
    version = data["spec"]
    if isinstance(version, str) and version.strip() == str(SPEC_VERSION):
        return [
            Diagnostic(
                source.span(("spec",)),
                f"`spec` must be the number {SPEC_VERSION}, not the string {version!r}",
                f"write `spec: {SPEC_VERSION}` without quotes",
            )
        ]
    if version != SPEC_VERSION or isinstance(version, bool):
        raise SpecError(
            [
                Diagnostic(
                    source.span(("spec",)),
                    f"unsupported spec version `{version}`: this epicycle reads version {SPEC_VERSION}",
                    f"write `spec: {SPEC_VERSION}`, or upgrade epicycle if the spec is newer",
                )
            ]
        )
    return []


# --------------------------------------------------------------------------- error translation


def _explain_all(errors: list[dict[str, Any]], data: Any, source: SourceMap) -> list[Diagnostic]:
    diagnostics: list[Diagnostic] = []
    seen: set[tuple[str, str]] = set()
    for error in _one_per_root(errors):
        diagnostic = _explain(error, data, source)
        key = (str(diagnostic.span), diagnostic.message)
        if key not in seen:
            seen.add(key)
            diagnostics.append(diagnostic)
        if len(diagnostics) >= MAX_REPORTED:
            break
    return diagnostics


def _one_per_root(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Without the errors another one explains: a key misspelt (`form:`) is reported as unknown,
    with `did you mean `from`?`, and not again as `from` missing."""
    misspelt = set()
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden" and loc:
            guess = did_you_mean(str(loc[-1]), _field_names(_model_at(loc[:-1])))
            if guess is not None:
                misspelt.add((*loc[:-1], guess))
    return [e for e in errors if not (e["type"] == "missing" and tuple(e["loc"]) in misspelt)]


def _explain(error: dict[str, Any], data: Any, source: SourceMap) -> Diagnostic:
    loc: tuple[Any, ...] = tuple(error["loc"])
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    if (
        loc and loc[-1] == "[key]"
    ):  # a mapping key that is not a valid name: point at the key itself
        span, found = source.locate(loc[:-1], key=True)
        return Diagnostic(
            span,
            f"`{loc[-2]}` is not a valid name",
            "names start with a letter or `_` and hold letters, digits, `_` and `-`",
        )
    span, found = source.locate(loc, key=kind == "extra_forbidden")
    field = _field_name(loc, found, kind)
    where = _where(found if kind in ("missing", "extra_forbidden") else found[:-1])
    model = _model_at(loc[:-1]) if kind in ("missing", "extra_forbidden") else None

    if kind == "extra_forbidden":
        known = _field_names(model)
        guess = did_you_mean(field, known)
        hint = (
            f"did you mean `{guess}`?"
            if guess
            else (f"known keys here: {', '.join(known)}" if known else None)
        )
        return Diagnostic(span, f"unknown key `{field}` in {_where(found[:-1])}", hint)
    if kind == "missing":
        about = _field_description(model, field)
        return Diagnostic(
            span, f"{where} needs `{field}`", f"`{field}`: {about}" if about else None
        )
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = [
            t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()
        ]
        tags = tags or _union_tags(loc)
        if kind == "union_tag_not_found":
            return Diagnostic(span, f"{_where(found)} needs a `kind`", f"one of: {', '.join(tags)}")
        tag = ctx.get("tag")
        guess = did_you_mean(str(tag), tags)
        hint = (f"did you mean `{guess}`? " if guess else "") + f"known kinds: {', '.join(tags)}"
        span = source.span((*found, "kind"))
        return Diagnostic(span, f"unknown kind `{tag}` in {_where(found)}", hint)
    if kind == "literal_error":
        choices = [
            c.strip().strip("'")
            for c in str(ctx.get("expected", "")).replace(" or ", ", ").split(",")
        ]
        guess = did_you_mean(str(value), choices)
        hint = (
            f"did you mean `{guess}`? " if guess else ""
        ) + f"choose one of: {', '.join(choices)}"
        return Diagnostic(span, f"`{field}` cannot be `{_show(value)}`", hint)
    if kind in ("int_type", "int_parsing", "int_from_float", "int_parsing_size"):
        bound = _bounds(loc).get("le")
        if isinstance(value, float) and value == value and bound is not None and value > bound:
            return Diagnostic(
                span,
                f"`{field}` is {_show(value)}, which is too large: it must be at most {bound}",
                _size_hint(field),
            )
        hint = None
        if (
            isinstance(value, float)
            and value == value
            and value not in (float("inf"), float("-inf"))
            and value == int(value)
        ):
            hint = "write a whole number in digits, without a decimal point or exponent"
        return Diagnostic(span, f"`{field}` must be a whole number, got {_type_name(value)}", hint)
    if kind in ("float_type", "float_parsing", "number_type"):
        return Diagnostic(span, f"`{field}` must be a number, got {_type_name(value)}")
    if kind == "bool_type":
        return Diagnostic(span, f"`{field}` must be `true` or `false`, got {_type_name(value)}")
    if kind == "string_type":
        hint = None
        if field in ("from", "to") and isinstance(value, list) and "edges" in found:
            hint = "an edge joins one node to one node: write one edge for each pair"
        return Diagnostic(span, f"`{field}` must be a name or text, got {_type_name(value)}", hint)
    if kind == "string_pattern_mismatch":
        return Diagnostic(
            span,
            f"`{_show(value)}` is not a valid name",
            "names start with a letter or `_` and hold letters, digits, `_` and `-`",
        )
    if kind == "string_too_long":
        return Diagnostic(span, f"`{field}` is longer than {ctx.get('max_length')} characters")
    if kind == "string_too_short":
        return Diagnostic(span, f"`{field}` is empty", f"give `{field}` a value")
    if kind in ("less_than_equal", "less_than"):
        bound = ctx.get("le", ctx.get("lt"))
        word = "at most" if kind == "less_than_equal" else "less than"
        return Diagnostic(
            span,
            f"`{field}` is {_show(value)}, which is too large: it must be {word} {bound}",
            _size_hint(field),
        )
    if kind in ("greater_than_equal", "greater_than"):
        bound = ctx.get("ge", ctx.get("gt"))
        word = "at least" if kind == "greater_than_equal" else "greater than"
        return Diagnostic(span, f"`{field}` is {_show(value)}: it must be {word} {bound}")
    if kind == "finite_number":
        return Diagnostic(span, f"`{field}` must be a finite number, got `{_show(value)}`")
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return Diagnostic(
            span, f"`{field}` must be a mapping (`key: value` lines), got {_type_name(value)}"
        )
    if kind == "list_type":
        return Diagnostic(span, f"`{field}` must be a list, got {_type_name(value)}")
    if kind == "too_short":
        if ctx.get("actual_length") == 0:
            return Diagnostic(
                span, f"`{field}` is empty", f"give it at least {ctx.get('min_length', 1)} entry"
            )
        return Diagnostic(
            span,
            f"`{field}` has {ctx.get('actual_length')} entries; it needs at least {ctx.get('min_length')}",
        )
    if kind == "too_long":
        return Diagnostic(
            span, f"`{field}` has more than {ctx.get('max_length')} entries, the most a spec allows"
        )
    if kind.startswith("rational") or kind in ("sources_type", "duplicate_name"):
        return Diagnostic(span, f"`{field}`: {error['msg']}")
    return Diagnostic(span, f"`{field}`: {error['msg']}")


_SIZE_FIELDS = {
    "width",
    "heads",
    "kv_heads",
    "layers",
    "vocab",
    "context",
    "teeth",
    "steps",
    "backprop_steps",
    "classes",
}
_FIELD_HINTS = {
    "dropout": "dropout is a probability, from 0 up to (not including) 1",
    "delay": "a delay counts feedback steps; at most 64",
    "tolerance": "a relative change, between 0 and 1 (e.g. 1.0e-4)",
    "mlp_ratio": "the MLP width as a multiple of `width`, e.g. 4",
}


def _size_hint(field: str) -> str | None:
    if field in _SIZE_FIELDS:
        return "sizes this large are almost always a typo"
    return _FIELD_HINTS.get(field)


def _bounds(loc: tuple[Any, ...]) -> dict[str, Any]:
    """The numeric bounds (`le`, `ge`, ...) declared on the field at `loc`."""
    model = _model_at(loc[:-1])
    field = _find_field(model, loc[-1]) if model is not None and loc else None
    if field is None:
        return {}
    found: dict[str, Any] = {}

    def collect(annotation: Any, metadata: list[Any]) -> None:
        for item in metadata:
            for name in ("le", "ge", "lt", "gt"):
                if getattr(item, name, None) is not None:
                    found.setdefault(name, getattr(item, name))
            collect(None, list(getattr(item, "metadata", []) or []))
        if annotation is None:
            return
        if typing.get_origin(annotation) is typing.Annotated:
            inner, *extra = typing.get_args(annotation)
            collect(inner, extra)
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            for arg in typing.get_args(annotation):
                collect(arg, [])

    collect(field.annotation, list(field.metadata))
    return found


def _show(value: Any) -> str:
    if isinstance(value, bool):
        text = str(value).lower()
    elif value is None:
        text = "null"
    else:
        text = getattr(value, "text", None) or str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_name(loc: tuple[Any, ...], found: tuple[Any, ...], kind: str) -> str:
    if kind in ("missing", "extra_forbidden") and loc:
        return str(loc[-1])
    for part in reversed(found):
        if isinstance(part, str):
            return part
    return "spec"


def _where(path: tuple[Any, ...]) -> str:
    if not path:
        return "the spec"
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return f"`{text}`"


# --------------------------------------------------------------------------- walking the models


def _unwrap(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> list[Any]:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [_unwrap(a) for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that the data at `loc` was validated against (union tags included)."""
    current: Any = Spec
    for part in loc:
        component = _component_field(current)
        if component is not None:  # a registry field: the loc names the chosen kind, as a union tag
            chosen = isinstance(part, str) and part.startswith(TAG_PREFIX)
            current = component.config(part[len(TAG_PREFIX) :]) if chosen else None
            if current is None:
                return None
            continue
        members = _union_members(current)
        chosen = [m for m in members if _kind_of(m) == part]
        if chosen:  # a discriminated union: pydantic's loc names the chosen tag
            current = chosen[0]
            continue
        current = members[0]
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = _find_field(current, part)
            if field is None:
                return None
            current = field.annotation
            continue
        origin = typing.get_origin(current)
        if origin is dict:
            current = typing.get_args(current)[1]
        elif origin is list:
            current = typing.get_args(current)[0]
        else:
            return None
    members = _union_members(current)
    if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
        return members[0]
    return None


def _component_field(annotation: Any) -> ComponentField | None:
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


def _kind_of(model: Any) -> str | None:
    if isinstance(model, type) and issubclass(model, BaseModel) and "kind" in model.model_fields:
        args = typing.get_args(_unwrap(model.model_fields["kind"].annotation))
        return args[0] if args else None
    return None


def _find_field(model: type[BaseModel], name: Any) -> Any:
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _field_names(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [field.alias or name for name, field in model.model_fields.items()]


def _field_description(model: type[BaseModel] | None, name: str) -> str | None:
    field = _find_field(model, name) if model is not None else None
    return field.description if field is not None else None


def _union_tags(loc: tuple[Any, ...]) -> list[str]:
    parent = _model_at(loc[:-2]) if len(loc) >= 2 else None
    if parent is None:
        return []
    field = _find_field(parent, loc[-2])
    if field is None:
        return []
    annotation = _unwrap(field.annotation)
    if typing.get_origin(annotation) is dict:
        annotation = typing.get_args(annotation)[1]
    return [k for k in (_kind_of(m) for m in _union_members(annotation)) if k]
