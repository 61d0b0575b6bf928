"""`epicycle train` on a spec with a time axis: truncated backpropagation through time.

    time: {}
    train:
      tbptt: {chunk: 2}     # time steps per chunk; default: the whole sequence

The data are arrays `(examples, time, tokens[, width])`. A batch of sequences is cut into chunks;
each chunk is one training step (one optimizer step): `model.scan` runs it from the state the
previous chunk left, its per-step outputs are scored, the state is detached and carried on.
Validation runs the whole sequence forward."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import compiler
from compiler.tools.cli import app
from compiler.tools.training.objective import training_loss_class, training_task
from compiler.tools.training.tbptt import Chunks
from tests.test_time import TWO_NODES

ORBIT = (
    TWO_NODES
    + """\
train:
  steps: 6
  batch: 2
  eval_every: 3
  tbptt: {chunk: 2}
"""
)


def cli(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def sequences(path, examples=20, steps=6, tokens=3, **shapes):
    """An npz of `examples` sequences of `steps` time steps; `shapes` replaces an array's shape."""
    generator = np.random.default_rng(0)
    date = shapes.get("date", (examples, steps, tokens, 3))
    longitude = shapes.get("longitude", (examples, steps, tokens, 2))
    np.savez(
        path,
        date=generator.normal(size=date).astype(np.float32),
        longitude=generator.normal(size=longitude).astype(np.float32),
    )
    return path


def test_a_time_spec_trains_one_optimizer_step_per_chunk(write_spec, tmp_path):
    data = sequences(tmp_path / "orbit.npz")  # 6 steps, chunks of 2: 3 training steps a sequence
    result = cli(write_spec(ORBIT), "--data", data, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [3, 6]
    for record in records:
        assert np.isfinite(record["loss"]) and np.isfinite(record["val_loss"])
        assert record["tokens_per_s"] > 0
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.fixture
def orbit(write_spec):
    ir = compiler.analyze(write_spec(ORBIT))
    torch.manual_seed(0)
    model = compiler.build_model(ir)
    objective = training_loss_class()(model, training_task(ir))
    date = torch.randn(2, 6, 3, 3, requires_grad=True)
    longitude = torch.randn(2, 6, 3, 2)
    chunks = Chunks(lambda index: ({"date": date}, {"longitude": longitude}), steps=6, length=2)
    return model, objective, chunks, date


def train_chunk(objective, chunks, model, step):
    inputs, targets, state = chunks.at(step, model)
    total, _, state = objective(inputs, targets, step, state)
    chunks.carry(step, state)
    return total


def test_the_gradient_stops_at_the_chunk_boundary(orbit):
    model, objective, chunks, date = orbit
    train_chunk(objective, chunks, model, 0)  # chunk 1: time steps 0, 1
    date.grad = None
    train_chunk(objective, chunks, model, 1).backward()  # chunk 2: time steps 2, 3
    per_step = date.grad.abs().sum(dim=(0, 2, 3))
    assert (per_step[:2] == 0).all()  # the carried state is detached
    assert (per_step[2:4] > 0).all()
    assert (per_step[4:] == 0).all()


def test_the_state_is_carried_from_chunk_to_chunk(orbit):
    model, objective, chunks, date = orbit
    with torch.no_grad():
        whole = model(date=date)["longitude"]
        inputs, _, state = chunks.at(0, model)
        state, _ = model.scan(state, **inputs)
        chunks.carry(0, state)
        inputs, _, carried = chunks.at(1, model)
        second = model.scan(carried, **inputs)[1]["longitude"]
        fresh = model.scan(model.init_state(2, 3), **inputs)[1]["longitude"]
    torch.testing.assert_close(second, whole[:, 2:4])
    assert not torch.allclose(second, fresh)


def test_a_walk_resumed_in_mid_sequence_starts_from_the_state_the_checkpoint_carried(orbit):
    model, _, chunks, date = orbit
    with torch.no_grad():
        whole = model(date=date)["longitude"]
        state, _ = model.scan(model.init_state(2, 3), date=date[:, :4])  # the first two chunks
        chunks.restored = state  # as `resume.carried_state` reads it from the checkpoint
        inputs, _, start = chunks.at(2, model)  # a new walk, at the third chunk
        third = model.scan(start, **inputs)[1]["longitude"]
    torch.testing.assert_close(third, whole[:, 4:6])


def test_a_walk_resumed_in_mid_sequence_without_a_carried_state_stops(orbit):
    model, _, chunks, _ = orbit
    with pytest.raises(RuntimeError, match="holds no carried state"):
        chunks.at(2, model)


def test_the_chunk_length_is_bounded(spec_errors):
    message = spec_errors(ORBIT.replace("{chunk: 2}", "{chunk: 0}"))
    assert message == "spec.yaml:20:18: error: `chunk` is 0: it must be at least 1"


def test_tbptt_asks_for_a_time_axis(spec_errors):
    message = spec_errors(
        ORBIT.replace("time: {}\n", "").replace(
            "  - {from: moon, to: sun, kind: feedback, delay: 1}\n", ""
        )
    )
    assert "error: `train.tbptt` cuts a time axis into chunks, and this spec declares none" in (
        message
    )


def test_arrays_without_the_time_axis_are_refused_by_name(write_spec, tmp_path):
    data = sequences(tmp_path / "flat.npz", date=(20, 3, 3), longitude=(20, 3, 2))
    result = cli(write_spec(ORBIT), "--data", data, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 1
    assert (
        f"{data}:1:1: error: array `date` has shape (20, 3, 3); it should be "
        "(examples, time, tokens, 3)"
    ) in result.output
    assert not (tmp_path / "run").exists()


def test_arrays_of_different_time_lengths_are_refused(write_spec, tmp_path):
    data = sequences(tmp_path / "ragged.npz", longitude=(20, 5, 3, 2))
    result = cli(write_spec(ORBIT), "--data", data, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 1
    assert "the arrays have different numbers of time steps: `date` 6, `longitude` 5" in (
        result.output
    )


def test_a_text_cannot_feed_a_time_axis(write_spec, tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("once upon a time\n" * 50)
    spec = ORBIT.replace(
        "{kind: features, width: 3, context: 8}", "{kind: tokens, vocab: 64, context: 8}"
    ).replace("kind: regression, width: 2", "kind: lm_head")
    result = cli(write_spec(spec), "--data", text, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 1
    assert "this spec declares a time axis (`time:`)" in result.output


def test_compile_is_refused_on_a_time_axis(write_spec, tmp_path):
    data = sequences(tmp_path / "orbit.npz")
    result = cli(
        write_spec(ORBIT), "--data", data, "--out", tmp_path / "run", "--device", "cpu", "--compile"
    )
    assert result.exit_code == 2
    assert "--compile: this spec declares a time axis" in result.output


def test_token_sequences_predict_their_next_ids_and_a_class_per_time_step(write_spec, tmp_path):
    spec = (
        ORBIT.replace(
            "{kind: features, width: 3, context: 8}", "{kind: tokens, vocab: 11, context: 8}"
        )
        .replace(
            "longitude: {from: [sun, moon], kind: regression, width: 2}",
            "next: {from: moon, kind: lm_head}\n  phase: {from: sun, kind: classification, classes: 3}",
        )
        .replace("steps: 6", "steps: 2")
        .replace("eval_every: 3", "eval_every: 2")
    )
    generator = np.random.default_rng(0)
    data = tmp_path / "ids.npz"  # ids hold one more token per step: the next ids are predicted
    np.savez(
        data, date=generator.integers(0, 11, (20, 5, 4)), phase=generator.integers(0, 3, (20, 5))
    )
    result = cli(write_spec(spec), "--data", data, "--out", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record["losses"]) == {"next", "phase"} and np.isfinite(record["val_loss"])


def test_a_time_run_stopped_in_mid_sequence_resumes_to_the_uninterrupted_run(write_spec, tmp_path):
    """Stopped after the first chunk of a sequence and resumed, the run rebuilds the carried state
    from the resumed weights and ends where the run that never stopped ends."""
    spec, data = write_spec(ORBIT), sequences(tmp_path / "orbit.npz")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run = ("--data", data, "--device", "cpu", "--log-every", "1")
    assert cli(spec, *run, "--out", whole).exit_code == 0
    first = cli(spec, *run, "--out", parts, "--stop-at", "4")  # chunk 1 of the second batch
    assert first.exit_code == 0, first.output
    second = cli(spec, *run, "--out", parts, "--resume", parts)
    assert second.exit_code == 0, second.output
    ended = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == ended[-1]["step"] == 6
    for step in (5, 6):  # the chunks after the stop, each from the rebuilt state
        assert resumed[step - 1]["loss"] == pytest.approx(ended[step - 1]["loss"], rel=1e-5)
