"""Golden tests for malformed specs: every `tests/bad_specs/X.yaml` must make `epicycle validate`
exit 1 and print exactly `tests/bad_specs/X.expected` on stderr (no traceback, nothing on stdout).

Each spec holds one mistake, except `all_errors_*`, which hold several independent ones (all are
reported in one run) or one that used to be reported several times (it is reported once). The goldens were read line by line before being accepted: a message
must point at the line that is wrong, say what is wrong in the spec's own words and, where there
is something to do, say what to do.

The validation runs in-process through typer's CliRunner (the same code path as the command, and
the same text byte for byte); one test runs the real `epicycle` executable to prove it end to end.

Regenerate the goldens after an intended change to a message, then review the diff:

    EPICYCLE_UPDATE_GOLDEN=1 python -m pytest tests/test_bad_specs.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compiler.tools.cli import app

ROOT = Path(__file__).resolve().parent.parent
BAD_SPECS = ROOT / "tests" / "bad_specs"
CASES = sorted(BAD_SPECS.glob("*.yaml"))
UPDATE = os.environ.get("EPICYCLE_UPDATE_GOLDEN") == "1"
TIME_LIMIT_S = 2.0
SPEC_FILE_HINT = "pass a spec's .yaml file (a spec describes a topology, in at most 4 MiB)"

# `FILE:LINE:COL: error: MESSAGE`, optionally followed by `  help: ...`
DIAGNOSTIC = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?:error|warning): \S.*$")
HELP = re.compile(r"^  help: \S.*$")

runner = CliRunner()


def _relative(path: Path) -> str:
    """The path as a user types it from the repository root: the goldens quote it."""
    return path.relative_to(ROOT).as_posix()


def _assert_well_formed(stderr: str, file: str) -> None:
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    assert stderr.endswith("\n"), repr(stderr)
    lines = stderr.splitlines()
    assert lines and DIAGNOSTIC.match(lines[0]), stderr
    for line in lines:
        match = DIAGNOSTIC.match(line)
        assert match or HELP.match(line), f"not a diagnostic or help line: {line!r}"
        if match:
            assert match["file"] == file, line
            assert int(match["line"]) >= 1 and int(match["col"]) >= 1, line
    assert any(": error: " in line for line in lines), stderr


def _validate_in_process(file: str):
    start = time.perf_counter()
    result = runner.invoke(app, ["validate", file])
    return result, time.perf_counter() - start


def _epicycle() -> list[str]:
    exe = shutil.which("epicycle")
    return [exe] if exe else [sys.executable, "-m", "compiler.tools.cli"]


def _validate_subprocess(file: str | Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run(
        [*_epicycle(), "validate", str(file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if k != "EPICYCLE_DEBUG"},
    )
    return done, time.perf_counter() - start


# --------------------------------------------------------------------------- the goldens


def test_there_are_enough_cases_and_every_golden_has_its_spec():
    assert len(CASES) >= 45
    orphans = [p.name for p in BAD_SPECS.glob("*.expected") if not p.with_suffix(".yaml").exists()]
    assert not orphans, f"goldens without a spec: {orphans}"


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_bad_spec_matches_its_golden(case: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("EPICYCLE_DEBUG", raising=False)
    file = _relative(case)
    result, elapsed = _validate_in_process(file)

    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert result.exit_code == 1, result.output
    assert result.stdout == "", result.stdout
    _assert_well_formed(result.stderr, file)
    assert elapsed < TIME_LIMIT_S, f"{file} took {elapsed:.2f} s"

    golden = case.with_suffix(".expected")
    if UPDATE:
        golden.write_text(result.stderr, encoding="utf-8", newline="\n")
    assert golden.exists(), (
        f"no golden {golden.name}: run EPICYCLE_UPDATE_GOLDEN=1 pytest {__file__}"
    )
    assert result.stderr == golden.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("stem", ["unknown_node_key", "two_cycle_no_delay", "python_tag"])
def test_the_real_command_prints_the_golden_and_exits_1(stem: str):
    case = BAD_SPECS / f"{stem}.yaml"
    done, elapsed = _validate_subprocess(_relative(case))
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert done.stderr == case.with_suffix(".expected").read_text(encoding="utf-8")
    assert elapsed < TIME_LIMIT_S, f"{stem} took {elapsed:.2f} s"


def _binary(path: Path) -> str:
    path.write_bytes(b"spec: 1\nname: bin\x00\x01\x02\xff\n")
    return ":2:10: error: this is a binary file (it contains a NUL byte), not a YAML spec\n"


def _latin1(path: Path) -> str:
    path.write_bytes("spec: 1\nname: café\n".encode("latin-1"))
    return ":2:10: error: the file is not UTF-8"


def _deep(path: Path) -> str:
    depth = 20_000
    path.write_text(f"spec: 1\nname: deep\nseed: {'[' * depth}{']' * depth}\n", encoding="utf-8")
    # the spec's own mapping is level 1, so the 64th `[` (column 7 + 63) is the 65th level
    return ":3:70: error: nesting deeper than 64 levels\n"


@pytest.mark.parametrize("make", [_binary, _latin1, _deep], ids=["nul_bytes", "latin1", "deep"])
def test_files_that_are_not_yaml_specs_get_one_located_error(make, tmp_path: Path):
    path = tmp_path / "spec.yaml"
    expected = make(path)
    done, elapsed = _validate_subprocess(path)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    _assert_well_formed(done.stderr, str(path))
    assert done.stderr.startswith(str(path) + expected), done.stderr
    assert len(done.stderr.splitlines()) == 2 and done.stderr.splitlines()[1].startswith("  help: ")
    assert elapsed < TIME_LIMIT_S, f"{make.__name__} took {elapsed:.2f} s"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.yaml", "no such spec file"),
        (lambda tmp: tmp, "the spec file path is a directory, not a regular file"),
    ],
    ids=["missing_file", "directory"],
)
def test_paths_that_are_not_files_are_reported_at_1_1(make, message, tmp_path: Path):
    path = make(tmp_path)
    result, _ = _validate_in_process(str(path))
    assert result.exit_code == 1, result.output
    assert result.stderr == f"{path}:1:1: error: {message}\n  help: {SPEC_FILE_HINT}\n"
