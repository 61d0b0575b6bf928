"""`epicycle viz --lattice RUN` over training: the phase-wave animation (a GIF, one frame per logged
step) and the per-head histories, read from the per-head values training logs from
`model.report()`; and the delimiter wave the copy-reverse example draws."""

from __future__ import annotations

import json
import math

import pytest
import torch

import compiler
from compiler.tools.viz.lattice import head_histories, phase_term_wave, read_metrics
from tests.test_viz import TINY_LATTICE, run


@pytest.fixture
def trained_run(tmp_path):
    """A checkpoint and a metrics.jsonl as training writes them: `lattice` per step, from
    `model.report()`, named `NODE.LAYER`, while the phases move."""
    from compiler.tools.checkpoint import save_checkpoint

    model = compiler.build_model(compiler.load_spec_text(TINY_LATTICE))
    directory = tmp_path / "run"
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 10):
            with torch.no_grad():
                for module in model.modules():
                    if hasattr(module, "initial_phase"):
                        module.initial_phase.add_(0.3)
            entry = model.report()["nodes"]["body"]["lattice"]
            lattice = {f"body.{layer}": values for layer, values in entry.items()}
            f.write(json.dumps({"step": step, "loss": 2.0, "lattice": lattice}) + "\n")
    save_checkpoint(model, directory)
    (tmp_path / "metrics.jsonl").rename(directory / "metrics.jsonl")
    return directory


def test_viz_lattice_animates_the_phases_over_training(trained_run):
    pytest.importorskip("matplotlib", reason="the lattice plots use matplotlib")
    from PIL import Image

    result = run("viz", "--lattice", str(trained_run))
    assert result.exit_code == 0, result.output
    assert f"wrote {trained_run / 'lattice_phases.gif'}" in result.stdout
    with Image.open(trained_run / "lattice_phases.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 5  # one frame per logged step
    with Image.open(trained_run / "lattice_heads.png") as png:
        assert png.format == "PNG" and png.width > 300
    histories = head_histories(read_metrics(trained_run / "metrics.jsonl"))
    assert list(histories) == ["body.blocks.0.attn.lattice", "body.blocks.1.attn.lattice"]
    for history in histories.values():
        assert history.steps == (0, 10, 20, 30, 40)
        assert {"phase", "coupling_force"} <= set(history.values)
        assert all(len(row) == 4 for row in history.values["phase"])


def test_viz_lattice_says_why_there_is_no_animation(trained_run):
    """Metrics without per-head values (written before the report had them): the other plots,
    and a note."""
    pytest.importorskip("matplotlib", reason="the lattice plots use matplotlib")
    metrics = trained_run / "metrics.jsonl"
    records = read_metrics(metrics)
    for record in records:
        for values in record["lattice"].values():
            del values["heads"]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run("viz", "--lattice", str(trained_run))
    assert result.exit_code == 0, result.output
    assert (trained_run / "lattice_order.png").exists()
    assert not (trained_run / "lattice_phases.gif").exists()
    assert "no phase animation" in result.stderr and "per-head phases" in result.stderr


def test_the_delimiter_wave_is_each_heads_phase_term_from_the_delimiter():
    waves = phase_term_wave([0.5, -1.0], [1.0, 2.0], [1.5, 0.5], 0.1, query=4)
    assert [len(w) for w in waves] == [5, 5]  # causal: keys 0..4
    assert waves[0][4] == pytest.approx(1.5 * math.cos(0.5))  # the delimiter itself: offset 0
    assert waves[1][0] == pytest.approx(0.5 * math.cos(-1.0 + 0.1 * 2.0 * 4))
