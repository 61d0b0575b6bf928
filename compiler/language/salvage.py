"""What validated of a document that did not: the sound part that the graph passes still check.

A compiler reports every independent mistake in one run. Pydantic already reports every field
error of the document; but a document with one wrong field used to stop there, so an undelayed
loop elsewhere, or heads that do not divide a width, waited for the next run. Here the parts that
failed validation are *withheld*: a broken node, edge, input or output is left out, a broken
`defaults` field is left unset, a missing section is empty, and what remains is a valid `Spec`
for the passes.

Withholding a part must not make its neighbours look wrong (one mistake, one message), so what
depended on a withheld part is withheld with it:

* a node that inherits a withheld `defaults.transformer` field, or that takes its width from a
  withheld input;
* an output that reads a withheld node, and an `lm_head` whose vocabulary input may be withheld;
* a key misspelt (`widht`, `edgse`) withholds the field it was meant to be (`width`, `edges`).

The passes consult `Withheld` only where a claim of absence could be an echo: a name that does
not resolve (it may name a withheld node), "no edge has a delay", reachability, and the kinds'
whole-graph rules. A part that is not withheld is checked exactly as in a valid spec.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from compiler.language.diagnostics import did_you_mean
from compiler.language.source import SourceMap
from compiler.language.spec import Name, Spec, TransformerSettings

NAMED_SECTIONS = ("inputs", "perspectives", "nodes", "outputs")
PathKey = tuple[Any, ...]


@dataclass(frozen=True)
class Withheld:
    """The data paths of what failed validation (`("nodes", "sun")`, `("edges", 3)`,
    `("inputs",)`, `("defaults", "transformer", "width")`) and of what depended on it. Empty for a
    spec that validated."""

    paths: frozenset[PathKey] = frozenset()
    node_kinds: frozenset[str] = frozenset()  # the `kind` written on each withheld node, if any
    written: tuple[tuple[str, tuple[str, ...]], ...] = ()  # each section's names, as written

    def __bool__(self) -> bool:
        return bool(self.paths)

    def covers(self, path: PathKey) -> bool:
        """Whether `path` lies in (or is) a withheld part."""
        return any(path[: len(part)] == part for part in self.paths)

    def may_name(self, section: str, name: str) -> bool:
        """Whether `name`, found nowhere in `section`, may mean one of its withheld entries: one
        of that name or a near one, or one whose key was no valid name (its intended spelling is
        unknown)."""
        if self.covers((section,)) or self.covers((section, name)):
            return True
        entries = [str(p[1]) for p in self.paths if len(p) == 2 and p[0] == section]
        return did_you_mean(name, entries) is not None or not all(map(_is_name, entries))

    def names(self, section: str, validated: Iterable[str]) -> list[str]:
        """The names `section` holds as written (withheld ones too), for a help line."""
        written = dict(self.written).get(section)
        return list(validated) if written is None else [n for n in written if _is_name(n)]

    def any(self, section: str) -> bool:
        """Whether anything in `section` was withheld."""
        return any(part[0] == section for part in self.paths)

    @property
    def graph(self) -> bool:
        """Whether an input, node, edge or output was withheld: the graph is then partial."""
        return any(self.any(s) for s in ("inputs", "nodes", "edges", "outputs"))


@dataclass(frozen=True)
class Salvaged:
    data: dict[str, Any]  # the spec's fields, validated, for `Spec.model_construct`
    source: SourceMap  # edge indices renumbered to the edges kept
    withheld: Withheld


def broken_paths(
    errors: Iterable[dict[str, Any]], known_keys: Callable[[PathKey], list[str]]
) -> tuple[set[PathKey], set[PathKey]]:
    """The parts each validation error breaks: what to remove from the data, and what to treat as
    withheld without removing it (the field a misspelt key was meant to be)."""
    removed: set[PathKey] = set()
    meant: set[PathKey] = set()
    for error in errors:
        loc = tuple(part for part in error["loc"] if part != "[key]")
        part = _part_of(loc)
        if part is None:
            continue
        removed.add(part)
        if error["type"] == "extra_forbidden" and len(loc) == len(part):
            guess = did_you_mean(str(loc[-1]), known_keys(loc))
            if guess is not None:
                meant.add((*loc[:-1], guess))
    return removed, meant


def _part_of(loc: PathKey) -> PathKey | None:
    """The smallest part of the document an error at `loc` takes out: a section's entry, an edge,
    a `defaults` field, or a whole top-level field."""
    if not loc:
        return None
    top = loc[0]
    if top in NAMED_SECTIONS or top == "edges":
        return loc[:2]
    if top == "defaults":
        return loc[:3]
    return loc[:1]


def salvage(
    data: dict[str, Any],
    source: SourceMap,
    removed: set[PathKey],
    meant: set[PathKey],
) -> Salvaged | None:
    """The spec's fields with every broken part withheld, validated one entry at a time, or None
    when what is left still does not validate (the document's own errors then stand alone)."""
    from compiler.language.kinds import KINDS

    fields = Spec.model_fields
    kept = {k: v for k, v in data.items() if k in fields and (k,) not in removed}
    withheld = set(removed) | set(meant)
    values: dict[str, Any] = {}
    try:
        for name in ("spec", "name", "seed", "defaults", "feedback", "time", "train"):
            if name == "defaults" and isinstance(kept.get(name), dict):
                kept[name] = _pruned(kept[name], removed, (name,))
            if name in kept:
                values[name] = _adapter(name).validate_python(kept[name])
    except ValidationError:
        return None
    values.setdefault("spec", 1)
    values.setdefault("name", "spec")
    entries: dict[str, dict[str, Any]] = {}
    for section in NAMED_SECTIONS:
        written = kept.get(section)
        written = written if isinstance(written, dict) else {}
        entries[section] = {}
        for key, value in written.items():
            if (section, key) in withheld:
                continue
            try:
                entries[section][key] = _entry_adapter(section).validate_python(value)
            except ValidationError:
                withheld.add((section, key))
    defaults = values.get("defaults")
    inherited_withheld = {
        p[2] for p in withheld if p[:2] == ("defaults", "transformer") and len(p) > 2
    }
    if {("defaults",), ("defaults", "transformer")} & withheld:
        inherited_withheld.add("*")
    inputs_withheld = any(p[0] == "inputs" for p in withheld)
    for name, node in list(entries["nodes"].items()):
        node_kind = KINDS.get(node.kind)
        located = node_kind.transformer_settings(node)
        own = located[0] if located is not None else None
        if own is not None and any(
            getattr(own, f, None) is None for f in _fields_of(own, inherited_withheld)
        ):
            withheld.add(("nodes", name))
            continue
        width = (
            (own.width or (defaults.transformer.width if defaults is not None else None))
            if own is not None
            else node_kind.declared_width(node)
        )
        reads = node_kind.reads(node)
        reads_withheld = (
            inputs_withheld
            if reads is None
            else any(("inputs", r) in withheld or ("inputs",) in withheld for r in reads)
        )
        if width is None and reads_withheld:
            withheld.add(("nodes", name))
    nodes_withheld = any(p[0] == "nodes" for p in withheld)
    for name, output in list(entries["outputs"].items()):
        reads_withheld = any(("nodes", s) in withheld for s in output.source) or (
            ("nodes",) in withheld
        )
        vocab = getattr(output, "vocab_of", None)
        vocab_withheld = output.kind == "lm_head" and (
            (vocab is None and inputs_withheld)
            or ("inputs", vocab) in withheld
            or ("inputs",) in withheld
            or (getattr(output, "tie", False) and nodes_withheld)
        )
        if reads_withheld or vocab_withheld:
            withheld.add(("outputs", name))
    for section in NAMED_SECTIONS:
        values[section] = {
            k: v for k, v in entries[section].items() if (section, k) not in withheld
        }
    edges, kept_indices = [], []
    written_edges = kept.get("edges") if ("edges",) not in withheld else None
    for index, edge in enumerate(written_edges if isinstance(written_edges, list) else []):
        if ("edges", index) in withheld:
            continue
        try:
            edges.append(_entry_adapter("edges").validate_python(edge))
        except ValidationError:
            withheld.add(("edges", index))
            continue
        kept_indices.append(index)
    values["edges"] = edges
    return Salvaged(
        data=values,
        source=_renumbered(source, kept_indices),
        withheld=Withheld(
            frozenset(withheld),
            _written_kinds(data.get("nodes"), withheld),
            tuple(
                (section, tuple(map(str, data[section])))
                for section in NAMED_SECTIONS
                if isinstance(data.get(section), dict)
            ),
        ),
    )


def _fields_of(settings: Any, names: set[str]) -> list[str]:
    """The transformer settings among `names` ("*": all of them) that `settings` may inherit."""
    inheritable = TransformerSettings.model_fields
    return sorted(n for n in inheritable if "*" in names or n in names)


def _written_kinds(nodes: Any, withheld: set[PathKey]) -> frozenset[str]:
    """The `kind` written on each withheld node (any text: it may be the misspelt one)."""
    if not isinstance(nodes, dict):
        return frozenset(["*"]) if ("nodes",) in withheld else frozenset()
    if ("nodes",) in withheld:
        return frozenset(["*"])
    return frozenset(
        str(raw.get("kind")) if isinstance(raw, dict) else "*"
        for key, raw in nodes.items()
        if ("nodes", key) in withheld
    )


def _pruned(mapping: dict[str, Any], removed: set[PathKey], path: PathKey) -> dict[str, Any]:
    """`mapping` without the removed paths below `path` (one level of nesting: `defaults`)."""
    result = {}
    for key, value in mapping.items():
        here = (*path, key)
        if here in removed:
            continue
        result[key] = _pruned(value, removed, here) if isinstance(value, dict) else value
    return result


def _renumbered(source: SourceMap, kept: list[int]) -> SourceMap:
    """The same spans with the kept edges numbered as the salvaged spec's `edges` list has them."""
    new_index = {old: new for new, old in enumerate(kept)}

    def moved(spans: dict[PathKey, Any]) -> dict[PathKey, Any]:
        result = {}
        for path, span in spans.items():
            if len(path) >= 2 and path[0] == "edges":
                if path[1] not in new_index:
                    continue
                path = ("edges", new_index[path[1]], *path[2:])
            result[path] = span
        return result

    return SourceMap(source.file, moved(source.key_spans), moved(source.value_spans))


def _is_name(text: str) -> bool:
    try:
        _name_adapter().validate_python(text)
    except ValidationError:
        return False
    return True


@functools.cache
def _name_adapter() -> TypeAdapter:
    return TypeAdapter(Name)


@functools.cache
def _adapter(field: str) -> TypeAdapter:
    return TypeAdapter(Spec.model_fields[field].annotation)


@functools.cache
def _entry_adapter(field: str) -> TypeAdapter:
    """One entry of a section: the value type of `inputs`/`nodes`/..., the item type of `edges`."""
    annotation = Spec.model_fields[field].annotation
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return TypeAdapter(typing.get_args(annotation)[-1])
