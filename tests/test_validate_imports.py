"""`epicycle validate` checks and counts a spec without torch: importing torch and torch-geometric
costs seconds, and validating needs neither (the counts are closed-form, `compiler.counting`).
The speed itself is measured in benchmarks/compile_latency.py; this holds the cause of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import GALLERY, ROOT, python_path

VALIDATE_AND_LIST_MODULES = """
import json, sys
from compiler.tools.cli import main
sys.argv = ["epicycle", "validate", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torch_geometric"))
print(json.dumps({"exit": code, "heavy": heavy}))
"""


def test_validating_every_gallery_spec_imports_neither_torch_nor_torch_geometric():
    proc = subprocess.run(
        [sys.executable, "-c", VALIDATE_AND_LIST_MODULES, *map(str, GALLERY)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": python_path()},
        timeout=60,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"exit": 0, "heavy": []}, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok (") == len(GALLERY)
