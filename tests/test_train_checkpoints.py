"""Training checkpoints: resume continues step for step, a failed save loses nothing, bad input is
a located error.

    epicycle train spec.yaml --out runs/a --steps 1000 --stop-at 500   # a session cut short
    epicycle train spec.yaml --out runs/a --resume runs/a --steps 1000 # ... continued

A training checkpoint directory holds `model.safetensors` (weights, the spec in its header: what
`load_checkpoint` reads), `training.safetensors` (optimizer moments and RNG states as tensors; the
optimizer's and schedule's other state, the vocabulary, the data position and the settings as
JSON in its header) and `spec.yaml`. No pickle anywhere. Every file is written to a temporary name
and renamed once all are written.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from typer.testing import CliRunner

import compiler
from compiler.tools.checkpoint import load_checkpoint, read_training_state
from compiler.tools.cli import app
from compiler.tools.training import RunOptions, train
from tests.conftest import CORPUS

SPEC = """
spec: 1
name: resumable
seed: 1
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 2, dropout: 0.2}
outputs:
  logits: {from: body, kind: lm_head, tie: true}
train:
  optimizer: %s
  schedule: {kind: warmup_cosine, warmup: 2, min_lr: 0.001}
  steps: 8
  batch: 4
  eval_every: 2
"""
ADAMW = "{kind: adamw, lr: 0.01}"


def run(spec: Path, text: Path, out: Path, **options) -> list[dict]:
    return train(spec, RunOptions(data=str(text), out=str(out), log_every=1, **options))


def cli(*args) -> object:
    return CliRunner().invoke(app, ["train", *map(str, args)])


@pytest.mark.parametrize("optimizer", [ADAMW, "{kind: fam, lr: 0.05, fam_start_step: 2}"])
def test_a_resumed_run_repeats_an_uninterrupted_one_exactly(write_spec, text, tmp_path, optimizer):
    spec = write_spec(SPEC % optimizer)
    straight = run(spec, text, tmp_path / "straight")  # 8 steps
    first = run(spec, text, tmp_path / "cut", stop_at=4)  # the schedule still spans 8
    second = run(spec, text, tmp_path / "cut", resume=str(tmp_path / "cut"))
    assert [r["step"] for r in first + second] == list(range(1, 9))
    for a, b in zip(straight, first + second, strict=True):
        assert (a["loss"], a["lr"], a.get("val_loss")) == (b["loss"], b["lr"], b.get("val_loss"))
    one, other = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "cut")
    for name, value in one.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name  # bit for bit
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 9))  # one curve


def test_dropout_is_on_so_the_rng_restore_is_what_makes_resume_exact(write_spec, text, tmp_path):
    """Without the saved generator states the continued run draws other dropout masks."""
    spec = write_spec(SPEC % ADAMW)
    straight = run(spec, text, tmp_path / "straight")
    run(spec, text, tmp_path / "cut", stop_at=4)
    path = tmp_path / "cut" / "training.safetensors"
    with safetensors.safe_open(str(path), "pt") as handle:
        header = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors["rng/0/cpu"] = torch.Generator().manual_seed(123).get_state()
    safetensors.torch.save_file(tensors, str(path), metadata=header)
    resumed = run(spec, text, tmp_path / "cut", resume=str(tmp_path / "cut"))
    assert resumed[0]["loss"] != straight[4]["loss"]


def test_the_training_state_is_safetensors_and_json_no_pickle(write_spec, text, tmp_path):
    spec = write_spec(SPEC % ADAMW)
    run(spec, text, tmp_path / "run", stop_at=2)
    with safetensors.safe_open(str(tmp_path / "run" / "training.safetensors"), "pt") as handle:
        header = handle.metadata()
        names = set(handle.keys())
    state = json.loads(header["state"])
    assert header["step"] == "2"
    assert state["data"]["position"] == 2
    assert state["vocabulary"] == "".join(sorted(set(CORPUS.read_text()[:20_000])))
    assert state["schedule"]["last_epoch"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01)
    assert "optimizer/state/model.federation.transformers.0.blocks.0.attn.qkv.weight/exp_avg" in (
        names
    ) or any(n.endswith("/exp_avg_sq") for n in names)
    assert "rng/0/cpu" in names


def test_a_full_disk_during_save_leaves_the_previous_checkpoint(
    write_spec, text, tmp_path, monkeypatch
):
    spec = write_spec(SPEC % ADAMW)
    run(spec, text, tmp_path / "run", stop_at=2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    writes = []
    real = safetensors.torch.save_file

    def disk_full_on_the_second_file(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 2:  # the weights went through, the training state does not
            with open(filename, "wb") as partial:
                partial.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_on_the_second_file)
    result = cli(
        spec, "--data", text, "--out", tmp_path / "run", "--resume", tmp_path / "run",
        "--log-every", "1",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "cannot write the checkpoint of step 4: No space left on device" in result.stderr
    assert "the checkpoint already there is unchanged" in result.stderr
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    metrics = after.pop("metrics.jsonl"), before.pop("metrics.jsonl")
    assert after == before  # no temporary files left, every file as it was
    assert read_training_state(tmp_path / "run").step == 2  # the old checkpoint still loads
    load_checkpoint(tmp_path / "run")
    assert len(metrics[0].splitlines()) == 4  # the log holds the steps that did run
    resumed = run(spec, text, tmp_path / "run", resume=str(tmp_path / "run"))
    assert resumed[0]["step"] == 3


def test_resuming_with_another_spec_lists_what_differs(write_spec, text, tmp_path):
    run(write_spec(SPEC % ADAMW), text, tmp_path / "run", stop_at=2)
    changed = write_spec(
        (SPEC % ADAMW).replace("layers: 2", "layers: 3").replace("seed: 1", "seed: 2"), "b.yaml"
    )
    result = cli(changed, "--data", text, "--out", tmp_path / "run", "--resume", tmp_path / "run")
    assert result.exit_code == 1
    assert f"{changed}:3:7: error: `seed` is 2 here but 1 in the checkpoint" in result.stderr
    assert f"{changed}:7:58: error: `nodes.body.layers` is 3 here but 2" in result.stderr
    assert f"its text is in {tmp_path / 'run' / 'spec.yaml'}" in result.stderr
    longer = write_spec((SPEC % ADAMW).replace("steps: 8", "steps: 10"), "c.yaml")
    resumed = cli(
        longer, "--data", text, "--out", tmp_path / "run2", "--resume", tmp_path / "run",
        "--stop-at", "3",
    )  # fmt: skip
    assert resumed.exit_code == 0, resumed.output  # the `train:` section may change
    finished = cli(
        spec := write_spec(SPEC % ADAMW, "d.yaml"), "--data", text, "--out", tmp_path / "run3",
        "--resume", tmp_path / "run2", "--steps", "3",
    )  # fmt: skip
    assert finished.exit_code == 1
    assert "the checkpoint is at step 3 and this run stops at step 3: nothing to train" in (
        finished.stderr
    )
    assert spec.exists()


def test_resuming_on_text_outside_the_vocabulary_points_at_the_character(
    write_spec, text, tmp_path
):
    spec = write_spec(SPEC % ADAMW)
    run(spec, text, tmp_path / "run", stop_at=2)
    other = tmp_path / "other.txt"
    other.write_text(text.read_text() + "\nnaïve ☃\n", encoding="utf-8")
    line = text.read_text().count("\n") + 2
    result = cli(spec, "--data", other, "--out", tmp_path / "run", "--resume", tmp_path / "run")
    assert result.exit_code == 1
    assert (
        f"other.txt:{line}:3: error: 2 character(s) of the data file are not in the vocabulary"
        in (result.stderr)
    )
    assert "'ï', '☃'" in result.stderr


@pytest.mark.parametrize("damage", ["truncate weights", "truncate training", "mismatch", "missing"])
def test_a_damaged_checkpoint_is_refused_clearly(write_spec, text, tmp_path, damage):
    spec = write_spec(SPEC % ADAMW)
    run(spec, text, tmp_path / "run", stop_at=2)
    ck = tmp_path / "run"
    if damage.startswith("truncate"):
        path = ck / ("model.safetensors" if damage.endswith("weights") else "training.safetensors")
        path.write_bytes(path.read_bytes()[:200])
        expected = "truncated or corrupt"
    elif damage == "mismatch":  # the training state of another save beside these weights
        run(spec, text, tmp_path / "other", stop_at=4)
        shutil.copy(tmp_path / "other" / "training.safetensors", ck / "training.safetensors")
        expected = "the training state (step 4) was not saved with the weights beside it (step 2)"
    else:
        (ck / "training.safetensors").unlink()
        expected = "this checkpoint has weights but no training state"
    result = cli(spec, "--data", text, "--out", tmp_path / "new", "--resume", ck)
    assert result.exit_code == 1, result.output
    assert expected in result.stderr
    assert "Traceback" not in result.output


def test_the_old_checkpoint_api_is_unchanged(tmp_path):
    model = compiler.build_model(compiler.load_spec_text(SPEC % ADAMW))
    compiler.tools.checkpoint.save_checkpoint(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["model.safetensors", "spec.yaml"]
    loaded = load_checkpoint(tmp_path / "ck")
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])
