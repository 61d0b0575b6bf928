"""The benchmark suite runs end to end in its small CPU mode and writes its JSON (figures come from GPU runs)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from run_all import SCRIPTS as NAMES  # noqa: E402  every script the driver runs


def test_the_suite_runs_in_smoke_mode(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run_all.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == set(NAMES)
    for name in NAMES:
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["machine"]["torch"] and result["rows"]
        assert all(
            isinstance(v, (int, float))
            for row in result["rows"]
            for v in row.values()
            if not isinstance(v, str) and v is not None
        )
