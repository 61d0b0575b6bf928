"""Repeat templates: N copies of a node, and edges between copies by a named pattern or by index.

A template is written, never evaluated. The grammar is fixed and small:

* a node whose key holds the placeholder `{i}` and whose body has `repeat: N` stands for N copies
  named by putting 0 .. N-1 in place of `{i}` (`r{i}` with `repeat: 6` is `r0` ... `r5`); the rest
  of the body is each copy's body;
* an edge with `pattern: chain | ring | all_to_all | star` and `over: r{i}` stands for the edges
  of that pattern between the copies of `r{i}` (its other fields are each edge's fields); a star
  runs from `center` (default: copy 0) to every other copy (`direction: out`, the default), from
  them to it (`in`), or both ways (`both`);
* an edge whose `from` or `to` holds `{i}`, `{i+K}` or `{i-K}` (K a whole number) stands for one
  edge per copy `i` of the first template it names; an index outside a template's copies gives no
  edge for that `i`, unless the edge says `wrap: true`, which counts modulo the copies;
* an output's `from` may name a template: its copies, in order.

Expansion works on the positioned document before validation, so each copy is validated like a
node written by hand, and every error in a copy is located at the template that wrote it. The
document's text (what the checkpoint stores and hashes) stays what the user wrote."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from compiler.language.diagnostics import Diagnostic, SpecError
from compiler.language.source import Document, PathKey, SourceMap

MAX_COPIES = 4096  # per template; the resource guard then applies to the expanded graph
MAX_TEMPLATE_EDGES = 1_000_000
PATTERNS = ("chain", "ring", "all_to_all", "star")
DIRECTIONS = ("out", "in", "both")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_INDEX = re.compile(r"^i(?:([+-])(\d{1,6}))?$")
_GRAMMAR = "write `{i}`, `{i+K}` or `{i-K}` with K a whole number"
_PATTERN_KEYS = ("pattern", "over", "center", "direction")


@dataclass(frozen=True)
class Template:
    """A repeated node: its key as written (`r{i}`) and its number of copies."""

    key: str
    count: int

    def copy(self, index: int) -> str:
        return self.key.replace("{i}", str(index))

    @property
    def copies(self) -> list[str]:
        return [self.copy(i) for i in range(self.count)]


@dataclass(frozen=True)
class _Reference:
    """A name in an edge's `from`/`to`: a template's copy at `i + offset`, or a plain name."""

    template: Template | None
    offset: int = 0
    plain: str = ""
    suffix: str = ""  # a path into the copy, when it is a sub-graph: `.follower` of `g{i}.follower`

    def at(self, i: int, wrap: bool) -> str | None:
        if self.template is None:
            return self.plain
        index = i + self.offset
        if wrap:
            index %= self.template.count
        elif not 0 <= index < self.template.count:
            return None
        return self.template.copy(index) + self.suffix


def expand_templates(doc: Document) -> Document:
    """The document with every template replaced by what it stands for, and a source map in
    which each copy's paths point at the template that wrote it. Unchanged if it has none."""
    data = doc.data
    if not isinstance(data, dict) or not _has_templates(data):
        return doc
    source = doc.source
    spans = _SpanCopier(source)
    errors: list[Diagnostic] = []
    templates: dict[str, Template] = {}
    nodes = data.get("nodes")
    if isinstance(nodes, dict):
        new_nodes, templates = _expand_nodes(nodes, source, spans, errors)
    else:
        new_nodes = nodes
    edges = data.get("edges")
    if isinstance(edges, list):
        new_edges = _expand_edges(edges, templates, source, spans, errors)
    else:
        new_edges = edges
    outputs = data.get("outputs")
    new_outputs = _expand_outputs(outputs, templates) if isinstance(outputs, dict) else outputs
    if errors:
        raise SpecError(errors)
    expanded = dict(data)
    for section, value in (("nodes", new_nodes), ("edges", new_edges), ("outputs", new_outputs)):
        if section in data:
            expanded[section] = value
    return Document(expanded, spans.result(), doc.text)


def _has_templates(data: dict[str, Any]) -> bool:
    nodes, edges = data.get("nodes"), data.get("edges")
    if isinstance(nodes, dict) and any(
        "{" in str(k) or (isinstance(v, dict) and "repeat" in v) for k, v in nodes.items()
    ):
        return True
    return isinstance(edges, list) and any(
        isinstance(e, dict)
        and ("pattern" in e or any("{" in str(e.get(f, "")) for f in ("from", "to")))
        for e in edges
    )


class _SpanCopier:
    """Builds the expanded document's source map: paths outside the rewritten sections keep
    their spans; a copy's paths take the spans of the template path it came from."""

    def __init__(self, source: SourceMap):
        self.source = source
        self.keys: dict[PathKey, Any] = {}
        self.values: dict[PathKey, Any] = {}
        rewritten = ("nodes", "edges")
        for table, into in ((source.key_spans, self.keys), (source.value_spans, self.values)):
            for path, span in table.items():
                if len(path) < 2 or path[0] not in rewritten:
                    into[path] = span

    def copy(self, old: PathKey, new: PathKey) -> None:
        for table, into in (
            (self.source.key_spans, self.keys),
            (self.source.value_spans, self.values),
        ):
            for path, span in table.items():
                if path[: len(old)] == old:
                    into[(*new, *path[len(old) :])] = span

    def result(self) -> SourceMap:
        return SourceMap(self.source.file, self.keys, self.values)


def _expand_nodes(
    nodes: dict[str, Any], source: SourceMap, spans: _SpanCopier, errors: list[Diagnostic]
) -> tuple[dict[str, Any], dict[str, Template]]:
    templates: dict[str, Template] = {}
    expanded: dict[str, Any] = {}
    written = {k for k in nodes if "{" not in str(k)}
    for key, body in nodes.items():
        where = ("nodes", key)
        has_placeholder = "{" in str(key)
        repeat = body.get("repeat") if isinstance(body, dict) else None
        if not has_placeholder and (not isinstance(body, dict) or "repeat" not in body):
            expanded[key] = body
            spans.copy(where, where)
            continue
        if not has_placeholder:
            errors.append(
                _error(
                    source.span((*where,), key=True),
                    f"node `{key}` has `repeat:` but its name has no `{{i}}` for the copies' index",
                    f"name the copies, e.g. `{key}{{i}}:` (copies `{key}0`, `{key}1`, ...)",
                )
            )
            continue
        if _PLACEHOLDER.sub("", key).count("{") or [m for m in _PLACEHOLDER.findall(key)] != ["i"]:
            errors.append(
                _error(
                    source.span(where, key=True),
                    f"a repeated node's name holds `{{i}}` exactly once; `{key}` does not",
                    "write the name as a stem and `{i}`, e.g. `r{i}` or `planet_{i}`",
                )
            )
            continue
        if not isinstance(body, dict) or "repeat" not in body:
            errors.append(
                _error(
                    source.span(where, key=True),
                    f"node `{key}` names copies with `{{i}}` but says not how many",
                    "add `repeat: N` to its body (N copies, indices 0 .. N-1)",
                )
            )
            continue
        if type(repeat) is not int or not 1 <= repeat <= MAX_COPIES:
            errors.append(
                _error(
                    source.span((*where, "repeat")),
                    f"`repeat: {repeat!r}` must be a whole number from 1 to {MAX_COPIES}",
                    "the number of copies of this node",
                )
            )
            continue
        template = Template(key, repeat)
        templates[key] = template
        copy_body = {k: v for k, v in body.items() if k != "repeat"}
        for name in template.copies:
            if name in written or name in expanded:
                errors.append(
                    _error(
                        source.span(where, key=True),
                        f"copy `{name}` of template `{key}` has the name of another node",
                        "rename the template's stem or the other node",
                    )
                )
                break
            expanded[name] = copy_body
            spans.copy(where, ("nodes", name))
    return expanded, templates


def _expand_edges(
    edges: list[Any],
    templates: dict[str, Template],
    source: SourceMap,
    spans: _SpanCopier,
    errors: list[Diagnostic],
) -> list[Any]:
    expanded: list[Any] = []
    for index, edge in enumerate(edges):
        where: PathKey = ("edges", index)
        if not isinstance(edge, dict):
            spans.copy(where, ("edges", len(expanded)))
            expanded.append(edge)
            continue
        try:
            produced = _edge_instances(edge, where, templates, source)
        except SpecError as exc:
            errors.extend(exc.diagnostics)
            continue
        if len(expanded) + len(produced) > MAX_TEMPLATE_EDGES:
            errors.append(
                _error(
                    source.span(where),
                    f"the edges' templates stand for more than {MAX_TEMPLATE_EDGES:,} edges",
                    "use fewer copies or a sparser pattern than `all_to_all`",
                )
            )
            return expanded
        for instance in produced:
            spans.copy(where, ("edges", len(expanded)))
            expanded.append(instance)
    return expanded


def _edge_instances(
    edge: dict[str, Any], where: PathKey, templates: dict[str, Template], source: SourceMap
) -> list[dict[str, Any]]:
    if "pattern" in edge:
        return _pattern_edges(edge, where, templates, source)
    stray = [k for k in ("over", "center", "direction") if k in edge]
    if stray:
        raise SpecError(
            [
                _error(
                    source.span((*where, stray[0]), key=True),
                    f"`{stray[0]}` belongs to an edge pattern, and this edge has no `pattern:`",
                    f"add `pattern: {' | '.join(PATTERNS)}`, or remove `{stray[0]}`",
                )
            ]
        )
    refs = {f: _reference(edge.get(f), (*where, f), templates, source) for f in ("from", "to")}
    wrap = edge.get("wrap", False)
    if "wrap" in edge and type(wrap) is not bool:
        raise SpecError([_error(source.span((*where, "wrap")), "`wrap` is true or false", None)])
    counted = [r.template for r in refs.values() if r.template is not None]
    if not counted:
        if "wrap" in edge:
            raise SpecError(
                [
                    _error(
                        source.span((*where, "wrap"), key=True),
                        "`wrap` applies to an edge between copies, and this one names no template",
                        "remove `wrap`",
                    )
                ]
            )
        return [edge]
    body = {k: v for k, v in edge.items() if k != "wrap"}
    instances = []
    for i in range(counted[0].count):
        ends = {f: ref.at(i, wrap) for f, ref in refs.items()}
        if None not in ends.values():
            instances.append({**body, "from": ends["from"], "to": ends["to"]})
    return instances


def _reference(
    name: Any, where: PathKey, templates: dict[str, Template], source: SourceMap
) -> _Reference:
    if not isinstance(name, str) or "{" not in name:
        return _Reference(None, plain=name)
    placeholders = _PLACEHOLDER.findall(name)
    match = _INDEX.match(placeholders[0]) if len(placeholders) == 1 else None
    if match is None or _PLACEHOLDER.sub("", name).count("{") or "}" in _PLACEHOLDER.sub("", name):
        raise SpecError(
            [
                _error(
                    source.span(where),
                    f"`{name}` is not a copy's name: an index is written as `{{i}}` once",
                    _GRAMMAR,
                )
            ]
        )
    sign, digits = match.groups()
    offset = int(digits or 0) * (-1 if sign == "-" else 1)
    written = _PLACEHOLDER.sub("{i}", name)
    # `g{i}.follower`: copy i of the repeated sub-graph `g{i}`, then its node `follower`
    cut = written.find(".", written.index("{i}"))
    key, suffix = (written, "") if cut < 0 else (written[:cut], written[cut:])
    template = templates.get(key)
    if template is None:
        raise SpecError(
            [
                _error(
                    source.span(where),
                    f"no repeated node is named `{key}`",
                    _template_hint(templates),
                )
            ]
        )
    return _Reference(template, offset, suffix=suffix)


def _pattern_edges(
    edge: dict[str, Any], where: PathKey, templates: dict[str, Template], source: SourceMap
) -> list[dict[str, Any]]:
    pattern = edge["pattern"]
    if pattern not in PATTERNS:
        raise SpecError(
            [
                _error(
                    source.span((*where, "pattern")),
                    f"unknown edge pattern {pattern!r}",
                    f"use one of {', '.join(PATTERNS)}",
                )
            ]
        )
    for field in ("from", "to", "wrap"):
        if field in edge:
            raise SpecError(
                [
                    _error(
                        source.span((*where, field), key=True),
                        f"a `pattern: {pattern}` edge draws its own ends; it takes no `{field}`",
                        "name the copies with `over: NAME{i}`"
                        + (" and the hub with `center`" if pattern == "star" else ""),
                    )
                ]
            )
    over = edge.get("over")
    template = templates.get(over) if isinstance(over, str) else None
    if template is None:
        raise SpecError(
            [
                _error(
                    source.span((*where, "over") if "over" in edge else where),
                    f"`over: {over}` names no repeated node"
                    if "over" in edge
                    else f"a `pattern: {pattern}` edge needs `over:`, the repeated node it wires",
                    _template_hint(templates),
                )
            ]
        )
    if pattern != "star":
        for field in ("center", "direction"):
            if field in edge:
                raise SpecError(
                    [
                        _error(
                            source.span((*where, field), key=True),
                            f"`{field}` belongs to `pattern: star`",
                            f"remove `{field}`",
                        )
                    ]
                )
    copies = template.copies
    body = {k: v for k, v in edge.items() if k not in _PATTERN_KEYS}
    if pattern == "chain":
        pairs = list(itertools.pairwise(copies))
    elif pattern == "ring":
        pairs = list(itertools.pairwise(copies)) + (
            [(copies[-1], copies[0])] if len(copies) > 1 else []
        )
    elif pattern == "all_to_all":
        pairs = [(a, b) for a in copies for b in copies if a != b]
    else:
        center = edge.get("center", copies[0])
        direction = edge.get("direction", "out")
        if direction not in DIRECTIONS:
            raise SpecError(
                [
                    _error(
                        source.span((*where, "direction")),
                        f"unknown star direction {direction!r}",
                        f"use one of {', '.join(DIRECTIONS)}",
                    )
                ]
            )
        if not isinstance(center, str):
            raise SpecError(
                [_error(source.span((*where, "center")), "`center` is a node's name", None)]
            )
        leaves = [c for c in copies if c != center]
        pairs = []
        for leaf in leaves:
            if direction in ("out", "both"):
                pairs.append((center, leaf))
            if direction in ("in", "both"):
                pairs.append((leaf, center))
    return [{**body, "from": a, "to": b} for a, b in pairs]


def _expand_outputs(outputs: dict[str, Any], templates: dict[str, Template]) -> dict[str, Any]:
    """An output's `from` naming a template reads all its copies, in order."""
    expanded = {}
    for name, output in outputs.items():
        if isinstance(output, dict) and "from" in output:
            sources = output["from"]
            listed = sources if isinstance(sources, list) else [sources]
            if any(isinstance(s, str) and s in templates for s in listed):
                flat = []
                for s in listed:
                    flat.extend(
                        templates[s].copies if isinstance(s, str) and s in templates else [s]
                    )
                output = {**output, "from": flat}
        expanded[name] = output
    return expanded


def _template_hint(templates: dict[str, Template]) -> str:
    if templates:
        return "repeated nodes here: " + ", ".join(f"`{k}`" for k in templates)
    return "declare one under `nodes:` with a `{i}` in its name and `repeat: N`"


def _error(span: Any, message: str, hint: str | None) -> Diagnostic:
    return Diagnostic(span, message, hint)
