"""Capabilities instead of special cases: every kind, component and perspective says what it can
take part in, and what a spec asks beyond that is refused with a located error, up front."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

import compiler
from compiler.language.kinds import KINDS
from compiler.passes.check_capabilities import model_capabilities
from compiler.tools import interop
from compiler.tools.cli import app

ROTATED = """
spec: 1
name: rotated
inputs:
  tokens: {kind: tokens, vocab: 40, context: 32}
perspectives:
  sky: {kind: rotation}
nodes:
  a: {kind: gear, width: 32, heads: 2, layers: 1, teeth: 20, perspective: sky}
  b: {kind: gear, width: 32, heads: 2, layers: 1, teeth: 40}
edges:
  - {from: a, to: b, kind: mesh}
outputs:
  logits: {from: b, kind: lm_head}
"""

EQUILIBRIUM = """
spec: 1
name: loop
inputs:
  tokens: {kind: tokens, vocab: 40, context: 32}
nodes:
  a: {kind: transformer, width: 32, heads: 2, layers: 1}
edges:
  - {from: a, to: a, delay: 1}
feedback: {steps: 8, mode: equilibrium, lipschitz: 0.8}
outputs:
  logits: {from: a, kind: lm_head}
"""


def test_every_kind_declares_its_capabilities():
    for node_kind in KINDS:
        assert node_kind.capabilities.supported(), node_kind.name
    assert not KINDS.get("fractal").capabilities.receives_messages
    assert not KINDS.get("companion").capabilities.sends_messages


def test_a_rotation_perspective_rules_out_onnx_and_says_where(write_spec):
    ir = compiler.analyze(write_spec(ROTATED))
    limits = model_capabilities(ir)
    assert [limit.path for limit in limits["onnx"]] == [("perspectives", "sky", "kind")]
    assert limits["export"] == [] and limits["fullgraph"] == []


def test_equilibrium_feedback_rules_out_export_fullgraph_cuda_graphs_and_fsdp(write_spec):
    limits = model_capabilities(compiler.analyze(write_spec(EQUILIBRIUM)))
    for capability in ("onnx", "export", "fullgraph", "cuda_graphs"):
        assert [limit.path for limit in limits[capability]] == [("feedback", "mode")]
    assert [limit.path for limit in limits["fsdp"]] == [("feedback", "lipschitz")]


def test_export_refuses_an_unsupported_operator_before_the_exporter_starts(
    write_spec, tmp_path, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("the exporter must not start")

    monkeypatch.setattr(interop, "export_onnx", never)
    spec = write_spec(ROTATED)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["export", str(spec), "-o", str(tmp_path / "m.onnx")])
    assert time.perf_counter() - start < 30  # not minutes (the exporter took 6.4 min)
    assert result.exit_code == 1
    assert f"{spec}:6:15: error: cannot export to ONNX: perspective `sky` is a rotation" in (
        result.output
    )
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_is_asked_the_same_before_export(write_spec, tmp_path, monkeypatch):
    monkeypatch.setattr(interop, "save_program", lambda *a, **k: pytest.fail("exporter started"))
    spec = write_spec(EQUILIBRIUM)
    run = tmp_path / "ckpt"
    assert CliRunner().invoke(app, ["compile", str(spec), "--out", str(run)]).exit_code == 0
    result = CliRunner().invoke(app, ["export", str(run), "-o", str(tmp_path / "m.pt2")])
    assert result.exit_code == 1
    assert "cannot export with torch.export: equilibrium feedback stops" in result.output
    assert "(its spec):" in result.output


@pytest.mark.parametrize("spec", ["transformer.yaml", "antikythera.yaml", "fractalformer.yaml"])
def test_the_gallery_exports_where_nothing_rules_it_out(spec):
    from tests.conftest import ROOT

    limits = model_capabilities(compiler.analyze(ROOT / "specs" / spec))
    assert limits["export"] == []


def test_compile_says_what_the_model_supports_and_what_rules_the_rest_out(write_spec):
    result = CliRunner().invoke(app, ["compile", str(write_spec(ROTATED)), "--no-smoke"])
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split()[result.output.split().index("supports:") :])
    assert line.startswith("supports: export, fullgraph, fsdp; not onnx (perspective")


def test_training_under_cuda_graphs_is_refused_where_a_rotation_rules_them_out(
    write_spec, tmp_path
):
    """`reduce-overhead` records CUDA graphs; the rotation's matrix exponential syncs the host
    inside the step, so the spec is refused at its perspective before a weight is built."""
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", str(write_spec(ROTATED)), "--compile", "--compile-mode", "reduce-overhead",
         "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "6:15: error: cannot train with --compile-mode reduce-overhead (CUDA graphs): " in (
        result.output
    )
    assert "use --compile-mode default or max-autotune-no-cudagraphs" in result.output
    assert not out.exists()
