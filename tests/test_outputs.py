"""Where commands write: one rule for every output path (`compiler/tools/outputs.py`).

Missing parent directories are created; a path of the wrong kind (a file where a directory goes,
a directory where a file goes, a device, `..` after a missing directory) is a usage error, exit 2;
a path the system refuses exits 1; never exit 3. Nothing is created when a command fails, files
are replaced all or nothing, and they get the umask's permissions like any other new file.
Nothing is written outside the requested output either, not even in the temp folder.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compiler.tools.cli import app
from compiler.tools.outputs import (
    OutputError,
    check_directory_output,
    output_directory,
    write_file,
    write_with,
)
from tests.conftest import ROOT, TINY, python_path

runner = CliRunner()
FEDERATION = str(ROOT / "specs" / "federation.yaml")


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def tree(path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_schema_creates_the_missing_parents_of_its_output(tmp_path):
    out = tmp_path / "docs" / "new" / "schema.json"
    result = run("schema", "-o", out)
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8").startswith("{")
    assert tree(tmp_path) == {"docs", "docs/new", "docs/new/schema.json"}  # no staging left


def test_an_output_file_gets_the_mode_the_umask_gives_any_new_file(tmp_path):
    previous = os.umask(0o027)
    try:
        assert run("schema", "-o", tmp_path / "s.json").exit_code == 0
        assert run("compile", FEDERATION, "--no-smoke", "--out", tmp_path / "ck").exit_code == 0
    finally:
        os.umask(previous)
    for written in (tmp_path / "s.json", tmp_path / "ck" / "model.safetensors"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o640, written  # not safetensors' 0600
    assert stat.S_IMODE((tmp_path / "ck" / "spec.yaml").stat().st_mode) == 0o640


def test_dot_dot_after_a_missing_directory_is_refused_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in (
        ["compile", FEDERATION, "--no-smoke", "--out", "nonexist/../run"],
        ["schema", "-o", "nonexist/../s.json"],
    ):
        result = run(*command)
        assert result.exit_code == 2, result.output
        assert "`nonexist` does not exist, so the `..` after it cannot be followed" in result.stderr
        assert "help: write the path without `..`" in result.stderr
    assert tree(tmp_path) == set()


def test_train_out_that_is_an_existing_file_is_a_usage_error(write_spec, tmp_path):
    spec = write_spec(TINY)
    existing = tmp_path / "run"
    existing.write_text("not a directory")
    result = run("train", spec, "--out", existing, "--steps", "1")
    assert result.exit_code == 2, result.output
    assert f"--out {existing}: this is a file" in result.stderr
    assert "help: choose a directory" in result.stderr
    assert existing.read_text() == "not a directory"


def test_export_onto_a_directory_is_refused_before_the_export(tmp_path):
    result = run("export", FEDERATION, "-o", tmp_path, "--format", "pt2")
    assert result.exit_code == 2, result.output
    assert "this is a directory; the option names the file to write" in result.stderr
    assert tree(tmp_path) == set()


def test_a_device_as_output_file_is_refused():
    result = run("schema", "-o", "/dev/null")
    assert result.exit_code == 2, result.output
    assert "--out /dev/null: this is a character device" in result.stderr


def test_a_special_file_system_exits_1_with_what_to_do(write_spec):
    for command in (
        ["schema", "-o", "/proc/epicycle-test/schema.json"],
        ["train", write_spec(TINY), "--out", "/proc/epicycle-test"],  # refused before training
    ):
        result = run(*command)
        assert result.exit_code == 1, result.output
        assert "epicycle: error: --out /proc/epicycle-test" in result.stderr
        assert "cannot write in `/proc`" in result.stderr and "internal error" not in result.output
        assert "help: choose a path on a disk you can write to" in result.stderr
    assert not os.path.exists("/proc/epicycle-test")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_directory_exits_1(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run("compile", FEDERATION, "--no-smoke", "--out", locked / "ck")
    assert result.exit_code == 1, result.output
    assert "permission denied or a read-only file system" in result.stderr


def test_a_file_in_the_middle_of_the_path_is_a_usage_error(tmp_path):
    (tmp_path / "plain").write_text("x")
    result = run("viz", FEDERATION, "-o", tmp_path / "plain" / "g.svg")
    assert result.exit_code == 2, result.output
    assert "is not a directory, so nothing can be written below it" in result.stderr


def test_a_failed_write_leaves_neither_a_file_nor_the_directories_made_for_it(tmp_path):
    target = tmp_path / "a" / "b" / "out.bin"

    def half_then_fail(staged):
        staged.write_bytes(b"half")
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError):
        write_with(target, half_then_fail)
    assert tree(tmp_path) == set()


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.txt"
    write_file(target, "first")

    def full_disk(staged):
        staged.write_text("sec")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device"):
        write_with(target, full_disk)
    assert target.read_text() == "first"
    assert tree(tmp_path) == {"out.txt"}


def test_a_writer_may_add_sibling_files_which_are_renamed_with_it(tmp_path):
    """ONNX writes external weights as `NAME.data` beside a large model: the staged name is the
    final one, so the reference inside the file still holds after the rename."""

    def with_sidecar(staged):
        staged.write_text("model")
        staged.with_name(staged.name + ".data").write_text("weights")

    write_with(tmp_path / "m.onnx", with_sidecar)
    assert tree(tmp_path) == {"m.onnx", "m.onnx.data"}


def test_output_directory_removes_what_it_made_when_the_command_fails(tmp_path):
    with pytest.raises(ValueError), output_directory(tmp_path / "x" / "run"):
        assert (tmp_path / "x" / "run").is_dir()
        raise ValueError("the command failed")
    assert tree(tmp_path) == set()


def test_an_existing_output_directory_is_kept_when_the_command_fails(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError), output_directory(tmp_path / "run"):
        raise ValueError("the command failed")
    assert (tmp_path / "run").is_dir()


def test_output_errors_say_which_option_and_whether_it_is_usage(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError) as caught:
        check_directory_output(tmp_path / "f", "--out")
    assert caught.value.usage and caught.value.option == "--out"


def test_compile_leaves_nothing_in_the_temp_folder(tmp_path):
    """torch-geometric generates a `*_propagate_*.py` module per message-passing class from a
    jinja template into the temp folder, and imports it from there; the message layer keeps it
    from doing so. (torch's own compiler cache directory, created empty on import, is allowed.)"""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": python_path()}
    done = subprocess.run(  # compile validates, builds the message layers and runs them
        [sys.executable, "-m", "compiler.tools.cli", "compile", FEDERATION, "--tokens", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    files = [p for p in temp.rglob("*") if not p.is_dir()]
    assert files == []
    assert {p.name for p in temp.iterdir()} <= {f"torchinductor_{_user()}"}


def _user() -> str:
    import getpass

    return getpass.getuser()


def test_a_name_too_long_for_the_file_system_exits_1_saying_so(tmp_path):
    result = run("compile", FEDERATION, "--no-smoke", "--out", tmp_path / ("a" * 300) / "ck")
    assert result.exit_code == 1, result.output
    assert "File name too long" in result.stderr and "help: shorten the path" in result.stderr


PARTS = ["file", "dir", "fifo", "new", "..", ".", "a" * 300]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PARTS), min_size=1, max_size=4), st.booleans())
def test_every_output_path_is_written_or_refused_and_a_refusal_creates_nothing(parts, as_dir):
    """Any path made of existing files, directories, FIFOs, new names, `..`, `.` and over-long
    names: either the output is written where the path says, or an `OutputError` (never another
    exception) and the tree is as it was."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "file").write_text("old")
        (root / "dir").mkdir()
        os.mkfifo(root / "fifo")
        before = tree(root)
        target = root.joinpath(*parts)
        try:
            if as_dir:
                with output_directory(target):
                    pass
            else:
                write_file(target, "new")
        except OutputError:
            assert tree(root) == before
            assert (root / "file").read_text() == "old"
            return
        if as_dir:
            assert target.is_dir()
        else:
            assert target.read_text() == "new"
