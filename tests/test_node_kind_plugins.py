"""A node kind defined outside the project plugs in without editing any of its files.

`tests/plugins/feedforward_kind.py` is such a kind, a stack of token-wise MLPs: registered through
the `@kind` decorator in this process, and through the `epicycle.kinds` entry point of a
throwaway installed package in a fresh one. A spec using it validates, compiles, trains, draws,
is listed by `epicycle kinds` and is described by the JSON Schema and the spec reference.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import compiler
from compiler.language.kinds import KINDS
from compiler.tools.cli import app
from tests.conftest import ROOT

SPEC = """
spec: 1
name: mlp_only
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  mixer: {kind: feedforward, width: 16, layers: 2}
  body: {kind: transformer, width: 16, heads: 2, layers: 1}
edges:
  - {from: mixer, to: body}
outputs:
  logits: {from: [mixer, body], kind: lm_head}
train:
  steps: 4
  batch: 2
  eval_every: 2
"""


@pytest.fixture
def feedforward():
    """The plugin registered through its decorator, and unregistered afterwards."""
    sys.modules.pop("tests.plugins.feedforward_kind", None)
    module = importlib.import_module("tests.plugins.feedforward_kind")
    yield module
    KINDS.remove("feedforward")
    sys.modules.pop("tests.plugins.feedforward_kind", None)


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_a_spec_using_a_registered_kind_validates_compiles_and_runs(feedforward, write_spec):
    spec = write_spec(SPEC)
    ir = compiler.analyze(spec)
    assert ir.graph.nodes["nodes.mixer"]["config"] == feedforward.FeedForwardConfig(16, 2)
    model = compiler.build_model(spec)
    assert isinstance(model.node("mixer").module, feedforward.FeedForwardStack)
    logits = model(torch.randint(0, 70, (2, 8)))["logits"]
    assert logits.shape == (2, 8, 70)
    # what its module reports joins the model's report, which training logs
    assert model.report()["nodes"]["mixer"]["module"] == {"blocks": 2}
    # the estimate counts the plugin's own modules
    assert ir.facts.estimates["mixer"]["parameters"] == 2 * (16 * 32 + 32 * 16)
    result = cli("compile", spec)
    assert result.exit_code == 0, result.output
    assert "feedforward" in result.output


def test_the_kinds_own_check_reports_a_located_error(feedforward, spec_errors):
    errors = spec_errors(SPEC.replace("width: 16, layers: 2", "width: 15, layers: 2"))
    assert "spec.yaml:6:37: error: a feedforward node needs an even width" in errors


def test_its_capabilities_are_enforced_at_validate_time(feedforward, spec_errors):
    errors = spec_errors(SPEC.replace("{from: mixer, to: body}", "{from: body, to: mixer}"))
    assert "`mixer` is a `feedforward` node, which cannot receive messages" in errors


def test_it_trains_draws_and_is_listed(feedforward, write_spec, text, tmp_path):
    spec = write_spec(SPEC)
    run = tmp_path / "run"
    result = cli("train", spec, "--data", text, "--out", run)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records)
    page = tmp_path / "mlp.svg"
    assert cli("viz", spec, "-o", page).exit_code == 0
    drawing = page.read_text()
    assert "mixer" in drawing and "MLP blocks" in drawing and "#805ad5" in drawing
    listed = cli("kinds")
    assert listed.exit_code == 0 and "feedforward" in listed.output
    schema = compiler.json_schema()
    assert "FeedForwardSpec" in schema["$defs"]
    mapping = schema["$defs"]["Node"]["discriminator"]["mapping"]
    assert mapping["feedforward"] == "#/$defs/FeedForwardSpec"


def test_the_kind_is_unknown_once_unregistered(spec_errors, feedforward):
    KINDS.remove("feedforward")
    errors = spec_errors(SPEC)
    assert "unknown kind `feedforward` in `nodes.mixer`" in errors


def test_an_installed_package_registers_its_kind_through_the_entry_point(tmp_path, write_spec):
    """A throwaway distribution on the path: its `entry_points.txt` names the plugin module's
    `register` function under `epicycle.kinds`, as `pip install` of such a package would."""
    site = tmp_path / "site"
    package = site / "throwaway_kinds"
    package.mkdir(parents=True)
    source = (ROOT / "tests" / "plugins" / "feedforward_kind.py").read_text()
    (package / "__init__.py").write_text(source)
    info = site / "throwaway_kinds-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-kinds\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[epicycle.kinds]\nfeedforward = throwaway_kinds:register\n"
    )
    spec = write_spec(SPEC)
    inherited = os.environ.get("PYTHONPATH", "")
    path = os.pathsep.join(entry for entry in (str(site), str(ROOT), inherited) if entry)
    env = {**os.environ, "PYTHONPATH": path}
    script = textwrap.dedent(
        """
        import sys
        from compiler.tools.cli import main
        sys.argv = ["epicycle", *sys.argv[1:]]
        main()
        """
    )

    def epicycle(*args):
        return subprocess.run(
            [sys.executable, "-c", script, *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    listed = epicycle("kinds")
    assert listed.returncode == 0, listed.stderr
    assert "feedforward" in listed.stdout
    validated = epicycle("validate", spec)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert "ok" in validated.stdout


def test_a_kind_that_does_not_say_how_it_is_built_and_counted_is_refused_at_registration():
    from typing import Literal

    from compiler.language.kinds import KindRegistry, NodeKind
    from compiler.language.spec import SpecModel

    class HalfSpec(SpecModel):
        """A kind that forgot its hooks."""

        kind: Literal["half"]

    class Half(NodeKind):
        Spec = HalfSpec

        def plan(self, ir, vertex): ...

    with pytest.raises(TypeError, match="must define build, flops_per_token, parameters"):
        KindRegistry().add(Half)
