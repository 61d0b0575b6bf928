"""A sub-graph as a spec of its own: what `epicycle compile SPEC --node PATH` builds and runs.

The whole spec flattens its sub-graphs (`compiler.language.subgraphs`); this module goes the
other way for one of them: it reads the body of the graph node at `PATH` (`outer.train_a`: the
node `train_a` inside the graph node `outer`), inline or from its `spec:` file, and writes it as a
top-level spec in which it keeps what it had where it was included:

* its inputs are the model's inputs, each declared as the input of the including spec it was
  bound to (through every level's `bind:`), so its kind, width, vocabulary and context are that
  input's; its outputs, and those of the sub-graphs inside it (`train_a.phase`), are the model's;
* its nodes' unset transformer settings come from its own `defaults.transformer`, then from those
  of each graph around it, innermost first, then from the including spec's, as the flattening
  fills them in: the graphs' are written into its nodes (and into the defaults of the graphs
  inside it) the way the flattening writes them, so a null one blocks the graphs around it just
  the same; the spec's defaults are the new spec's. `defaults.message`, `feedback`, `time` and
  `seed`, the whole model's, are the including spec's, and so is the bus width when it is given
  (the widest node of the whole model, not of the sub-graph), so its nodes' projections onto the
  bus keep their shapes;
* every `spec:` file inside it is written inline, so the spec is one self-contained text (what
  a checkpoint of the sub-graph stores and hashes); `train:` is not carried (its losses and data
  name the whole model's outputs and inputs).

A perspective its nodes share with nodes outside it (one a graph around it declares) is copied
into it: alone, its nodes keep their frame, now of their own. Edges from outside into the
sub-graph are not part of it: alone, it is driven by its inputs only.
Every value keeps the span it was written at, so a problem of the sub-graph alone (an edge that
names a node outside it) is located where that edge is written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.frontend import LoadedSpec, validate_document
from compiler.language.source import Document, PathKey, SourceMap, read_spec_file
from compiler.language.subgraphs import (
    BODY,
    IncludeContext,
    is_graph,
    marked_map,
    node_body,
    resolve_include,
    sub_map,
)
from compiler.language.templates import expand_templates

if TYPE_CHECKING:
    from compiler.language.overrides import Override

WHOLE_MODEL_SECTIONS = ("seed", "feedback", "time")  # the including spec's, carried as they are
MAX_NAME = 128  # `Spec.name`


@dataclass(frozen=True)
class Surroundings:
    """What the whole model settles for all its nodes, which the sub-graph alone would settle for
    itself: the message bus's width (the widest node) and the context (the longest input).
    `compile --node` keeps the whole model's (`analyze(file).facts`), so that every node keeps its
    shapes (projections onto the bus, learned positions, attention over the context); None lets
    the sub-graph alone settle it."""

    bus_width: int | None = None
    context: int | None = None


def load_sub_graph(
    file: str | Path,
    path: str,
    overrides: Sequence[str | Override] = (),
    *,
    around: Surroundings = Surroundings(),
) -> LoadedSpec:
    """The sub-graph at `path` of the spec `file` (with `overrides` applied to the whole spec
    first), validated as a spec of its own. The caller has checked that `path` names a
    sub-graph of the whole spec (`compile --node` does, with a did-you-mean)."""
    doc = read_spec_file(file)
    sets: tuple[str, ...] = ()
    if overrides:
        from compiler.language.overrides import apply_overrides

        doc, sets = apply_overrides(doc, overrides)
    return validate_document(sub_graph_document(doc, path, sets, around=around))


def sub_graph_document(
    doc: Document,
    path: str,
    sets: Sequence[str] = (),
    *,
    around: Surroundings = Surroundings(),
) -> Document:
    """The top-level document of the sub-graph at `path`, its spans pointing where each value
    was written; its text is that document as YAML (headed by where it came from)."""
    levels, ports, context, where = _walk(doc, path)
    body = _inlined(levels[-1], context)
    _refuse_empty(body.data, path, where.key_span)
    keys: dict[PathKey, Span] = {(): where.key_span}
    values: dict[PathKey, Span] = {(): where.span}
    data: dict[str, Any] = {}
    for section in ("spec", "name", *WHOLE_MODEL_SECTIONS, "defaults"):
        if section in doc.data:
            data[section] = doc.data[section]
            _move(doc.source, (section,), (section,), keys, values)
    data["name"] = f"{doc.data['name']}.{path}"[:MAX_NAME]
    data["defaults"] = _on_the_bus(data.get("defaults"), around.bus_width)
    data["inputs"] = {}
    inputs_at = body.source if ("inputs",) in body.source.value_spans else doc.source
    _move(inputs_at, ("inputs",), ("inputs",), keys, values, deep=False)
    for port, bound in ports.items():
        declared = doc.data["inputs"][bound]
        if around.context is not None:
            declared = {**declared, "context": around.context}
        data["inputs"][port] = declared
        _move(doc.source, ("inputs", bound), ("inputs", port), keys, values)
        _move(body.source, ("inputs", port), ("inputs", port), keys, values)  # as it was written
    body = replace(body, data={**body.data, "nodes": _filled(body.data["nodes"], levels[1:])})
    for section in ("perspectives", "nodes", "edges", "outputs"):
        if section in body.data:
            data[section] = body.data[section]
            _move(body.source, (section,), (section,), keys, values)
    _carry_perspectives(data, body.data, levels[:-1], keys, values)
    return Document(data, SourceMap(doc.source.file, keys, values), _text(data, doc, path, sets))


@dataclass(frozen=True)
class _Where:
    span: Span  # the graph node's body, in the graph that includes it
    key_span: Span  # its name there


def _walk(
    doc: Document, path: str
) -> tuple[list[Document], dict[str, str], IncludeContext, _Where]:
    """Down the path from the spec to the sub-graph: the body of each graph on the way (the
    spec's first, templates expanded), each of the sub-graph's ports with the spec's input it
    reads through every level's `bind:`, the context of includes inside it, and where it is."""
    top = Path(doc.source.file)
    root = top.resolve().parent if top.exists() else Path.cwd().resolve()
    context = IncludeContext(root, (top.resolve(),) if top.exists() else (), None, [0], {})
    here = expand_templates(doc)
    ports = {name: name for name in here.data["inputs"]}
    levels = [here]
    for name in path.split("."):
        body = here.data["nodes"][name]
        where = _Where(
            here.source.span(("nodes", name)), here.source.span(("nodes", name), key=True)
        )
        here, context = _graph_body(name, body, here, context)
        here = expand_templates(here)
        bind = body.get("bind") or {}
        ports = {p: ports[bind.get(p, p)] for p in here.data.get("inputs") or {}}
        levels.append(here)
    return levels, ports, context, where


def _on_the_bus(defaults: Any, bus_width: int | None) -> dict[str, Any]:
    """The spec's defaults, with the bus width kept where the spec leaves it to the nodes."""
    defaults = dict(defaults) if isinstance(defaults, dict) else {}
    message = defaults.get("message")
    message = dict(message) if isinstance(message, dict) else {}
    if bus_width is not None and message.get("width") is None:
        defaults["message"] = {**message, "width": bus_width}
    return defaults


def _carry_perspectives(
    data: dict, body: dict, around: list[Document], keys: dict, values: dict
) -> None:
    """The perspectives its nodes name and no graph of its declares: in the whole model they are
    frames of a graph around it (a name a graph does not declare reads the graph's around it,
    as flattening renames only its own), so alone it has a copy of each, as that graph
    declares it."""
    for name in sorted(_free_perspectives(body)):
        for level in reversed(around):  # the innermost graph around it that declares it
            declared = level.data.get("perspectives")
            if isinstance(declared, dict) and name in declared:
                data.setdefault("perspectives", {})[name] = declared[name]
                if ("perspectives",) not in values:
                    _move(
                        level.source, ("perspectives",), ("perspectives",), keys, values, deep=False
                    )
                _move(level.source, ("perspectives", name), ("perspectives", name), keys, values)
                break


def _free_perspectives(body: dict) -> set[str]:
    """The perspective names the body's nodes use, at any depth, that no graph on the way
    declares."""
    used: set[str] = set()
    nodes = body.get("nodes")
    for node in nodes.values() if isinstance(nodes, dict) else ():
        if is_graph(node):
            used |= _free_perspectives(node)
        elif isinstance(node, dict) and isinstance(node.get("perspective"), str):
            used.add(node["perspective"])
    declared = body.get("perspectives")
    return used - set(declared if isinstance(declared, dict) else ())


def _refuse_empty(body: dict, path: str, where: Span) -> None:
    """Alone, a sub-graph needs inputs to drive it and outputs to show for it; in the whole model
    edges into it may drive it, and its nodes may feed the including graph's outputs only."""
    problems = []
    if not body.get("inputs"):
        problems.append(
            Diagnostic(
                where,
                f"sub-graph `{path}` has no inputs of its own: alone, nothing would reach its nodes "
                "(in the whole model the edges into it drive them)",
                "give it an input (`inputs:` in its body, bound to one of the spec's), or compile "
                "the whole spec",
            )
        )
    if not _has_outputs(body):
        problems.append(
            Diagnostic(
                where,
                f"sub-graph `{path}` has no outputs of its own: alone, it would compute nothing "
                "(in the whole model the including graph's outputs read its nodes)",
                "give it an output (`outputs:` in its body), or compile the whole spec",
            )
        )
    if problems:
        raise SpecError(problems)


def _has_outputs(body: dict) -> bool:
    """Outputs of the body, or of a sub-graph inside it (they become the body's)."""
    nodes = body.get("nodes")
    inner = nodes.values() if isinstance(nodes, dict) else ()
    return bool(body.get("outputs")) or any(is_graph(b) and _has_outputs(b) for b in inner)


def _graph_body(
    name: str, body: dict, doc: Document, context: IncludeContext
) -> tuple[Document, IncludeContext]:
    """The graph node's body as a document (inline, or the file its `spec:` names, its spans
    marked with where it was included) and the context inside it, as the flattening reads it."""
    where = ("nodes", name)
    if "spec" not in body:
        data = {k: body[k] for k in BODY if k in body}
        return Document(data, sub_map(doc.source, where), doc.text), context
    included = resolve_include(body["spec"], (*where, "spec"), doc.source, context)
    via = f"included from {doc.source.span((*where, 'spec'))}"
    if context.via:
        via = f"{via}, {context.via}"
    read = read_spec_file(included)
    inner = Document(read.data, marked_map(read.source, via), read.text)
    return inner, replace(context, stack=(*context.stack, included), via=via)


def _inlined(doc: Document, context: IncludeContext) -> Document:
    """`doc` with every graph node's `spec:` file written inline in its body, at any depth;
    the spans of an inlined file's values stay in that file."""
    nodes = doc.data.get("nodes") if isinstance(doc.data, dict) else None
    if not isinstance(nodes, dict) or not any(is_graph(b) for b in nodes.values()):
        return doc
    keys = dict(doc.source.key_spans)
    values = dict(doc.source.value_spans)
    written = {}
    for name, body in nodes.items():
        if not is_graph(body):
            written[name] = body
            continue
        where = ("nodes", name)
        inner, inner_context = Document(body, sub_map(doc.source, where), doc.text), context
        if "spec" in body:  # the node's own fields (kind, bind, a template's), then the file's
            read, inner_context = _graph_body(name, body, doc, context)
            own = {k: v for k, v in body.items() if k != "spec"}
            inner = Document(
                {**own, **{k: read.data[k] for k in BODY if k in read.data}},
                _with(read.source, inner.source, own),
                read.text,
            )
        inner = _inlined(inner, inner_context)
        written[name] = inner.data
        for table in (keys, values):
            for p in [p for p in table if p[: len(where)] == where]:
                del table[p]
        _move(inner.source, (), where, keys, values)
    return Document(
        {**doc.data, "nodes": written}, SourceMap(doc.source.file, keys, values), doc.text
    )


def _with(file: SourceMap, node: SourceMap, own: dict) -> SourceMap:
    """The spans of an inlined body: the file's for its sections, the including node's for its
    own fields and for the body as a whole. The map's file is the included one, which the
    `spec:` paths inside it are relative to."""
    keys = {p: s for p, s in file.key_spans.items() if p and p[0] in BODY}
    values = {p: s for p, s in file.value_spans.items() if p and p[0] in BODY}
    for table, into in ((node.key_spans, keys), (node.value_spans, values)):
        for p, s in table.items():
            if not p or p[0] in own:
                into[p] = s
    return SourceMap(file.file, keys, values)


def _filled(nodes: dict[str, Any], levels: list[Document]) -> dict[str, Any]:
    """The sub-graph's nodes with the `defaults.transformer` of each graph on the path, its own
    included, written in as the flattening writes them (`node_body`: a setting the node leaves
    out is set from the innermost graph that names it, a null one too); a graph inside it gets
    them under its own defaults, which flattening it fills its nodes with first. The spec's own
    defaults stay the spec's, filled in last as ever."""
    chain: dict[str, Any] = {}
    for level in reversed(levels):  # innermost first: the first graph to name a setting sets it
        for key, value in _transformer_defaults(level.data).items():
            chain.setdefault(key, value)
    if not chain:
        return nodes
    filled = {}
    for name, body in nodes.items():
        if is_graph(body):
            own = body.get("defaults") if isinstance(body.get("defaults"), dict) else {}
            settings = {**chain, **_transformer_defaults(body)}
            filled[name] = {**body, "defaults": {**own, "transformer": settings}}
        else:
            filled[name] = node_body(body, {}, None, {}, chain)
    return filled


def _transformer_defaults(body: Any) -> dict[str, Any]:
    own = body.get("defaults") if isinstance(body, dict) else None
    settings = own.get("transformer") if isinstance(own, dict) else None
    return settings if isinstance(settings, dict) else {}


def _move(
    source: SourceMap, old: PathKey, new: PathKey, keys: dict, values: dict, *, deep: bool = True
) -> None:
    """The spans of `old` and (`deep`) everything below it, under `new`."""
    for table, into in ((source.key_spans, keys), (source.value_spans, values)):
        for p, span in table.items():
            if p == old or (deep and p[: len(old)] == old):
                into[(*new, *p[len(old) :])] = span


def _text(data: dict, doc: Document, path: str, sets: Sequence[str]) -> str:
    """The sub-graph's spec as YAML that reads back as `data` (the text its checkpoint stores),
    headed by where it came from."""
    from compiler.language.overrides import spec_yaml

    body = spec_yaml(data)
    given = "".join(f" --set {s!r}" for s in sets)
    header = (
        f"# sub-graph `{path}` of {doc.source.file}{given}, compiled alone: its spec files "
        "inline, `train:` not carried (written by epicycle; comments not kept)"
    )
    return header.replace("\n", " ") + "\n" + body
