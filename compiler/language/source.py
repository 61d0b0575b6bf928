"""Reading a spec file: safe YAML that remembers where every key and value came from.

PyYAML's safe loader is safe against code execution but not against the rest of what a user can
write: it accepts duplicate keys (the last silently wins), recurses without bound on deep nesting,
expands alias bombs, and resolves scalars by YAML 1.1 rules (`no` is false, `1e30` is a string).
So we compose the node tree with PyYAML and build the data ourselves:

* scalars resolve by the YAML 1.2 core schema (only `true`/`false` are booleans; `1e30` is a
  number); a float keeps the text it was written as (`SpecFloat.text`) so that exact rationals such
  as `13.368` are read from the digits, not from a binary approximation;
* every tag that is not plain data (`!!python/...`, `!!binary`, `!custom`, ...) is refused;
* duplicate keys are refused, naming both places;
* size, depth and alias-expansion limits are checked before anything deep happens;
* every key's and value's position is recorded in a `SourceMap` keyed by its path in the data
  (`("nodes", "sun", "width")`), which is how pydantic's error locations become `file:line:col`.

Nothing here calls `eval` or constructs anything but dicts, lists, str, int, float, bool and None.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.language.files import read_regular_file

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_VALUES = 200_000  # scalars and collections after alias expansion
MAX_NUMBER_DIGITS = 64

PathKey = tuple[str | int, ...]


class SpecFloat(float):
    """A float that remembers the digits it was written with (`13.368`, `1e30`)."""

    text: str

    def __new__(cls, text: str) -> SpecFloat:
        self = super().__new__(cls, _float_from_text(text))
        self.text = text
        return self

    def __getnewargs__(self) -> tuple[str]:  # copy and pickle rebuild it from its text
        return (self.text,)


@dataclass
class SourceMap:
    """Where each path of the loaded data was written."""

    file: str
    key_spans: dict[PathKey, Span] = field(default_factory=dict)
    value_spans: dict[PathKey, Span] = field(default_factory=dict)

    def locate(self, path: tuple[Any, ...], *, key: bool = False) -> tuple[Span, PathKey]:
        """The span of the deepest prefix of `path` that exists in the file.

        Path elements that are not in the data (pydantic inserts union tags such as
        `transformer` into its error locations) are skipped rather than ending the walk.
        """
        found: PathKey = ()
        for part in path:
            candidate = (*found, part)
            if candidate in self.value_spans:
                found = candidate
            elif isinstance(part, int) and (*found, str(part)) in self.value_spans:
                found = (*found, str(part))
        spans = self.key_spans if key and found in self.key_spans else self.value_spans
        return spans.get(found, Span(self.file, 1, 1)), found

    def span(self, path: tuple[Any, ...], *, key: bool = False) -> Span:
        return self.locate(path, key=key)[0]


@dataclass
class Document:
    data: Any
    source: SourceMap
    text: str


def read_spec_file(path: str | Path) -> Document:
    """Read and parse a spec file; a FIFO, a device or a directory is refused before reading, and
    no more than `MAX_FILE_BYTES` are ever read (`/dev/zero` has no end)."""
    shown = str(path)
    raw = read_regular_file(
        shown,
        limit=MAX_FILE_BYTES,
        what="spec file",
        hint="pass a spec's .yaml file (a spec describes a topology, in at most 4 MiB)",
    )
    return parse_spec_text(raw, shown)


def parse_spec_text(raw: bytes | str, file: str = "<string>") -> Document:
    text = _decode(raw, file) if isinstance(raw, bytes) else raw
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(
            [_diag(file, 1, 1, f"the spec text is longer than {MAX_FILE_BYTES:,} characters")]
        )
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise SpecError(
            [_diag(file, 1, 1, "the file is empty", "a spec starts with `spec: 1` and a `name:`")]
        )
    _prescan(text, file)
    try:
        root = yaml.compose(text, Loader=_ComposeLoader)
    except yaml.YAMLError as exc:
        raise SpecError([_yaml_error(_python_parser_error(text) or exc, file)]) from None
    if root is None:
        raise SpecError(
            [_diag(file, 1, 1, "the file holds only comments", "a spec starts with `spec: 1`")]
        )
    builder = _DataBuilder(file)
    data = builder.build(root, (), depth=0)
    return Document(data=data, source=builder.source, text=text)


# --------------------------------------------------------------------------- decoding and scanning


def _decode(raw: bytes, file: str) -> str:
    wide = _wide_encoding(raw)
    if wide is not None:
        raise SpecError(
            [
                _diag(
                    file,
                    1,
                    1,
                    f"this file is {wide}; save it as UTF-8",
                    "specs are read as UTF-8 (in most editors: Save with Encoding > UTF-8; or "
                    f"`iconv -f {_ICONV_NAMES[wide]} -t UTF-8`)",
                )
            ]
        )
    if not raw.strip():
        raise SpecError(
            [_diag(file, 1, 1, "the file is empty", "a spec starts with `spec: 1` and a `name:`")]
        )
    nul = raw.find(b"\x00")
    if nul >= 0:
        line, col = _line_col_of_byte(raw, nul)
        raise SpecError(
            [
                _diag(
                    file,
                    line,
                    col,
                    "this is a binary file (it contains a NUL byte), not a YAML spec",
                    "pass the .yaml file that describes the model",
                )
            ]
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = _line_col_of_byte(raw, exc.start)
        raise SpecError(
            [
                _diag(
                    file,
                    line,
                    col,
                    f"the file is not UTF-8 (byte 0x{raw[exc.start]:02x} here: {exc.reason})",
                    "save the spec as UTF-8",
                )
            ]
        ) from None


_BYTE_ORDER_MARKS = (  # UTF-32's before UTF-16's: FF FE 00 00 starts with UTF-16-LE's mark
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
)
_ICONV_NAMES = {
    "UTF-32 (little-endian)": "UTF-32LE",
    "UTF-32 (big-endian)": "UTF-32BE",
    "UTF-16 (little-endian)": "UTF-16LE",
    "UTF-16 (big-endian)": "UTF-16BE",
}
# (encoding, code unit bytes, offsets in a unit that are NUL for ASCII text, offsets that are not)
_NUL_PATTERNS = (
    ("UTF-32 (little-endian)", 4, (1, 2, 3), (0,)),
    ("UTF-32 (big-endian)", 4, (0, 1, 2), (3,)),
    ("UTF-16 (little-endian)", 2, (1,), (0,)),
    ("UTF-16 (big-endian)", 2, (0,), (1,)),
)


def _wide_encoding(raw: bytes) -> str | None:
    """UTF-16 or UTF-32, told by a byte-order mark or, without one, by the NUL bytes that ASCII
    text (every spec's keys) leaves in each code unit; None for anything else."""
    for mark, name in _BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            return name
    sample = raw[:1024]
    for name, unit, zero, text in _NUL_PATTERNS:
        units = [sample[i : i + unit] for i in range(0, len(sample) - unit + 1, unit)]
        if len(units) < 4:
            continue
        nul_share = sum(all(u[k] == 0 for k in zero) for u in units) / len(units)
        text_share = sum(all(u[k] != 0 for k in text) for u in units) / len(units)
        if nul_share >= 0.9 and text_share >= 0.9:
            return name
    return None


def _line_col_of_byte(raw: bytes, offset: int) -> tuple[int, int]:
    line = raw.count(b"\n", 0, offset) + 1
    col = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
    return line, col


def _prescan(text: str, file: str, loader: type = None) -> None:  # type: ignore[assignment]
    """Walk the event stream (iteratively) before composing: refuse deep nesting, recursive aliases
    and alias bombs here, where each alias still has its own position and nothing has been built.

    libyaml (PyYAML >= 6.0.4) reads flow collections ahead and stops at 1,000 levels itself, before
    this walk reaches its own limit; the walk is then repeated with the pure-Python parser, which
    is iterative too and yields events one by one, so the refusal names the 65th level."""
    loader = loader or _Base
    depth = 0
    documents = 0
    total = 0
    open_counts: list[list] = []  # [anchor or None, values inside] per open collection
    anchor_sizes: dict[str, int] = {}
    aliased = 0  # of `total`, the values that aliases repeat

    def refuse(event: yaml.Event, message: str, hint: str) -> SpecError:
        mark = event.start_mark
        return SpecError([_diag(file, mark.line + 1, mark.column + 1, message, hint)])

    try:
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise refuse(
                        event,
                        "the file holds more than one YAML document",
                        "put each spec in its own file (remove the `---` line)",
                    )
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise refuse(
                        event,
                        f"nesting deeper than {MAX_DEPTH} levels",
                        "a spec needs only a few levels; flatten this structure",
                    )
                total += 1
                for entry in open_counts:
                    entry[1] += 1
                open_counts.append([event.anchor, 0])
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
                anchor, size = open_counts.pop()
                if anchor is not None:
                    anchor_sizes[anchor] = size + 1
            elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                size = 1
                if isinstance(event, yaml.AliasEvent):
                    if any(entry[0] == event.anchor for entry in open_counts):
                        raise refuse(
                            event,
                            f"the alias `*{event.anchor}` refers to the collection that contains it",
                            "an alias may only repeat a finished collection",
                        )
                    size = anchor_sizes.get(event.anchor, 1)
                    aliased += size
                elif event.anchor is not None:
                    anchor_sizes[event.anchor] = 1
                total += size
                for entry in open_counts:
                    entry[1] += size
                if total > MAX_VALUES:
                    raise _too_many_values(refuse, event, aliased)
    except yaml.reader.ReaderError as exc:
        raise SpecError([_unacceptable_character(exc, text, file)]) from None
    except yaml.YAMLError as exc:
        if loader is not yaml.SafeLoader and "nesting depth" in str(exc):
            _prescan(text, file, yaml.SafeLoader)  # raises the located refusal
        raise SpecError([_yaml_error(_python_parser_error(text) or exc, file)]) from None


_CONTROL_NAMES = {0x07: "bell", 0x08: "backspace", 0x1B: "escape", 0x7F: "delete"}


def _unacceptable_character(exc: yaml.reader.ReaderError, text: str, file: str) -> Diagnostic:
    """A control character YAML does not allow (ESC of an ANSI sequence, a bell), at its place."""
    offset = min(max(exc.position, 0), len(text))
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
    name = unicodedata.name(chr(code), None) or _CONTROL_NAMES.get(code)
    return _diag(
        file,
        line,
        col,
        f"the control character U+{code:04X}"
        + (f" ({name.lower()})" if name else "")
        + " is not allowed in YAML",
        "remove it; inside a double-quoted string it can be written as an escape (`\\x1b`)",
    )


def _too_many_values(refuse, event: yaml.Event, aliased: int) -> SpecError:
    """Say which limit was passed, and whether aliases or the written text passed it."""
    if aliased * 2 > MAX_VALUES:
        return refuse(
            event,
            f"aliases expand the spec to more than {MAX_VALUES:,} values here "
            f"({aliased:,} of them repeated by aliases); a spec may hold at most {MAX_VALUES:,}",
            "anchors and aliases may share settings, not multiply them",
        )
    return refuse(
        event,
        f"the spec holds more than {MAX_VALUES:,} values (keys' values, list items and "
        f"collections), the most a spec may hold; this is value {MAX_VALUES + 1:,}",
        "a spec describes a topology and stays far below this: move tables of numbers into "
        "files the training code reads",
    )


def _python_parser_error(text: str) -> yaml.YAMLError | None:
    """The pure-Python parser's account of a syntax error: libyaml's messages say less."""
    try:
        yaml.compose(text, Loader=_PythonComposeLoader)
    except yaml.YAMLError as exc:
        return exc
    except RecursionError:  # the composer recurses per level: keep libyaml's account
        return None
    return None


def _yaml_error(exc: yaml.YAMLError, file: str) -> Diagnostic:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if "'\\t'" in problem or "\t" in problem:
        return _diag(
            file,
            line,
            col,
            "tab character: YAML indents with spaces only",
            "replace the tabs with spaces",
        )
    context_mark = getattr(exc, "context_mark", None)
    if (
        problem.startswith("expected ',' or")
        and context_mark is not None
        and "flow" in (context or "")
    ):
        bracket = "{" if "mapping" in context else "["
        closing = "}" if bracket == "{" else "]"
        return _diag(
            file,
            context_mark.line + 1,
            context_mark.column + 1,
            f"this `{bracket}` is not closed (line {line} goes on without a `,` or `{closing}`)",
            f"close it with `{closing}`, or separate its items with commas",
        )
    message = f"malformed YAML: {problem}"
    if context:
        message += f" ({context})"
    return _diag(file, line, col, message, _yaml_hint(problem))


def _yaml_hint(problem: str) -> str | None:
    if "mapping values are not allowed" in problem:
        return "a value that contains `: ` must be quoted, or a key is indented too far"
    if "could not find expected ':'" in problem:
        return "each line of a mapping is `key: value`"
    if "found undefined alias" in problem:
        return "define the anchor (`&name`) before its alias (`*name`)"
    if "expected <block end>" in problem:
        return "check the indentation of this line against the lines above"
    return None


def _diag(file: str, line: int, col: int, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Span(file, line, col), message, hint)


# --------------------------------------------------------------------------- composing and building

_PLAIN = "epicycle:plain"
_TAG = "tag:yaml.org,2002:"
_ALLOWED_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null")}


_Base = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)  # libyaml's C parser when present (much faster than the pure-Python one)


def _mark_plain_scalars(self, kind, value, implicit):  # type: ignore[no-untyped-def]
    if kind is yaml.ScalarNode and implicit[0]:
        return _PLAIN
    return yaml.resolver.BaseResolver.resolve(self, kind, value, implicit)


class _ComposeLoader(_Base):  # type: ignore[valid-type,misc]
    """Composes nodes only; plain scalars are marked so we can resolve them by YAML 1.2 rules."""

    yaml_implicit_resolvers: dict = {}
    resolve = _mark_plain_scalars


class _PythonComposeLoader(yaml.SafeLoader):
    """The same with the pure-Python parser, whose error messages are the clearer ones."""

    yaml_implicit_resolvers: dict = {}
    resolve = _mark_plain_scalars


_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"^[-+]?[0-9]+$")
_INT_OCT = re.compile(r"^0o[0-7]+$")
_INT_HEX = re.compile(r"^0x[0-9a-fA-F]+$")
_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")
_INF = re.compile(r"^[-+]?\.(?:inf|Inf|INF)$")
_NAN = re.compile(r"^\.(?:nan|NaN|NAN)$")


def _float_from_text(text: str) -> float:
    if _INF.match(text):
        return float("-inf") if text.startswith("-") else float("inf")
    if _NAN.match(text):
        return float("nan")
    return float(text)


class _DataBuilder:
    def __init__(self, file: str):
        self.file = file
        self.source = SourceMap(file)
        self.count = 0

    def span(self, node: yaml.Node) -> Span:
        return Span(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def fail(self, node: yaml.Node, message: str, hint: str | None = None) -> SpecError:
        return SpecError([Diagnostic(self.span(node), message, hint)])

    def build(self, node: yaml.Node, path: PathKey, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self.fail(
                node,
                f"merge keys (`<<: *anchor`) expand the spec to more than {MAX_VALUES:,} values, "
                "the most a spec may hold",
                "anchors and aliases may share settings, not multiply them",
            )
        if depth > MAX_DEPTH:
            raise self.fail(
                node,
                f"nesting deeper than {MAX_DEPTH} levels (a recursive alias?)",
                "an alias may not refer to the collection that contains it",
            )
        self.source.value_spans.setdefault(path, self.span(node))
        if isinstance(node, yaml.MappingNode):
            self._check_tag(node, _TAG + "map")
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            self._check_tag(node, _TAG + "seq")
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        return self._scalar(node)

    def _check_tag(self, node: yaml.Node, expected: str) -> None:
        if node.tag != expected:
            raise self._tag_error(node)

    def _tag_error(self, node: yaml.Node) -> SpecError:
        tag = node.tag.replace(_TAG, "!!")
        return self.fail(
            node,
            f"the YAML tag `{tag}` is not allowed",
            "a spec holds plain data (mappings, lists, strings, numbers, booleans); remove the tag",
        )

    def _mapping(self, node: yaml.MappingNode, path: PathKey, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        key_nodes: dict[str, yaml.Node] = {}
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(
                    key_node, "a mapping key must be a plain name, not a list or mapping"
                )
            if key_node.tag == _TAG + "merge" or (
                key_node.tag == _PLAIN and key_node.value == "<<"
            ):
                merged.extend(self._merge_sources(value_node))
                continue
            key = self._key(key_node)
            if key in key_nodes:
                first = key_nodes[key]
                raise self.fail(
                    key_node,
                    f"duplicate key `{key}` (first set at line {first.start_mark.line + 1})",
                    "each key may appear once in a mapping; remove one of them",
                )
            key_nodes[key] = key_node
            self.source.key_spans[(*path, key)] = self.span(key_node)
            result[key] = self.build(value_node, (*path, key), depth + 1)
        for key_node, value_node in merged:  # explicit keys win over merged ones
            key = self._key(key_node)
            if key not in result:
                self.source.key_spans[(*path, key)] = self.span(key_node)
                result[key] = self.build(value_node, (*path, key), depth + 1)
                key_nodes[key] = key_node
        return result

    def _key(self, key_node: yaml.ScalarNode) -> str:
        """Keys are names: taken as written (`1:` is the name "1"), never converted."""
        if key_node.tag not in (_PLAIN, _TAG + "str"):
            raise self._tag_error(key_node)
        if len(key_node.value) > 256:
            raise self.fail(key_node, "a key longer than 256 characters", "keys are short names")
        return key_node.value

    def _merge_sources(self, value_node: yaml.Node) -> list[tuple[yaml.Node, yaml.Node]]:
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        pairs: list[tuple[yaml.Node, yaml.Node]] = []
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                raise self.fail(
                    source, "`<<` merges mappings only", "write `<<: *anchor` of a mapping"
                )
            pairs.extend(source.value)
        return pairs

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        value: str = node.value
        tag = node.tag
        if tag == _PLAIN:
            return self._plain(node, value)
        if tag not in _ALLOWED_SCALAR_TAGS:
            raise self._tag_error(node)
        kind = tag[len(_TAG) :]
        if kind == "str":
            return value
        resolved = self._plain(node, value)
        expected = {"int": int, "float": float, "bool": bool, "null": type(None)}[kind]
        if kind == "float" and isinstance(resolved, int) and not isinstance(resolved, bool):
            return SpecFloat(value)
        if not isinstance(resolved, expected) or (kind == "int" and isinstance(resolved, bool)):
            raise self.fail(node, f"`{value}` is not a valid `!!{kind}`")
        return resolved

    def _plain(self, node: yaml.Node, value: str) -> Any:
        if _NULL.match(value):
            return None
        if value in _BOOL:
            return _BOOL[value]
        if _INT.match(value) or _INT_OCT.match(value) or _INT_HEX.match(value):
            if len(value) > MAX_NUMBER_DIGITS:
                raise self.fail(node, f"a number with {len(value)} digits is too long to be a size")
            if _INT.match(value):
                return int(value)
            return int(value[2:], 8 if value[1] == "o" else 16)
        if _FLOAT.match(value) or _INF.match(value) or _NAN.match(value):
            if len(value) > MAX_NUMBER_DIGITS:
                raise self.fail(node, f"a number with {len(value)} characters is too long")
            return SpecFloat(value)
        return value
