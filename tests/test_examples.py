"""The examples run end to end in their quick mode (the full runs and their figures are in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def run_example(script: str, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--quick", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_antikythera_sky_quick(tmp_path):
    """The mechanism, made recurrent and not, against a plain transformer and an MLP."""
    pytest.importorskip("ephem", reason="the sky example needs `ephem` (pip install -e '.[dev]')")
    out = tmp_path / "sky.json"
    run_example("antikythera_sky.py", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    recurrent = "recurrent federation (antikythera_recurrent.yaml)"
    assert set(results) == {
        "gear federation (antikythera.yaml)",
        recurrent,
        "plain transformer",
        "MLP",
    }
    sizes = [r["parameters"] for r in results.values()]
    assert max(sizes) / min(sizes) < 1.1  # the baselines are sized like the federation
    for r in results.values():
        assert all(0 <= e <= 180 for e in r["test_error_deg"].values())
    assert all(0 <= e <= 180 for e in results[recurrent]["test_streamed_error_deg"].values())


def test_fractal_shakespeare_quick(tmp_path):
    """The FractalFormer example on a small corpus (the real one lies outside the repository)."""
    corpus = tmp_path / "corpus.txt"
    lines = [
        "To be, or not to be, that is the question:",
        "Whether 'tis nobler in the mind to suffer",
    ]
    corpus.write_text("\n".join(lines * 800))
    out = tmp_path / "fractal.json"
    run_example(
        "fractal_shakespeare.py",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--level-batch",
        "shared,split",
    )
    levels = json.loads(out.read_text())["levels"]
    assert [(r["level"], r["sub_models"], r["width"]) for r in levels] == [
        (0, 1, 128),
        (1, 2, 64),
        (2, 4, 32),
    ]
    for r in levels:
        for mode in ("shared", "split"):
            assert len(r[f"fractal_{mode}_each"]) == r["sub_models"]
            assert 0 < r[f"fractal_{mode}_best"] <= r[f"fractal_{mode}_mean"] < 10
        assert 0 < r["plain"] < 10


def test_lattice_oscillators_quick(tmp_path):
    pytest.importorskip("matplotlib", reason="the lattice example plots with matplotlib")
    run_example("lattice_oscillators.py", "--out", str(tmp_path))
    results = json.loads((tmp_path / "lattice_oscillators.json").read_text())["results"]
    assert set(results) == {"periodic", "hierarchical", "random"}
    for result in results.values():
        for record in result["history"]:
            for layer in record["layers"].values():
                assert 0 <= layer["order_parameter"] <= 1 and layer["attention_entropy"] >= 0
    for png in ("lattice_sync.png", "lattice_phases.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_equilibrium_bound_quick(tmp_path, text):
    run_example("equilibrium_bound.py", "--data", str(text), "--out", str(tmp_path))
    results = json.loads((tmp_path / "equilibrium_bound.json").read_text())["results"]
    assert set(results) == {"bounded", "unbounded", "no_loop"}
    bounded = results["bounded"]
    assert bounded["forward_converged"] == bounded["backward_converged"] == 1.0
    assert all(s["lipschitz"] <= 0.8 for s in bounded["per_step"])
    assert results["unbounded"]["final_gain"] == 1.0
