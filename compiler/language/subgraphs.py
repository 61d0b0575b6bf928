"""Sub-graphs as nodes: `kind: graph` puts a whole graph where a node would be.

A graph node's body is either inline (`inputs`, `nodes`, `edges`, `outputs`, `perspectives`,
`defaults`, as a spec has them) or another spec file (`spec: parts/gear_train.yaml`, relative to
the including file). It is flattened before validation, so everything downstream (checks,
batching of same-shaped nodes, estimates, checkpoints) sees one graph:

* its node `b1` becomes `g.b1` (graph `g`), its perspective `solar` `g.solar`, its output `out`
  the model's output `g.out`; graphs nest, so names read as paths (`top.train.b1`), and an edge of
  the including graph reaches an inner node by its path (`{from: sun, to: g.b1}`);
* its inputs are its ports: each is bound to an input of the including graph, by default the one
  of the same name (`bind: {date: when}` binds it to `when`), and must declare the same kind and
  width or vocabulary; its nodes read the bound inputs;
* its `defaults.transformer` fill its own nodes' unset settings (the including spec's then fill
  the rest); the message bus (`defaults.message`), `feedback`, `time`, `train` and `seed` are the
  whole model's, so a sub-graph that sets them is refused where it does.

Included files are read like the spec itself (a regular file, bounded), and only from the
including spec's folder tree: absolute paths, URLs, `..` out of the tree, symlinks that lead out
of it and include cycles are refused where the path is written. An error inside an included file
is located there and says from where it was included."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.source import Document, PathKey, SourceMap, read_spec_file
from compiler.language.spec import FED_BACK
from compiler.language.templates import expand_templates

MAX_DEPTH = 16  # graphs inside graphs
MAX_INCLUDES = 256  # files read for one spec
BODY = ("inputs", "nodes", "edges", "outputs", "perspectives", "defaults")
GRAPH_FIELDS = ("kind", "spec", "bind", *BODY)
WHOLE_MODEL = {
    "feedback": "the including spec's `feedback:` schedules the whole graph",
    "time": "the including spec's `time:` is the whole model's clock",
    "train": "training is set up by the including spec",
    "seed": "the including spec's seed initialises every weight",
}
NAMED_SECTIONS = ("nodes", "perspectives", "outputs", "inputs")


@dataclass(frozen=True)
class IncludeContext:
    root: Path  # the folder tree included files must stay in
    stack: tuple[Path, ...]  # the files being included, outermost first (cycles)
    via: str | None  # "included from a.yaml:4:5" for spans of an included file
    budget: list[int]  # files read so far, shared by the whole expansion
    read: dict[str, str]  # each included file (relative to root) and its text, for the record


def expand(doc: Document) -> Document:
    """The document with its templates and graph nodes expanded, at every depth."""
    _refuse_written_paths(doc)
    top = Path(doc.source.file)
    root = top.resolve().parent if top.exists() else Path.cwd().resolve()
    stack = (top.resolve(),) if top.exists() else ()
    context = IncludeContext(root, stack, None, [0], {})
    expanded = _expand(expand_templates(doc), context, depth=0)
    if not context.read:
        return expanded
    return replace(expanded, text=recorded_text(doc.text, context.read))


INCLUDED = "# ---- epicycle: the sub-graph files this spec included, as they were read ----"


def recorded_text(text: str, read: dict[str, str]) -> str:
    """The spec's text with every file it included appended as comments: what a checkpoint
    stores and hashes, so a part edited after training changes the digest instead of loading
    weights into another model. A record already there (a spec re-read from a checkpoint) is
    replaced, not appended to."""
    own = text.split("\n" + INCLUDED + "\n", 1)[0].rstrip("\n")
    parts = [INCLUDED]
    for name, body in sorted(read.items()):
        parts.append(f"# ---- {name}")
        parts.extend(f"# {line}".rstrip() for line in body.splitlines())
    return own + "\n\n" + "\n".join(parts) + "\n"


def _expand(doc: Document, context: IncludeContext, depth: int) -> Document:
    data = doc.data
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        return doc
    if not any(is_graph(body) for body in data["nodes"].values()):
        return doc
    source, errors = doc.source, []
    spans = _Spans(source)
    nodes: dict[str, Any] = {}
    sections = {
        k: dict(data[k]) for k in ("perspectives", "outputs") if isinstance(data.get(k), dict)
    }
    edges = list(data["edges"]) if isinstance(data.get("edges"), list) else None
    for key in ("perspectives", "outputs"):
        for name in sections.get(key, {}):
            spans.keep((key, name))
    if edges is not None:
        for i in range(len(edges)):
            spans.keep(("edges", i))
    for name, body in data["nodes"].items():
        if not is_graph(body):
            nodes[name] = body
            spans.keep(("nodes", name))
            continue
        try:
            inner = _body(name, body, doc, context, depth)
            _flatten(name, body, inner, data, nodes, sections, edges, spans, source)
        except SpecError as exc:
            errors.extend(exc.diagnostics)
    if errors:
        raise SpecError(errors)
    expanded = {**data, "nodes": nodes, **sections}
    if edges is not None:
        expanded["edges"] = edges
    return Document(expanded, spans.result(), doc.text)


def _refuse_written_paths(doc: Document) -> None:
    """A dot separates a graph's name from its nodes' (`g.b1`): no name may be written with one."""
    data = doc.data if isinstance(doc.data, dict) else {}
    errors = []
    for section in NAMED_SECTIONS:
        names = data.get(section)
        for name in names if isinstance(names, dict) else ():
            if isinstance(name, str) and "." in name:
                errors.append(
                    Diagnostic(
                        doc.source.span((section, name), key=True),
                        f"`{name}`: a dot separates a sub-graph's name from the names inside it",
                        "name it without a dot (`_` or `-` join words)",
                    )
                )
    if errors:
        raise SpecError(errors)


def is_graph(body: Any) -> bool:
    return isinstance(body, dict) and body.get("kind") == "graph"


class _Spans:
    """The expanded document's source map: the including file's spans for what it wrote, and
    the inner document's (marked with where it was included) under the flattened paths."""

    def __init__(self, source: SourceMap):
        self.source = source
        self.keys: dict[PathKey, Span] = {}
        self.values: dict[PathKey, Span] = {}
        for table, into in ((source.key_spans, self.keys), (source.value_spans, self.values)):
            for path, span in table.items():
                if (
                    not path
                    or path[0] not in ("nodes", "edges", "outputs", "perspectives")
                    or len(path) == 1
                ):
                    into[path] = span

    def keep(self, path: PathKey) -> None:
        self.move(self.source, path, path, None)

    def move(self, source: SourceMap, old: PathKey, new: PathKey, via: str | None) -> None:
        for table, into in ((source.key_spans, self.keys), (source.value_spans, self.values)):
            for path, span in table.items():
                if path[: len(old)] == old:
                    into[(*new, *path[len(old) :])] = _marked(span, via)

    def result(self) -> SourceMap:
        return SourceMap(self.source.file, self.keys, self.values)


def _marked(span: Span, via: str | None) -> Span:
    if via is None:
        return span
    return replace(span, via=f"{span.via}, {via}" if span.via else via)


def _body(name: str, body: dict, doc: Document, context: IncludeContext, depth: int) -> Document:
    """The graph node's own graph as a document, its templates and graphs expanded."""
    where = ("nodes", name)
    source = doc.source
    if depth >= MAX_DEPTH:
        raise _refuse(source, where, f"graphs nest deeper than {MAX_DEPTH} levels here", None)
    unknown = [k for k in body if k not in GRAPH_FIELDS and k not in WHOLE_MODEL]
    if unknown:
        raise _refuse(
            source,
            (*where, unknown[0]),
            f"a graph node has no field `{unknown[0]}`",
            "its fields: " + ", ".join(f"`{f}`" for f in GRAPH_FIELDS),
            key=True,
        )
    if "spec" in body:
        inline = [k for k in BODY if k in body]
        if inline:
            raise _refuse(
                source,
                (*where, inline[0]),
                f"graph `{name}` is read from `spec:` and also writes `{inline[0]}:` inline",
                "write its body in the file it includes, or inline, not both",
                key=True,
            )
        included = resolve_include(body["spec"], (*where, "spec"), source, context)
        via = f"included from {source.span((*where, 'spec'))}"
        if context.via:
            via = f"{via}, {context.via}"
        inner = read_spec_file(included)
        context.read[included.relative_to(context.root).as_posix()] = inner.text
        inner = Document(inner.data, marked_map(inner.source, via), inner.text)
        _refuse_written_paths(inner)
        _check_included_sections(inner)
        inner_context = IncludeContext(
            context.root, (*context.stack, included), via, context.budget, context.read
        )
        _check_whole_model_fields(inner, ())
    else:
        data = {k: body[k] for k in BODY if k in body}
        inner_source = sub_map(source, where)
        inner = Document(data, inner_source, doc.text)
        inner_context = context
        _check_whole_model_fields(Document(body, sub_map(source, where), doc.text), ())
    if not isinstance(inner.data, dict) or not isinstance(inner.data.get("nodes"), dict):
        raise _refuse(
            inner.source, (), f"graph `{name}` has no `nodes:`", "give the sub-graph its nodes"
        )
    return _expand(expand_templates(inner), inner_context, depth + 1)


def _check_included_sections(doc: Document) -> None:
    data = doc.data if isinstance(doc.data, dict) else {}
    for key, value in data.items():
        if key == "spec" and value != 1:
            raise _refuse(doc.source, ("spec",), f"`spec: {value}`: this epicycle reads 1", None)
        if key not in ("spec", "name", *BODY, *WHOLE_MODEL):
            raise _refuse(
                doc.source,
                (key,),
                f"a sub-graph's file has no section `{key}`",
                "its sections: " + ", ".join(f"`{s}`" for s in ("spec", "name", *BODY)),
                key=True,
            )


def marked_map(source: SourceMap, via: str) -> SourceMap:
    return SourceMap(
        source.file,
        {p: _marked(s, via) for p, s in source.key_spans.items()},
        {p: _marked(s, via) for p, s in source.value_spans.items()},
    )


def sub_map(source: SourceMap, where: PathKey) -> SourceMap:
    """The part of `source` below `where`, as if it were a document of its own."""
    n = len(where)
    keys = {p[n:]: s for p, s in source.key_spans.items() if p[:n] == where}
    values = {p[n:]: s for p, s in source.value_spans.items() if p[:n] == where}
    return SourceMap(source.file, keys, values)


def _check_whole_model_fields(doc: Document, where: PathKey) -> None:
    data = doc.data if isinstance(doc.data, dict) else {}
    for field, why in WHOLE_MODEL.items():
        if field in data:
            raise _refuse(
                doc.source,
                (*where, field),
                f"a sub-graph cannot set `{field}:`: {why}",
                f"remove `{field}:` from the sub-graph",
                key=True,
            )
    defaults = data.get("defaults")
    if isinstance(defaults, dict) and "message" in defaults:
        raise _refuse(
            doc.source,
            (*where, "defaults", "message"),
            "a sub-graph cannot set `defaults.message`: the message bus is the whole model's",
            "set `defaults.message` in the including spec",
            key=True,
        )


def resolve_include(path: Any, where: PathKey, source: SourceMap, context: IncludeContext) -> Path:
    """The included file, resolved and checked: relative, inside the tree, no cycle."""
    if not isinstance(path, str) or not path:
        raise _refuse(source, where, "`spec:` is the path of a spec file", None)
    hint = "include a spec file by a path relative to the including file, inside its folder tree"
    if "://" in path or path.startswith(("http:", "https:", "file:")):
        raise _refuse(
            source, where, f"`spec: {path}` is a URL; only local files are included", hint
        )
    if os.path.isabs(path) or path.startswith("~"):
        raise _refuse(source, where, f"`spec: {path}` is an absolute path", hint)
    context.budget[0] += 1
    if context.budget[0] > MAX_INCLUDES:
        raise _refuse(source, where, f"more than {MAX_INCLUDES} files are included", None)
    here = Path(source.file).resolve().parent
    written = here / path
    resolved = written.resolve()
    if not _inside(resolved, context.root):
        what = "a symlink that leads" if _inside(_lexical(written), context.root) else "a path"
        raise _refuse(
            source,
            where,
            f"`spec: {path}` is {what} out of the including spec's folder tree ({context.root})",
            hint,
        )
    if resolved in context.stack:
        chain = " -> ".join(p.name for p in (*context.stack, resolved))
        raise _refuse(source, where, f"the graphs include each other: {chain}", "break the cycle")
    if not resolved.is_file():
        missing = not resolved.exists()
        raise _refuse(
            source,
            where,
            f"`spec: {path}`: " + ("no such file" if missing else "not a regular file"),
            hint,
        )
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _lexical(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))


def _flatten(
    name: str,
    body: dict,
    inner: Document,
    outer: dict,
    nodes: dict[str, Any],
    sections: dict[str, dict],
    edges: list | None,
    spans: _Spans,
    source: SourceMap,
) -> None:
    data, inner_map = inner.data, inner.source
    where = ("nodes", name)
    bound = _bind(
        name, body, data.get("inputs") or {}, outer.get("inputs") or {}, source, inner_map
    )
    renamed = {n: f"{name}.{n}" for n in data["nodes"]}
    perspectives = {p: f"{name}.{p}" for p in (data.get("perspectives") or {})}
    defaults = (data.get("defaults") or {}).get("transformer") or {}
    single = next(iter(bound.values())) if len(bound) == 1 else None
    for inner_name, node in data["nodes"].items():
        new = renamed[inner_name]
        if new in nodes:
            raise _refuse(source, where, f"node `{new}` is written twice", None, key=True)
        nodes[new] = node_body(node, bound, single, perspectives, defaults)
        spans.move(inner_map, ("nodes", inner_name), ("nodes", new), None)
    if "perspectives" in data:
        own = sections.setdefault("perspectives", {})
        for p, value in data["perspectives"].items():
            own[perspectives[p]] = value
            spans.move(inner_map, ("perspectives", p), ("perspectives", perspectives[p]), None)
    for o, output in (data.get("outputs") or {}).items():
        own = sections.setdefault("outputs", {})
        moved = dict(output) if isinstance(output, dict) else output
        if isinstance(moved, dict) and "from" in moved:
            moved["from"] = _renamed(moved["from"], renamed)
        if isinstance(moved, dict) and isinstance(moved.get("vocab_of"), str):
            moved["vocab_of"] = bound.get(moved["vocab_of"], moved["vocab_of"])
        own[f"{name}.{o}"] = moved
        spans.move(inner_map, ("outputs", o), ("outputs", f"{name}.{o}"), None)
    if data.get("edges"):
        if edges is None:
            edges = []
            outer["edges"] = edges
        # an edge feeding one of the body's outputs back names it by its new path too
        ends = renamed | {
            f"{FED_BACK}{o}": f"{FED_BACK}{name}.{o}" for o in data.get("outputs") or {}
        }
        for i, edge in enumerate(data["edges"]):
            moved = dict(edge) if isinstance(edge, dict) else edge
            if isinstance(moved, dict):
                for end in ("from", "to"):
                    if isinstance(moved.get(end), str):
                        moved[end] = ends.get(moved[end], moved[end])
            spans.move(inner_map, ("edges", i), ("edges", len(edges)), None)
            edges.append(moved)


def _renamed(value: Any, renamed: dict[str, str]) -> Any:
    if isinstance(value, list):
        return [renamed.get(v, v) if isinstance(v, str) else v for v in value]
    return renamed.get(value, value) if isinstance(value, str) else value


def node_body(
    node: Any,
    bound: dict[str, str],
    single: str | None,
    perspectives: dict[str, str],
    defaults: dict[str, Any],
) -> Any:
    """An inner node's body in the including graph: its inputs bound, its perspective renamed,
    the sub-graph's transformer defaults under its own settings."""
    if not isinstance(node, dict):
        return node
    body = dict(node)
    if "input" in body:
        body["input"] = _renamed(body["input"], bound)
    elif single is not None and "input" in _fields(body):
        body["input"] = [single]  # it read the sub-graph's only input
    if isinstance(body.get("perspective"), str):
        body["perspective"] = perspectives.get(body["perspective"], body["perspective"])
    settings = _settings_path(body)
    if defaults and settings is not None:
        target = body
        for part in settings:
            target[part] = dict(target.get(part) or {})
            target = target[part]
        for key, value in defaults.items():
            target.setdefault(key, value)
    return body


def _fields(body: dict) -> tuple[str, ...]:
    from compiler.language.kinds import KINDS

    kind = body.get("kind")
    return tuple(KINDS.get(kind).Spec.model_fields) if kind in KINDS else ()


def _settings_path(body: dict) -> tuple[str, ...] | None:
    """Where a node's transformer settings sit in its body, by its kind's own hook."""
    import pydantic

    from compiler.language.kinds import KINDS

    if body.get("kind") not in KINDS:
        return None
    kind = KINDS.get(body["kind"])
    try:
        spec = kind.Spec.model_validate(body)
    except pydantic.ValidationError:
        return None  # reported where the node is validated
    located = kind.transformer_settings(spec)
    return None if located is None else tuple(located[1])


def _bind(
    name: str,
    body: dict,
    ports: dict[str, Any],
    inputs: dict[str, Any],
    source: SourceMap,
    inner_map: SourceMap,
) -> dict[str, str]:
    """Each port (an input of the sub-graph) to the including graph's input it reads."""
    bind = body.get("bind") or {}
    where = ("nodes", name)
    if not isinstance(bind, dict):
        raise _refuse(
            source, (*where, "bind"), "`bind` maps the sub-graph's inputs to inputs", None
        )
    for port in bind:
        if port not in ports:
            raise _refuse(
                source,
                (*where, "bind", port),
                f"graph `{name}` has no input `{port}`",
                "its inputs: " + (", ".join(f"`{p}`" for p in ports) or "none"),
                key=True,
            )
    bound = {}
    for port, declared in ports.items():
        target = bind.get(port, port)
        if target not in inputs:
            raise _refuse(
                source,
                (*where, "bind", port) if port in bind else where,
                f"input `{port}` of graph `{name}` is bound to `{target}`, which is not an input here",
                "bind it to one: `bind: {"
                + f"{port}: NAME"
                + "}`; the inputs here: "
                + ", ".join(f"`{i}`" for i in inputs),
                key=port not in bind,
            )
        outer = inputs[target]
        if isinstance(declared, dict) and isinstance(outer, dict):
            for field in ("kind", "width", "vocab", "context"):
                if field in declared and field in outer and declared[field] != outer[field]:
                    raise _refuse(
                        inner_map,
                        ("inputs", port, field),
                        f"input `{port}` of graph `{name}` has `{field}: {declared[field]}`, and "
                        f"the input `{target}` it is bound to has `{field}: {outer[field]}`",
                        "declare the port as the input it reads, or bind it to another",
                    )
        bound[port] = target
    return bound


def _refuse(
    source: SourceMap, where: PathKey, message: str, hint: str | None, *, key: bool = False
) -> SpecError:
    return SpecError([Diagnostic(source.span(where, key=key), message, hint)])
