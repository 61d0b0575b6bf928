"""The examples run end to end in their quick mode (the full runs and their figures are in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytest.importorskip("ephem", reason="the sky example needs `ephem` (pip install -e '.[dev]')")


def test_antikythera_sky_quick(tmp_path):
    out = tmp_path / "sky.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "antikythera_sky.py"),
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"gear federation (antikythera.yaml)", "plain transformer", "MLP"}
    sizes = [r["parameters"] for r in results.values()]
    assert max(sizes) / min(sizes) < 1.1  # the baselines are sized like the federation
    for r in results.values():
        assert all(0 <= e <= 180 for e in r["test_error_deg"].values())
