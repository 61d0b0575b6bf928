"""`--set path.to.field=value`: one field of a spec set for one run, before validation.

An override names a place in the spec's document by its keys and list indices, separated by dots
(`nodes.sun.width`, `edges.3.delay`, `defaults.transformer.attention.window`), and a value written
as YAML, read by the same safe rules as the file (`compiler.language.source`: YAML 1.2 scalars, no
tags, no alias bombs, no duplicate keys): `64`, `0.1`, `rope`, `[2, 4]`, `{kind: sdpa}`, `null`.
The effective document is then validated exactly like the file, so a wrong value gets the
message the same value in the file would get, located on the command line instead: the `N`th
override's text at column `COL` is `--set:N:COL` (`--set:1:17: error: ...`). Errors in what the
overrides did not touch stay located in the file.

* The last key may be new: `nodes.sun.layers=4` adds `layers` to a node that did not set it, and
  `nodes.moon={kind: transformer, width: 32}` adds a node. A misspelt last key (`widht`) is then
  an unknown key of the spec, with its "did you mean".
* A key on the way that the document does not have is created as a mapping only where the spec
  language has a section of that name (`defaults.transformer.dropout=0.1` without a `defaults:`,
  `feedback.steps=4`); any other missing key on the way (`nodes.suun.width`) is an error naming
  the keys there, with a "did you mean".
* A list entry is addressed by its index, which must exist (`edges.0` .. `edges.N-1`).
* Overrides apply in order; a later one wins.

An override without `=` or with an empty path is a usage error (`OverrideSyntaxError`).

`LoadedSpec.text` of a spec loaded with overrides is the effective document written as YAML (the
file's comments are not kept), so a checkpoint stores the spec that was trained;
`LoadedSpec.overrides` lists the overrides as given.
"""

from __future__ import annotations

import copy
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from compiler.language.diagnostics import Diagnostic, Span, SpecError, did_you_mean
from compiler.language.source import (
    _BOOL,
    _FLOAT,
    _INF,
    _INT,
    _INT_HEX,
    _INT_OCT,
    _NAN,
    _NULL,
    MAX_FILE_BYTES,
    Document,
    PathKey,
    SourceMap,
    SpecFloat,
    _ComposeLoader,
    _DataBuilder,
    _prescan,
    _python_parser_error,
    _yaml_error,
)

COMMAND_LINE = "--set"  # the file part of a span on the command line: `--set:N:COL`
_VALUE = "<value>"  # spans within the value's own text, before they are moved onto the override
_INDEX = re.compile(r"^[0-9]+$")


class OverrideSyntaxError(ValueError):
    """An override that is not `PATH=VALUE` (a usage error: the command exits 2)."""


@dataclass(frozen=True)
class Override:
    """One `--set`: its text as given, the path's segments and where each starts (0-based), the
    value's text and where it starts, and its place among the overrides (1-based)."""

    text: str
    segments: tuple[str, ...]
    starts: tuple[int, ...]
    value: str
    value_start: int
    ordinal: int

    def span(self, offset: int) -> Span:
        return Span(COMMAND_LINE, self.ordinal, offset + 1)

    def segment_span(self, i: int) -> Span:
        return self.span(self.starts[i])

    def where(self, count: int) -> str:
        """The first `count` segments as a dotted path, for messages."""
        return ".".join(self.segments[:count])


def parse_override(text: str, ordinal: int = 1) -> Override:
    """`a.b.c=value` as an `Override`, or `OverrideSyntaxError` saying what is wrong with it."""
    path, eq, value = text.partition("=")
    if not eq:
        raise OverrideSyntaxError(
            f"--set {text!r}: expected PATH=VALUE (a dotted path, `=`, then a value), "
            "e.g. --set nodes.sun.width=64"
        )
    if not path:
        raise OverrideSyntaxError(
            f"--set {text!r}: the path before `=` is empty; name the field to set, "
            "e.g. --set nodes.sun.width=64"
        )
    segments = path.split(".")
    if "" in segments:
        raise OverrideSyntaxError(
            f"--set {text!r}: the path {path!r} has an empty part; separate keys with single dots"
        )
    starts, at = [], 0
    for segment in segments:
        starts.append(at)
        at += len(segment) + 1
    return Override(text, tuple(segments), tuple(starts), value, len(path) + 1, ordinal)


def parse_overrides(texts: Sequence[str | Override]) -> list[Override]:
    return [t if isinstance(t, Override) else parse_override(t, i) for i, t in enumerate(texts, 1)]


def apply_overrides(
    doc: Document, overrides: Sequence[str | Override]
) -> tuple[Document, tuple[str, ...]]:
    """The effective document (data, spans, text) and the overrides' texts, or `SpecError`
    located on the command line for a value that is not YAML or a path that names nothing."""
    parsed = parse_overrides(overrides)
    data = copy.deepcopy(doc.data)
    source = SourceMap(doc.source.file, dict(doc.source.key_spans), dict(doc.source.value_spans))
    problems = []
    for override in parsed:  # every override's own mistakes at once
        try:
            value, spans = _parse_value(override)
            data = _set(data, source, override, value, spans)
        except SpecError as exc:
            problems += exc.diagnostics
    if problems:
        raise SpecError(problems)
    texts = tuple(o.text for o in parsed)
    return Document(
        data=data, source=source, text=effective_text(data, doc.source.file, texts)
    ), texts


# --------------------------------------------------------------------------- the value


class _ValueBuilder(_DataBuilder):
    """The file's data builder, with positions on the command line."""

    def __init__(self, override: Override):
        super().__init__(COMMAND_LINE)
        self.override = override

    def span(self, node: yaml.Node) -> Span:
        return self.override.span(self.override.value_start + node.start_mark.index)


def _parse_value(override: Override) -> tuple[Any, SourceMap]:
    text = override.value
    if len(text) > MAX_FILE_BYTES:
        raise SpecError([Diagnostic(override.span(override.value_start), "the value is too long")])
    try:
        if not text.strip():
            return None, SourceMap(COMMAND_LINE, {}, {(): override.span(override.value_start)})
        _prescan(text, _VALUE)
        try:
            root = yaml.compose(text, Loader=_ComposeLoader)
        except yaml.YAMLError as exc:
            raise SpecError([_yaml_error(_python_parser_error(text) or exc, _VALUE)]) from None
        builder = _ValueBuilder(override)
        return builder.build(root, (), depth=0), builder.source
    except SpecError as exc:
        raise SpecError([_on_command_line(d, override) for d in exc.diagnostics]) from None


def _on_command_line(diagnostic: Diagnostic, override: Override) -> Diagnostic:
    """A diagnostic about the value's text (line and column within it) moved onto the override."""
    span = diagnostic.span
    if span.file != _VALUE:
        return diagnostic
    lines = override.value.split("\n")
    offset = sum(len(line) + 1 for line in lines[: span.line - 1]) + span.col - 1
    return Diagnostic(
        override.span(override.value_start + offset),
        diagnostic.message,
        diagnostic.hint,
        diagnostic.severity,
    )


# --------------------------------------------------------------------------- the path


def _set(data: Any, source: SourceMap, override: Override, value: Any, spans: SourceMap) -> Any:
    segments = override.segments
    if not isinstance(data, dict):
        raise SpecError(
            [
                Diagnostic(
                    override.segment_span(0), "the spec is not a mapping: there is nothing to set"
                )
            ]
        )
    container, path = data, ()
    for i in range(len(segments) - 1):
        key = _key(container, override, i)
        if isinstance(container, dict) and key not in container:
            if not _is_section(path, key, data):
                raise SpecError([_no_key(container, path, override, i, data)])
            container[key] = {}
            source.key_spans[(*path, key)] = source.value_spans[(*path, key)] = (
                override.segment_span(i)
            )
        container, path = container[key], (*path, key)
        if not isinstance(container, (dict, list)):
            raise SpecError(
                [
                    Diagnostic(
                        override.segment_span(i + 1),
                        f"`{override.where(i + 1)}` is `{_shown(container)}`, not a mapping or a "
                        f"list: `{override.where(i + 2)}` names nothing",
                        f"set `{override.where(i + 1)}` itself",
                    )
                ]
            )
    last = _key(container, override, len(segments) - 1)
    target = (*path, last)
    for spans_of in (source.key_spans, source.value_spans):
        for existing in [p for p in spans_of if p[: len(target)] == target]:
            if not (spans_of is source.key_spans and existing == target):
                del spans_of[existing]  # the key, where the file wrote it, stays located there
    source.key_spans.setdefault(target, override.segment_span(len(segments) - 1))
    for relative, span in spans.key_spans.items():
        source.key_spans[(*target, *relative)] = span
    for relative, span in spans.value_spans.items():
        source.value_spans[(*target, *relative)] = span
    container[last] = value
    return data


def _key(container: dict | list, override: Override, i: int) -> str | int:
    segment = override.segments[i]
    if isinstance(container, dict):
        return segment
    if _INDEX.match(segment) and int(segment) < len(container):
        return int(segment)
    where = override.where(i)
    raise SpecError(
        [
            Diagnostic(
                override.segment_span(i),
                f"`{where}` is a list of {len(container)} entries; `{segment}` is not one of its "
                "indices",
                f"address an entry by its index, from 0 to {len(container) - 1}"
                if container
                else f"`{where}` is empty: set the whole list, e.g. --set '{where}=[...]'",
            )
        ]
    )


def _no_key(container: dict, path: PathKey, override: Override, i: int, data: Any) -> Diagnostic:
    segment = override.segments[i]
    fields = _fields_at(path, data) or []
    if segment in fields:  # a list the document does not have
        return Diagnostic(
            override.segment_span(i),
            f"the spec has no `{override.where(i + 1)}` list to address an entry of",
            f"set the whole list, e.g. --set '{override.where(i + 1)}=[...]'",
        )
    known = [*map(str, container), *(f for f in fields if f not in container)]
    guess = did_you_mean(segment, known)
    where = f"`{override.where(i)}`" if i else "the spec"
    hint = (
        f"did you mean `{guess}`?"
        if guess
        else (f"keys there: {', '.join(known)}" if known else None)
    )
    return Diagnostic(override.segment_span(i), f"{where} has no `{segment}`", hint)


def _shown(value: Any) -> str:
    text = getattr(value, "text", None) or str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_section(path: PathKey, key: str, data: Any) -> bool:
    """Whether the spec language has a mapping named `key` at `path` (`defaults`, `feedback`,
    `defaults.transformer`): only those are created when missing."""
    from compiler.language.models import component_field as _component_field
    from compiler.language.models import union_members as _union_members

    annotation = _field_annotation(path, key, data)
    if annotation is None:
        return False
    if _component_field(annotation) is not None:
        return True
    return any(
        (isinstance(m, type) and issubclass(m, BaseModel)) or typing.get_origin(m) is dict
        for m in _union_members(annotation)
    )


def _field_annotation(path: PathKey, key: str, data: Any) -> Any:
    """The declared type of field `key` of the mapping at `path`, if the spec language has it."""
    from compiler.language.models import find_field as _find_field

    model = _model_at(path, data)
    field = _find_field(model, key) if model is not None else None
    return field.annotation if field is not None else None


def _fields_at(path: PathKey, data: Any) -> list[str] | None:
    """The keys the spec language allows in the mapping at `path` of `data`, or None where the
    keys are the user's names (`nodes`) or the place is not a mapping of known fields."""
    from compiler.language.models import field_names as _field_names

    model = _model_at(path, data)
    return _field_names(model) if model is not None else None


def _model_at(path: PathKey, data: Any) -> type[BaseModel] | None:
    """The model the mapping at `path` of `data` is validated against, chosen by the `kind`s the
    data names on the way."""
    from compiler.language.models import find_field as _find_field
    from compiler.language.models import unwrap as _unwrap
    from compiler.language.spec import Spec

    annotation: Any = Spec
    value = data
    for part in path:
        model = _concrete(annotation, value)
        if model is not None:
            field = _find_field(model, part)
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(_unwrap(annotation)) in (dict, list):
            annotation = typing.get_args(_unwrap(annotation))[-1]
        else:
            return None
        value = value[part] if isinstance(value, (dict, list)) else None
    return _concrete(annotation, value)


def _concrete(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The model the data `value` is validated against at a place typed `annotation`: a plain
    model, the member of a union its `kind` chooses, or the registered component or node kind."""
    from compiler.language.models import component_field as _component_field
    from compiler.language.models import kind_of as _kind_of
    from compiler.language.models import union_members as _union_members

    kind = value.get("kind") if isinstance(value, dict) else None
    component = _component_field(annotation)
    if component is not None:
        return component.config(kind) if isinstance(kind, str) else None
    models = [
        m for m in _union_members(annotation) if isinstance(m, type) and issubclass(m, BaseModel)
    ]
    if len(models) == 1:
        return models[0]
    chosen = [m for m in models if _kind_of(m) == kind]
    return chosen[0] if chosen else None


# --------------------------------------------------------------------------- the effective text


class _EffectiveDumper(yaml.SafeDumper):
    """Writes data as the spec's loader reads it: strings that would read back as numbers,
    booleans or null (by YAML 1.2 rules, `1e30` too) are quoted; numbers keep their digits."""

    yaml_implicit_resolvers: typing.ClassVar[dict] = {}


for _tag, _patterns in {
    "bool": [re.compile("^(?:" + "|".join(_BOOL) + ")$")],
    "int": [_INT, _INT_OCT, _INT_HEX],
    "float": [_FLOAT, _INF, _NAN],
    "null": [_NULL],
}.items():
    for _pattern in _patterns:
        _EffectiveDumper.add_implicit_resolver(
            f"tag:yaml.org,2002:{_tag}", _pattern, list("-+0123456789.~tTfFnN") + [""]
        )


def _represent_spec_float(dumper: yaml.SafeDumper, value: SpecFloat) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:float", value.text)


_EffectiveDumper.add_representer(SpecFloat, _represent_spec_float)


def spec_yaml(data: Any) -> str:
    """`data` as YAML that the spec's loader reads back as `data` (a checkpoint's spec text)."""
    return yaml.dump(data, Dumper=_EffectiveDumper, sort_keys=False, allow_unicode=True, width=100)


def effective_text(data: Any, file: str, overrides: Sequence[str]) -> str:
    """The document as YAML that reads back as `data`, headed by where it came from."""
    body = spec_yaml(data)
    sets = " ".join(f"--set {o!r}" for o in overrides)
    header = f"# the effective spec: {file} with {sets} (written by epicycle; comments not kept)\n"
    return header.replace("\n", " ").rstrip() + "\n" + body
