"""`examples/equilibrium_loop_helps.py --quick` runs end to end and writes every arm it compares."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT, python_path


def test_the_loop_helps_example_writes_every_arm_at_equal_steps_and_equal_time(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "equilibrium_loop_helps.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": python_path()},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "equilibrium_loop_helps.json").read_text())
    assert payload["arms"] == ["no_loop", "lipschitz", "jacobian"]
    (seed,) = payload["results"].values()
    assert set(seed) == {"no_loop", "lipschitz", "jacobian"}
    parameters = {arm: seed[arm]["parameters"] for arm in seed}
    assert len(set(parameters.values())) == 1, parameters  # the feedback edge adds no weights
    for result in seed.values():
        for table in ("equal_steps", "equal_time"):
            assert 0 <= result[table]["token_accuracy"] <= 1
        assert result["equal_time"]["steps"] >= result["equal_steps"]["steps"]
    for arm in ("lipschitz", "jacobian"):
        budgets = seed[arm]["eval_iterations"]
        assert list(budgets) == ["1", "2", "8"]
        assert budgets["1"]["eval_solver_iterations"] == 1  # the field reached the solver
        assert seed[arm]["equal_steps"]["forward_iterations_median"] >= 1
    table = (tmp_path / "equilibrium_loop_helps.md").read_text()
    assert "| equal steps | no_loop | lipschitz | jacobian |" in table
    assert "| equal wall time |" in table
