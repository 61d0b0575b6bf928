"""Data-parallel training under `torchrun`: DDP, and FSDP2 (`fully_shard`) with `--strategy fsdp`.

    torchrun --nproc-per-node 8 -m compiler.tools.cli train spec.yaml --device cuda --out runs/a
    torchrun --nproc-per-node 8 -m compiler.tools.cli train spec.yaml --device cuda --strategy fsdp ...

Every rank draws the same global batch and trains on its own contiguous slice; gradients are
averaged (DDP) or reduce-scattered (FSDP), so a run on 2 processes follows a 1-process run at the
same global batch up to float rounding. Only rank 0 writes checkpoints and metrics. Here: 2 CPU
processes on the gloo backend (nccl on CUDA), a tiny model, dropout off (each rank draws its own
dropout masks, so with dropout the runs are equal in distribution only).

This file is also the worker `torchrun` launches: `torchrun ... tests/test_distributed.py SPEC
DATA OUT` trains with DDP, with FSDP, and with FSDP cut short at step 3 and resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compiler.language.diagnostics import SpecError
from compiler.tools.checkpoint import load_checkpoint
from compiler.tools.training import RunOptions, train
from compiler.tools.training.processes import stop_processes

# the first 20,000 characters of the corpus `epicycle data shakespeare` writes, shipped here
CORPUS = Path(__file__).resolve().parent / "fixtures" / "shakespeare_20k.txt"

SPEC = """
spec: 1
name: data-parallel
seed: 2
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  body: {kind: transformer, width: 16, heads: 2, layers: 2}
outputs:
  logits: {from: body, kind: lm_head, tie: true}
train:
  optimizer: {kind: adamw, lr: 0.01}
  schedule: {kind: warmup_cosine, warmup: 2}
  steps: 6
  batch: 8
  eval_every: 3
"""


def _runs(spec: str, data: str, out: Path) -> None:
    """What each rank runs (also called with one process, for the reference)."""
    options = {"data": data, "log_every": 1, "eval_batches": 2}
    for strategy in ("ddp", "fsdp"):
        train(spec, RunOptions(out=str(out / strategy), strategy=strategy, **options))
    cut = str(out / "fsdp-cut")
    train(spec, RunOptions(out=cut, strategy="fsdp", stop_at=3, **options))
    if torch.distributed.get_rank() == 0:  # kept for a one-process resume
        shutil.copytree(cut, out / "fsdp-at-3")
    torch.distributed.barrier()
    train(spec, RunOptions(out=cut, strategy="fsdp", resume=cut, **options))


EQUILIBRIUM = """
spec: 1
name: data-parallel-equilibrium
seed: 2
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  reader: {kind: transformer, width: 16, heads: 2, layers: 1}
  refiner: {kind: transformer, width: 16, heads: 2, layers: 1}
edges:
  - {from: reader, to: refiner}
  - {from: refiner, to: reader, kind: feedback, delay: 1}
feedback: {steps: 20, mode: equilibrium, tolerance: 1.0e-6, lipschitz: 0.8}
outputs:
  logits: {from: refiner, kind: lm_head}
train: {steps: 4, batch: 8, eval_every: 2}
"""


def _equilibrium_runs(spec: str, data: str, out: Path) -> None:
    options = {"data": data, "log_every": 1, "eval_batches": 2}
    train(spec, RunOptions(out=str(out / "ddp"), strategy="ddp", **options))
    try:
        train(spec, RunOptions(out=str(out / "fsdp"), strategy="fsdp", **options))
    except SpecError as error:  # refused before a weight is built
        if torch.distributed.get_rank() == 0:
            (out / "fsdp-refused.txt").write_text(str(error), encoding="utf-8")


def _losses(directory: Path) -> list[tuple[int, float, float | None]]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, lines)]


def _two_processes(spec: Path, tmp_path: Path, *worker: str) -> Path:
    """Run this file as the torchrun worker on 2 CPU processes; returns the corpus it read. Each
    rank's output goes to its own log (`--redirects 3`); a failure shows every rank's in full
    (a rank that aborts in C++ leaves torchrun only its exit signal), Python's stacks included
    (`PYTHONFAULTHANDLER`)."""
    data = tmp_path / "text.txt"
    data.write_text(CORPUS.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    logs = tmp_path / "torchrun-logs"
    done = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "--redirects",
            "3",
            "--log-dir",
            logs,
            __file__,
            spec,
            data,
            tmp_path,
            *worker,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
    )
    if done.returncode != 0:
        pytest.fail(_rank_logs(logs) + "\n== torchrun\n" + done.stderr[-3000:], pytrace=False)
    return data


def _record_threads_left(out: Path) -> None:
    """The worker's threads once it left the group (Linux: `/proc/self/task`): a gloo thread
    still running here would run into interpreter shutdown, where one releasing a finished
    collective aborted the process ("terminate called without an active exception")."""
    tasks = Path("/proc/self/task")
    if tasks.is_dir():
        names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
        (out / f"threads-left-{os.environ['RANK']}.txt").write_text("\n".join(names))


def _assert_no_gloo_thread_outlived_the_group(tmp_path: Path) -> None:
    if sys.platform == "linux":
        for rank in (0, 1):
            left = (tmp_path / f"threads-left-{rank}.txt").read_text().split()
            assert not [name for name in left if "gloo" in name], (rank, left)


def _rank_logs(logs: Path) -> str:
    """Every rank's whole stderr and stdout, as torchrun's `--log-dir` keeps them
    (`<run>/attempt_<n>/<rank>/std{err,out}.log`)."""
    parts = []
    for path in sorted(logs.glob("*/attempt_*/*/std*.log")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(f"== rank {path.parent.name} {path.name}\n{text or '(empty)'}")
    return "\n".join(parts) or f"no rank logs under {logs}"


def test_two_processes_follow_one_at_the_same_global_batch(write_spec, tmp_path):
    spec = write_spec(SPEC)
    data = _two_processes(spec, tmp_path)
    _assert_no_gloo_thread_outlived_the_group(tmp_path)  # FSDP's mesh held the group
    reference = tmp_path / "one"
    train(spec, RunOptions(data=str(data), out=str(reference), log_every=1, eval_batches=2))
    expected = _losses(reference)
    assert [s for s, _, _ in expected] == [1, 2, 3, 4, 5, 6]
    for run in ("ddp", "fsdp", "fsdp-cut"):
        got = _losses(tmp_path / run)
        assert [s for s, _, _ in got] == [1, 2, 3, 4, 5, 6], run  # one line a step: rank 0 writes
        for (_, loss, val), (_, want, want_val) in zip(got, expected, strict=True):
            assert loss == pytest.approx(want, abs=1e-5), run
            assert (val is None) == (want_val is None), run
            if val is not None:
                assert val == pytest.approx(want_val, abs=1e-5), run
    # checkpoints do not depend on the strategy (optimizer state is keyed by parameter name):
    # the FSDP run's checkpoint of step 3 continues in one process
    at_3 = str(tmp_path / "fsdp-at-3")
    resumed = train(
        spec, RunOptions(data=str(data), out=at_3, log_every=1, eval_batches=2, resume=at_3)
    )
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for record, (_, want, _) in zip(resumed, expected[3:], strict=True):
        assert record["loss"] == pytest.approx(want, abs=1e-5)
    one, sharded = load_checkpoint(reference), load_checkpoint(tmp_path / "fsdp")
    for name, value in one.state_dict().items():  # FSDP's gathered weights, saved by rank 0
        torch.testing.assert_close(sharded.state_dict()[name], value, atol=1e-5, rtol=1e-4)


def test_a_bounded_equilibrium_loop_trains_alike_on_two_ddp_processes(write_spec, tmp_path):
    """Under DDP both processes measure the loop's Jacobian on their half of the batch and agree
    on the larger, which is the whole batch's (the norm is a maximum over sequences), and on when
    each solve stops. FSDP is refused with a located error: a double backward cannot reach the
    weights it gathers."""
    spec = write_spec(EQUILIBRIUM)
    data = _two_processes(spec, tmp_path, "equilibrium")
    _assert_no_gloo_thread_outlived_the_group(tmp_path)
    reference = tmp_path / "one"
    train(spec, RunOptions(data=str(data), out=str(reference), log_every=1, eval_batches=2))
    expected = _losses(reference)
    one = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])["equilibrium"]
    refused = (tmp_path / "fsdp-refused.txt").read_text(encoding="utf-8")
    assert "`lipschitz` measures the loop through a double backward" in refused
    assert "--strategy ddp" in refused
    got = _losses(tmp_path / "ddp")
    assert [s for s, _, _ in got] == [1, 2, 3, 4]
    for (_, loss, _), (_, want, _) in zip(got, expected, strict=True):
        assert loss == pytest.approx(want, abs=1e-4)
    last = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1])
    solves = last["equilibrium"]
    assert solves["residual"] < 1e-6 and solves["backward_residual"] < 1e-6
    assert solves["feedback_gain"] == pytest.approx(one["feedback_gain"], rel=1e-3)


TRUNCATED = """
spec: 1
name: data-parallel-truncated
seed: 2
inputs:
  tokens: {kind: tokens, vocab: 70, context: 16}
nodes:
  reader: {kind: transformer, width: 24, heads: 2, layers: 1}
  echo: {kind: transformer, width: 16, heads: 2, layers: 1}
edges:
  - {from: reader, to: echo}
  - {from: echo, to: reader, kind: feedback, delay: 1}
feedback: {steps: 3, mode: truncated, backprop_steps: 1}
outputs:
  logits: {from: echo, kind: lm_head}
train: {steps: 3, batch: 8, eval_every: 3}
"""


def test_truncated_feedback_trains_under_ddp_though_its_delayed_edge_gets_no_gradient(
    write_spec, tmp_path
):
    """With `backprop_steps: 1` the only path through `echo`'s bus projection is the delayed edge
    that truncation cuts: that parameter gets no gradient by design, which DDP refuses unless it
    is told to look for unused parameters (it was not, before)."""
    spec = write_spec(TRUNCATED)
    data = _two_processes(spec, tmp_path, "truncated")
    _assert_no_gloo_thread_outlived_the_group(tmp_path)
    reference = tmp_path / "one"
    train(spec, RunOptions(data=str(data), out=str(reference), log_every=1, eval_batches=2))
    for (_, loss, _), (_, want, _) in zip(
        _losses(tmp_path / "ddp"), _losses(reference), strict=True
    ):
        assert loss == pytest.approx(want, abs=1e-5)


if __name__ == "__main__":  # the torchrun worker
    if sys.argv[4:] == ["equilibrium"]:
        _equilibrium_runs(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[4:] == ["truncated"]:
        options = {"data": sys.argv[2], "log_every": 1, "eval_batches": 2}
        train(
            sys.argv[1], RunOptions(out=str(Path(sys.argv[3]) / "ddp"), strategy="ddp", **options)
        )
    else:
        _runs(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    stop_processes()
    _record_threads_left(Path(sys.argv[3]))
