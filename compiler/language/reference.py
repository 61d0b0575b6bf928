"""The spec reference (`docs/spec.md`): every field of the spec language with its type, default and
meaning, rendered as Markdown from the JSON Schema.

It is generated from `json_schema()` and nothing else, so whatever the schema holds appears here:
the spec's own models and every registered component (`epicycle schema --markdown`). Layout: the
top-level fields in declaration order, each in its own section (the model or the union of kinds it
holds rendered there), then every further definition they reach, in the order first reached. A
union discriminated by `kind` gets one subsection per kind. Output is deterministic: no dates, no
paths, the schema's own order.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter

from compiler.language.rational import PositiveRational
from compiler.language.spec import Name, json_schema

REF_PREFIX = "#/$defs/"
DISCRIMINATOR = "kind"
COMMAND = "epicycle schema --markdown -o docs/spec.md"
SCHEMA_COMMAND = "epicycle schema -o schema/epicycle.schema.json"

# the spec language's named scalar types: a schema equal to one of these (ignoring its title and
# description) is written by its name
_NAME = TypeAdapter(Name).json_schema(mode="validation")
_RATIONAL = TypeAdapter(PositiveRational).json_schema(mode="validation")


def spec_reference() -> str:
    """The Markdown reference of the spec language, from the JSON Schema as it is now."""
    return _Reference(json_schema()).render()


# --------------------------------------------------------------------------- layout


@dataclass
class _Section:
    heading: str  # Markdown text after the #'s
    level: int
    field: str | None = None  # a top-level field
    definition: str | None = None  # a `$defs` entry rendered here
    variant_of: str | None = None  # the union (a definition, or a top-level field) it is a kind of
    anchor: str = ""
    # (definition, field) pairs that hold this one
    used_by: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class _Reference:
    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self.defs: dict[str, Any] = schema.get("$defs", {})
        self.sections: list[_Section] = []
        self.placed: dict[str, _Section] = {}  # definition -> the section that renders it
        self.fields: dict[str, _Section] = {}  # top-level field -> its section
        self._plan()

    # ----------------------------------------------------------------------- planning

    def _plan(self) -> None:
        for name, prop in self.schema.get("properties", {}).items():
            section = _Section(f"`{name}`", 2, field=name)
            self.sections.append(section)
            self.fields[name] = section
            target = self._target(prop)
            if isinstance(target, str) and target in self.defs:
                if self._variants(self.defs[target]) is not None:
                    section.definition = target
                    self.placed[target] = section
                    self._place_variants(target, self.defs[target], section)
                elif target not in self.placed:
                    section.definition = target
                    self.placed[target] = section
            elif isinstance(target, dict):
                self._place_variants(None, target, section)
        # every definition reached from those, breadth first, in the order the fields name them
        done = 0
        while done < len(self.sections):
            section = self.sections[done]
            done += 1
            if section.definition is None:
                continue
            definition = self.defs[section.definition]
            for name, prop in definition.get("properties", {}).items():
                for ref in _refs(prop):
                    self._place(ref, used_by=(section.definition, name))
        self._anchor()

    def _place(self, ref: str, used_by: tuple[str, str]) -> None:
        if ref not in self.defs:
            return
        if ref not in self.placed:
            section = _Section(self._title(ref), 2, definition=ref)
            self.sections.append(section)
            self.placed[ref] = section
            if self._variants(self.defs[ref]) is not None:
                self._place_variants(ref, self.defs[ref], section)
        if used_by not in self.placed[ref].used_by:
            self.placed[ref].used_by.append(used_by)

    def _place_variants(self, union: str | None, schema: dict[str, Any], parent: _Section) -> None:
        for kind, ref in self._variants(schema) or []:
            if ref in self.placed:
                continue
            section = _Section(
                f"`{DISCRIMINATOR}: {kind}`",
                parent.level + 1,
                definition=ref,
                variant_of=union or parent.field,
            )
            self.sections.append(section)
            self.placed[ref] = section

    def _anchor(self) -> None:
        """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
        seen: dict[str, int] = {_slug(self._heading_title()): 1}
        for section in self.sections:
            slug = _slug(section.heading)
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            section.anchor = slug if count == 0 else f"{slug}-{count}"

    def _target(self, schema: dict[str, Any]) -> str | dict[str, Any] | None:
        """What a top-level field holds, through lists, mappings and null: one definition (its name),
        an inline union of kinds (its schema), or a plain value (None)."""
        schema = _non_null(schema)
        if "$ref" in schema:
            return _ref_name(schema["$ref"])
        if self._variants(schema) is not None:
            return schema
        if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
            return self._target(schema["items"])
        if schema.get("type") == "object":
            values = _mapping_values(schema)
            if values is not None:
                return self._target(values)
        return None

    def _variants(self, schema: dict[str, Any]) -> list[tuple[str, str]] | None:
        """(kind, definition) of a union discriminated by `kind`, in the schema's order; else None."""
        members = schema.get("oneOf") or schema.get("anyOf")
        if not members:
            return None
        found: list[tuple[str, str]] = []
        for member in members:
            if member.get("type") == "null":
                continue
            ref = _ref_name(member.get("$ref", ""))
            kind = self._kind(ref)
            if kind is None:
                return None
            found.append((kind, ref))
        return found or None

    def _kind(self, ref: str) -> str | None:
        prop = self.defs.get(ref, {}).get("properties", {}).get(DISCRIMINATOR, {})
        if "const" in prop:
            return str(prop["const"])
        if len(prop.get("enum", ())) == 1:
            return str(prop["enum"][0])
        return None

    def _title(self, ref: str) -> str:
        return str(self.defs[ref].get("title", ref))

    def _heading_title(self) -> str:
        return f"Reference: {self.schema.get('title', 'epicycle spec')}"

    # ----------------------------------------------------------------------- rendering

    def render(self) -> str:
        lines = [f"# {self._heading_title()}", "", *self._intro(), ""]
        lines += [*_paragraphs(self.schema.get("description")), ""]
        lines += self._table(self.schema, link_fields=True)
        for section in self.sections:
            lines += ["", f"{'#' * section.level} {section.heading}", ""]
            lines += self._section_body(section)
        return "\n".join(_tidy(lines)) + "\n"

    def _intro(self) -> list[str]:
        return [
            "Every field of a spec file, with its type, its default (or **required**) and its "
            "meaning. This page is generated from the spec's pydantic models and the component "
            f"registry by `{COMMAND}`; a test keeps it in sync, so edit the models, not this "
            "file. Its machine-readable twin is the JSON Schema "
            f"(`{SCHEMA_COMMAND}`), which editors read for completion, hover docs and live errors.",
            "",
            "Components registered from Python or through the `epicycle.components` entry points "
            "appear here too, once installed. In the types:",
            "",
            f"- *name*: a string matching `{_NAME['pattern']}`, at most {_NAME['maxLength']} "
            "characters.",
            f"- *rational*: {_RATIONAL.get('description', 'an exact ratio.')}",
        ]

    def _section_body(self, section: _Section) -> list[str]:
        lines: list[str] = []
        if section.field is not None:
            prop = self.schema["properties"][section.field]
            required = section.field in self.schema.get("required", ())
            lines += [
                f"**Type:** {self._type(prop)}  ",
                f"**Default:** {self._default(prop, required)}",
                "",
                *_paragraphs(prop.get("description")),
                "",
            ]
        elif section.variant_of is None and section.used_by:
            uses = ", ".join(
                f"`{name}` of [{self._label(owner)}](#{self.placed[owner].anchor})"
                for owner, name in section.used_by
            )
            lines += [f"Used by: {uses}.", ""]
        if section.definition is not None:
            definition = self.defs[section.definition]
            lines += [*_paragraphs(definition.get("description")), ""]
            if "properties" in definition:
                lines += self._table(definition, discriminated=section.variant_of is not None)
        return lines

    def _label(self, ref: str) -> str:
        """How a definition is named where it is used: its kind, or the top-level field it is."""
        section = self.placed[ref]
        if section.field is not None:
            return f"`{section.field}`"
        return section.heading

    def _table(
        self, model: dict[str, Any], discriminated: bool = False, link_fields: bool = False
    ) -> list[str]:
        props: dict[str, Any] = model.get("properties", {})
        names = list(props)
        if discriminated and DISCRIMINATOR in props:  # the kind first: it says which model this is
            names.remove(DISCRIMINATOR)
            names.insert(0, DISCRIMINATOR)
        required = set(model.get("required", ()))
        rows = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name in names:
            prop = props[name]
            label = f"`{name}`"
            if link_fields and name in self.fields:
                label = f"[{label}](#{self.fields[name].anchor})"
            cells = [
                label,
                self._type(prop),
                self._default(prop, name in required),
                self._meaning(prop, discriminated and name == DISCRIMINATOR),
            ]
            rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        return rows

    def _meaning(self, prop: dict[str, Any], is_kind: bool) -> str:
        text = self._description(prop)
        if text:
            return text
        if is_kind:
            return "Selects this kind."
        return ""

    def _description(self, prop: dict[str, Any]) -> str:
        """The field's description; a field without one that holds a model (or a list or mapping of
        them) takes the model's first paragraph."""
        if prop.get("description"):
            return str(prop["description"])
        target = self._target(prop)
        if isinstance(target, str):
            text = str(self.defs.get(target, {}).get("description", ""))
            return text.split("\n\n")[0]
        return ""

    # ----------------------------------------------------------------------- types and defaults

    def _type(self, schema: dict[str, Any]) -> str:
        if _same_type(schema, _RATIONAL):
            return "rational (e.g. `254/19`)"
        if _same_type(schema, _NAME):
            return "name"
        if "$ref" in schema:
            return self._link(_ref_name(schema["$ref"]))
        if "allOf" in schema and len(schema["allOf"]) == 1:
            return self._type(schema["allOf"][0])
        if "const" in schema:
            return f"`{_value(schema['const'])}`"
        if "enum" in schema:
            return "one of: " + ", ".join(f"`{_value(v)}`" for v in schema["enum"])
        variants = self._variants(schema)
        if variants is not None:
            kinds = ", ".join(f"[`{kind}`](#{self.placed[ref].anchor})" for kind, ref in variants)
            return f"one of {kinds} by `{DISCRIMINATOR}`"
        members = schema.get("anyOf") or schema.get("oneOf")
        if members:
            shown = [m for m in members if m.get("type") != "null"]
            nullable = len(shown) < len(members)
            text = " or ".join(self._type(m) for m in shown) or "null"
            if nullable and schema.get("default", ...) is not None:
                text += " or null"
            return text
        kind = schema.get("type")
        if isinstance(kind, list):
            return " or ".join(self._type({**schema, "type": k}) for k in kind)
        if kind == "integer":
            return _integer(schema)
        if kind == "number":
            return _number(schema)
        if kind == "string":
            return _string(schema)
        if kind == "boolean":
            return "boolean"
        if kind == "null":
            return "null"
        if kind == "array":
            items = schema.get("items")
            item = self._type(items) if isinstance(items, dict) else "any"
            text = f"list, each {item}" if item.startswith("one of") else f"list of {item}"
            return text + _count(schema, "minItems", "maxItems", "items")
        if kind == "object":
            values = _mapping_values(schema)
            if values is None:
                return "mapping"
            keys = "name" if _NAME["pattern"] in schema.get("patternProperties", {}) else "string"
            return f"mapping of {keys} -> {self._type(values)}" + _count(
                schema, "minProperties", "maxProperties", "entries"
            )
        return "any"

    def _link(self, ref: str) -> str:
        section = self.placed.get(ref)
        if section is None:
            return f"`{ref}`"
        label = self._title(ref) if section.variant_of is None else section.heading
        return f"[{label}](#{section.anchor})"

    def _default(self, schema: dict[str, Any], required: bool) -> str:
        if required:
            return "**required**"
        if "default" not in schema:
            return ""
        default = schema["default"]
        ref = _non_null(schema).get("$ref")
        if (
            isinstance(default, dict)
            and default
            and ref
            and default == self._defaults_of(_ref_name(ref))
        ):
            return "each field's default"
        return f"`{_value(default)}`"

    def _defaults_of(self, ref: str) -> dict[str, Any]:
        props = self.defs.get(ref, {}).get("properties", {})
        return {name: prop["default"] for name, prop in props.items() if "default" in prop}


# --------------------------------------------------------------------------- helpers


def _refs(schema: Any) -> list[str]:
    """Every definition a schema refers to, in order of appearance."""
    found: list[str] = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str):
                found.append(_ref_name(value))
            elif key not in ("default", "const", "enum", "examples"):
                found += _refs(value)
    elif isinstance(schema, list):
        for value in schema:
            found += _refs(value)
    return found


def _ref_name(ref: str) -> str:
    return ref[len(REF_PREFIX) :] if ref.startswith(REF_PREFIX) else ref


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    members = schema.get("anyOf")
    if members:
        shown = [m for m in members if m.get("type") != "null"]
        if len(shown) == 1 and len(members) == 2:
            return shown[0]
    return schema


def _mapping_values(schema: dict[str, Any]) -> dict[str, Any] | None:
    patterns = schema.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1:
        return next(iter(patterns.values()))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        return extra
    return None


def _same_type(schema: dict[str, Any], named: dict[str, Any]) -> bool:
    def strip(s: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in s.items() if k not in ("title", "description", "default")}

    return strip(schema) == strip(named)


def _integer(schema: dict[str, Any]) -> str:
    low = _first(schema, "minimum", "ge")
    if low is None and (gt := _first(schema, "exclusiveMinimum", "gt")) is not None:
        low = gt + 1
    high = _first(schema, "maximum", "le")
    if high is None and (lt := _first(schema, "exclusiveMaximum", "lt")) is not None:
        high = lt - 1
    if low is not None and high is not None:
        return f"integer {_number_text(low)}..{_number_text(high)}"
    if low is not None:
        return f"integer >= {_number_text(low)}"
    if high is not None:
        return f"integer <= {_number_text(high)}"
    return "integer"


def _number(schema: dict[str, Any]) -> str:
    bounds = []
    for keys, op in (
        (("minimum", "ge"), ">="),
        (("exclusiveMinimum", "gt"), ">"),
        (("maximum", "le"), "<="),
        (("exclusiveMaximum", "lt"), "<"),
    ):
        value = _first(schema, *keys)
        if value is not None:
            bounds.append(f"{op} {_number_text(value)}")
    return "number " + ", ".join(bounds) if bounds else "number"


def _string(schema: dict[str, Any]) -> str:
    text = "string"
    if "pattern" in schema:
        text += f" matching `{schema['pattern']}`"
    return text + _count(schema, "minLength", "maxLength", "characters")


def _count(schema: dict[str, Any], low_key: str, high_key: str, what: str) -> str:
    low, high = schema.get(low_key), schema.get(high_key)
    if (low, high) in ((1, 1), (1, None), (None, 1)):
        what = _SINGULAR.get(what, what)
    if low is not None and low == high:
        return f" (exactly {low} {what})"
    if low and high is not None:
        return f" ({low}..{high} {what})"
    if low:
        return f" (at least {low} {what})"
    if high is not None:
        return f" (at most {high} {what})"
    return ""


_SINGULAR = {"items": "item", "entries": "entry", "characters": "character"}


def _first(schema: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value = schema.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def _number_text(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


def _value(value: Any) -> str:
    """A value as written in YAML flow style: strings bare, the rest as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=False, separators=(", ", ": "))


def _paragraphs(text: Any) -> list[str]:
    return str(text).strip().splitlines() if text else []


def _cell(text: str) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _slug(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _tidy(lines: list[str]) -> list[str]:
    """No runs of blank lines, none at the ends."""
    tidy: list[str] = []
    for line in lines:
        line = line.rstrip() if not line.endswith("  ") else line
        if line == "" and (not tidy or tidy[-1] == ""):
            continue
        tidy.append(line)
    while tidy and tidy[-1] == "":
        tidy.pop()
    return tidy
