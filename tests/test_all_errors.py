"""Every independent mistake of a spec is reported in one run, and each mistake once.

The spec below holds two islands, `p` and `q`, that share nothing but the input. A mistake made
in one island is reported the same whether or not the other island holds a mistake of its own:
so combining two broken specs' mistakes in one document reports exactly the mistakes of both (no
mistake hidden by the other, none reported twice, none echoed as a second error elsewhere). Each
mistake rewrites one line, so the two islands' messages keep their `file:line:col`.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from compiler.language.diagnostics import SpecError
from compiler.pipeline import analyze

LINES = {
    "node1": "  {x}1: {{kind: transformer, width: 32}}",
    "node2": "  {x}2: {{kind: transformer, width: 32}}",
    "edge": "  - {{from: {x}1, to: {x}2}}",
    "spare": "  - {{from: {x}1, to: {x}2, kind: message}}",
    "output": "  {x}: {{from: {x}2, kind: lm_head}}",
}

MISTAKES = {
    "misspelt key": ("node1", "  {x}1: {{kind: transformer, widht: 32}}"),
    "unknown kind": ("node1", "  {x}1: {{kind: transfomer, width: 32}}"),
    "dropout out of range": ("node1", "  {x}1: {{kind: transformer, width: 32, dropout: 1.5}}"),
    "heads not dividing": ("node2", "  {x}2: {{kind: transformer, width: 32, heads: 5}}"),
    "width as text": ("node2", '  {x}2: {{kind: transformer, width: "32"}}'),
    "undelayed loop": ("spare", "  - {{from: {x}2, to: {x}1}}"),
    "feedback edge without delay": ("spare", "  - {{from: {x}2, to: {x}1, kind: feedback}}"),
    "dangling edge": ("spare", "  - {{from: {x}1, to: {x}9}}"),
    "misspelt from": ("spare", "  - {{form: {x}1, to: {x}2}}"),
    "negative delay": ("spare", "  - {{from: {x}1, to: {x}2, delay: -1}}"),
    "dangling output": ("output", "  {x}: {{from: {x}9, kind: lm_head}}"),
    "unknown output kind": ("output", "  {x}: {{from: {x}2, kind: lm_haed}}"),
}


def _island(x: str, mistake: str | None, slot: str) -> str:
    if mistake is not None and MISTAKES[mistake][0] == slot:
        return MISTAKES[mistake][1].format(x=x)
    return LINES[slot].format(x=x)


def spec_text(p: str | None = None, q: str | None = None) -> str:
    """The two-island spec with mistake `p` made in island p and mistake `q` in island q."""
    lines = [
        "spec: 1",
        "name: islands",
        "inputs:",
        "  tokens: {kind: tokens, vocab: 17, context: 16}",
    ]
    lines.append("nodes:")
    lines += [_island(x, m, slot) for x, m in (("p", p), ("q", q)) for slot in ("node1", "node2")]
    lines.append("edges:")
    lines += [_island(x, m, slot) for x, m in (("p", p), ("q", q)) for slot in ("edge", "spare")]
    lines.append("outputs:")
    lines += [_island(x, m, "output") for x, m in (("p", p), ("q", q))]
    return "\n".join(lines) + "\n"


@functools.cache
def reported(text: str) -> list[str]:
    """Every message `epicycle validate` would print for this spec (none if it is valid)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            analyze(path)
        except SpecError as exc:
            return [d.format().replace(str(path), "spec.yaml") for d in exc.diagnostics]
    return []


def test_the_spec_without_mistakes_is_valid():
    assert reported(spec_text()) == []


def test_each_mistake_alone_is_reported_and_once():
    for mistake in MISTAKES:
        found = reported(spec_text(p=mistake))
        errors = [m for m in found if ": error: " in m]
        assert errors, mistake
        assert len(found) == len(set(found)), (mistake, found)


def test_a_feedback_edge_without_delay_is_one_message():
    (message,) = reported(spec_text(p="feedback edge without delay"))
    assert "the feedback edge p2 -> p1 has no delay" in message


@settings(max_examples=30, deadline=None)
@given(p=st.sampled_from(sorted(MISTAKES)), q=st.sampled_from(sorted(MISTAKES)))
def test_two_independent_mistakes_are_both_reported_and_nothing_else(p: str, q: str):
    alone = set(reported(spec_text(p=p))) | set(reported(spec_text(q=q)))
    together = reported(spec_text(p=p, q=q))
    assert len(together) == len(set(together)), together
    assert set(together) == alone


# --------------------------------------------------------------------------- what stops, what goes on

LOOP = """name: loop
inputs:
  tokens: {kind: tokens, vocab: 17, context: 16}
nodes:
  a: {kind: transformer, width: 32}
  b: {kind: transformer, width: 32}
edges:
  - {from: a, to: b}
  - {from: b, to: a}
outputs:
  logits: {from: b, kind: lm_head}
"""


def test_a_missing_version_line_does_not_hide_the_rest():
    assert [m.split(": error: ")[1].split("\n")[0] for m in reported(LOOP)] == [
        "missing `spec:` (the spec language version)",
        "these edges form a loop with no delay: a -> b -> a",
    ]


def test_an_unsupported_version_stops_there():
    (message,) = reported("spec: 2\n" + LOOP)
    assert "unsupported spec version `2`" in message


def test_a_broken_input_is_not_also_missing_for_its_readers():
    text = """spec: 1
name: features
inputs:
  x: {kind: features, width: "3"}
nodes:
  a: {kind: transformer, input: x}
  b: {kind: transformer, width: 32, heads: 5, input: x}
outputs:
  y: {from: [a, b], kind: regression, width: 2}
"""
    # `a` takes its width from `x`, so it is left out with it; `b` has its own, and is checked
    assert [m.split("\n")[0] for m in reported(text)] == [
        "spec.yaml:4:30: error: `width` must be a whole number, got a string ('3')",
        "spec.yaml:7:44: error: `heads: 5` does not divide node `b`'s width 32",
    ]
