"""The `epicycle` command: exit codes, located messages on stderr, tables, weights on disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

import compiler
from compiler.tools.checkpoint import load_checkpoint, save_checkpoint
from compiler.tools.cli import app
from tests.conftest import GALLERY, ROOT, TINY

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_validate_accepts_the_whole_gallery():
    result = run("validate", *map(str, GALLERY))
    assert result.exit_code == 0, result.output
    assert result.stdout.count(": ok (") == len(GALLERY)


def test_validate_exits_1_and_prints_compiler_style_messages(write_spec):
    good = write_spec(TINY, "good.yaml")
    bad = write_spec(TINY.replace("width: 32", "width: wide"), "bad.yaml")
    result = run("validate", str(good), str(bad))
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"{bad}:6:36: error: `width` must be a whole number, got a string ('wide')\n"
    )
    assert f"{good}: ok" in result.stdout


def test_usage_errors_exit_2():
    assert run("validate").exit_code == 2
    assert run("compile", "a.yaml", "--tokens", "0").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_help_is_everywhere():
    for command in ([], ["validate"], ["compile"], ["schema"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_compile_prints_the_node_table_and_runs_a_smoke_forward():
    result = run("compile", str(ROOT / "specs" / "federation.yaml"))
    assert result.exit_code == 0, result.output
    for expected in (
        "sun",
        "moon",
        "dial",
        "#1 x4",
        "FLOPs/token",
        "smoke forward: logits (2, 16, 84)",
    ):
        assert expected in result.stdout


def test_compile_writes_safetensors_that_load_back_exactly(tmp_path):
    result = run("compile", str(ROOT / "specs" / "federation.yaml"), "--out", str(tmp_path / "ck"))
    assert result.exit_code == 0, result.output
    model = compiler.build_model(ROOT / "specs" / "federation.yaml")
    loaded = load_checkpoint(tmp_path / "ck")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert (tmp_path / "ck" / "spec.yaml").read_text() == (
        ROOT / "specs" / "federation.yaml"
    ).read_text()


def test_a_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    model = compiler.build_model(ROOT / "specs" / "transformer.yaml")
    path = save_checkpoint(model, tmp_path / "ck")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(compiler.SpecError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ck")
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(compiler.SpecError, match="carries no epicycle spec"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    with pytest.raises(compiler.SpecError, match="no checkpoint here"):
        load_checkpoint(tmp_path / "nowhere")


def test_schema_is_json_for_editors(tmp_path):
    result = run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert run("schema", "--out", str(tmp_path / "s.json")).exit_code == 0
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_the_shipped_schema_file_is_current():
    shipped = json.loads((ROOT / "schema" / "epicycle.schema.json").read_text())
    assert shipped == compiler.json_schema(), (
        "regenerate with: epicycle schema -o schema/epicycle.schema.json"
    )


def test_the_real_command_end_to_end(write_spec):
    bad = write_spec(TINY.replace("vocab: 17", "vocab: 17, vocab: 18"))
    proc = subprocess.run(
        [sys.executable, "-m", "compiler.tools.cli", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "duplicate key `vocab`" in proc.stderr and "Traceback" not in proc.stderr


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"epicycle {version('epicycle')}\n"


def test_compile_level_index_prints_the_sub_models_own_table():
    result = run(
        "compile", str(ROOT / "specs" / "fractalformer.yaml"), "--level", "1", "--index", "1"
    )
    assert result.exit_code == 0, result.output
    assert "sub-model (1, 1) of lm in fractalformer" in result.stdout
    assert "FLOPs/token" not in result.stdout  # the full model's table is not printed
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if "│" in line}
    assert rows["lm"].split("│")[2].strip() == "64"  # width 128 split in 2
    # as many parameters as the standalone transformer copied out of that sub-model
    fractal = compiler.build_model(ROOT / "specs" / "fractalformer.yaml").node("lm").fractal
    standalone = sum(p.numel() for p in fractal.fractal.extract(1, 1).parameters())
    assert rows["lm"].split("│")[-2].strip() == f"{standalone / 1000:.2f}K"
    assert "inputs.tokens" in rows and "outputs.logits (tied)" in rows
    assert "smoke forward: logits (2, 16, 84)" in result.stdout
