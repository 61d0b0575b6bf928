"""Special files where a spec (or a checkpoint's metrics) is read: a FIFO would block the read
forever and `/dev/zero` never ends, so anything but a regular file is refused before reading,
located at `PATH:1:1` and fast, and no more than the budget is ever read."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from compiler.language.diagnostics import SpecError
from compiler.language.source import MAX_FILE_BYTES, read_spec_file
from compiler.tools.viz.lattice import read_metrics
from tests.conftest import python_path

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def validate(path) -> subprocess.CompletedProcess:
    """The real command in its own process: a hang is a timeout here, not a stuck test run."""
    return subprocess.run(
        [sys.executable, "-m", "compiler.tools.cli", "validate", str(path)],
        env={**os.environ, "PYTHONPATH": python_path()},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fifo_as_spec_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    done = validate(fifo)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"{fifo}:1:1: error: the spec file path is a FIFO (named pipe)")
    assert "Traceback" not in done.stderr


def test_dev_zero_as_spec_is_refused_before_reading():
    start = time.perf_counter()
    with pytest.raises(SpecError) as caught:
        read_spec_file("/dev/zero")
    assert time.perf_counter() - start < 2
    assert "the spec file path is a character device, not a regular file" in str(caught.value)


def test_a_spec_over_the_budget_is_refused_by_its_size(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    with pytest.raises(SpecError, match=f"at most {MAX_FILE_BYTES:,} are read"):
        read_spec_file(big)


def test_a_directory_as_spec_is_refused(tmp_path):
    with pytest.raises(SpecError, match="the spec file path is a directory"):
        read_spec_file(tmp_path)


def test_a_fifo_as_a_checkpoints_metrics_is_refused(tmp_path):
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="the metrics file path is a FIFO"):
        read_metrics(fifo)
