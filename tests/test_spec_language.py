"""The spec language, by example: a YAML snippet in, a behaviour or a located message out."""

from __future__ import annotations

from fractions import Fraction

import compiler
from tests.conftest import TINY


def test_the_smallest_spec_compiles(write_spec):
    ir = compiler.analyze(write_spec(TINY))
    assert ir.spec.name == "tiny"
    assert ir.graph.nodes["nodes.body"]["config"].width == 32


def test_nodes_inherit_defaults_and_override_them(write_spec):
    ir = compiler.analyze(
        write_spec(
            """
            spec: 1
            name: d
            defaults:
              transformer: {width: 64, heads: 8, layers: 3, norm: rmsnorm}
            inputs:
              tokens: {kind: tokens, vocab: 10, context: 8}
            nodes:
              a: {kind: transformer}
              b: {kind: transformer, layers: 1}
              c: {kind: transformer, input: []}
            edges:
              - {from: a, to: c}
              - {from: b, to: c}
            outputs:
              y: {from: c, kind: lm_head}
            """
        )
    )
    a, b = (ir.graph.nodes[f"nodes.{n}"]["config"] for n in "ab")
    assert (a.width, a.heads, a.layers, a.norm) == (64, 8, 3, "rmsnorm")
    assert (b.layers, b.norm) == (1, "rmsnorm")
    assert ir.graph.nodes["nodes.a"]["settings_from"]["heads"] == (
        "defaults",
        "transformer",
        "heads",
    )


def test_a_width_can_come_from_the_input(write_spec):
    ir = compiler.analyze(
        write_spec(
            """
            spec: 1
            name: w
            inputs:
              x: {kind: features, width: 3}
              tokens: {kind: tokens, vocab: 5, context: 4, width: 48}
            nodes:
              body: {kind: transformer, heads: 4, input: [tokens, x]}
            outputs:
              y: {from: body, kind: regression, width: 2}
            """
        )
    )
    assert ir.graph.nodes["nodes.body"]["width"] == 48


def test_ratios_are_exact_rationals_in_the_spec(write_spec):
    ir = compiler.analyze(
        write_spec(
            TINY.replace("outputs:", "edges: []\noutputs:")
            .replace(
                "nodes:\n", "nodes:\n  gear: {kind: transformer, width: 32, heads: 2, layers: 1}\n"
            )
            .replace(
                "edges: []", "edges:\n  - {from: gear, to: body, kind: message, ratio: 13.368}"
            )
        )
    )
    assert ir.spec.edges[0].ratio == Fraction(13368, 1000)


def test_unknown_keys_get_a_did_you_mean(spec_errors):
    assert spec_errors(TINY.replace("heads: 2", "haeds: 2")) == (
        "spec.yaml:6:40: error: unknown key `haeds` in `nodes.body`\n  help: did you mean `heads`?"
    )


def test_heads_must_divide_the_width(spec_errors):
    assert spec_errors(TINY.replace("heads: 2", "heads: 5")) == (
        "spec.yaml:6:47: error: `heads: 5` does not divide node `body`'s width 32\n"
        "  help: heads split the width evenly; divisors of 32: 1, 2, 4, 8, 16, 32"
    )


def test_an_inherited_bad_value_is_reported_where_it_was_written(spec_errors):
    text = TINY.replace("nodes:", "defaults:\n  transformer: {heads: 3}\nnodes:").replace(
        "heads: 2, ", ""
    )
    assert spec_errors(text).startswith(
        "spec.yaml:6:24: error: `heads: 3` does not divide node `body`'s width 32"
    )


def test_a_cycle_without_delay_is_an_algebraic_loop(spec_errors):
    text = """
    spec: 1
    name: loop
    defaults: {transformer: {width: 16, heads: 2, layers: 1}}
    inputs: {tokens: {kind: tokens, vocab: 5, context: 4}}
    nodes:
      a: {kind: transformer}
      b: {kind: transformer}
    edges:
      - {from: a, to: b}
      - {from: b, to: a}
    outputs: {y: {from: b, kind: lm_head}}
    """
    assert spec_errors(text) == (
        "spec.yaml:9:5: error: these edges form a loop with no delay: a -> b -> a\n"
        "  help: add `delay: 1` to one edge of this cycle (it then reads the previous feedback step)"
    )
    fixed = (
        text.replace("{from: b, to: a}", "{from: b, to: a, delay: 1}") + "feedback: {steps: 3}\n"
    )
    assert "error" not in spec_errors_or_ok(fixed)


def spec_errors_or_ok(text):
    import tempfile
    import textwrap

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(textwrap.dedent(text))
    try:
        compiler.analyze(f.name)
        return "ok"
    except compiler.SpecError as exc:
        return exc.format()


def test_several_problems_are_reported_at_once(spec_errors):
    text = TINY.replace("width: 32", "width: 0").replace("vocab: 17", "vocab: -1")
    assert spec_errors(text).count("error:") == 2


def test_the_spec_version_is_checked_first(spec_errors):
    assert spec_errors(TINY.replace("spec: 1", "spec: 2")).startswith(
        "spec.yaml:1:7: error: unsupported spec version `2`: this epicycle reads version 1"
    )


def test_absurd_sizes_are_refused_before_anything_is_built(spec_errors):
    text = (
        TINY.replace("layers: 1", "layers: 9000")
        .replace("width: 32", "width: 1048576")
        .replace("heads: 2", "heads: 1024")
    )
    assert "beyond what epicycle will build" in spec_errors(text)


def test_a_node_that_feeds_nothing_is_a_warning(write_spec):
    text = TINY.replace(
        "nodes:\n", "nodes:\n  idle: {kind: transformer, width: 32, heads: 2, layers: 1}\n"
    )
    ir = compiler.analyze(write_spec(text))
    (warning,) = ir.facts.warnings
    assert warning.severity == "warning" and "node `idle` feeds no output" in warning.message


def test_the_json_schema_describes_every_section():
    schema = compiler.json_schema()
    assert set(schema["properties"]) == {
        "spec",
        "name",
        "seed",
        "defaults",
        "inputs",
        "perspectives",
        "nodes",
        "edges",
        "feedback",
        "time",
        "outputs",
        "train",
    }
    assert schema["properties"]["spec"]["const"] == 1
    node_kinds = schema["$defs"]["TransformerNode"]["properties"]["kind"]
    assert node_kinds["const"] == "transformer"
    assert schema["$defs"]["TransformerNode"]["additionalProperties"] is False
