"""`--set path.to.field=value`: one field of a spec set for one run, validated like the file.

Paths name mapping keys and list indices (`nodes.body.width`, `edges.8.delay`); values are YAML
read by the file's own safe rules. A wrong value is located on the command line, as `--set:N:COL`
(the Nth override, the column within its text); everything else stays located in the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from compiler.language.diagnostics import SpecError
from compiler.language.frontend import load_spec, load_spec_text
from compiler.language.overrides import OverrideSyntaxError, parse_override
from compiler.pipeline import analyze
from compiler.tools.cli import app

ROOT = Path(__file__).resolve().parent.parent
TRANSFORMER = ROOT / "specs" / "transformer.yaml"  # one node `body`, width 128, 4 layers
FEDERATION = ROOT / "specs" / "federation.yaml"  # 9 edges; edges[8] is moon -> sun, delay 1
COMPONENTS = ROOT / "specs" / "components.yaml"  # node `window` uses sliding_window, window 32

runner = CliRunner()


def messages(source, overrides) -> str:
    with pytest.raises(SpecError) as caught:
        analyze(source, overrides=overrides)
    return caught.value.format()


# --------------------------------------------------------------------------- setting fields


def test_an_override_sets_a_nodes_width():
    ir = analyze(TRANSFORMER, overrides=["nodes.body.width=64"])
    assert ir.graph.nodes["nodes.body"]["width"] == 64
    assert analyze(TRANSFORMER).graph.nodes["nodes.body"]["width"] == 128


def test_an_override_addresses_a_list_entry_by_its_index():
    ir = analyze(FEDERATION, overrides=["edges.8.delay=2", "feedback.steps=5"])
    assert ir.spec.edges[8].delay == 2 and ir.spec.feedback.steps == 5


def test_an_override_sets_a_field_of_a_nested_component():
    ir = analyze(COMPONENTS, overrides=["nodes.window.attention.window=8"])
    assert ir.spec.nodes["window"].attention.window == 8


def test_the_last_key_may_be_new_and_known_sections_are_created():
    ir = analyze(TRANSFORMER, overrides=["nodes.body.kv_heads=2", "defaults.message.width=32"])
    assert ir.spec.nodes["body"].kv_heads == 2
    assert ir.spec.defaults.message.width == 32  # the file has no `defaults:`


def test_overrides_apply_in_order_and_a_later_one_wins():
    ir = analyze(TRANSFORMER, overrides=["nodes.body.layers=1", "nodes.body.layers=3"])
    assert ir.spec.nodes["body"].layers == 3


def test_a_value_is_yaml_read_by_the_files_rules():
    ir = analyze(TRANSFORMER, overrides=["nodes.body.attention={kind: sliding_window, window: 8}"])
    assert ir.spec.nodes["body"].attention.window == 8
    assert "--set:1:6: error: the YAML tag `!!python/object:os.system` is not allowed" in messages(
        TRANSFORMER, ["name=!!python/object:os.system x"]
    )


# --------------------------------------------------------------------------- located errors


def test_a_wrong_type_is_located_on_the_command_line():
    assert messages(TRANSFORMER, ["nodes.body.layers=2", "nodes.body.width=wide"]) == (
        "--set:2:18: error: `width` must be a whole number, got a string ('wide')"
    )


def test_a_rule_broken_by_an_override_points_at_the_override():
    assert messages(TRANSFORMER, ["nodes.body.heads=3"]).startswith(
        "--set:1:18: error: `heads: 3` does not divide node `body`'s width 128"
    )


def test_errors_the_overrides_did_not_touch_stay_in_the_file(tmp_path: Path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(TRANSFORMER.read_text().replace("layers: 4", "layers: 0"))
    found = messages(spec, ["nodes.body.width=wide"])
    assert f"{spec}:13:13: error: `layers` is 0: it must be at least 1" in found
    assert "--set:1:18: error: `width` must be a whole number" in found


def test_a_misspelt_key_gets_a_suggestion():
    assert messages(TRANSFORMER, ["nodes.body.widht=64"]) == (
        "--set:1:12: error: unknown key `widht` in `nodes.body`\n  help: did you mean `width`?"
    )
    assert messages(TRANSFORMER, ["nodes.bdy.width=64"]) == (
        "--set:1:7: error: `nodes` has no `bdy`\n  help: did you mean `body`?"
    )
    assert messages(TRANSFORMER, ["nodse.body.width=64"]) == (
        "--set:1:1: error: the spec has no `nodse`\n  help: did you mean `nodes`?"
    )


def test_a_list_index_must_exist():
    assert messages(FEDERATION, ["edges.9.delay=1"]).startswith(
        "--set:1:7: error: `edges` is a list of 9 entries; `9` is not one of its indices"
    )


@pytest.mark.parametrize("text", ["nodes.body.width", "=64", "nodes..width=64"])
def test_an_override_that_is_not_path_equals_value_is_a_usage_error(text: str):
    with pytest.raises(OverrideSyntaxError):
        parse_override(text)
    result = runner.invoke(app, ["validate", str(TRANSFORMER), "--set", text])
    assert result.exit_code == 2 and result.stderr.startswith("epicycle: --set"), result.output


def test_the_commands_take_a_repeatable_set():
    ok = runner.invoke(
        app, ["validate", str(TRANSFORMER), "--set", "nodes.body.width=64", "--set", "seed=3"]
    )
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["compile", str(TRANSFORMER), "--set", "nodes.body.width=wide"])
    assert bad.exit_code == 1 and bad.stderr.startswith("--set:1:18: error: "), bad.output


# --------------------------------------------------------------------------- the effective spec


@pytest.mark.parametrize(
    ("spec", "overrides"),
    [
        (TRANSFORMER, ["nodes.body.width=64", "name='1e30'", "defaults.transformer.dropout=0.25"]),
        (FEDERATION, ["edges.8.delay=2", "edges.0.ratio=13.368"]),
        (COMPONENTS, ["nodes.window.attention.window=8"]),
    ],
)
def test_the_effective_text_validates_to_the_same_spec(spec: Path, overrides: list[str]):
    loaded = load_spec(spec, overrides)
    again = load_spec_text(loaded.text, "effective.yaml")
    assert again.spec == loaded.spec
    assert analyze(again).facts.parameters == analyze(loaded).facts.parameters
    assert loaded.overrides == tuple(overrides)
    assert loaded.text.startswith(f"# the effective spec: {spec} with --set")


def test_without_overrides_the_text_is_the_files_own():
    assert load_spec(TRANSFORMER).text == TRANSFORMER.read_text()


def test_a_checkpoint_stores_the_effective_spec(tmp_path: Path):
    from compiler.pipeline import build_model
    from compiler.tools.checkpoint import read_checkpoint_spec, save_checkpoint

    overrides = ["nodes.body.width=32", "nodes.body.layers=1"]
    model = build_model(TRANSFORMER, overrides=overrides, budget=0)
    text, header = read_checkpoint_spec(save_checkpoint(model, tmp_path / "run"))
    assert load_spec_text(text).spec == load_spec(TRANSFORMER, overrides).spec
    assert header["spec_sha256"] == load_spec(TRANSFORMER, overrides).digest
