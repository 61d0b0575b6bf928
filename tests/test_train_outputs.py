"""`epicycle train` for every output kind, the loss each is trained with, and how a run runs.

    train:
      losses:
        longitude: {loss: angular}          # (sin, cos) pairs: mean 1 - cos(angle error)
        dials: {loss: huber, delta: 0.5, weight: 0.1}

An output not named in `train.losses` trains with its kind's default at weight 1: cross-entropy for
`lm_head` and `classification`, `mse` for `regression`. The total loss is the sum of `weight *
loss` plus the training terms the spec's parts declare. On a GPU the run is bf16 autocast with
fused AdamW by default (`--device auto --precision auto`); here, on the CPU, fp32.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import compiler
from compiler.tools.checkpoint import load_checkpoint
from compiler.tools.cli import app
from compiler.tools.training.datasets import DataSource, load_training_data
from compiler.tools.training.losses import angular_loss, chunked_cross_entropy
from compiler.tools.training.optimizers import build_optimizer
from compiler.tools.training.ports import ports_of
from tests.conftest import ROOT


def cli(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)])


def records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


CLASSIFIER = """
spec: 1
name: parity
inputs:
  tokens: {kind: tokens, vocab: 12, context: 8}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 1}
outputs:
  label: {from: body, kind: classification, classes: 3}
train:
  steps: 3
  batch: 4
  eval_every: 3
  optimizer: {kind: adamw, lr: 0.01}
"""

REGRESSION = """
spec: 1
name: smoother
inputs:
  signal: {kind: features, width: 3, context: 8}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 1}
outputs:
  level: {from: body, kind: regression, width: 2}
train:
  steps: 3
  batch: 4
  eval_every: 3
  losses:
    level: {loss: huber, delta: 0.5}
"""


def classifier_data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 12, size=(40, 8))
    np.savez(path, tokens=tokens, label=tokens.sum(axis=1) % 3)
    return path


def regression_data(path: Path) -> Path:
    rng = np.random.default_rng(1)
    signal = rng.standard_normal((40, 8, 3)).astype(np.float32)
    np.savez(path, signal=signal, level=np.cumsum(signal[..., :2], axis=1) / 4)
    return path


def test_a_classifier_trains_from_the_command_line(write_spec, tmp_path):
    spec = write_spec(CLASSIFIER)
    data = classifier_data(tmp_path / "parity.npz")
    result = cli(spec, "--data", data, "--out", tmp_path / "run", "--log-every", "1")
    assert result.exit_code == 0, result.output
    lines = records(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert lines[0]["loss"] == pytest.approx(math.log(3), abs=0.5)  # a fresh model guesses
    assert "val_loss" in lines[-1]
    assert (lines[0]["device"], lines[0]["precision"]) == ("cpu", "fp32")
    assert load_checkpoint(tmp_path / "run").spec.name == "parity"


def test_a_regression_output_trains_with_the_loss_its_spec_names(write_spec, tmp_path):
    spec = write_spec(REGRESSION)
    data = regression_data(tmp_path / "levels.npz")
    result = cli(spec, "--data", data, "--out", tmp_path / "run", "--log-every", "1")
    assert result.exit_code == 0, result.output
    first = records(tmp_path / "run")[0]
    # the first step's loss is Huber (delta 0.5) of the fresh model on batch 0
    ir = compiler.analyze(spec)
    batches = load_training_data(DataSource(str(data)), ports_of(ir), val_fraction=0.1)
    inputs, targets = batches.batch("train", 0, 4, seed=0)
    model = compiler.build_model(spec).train()
    torch.manual_seed(0)  # dropout is off; the seed the run starts from
    predicted = model(**inputs)["level"]
    expected = F.huber_loss(predicted, targets["level"], delta=0.5)
    assert first["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert first["auxiliary_loss"] == 0.0


def test_the_mechanism_trains_its_longitudes_with_the_angular_loss(tmp_path):
    """specs/antikythera.yaml on a few synthetic dates: the 7 longitudes as (sin, cos) halves."""
    spec = tmp_path / "antikythera.yaml"
    spec.write_text(
        (ROOT / "specs" / "antikythera.yaml").read_text()
        + "train:\n  steps: 2\n  batch: 2\n  eval_every: 2\n  losses:\n"
        "    longitude: {loss: angular}\n    dials: {weight: 0.1}\n"
    )
    years = np.linspace(1500, 1510, 20 * 4).reshape(20, 4)
    phase = 2 * np.pi * years
    date = np.stack([years / 2000, np.sin(phase), np.cos(phase), years % 19 / 19], axis=-1)
    angles = phase[..., None] * np.array([1, 13.37, 4.15, 1.6, 0.53, 0.084, 0.034])
    longitude = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    dials = np.zeros((20, 4, 10))
    np.savez(tmp_path / "sky.npz", date=date, longitude=longitude, dials=dials)
    result = cli(
        spec, "--data", tmp_path / "sky.npz", "--out", tmp_path / "run", "--log-every", "1",
        "--eval-batches", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = records(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2]
    for line in lines:
        each = line["losses"]
        assert 0 <= each["longitude"] <= 2  # 1 - cos of the angle errors
        assert line["loss"] == pytest.approx(each["longitude"] + 0.1 * each["dials"])
    assert set(lines[-1]["val_losses"]) == {"longitude", "dials"}


# --------------------------------------------------------------------------- the losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 7, None])
def test_the_chunked_cross_entropy_is_f_cross_entropy(dtype, chunk_rows):
    """Value and gradient, in chunks of rows (the last one short); the gradient arrives in the
    logits' dtype, as `F.cross_entropy`'s does through the float32 cast autocast makes."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(30, 50)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (30,))
    ours = chunked_cross_entropy(logits, targets, chunk_rows)
    (ours * 2).backward()
    grad, logits.grad = logits.grad, None
    reference = F.cross_entropy(logits.float(), targets)
    (reference * 2).backward()
    assert ours.dtype == torch.float32
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    assert grad.dtype == dtype
    tolerance = 1e-7 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(grad.float(), logits.grad.float(), rtol=0, atol=tolerance)


def test_the_angular_loss_is_one_minus_the_cosine_of_the_angle_error():
    truth = torch.tensor([0.3, 2.0])
    as_halves = torch.cat([truth.sin(), truth.cos()])  # [sin a1, sin a2, cos a1, cos a2]
    assert float(angular_loss(as_halves * 5, as_halves)) == pytest.approx(0, abs=1e-6)
    assert float(angular_loss(-as_halves, as_halves)) == pytest.approx(2)  # opposite
    off = truth + torch.tensor([0.5, -1.0])
    guess = torch.cat([off.sin(), off.cos()]) * 0.1  # the length does not count
    expected = float((1 - torch.cos(torch.tensor([0.5, -1.0]))).mean())
    assert float(angular_loss(guess, as_halves)) == pytest.approx(expected, rel=1e-5)
    pairs = torch.stack([off.sin(), off.cos()], dim=-1).flatten()  # [sin a1, cos a1, ...]
    truth_pairs = torch.stack([truth.sin(), truth.cos()], dim=-1).flatten()
    assert float(angular_loss(pairs, truth_pairs, "pairs")) == pytest.approx(expected, rel=1e-5)


def test_fused_adamw_keeps_the_spec_optimizers_groups_and_hyper_parameters(write_spec):
    model = compiler.build_model(write_spec(CLASSIFIER))
    plain, _ = build_optimizer(model)
    fused, _ = build_optimizer(model, fused=True)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]  # matrices only
    assert [len(g["params"]) for g in fused.param_groups] == [
        len(g["params"]) for g in plain.param_groups
    ]
    assert fused.param_groups[0]["lr"] == 0.01  # the spec's
    settings = [
        {k: v for k, v in g.items() if k not in ("params", "fused")} for g in plain.param_groups
    ]
    assert [
        {k: g[k] for k in s} for g, s in zip(fused.param_groups, settings, strict=True)
    ] == settings


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("losses", "where", "says"),
    [
        ("lable: {loss: cross_entropy}", ":15:5:", "names `lable`, which is not an output"),
        ("label: {loss: mse}", ":15:19:", "is `kind: classification`, which does not train"),
        ("label: {delta: 2}", ":15:13:", "`delta` is read by the `huber` loss only"),
    ],
)
def test_a_loss_for_a_missing_output_or_of_the_wrong_kind_is_refused(
    write_spec, tmp_path, losses, where, says
):
    spec = write_spec(CLASSIFIER + f"  losses:\n    {losses}\n")
    result = cli(spec, "--data", classifier_data(tmp_path / "d.npz"), "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert f"{spec}{where} error:" in result.stderr and says in result.stderr
    assert "did you mean `label`?" in result.stderr or not losses.startswith("lable")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--device", "gpu"], "unknown device `gpu`: use auto, cpu, cuda, cuda:N or mps"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA GPU"),
        (["--compile", "--compile-mode", "reduce-overhead", "--device", "cpu"], "CUDA graphs"),
    ],
)
def test_a_device_or_precision_this_machine_lacks_is_a_usage_error(
    write_spec, text, tmp_path, option, says
):
    result = cli(write_spec(CLASSIFIER), "--data", text, "--out", tmp_path / "run", *option)
    assert result.exit_code == 2, result.output
    assert says in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="needs a machine without a GPU (it asks for CUDA where there is none)",
)
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_where_there_is_none_says_what_to_use(write_spec, text, tmp_path, device):
    result = cli(
        write_spec(CLASSIFIER), "--data", text, "--out", tmp_path / "run", "--device", device
    )
    assert result.exit_code == 2, result.output
    assert f"--device {device}: " in result.stderr and "use --device cpu (or auto)" in result.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- progress and records

TINY_LM = """
spec: 1
name: tiny
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 1}
outputs:
  logits: {from: body, kind: lm_head, tie: true}
train: {steps: 8, batch: 2, eval_every: 8}
"""


def test_a_piped_run_logs_a_line_per_interval_while_it_runs(write_spec, text, tmp_path):
    command = [
        sys.executable, "-m", "compiler.tools.cli", "train", str(write_spec(TINY_LM)),
        "--data", str(text), "--out", str(tmp_path / "run"), "--log-every", "1",
    ]  # fmt: skip
    with subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as run:
        first = run.stderr.readline()
        still_running = run.poll() is None
        rest = run.stderr.read()
        run.wait(timeout=300)
    assert first.startswith("step 1/8  loss ") and "tok/s" in first, first + rest
    assert still_running  # the line came while the run went on, not at its end
    lines = [first, *rest.splitlines()]
    assert [line.split()[1] for line in lines if line.startswith("step ")] == [
        f"{i}/8" for i in range(1, 9)
    ]
    assert run.returncode == 0


def test_tensorboard_event_files_hold_the_records_numbers(write_spec, text, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = write_spec(
        TINY_LM.replace("steps: 8", "steps: 2").replace("eval_every: 8", "eval_every: 2")
    )
    result = cli(spec, "--data", text, "--out", tmp_path / "run", "--log-every", "1")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "auxiliary_loss", "val_loss"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert events.Scalars("loss")[0].value == pytest.approx(records(tmp_path / "run")[0]["loss"])
    quiet = cli(spec, "--data", text, "--out", tmp_path / "quiet", "--no-tensorboard")
    assert quiet.exit_code == 0 and not (tmp_path / "quiet" / "tensorboard").exists()


# --------------------------------------------------------------------------- --set


def test_set_overrides_the_spec_for_this_run_and_the_checkpoint_keeps_the_effective_spec(
    write_spec, text, tmp_path
):
    spec = write_spec(TINY_LM)
    result = cli(
        spec, "--data", text, "--out", tmp_path / "run", "--set", "train.steps=2",
        "--set", "nodes.body.width=32", "--set", "train.losses={logits: {weight: 2}}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in records(tmp_path / "run")] == [2]
    assert records(tmp_path / "run")[0]["loss"] == pytest.approx(2 * math.log(70), abs=0.6)
    model = load_checkpoint(tmp_path / "run")
    assert model.spec.nodes["body"].width == 32 and model.spec.train.steps == 2
    assert "--set 'nodes.body.width=32'" in (tmp_path / "run" / "spec.yaml").read_text()


def test_a_set_loss_for_a_missing_output_is_located_on_the_command_line(write_spec, text, tmp_path):
    result = cli(
        write_spec(TINY_LM), "--data", text, "--out", tmp_path / "run",
        "--set", "train.steps=2", "--set", "train.losses={logit: {weight: 2}}",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "--set:2:15: error: `train.losses` names `logit`" in result.stderr
    assert "did you mean `logits`?" in result.stderr
    assert not (tmp_path / "run").exists()


CORRECTED_LOOP = """
spec: 1
name: corrected
inputs:
  tokens: {kind: tokens, vocab: 12, context: 8}
nodes:
  reader: {kind: transformer, width: 16, heads: 2, layers: 1}
  refiner: {kind: transformer, width: 16, heads: 2, layers: 1}
edges:
  - {from: reader, to: refiner}
  - {from: refiner, to: reader, kind: feedback, delay: 1}
feedback: {mode: equilibrium, steps: 12, tolerance: 1.0e-6, correction: {states: 2, decay: 0.5}}
outputs:
  label: {from: refiner, kind: classification, classes: 3}
train: {steps: 2, batch: 4, eval_every: 2}
"""


def test_fixed_point_correction_adds_the_task_loss_at_states_along_the_solve(write_spec, tmp_path):
    """`feedback.correction` scores the outputs at states along the solve with the output losses,
    so `epicycle train` passes them to the model's training terms: the auxiliary loss is that."""
    spec = write_spec(CORRECTED_LOOP)
    data = classifier_data(tmp_path / "parity.npz")
    result = cli(spec, "--data", data, "--out", tmp_path / "run", "--log-every", "1")
    assert result.exit_code == 0, result.output
    first = records(tmp_path / "run")[0]
    # two supervised states, weighted 0.5^0 and 0.5^1, each scored near a fresh model's task loss
    assert 0.5 * first["loss"] < first["auxiliary_loss"] < 3 * first["loss"]


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_allocated(
    write_spec, text, tmp_path
):
    """`--batch 1000000` allocated for a minute and died in the allocator; now `train` refuses it
    at once, on the command line, with the estimate, the machine's memory and a batch that fits."""
    run = tmp_path / "run"
    result = cli(
        write_spec(TINY_LM), "--data", text, "--out", run, "--batch", 1_000_000,
        "--set", "inputs.tokens.context=2048",  # about 6 TiB of activations
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "command line: --batch:1:1: error: a training step needs about" in result.output
    assert "a batch of at most" in result.output
    assert not run.exists()


def test_a_command_line_value_outside_the_specs_bounds_is_located_at_its_option(
    write_spec, tmp_path
):
    spec = write_spec(CLASSIFIER)
    data = classifier_data(tmp_path / "parity.npz")
    result = cli(spec, "--data", data, "--out", tmp_path / "run", "--batch", 100_000_000)
    assert result.exit_code == 1, result.output
    assert "command line: --batch:1:1: error: --batch 100000000: input should be less than" in (
        result.output
    )
