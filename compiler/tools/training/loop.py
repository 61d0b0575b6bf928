"""`train(...)`: the training loop of `epicycle train` (nanoGPT's train.py is the model), for every
output kind, with periodic validation, checkpoints and metrics records.

On a GPU it runs the way a loop written by hand for speed does: bf16 autocast by default (fp16
with a gradient scaler, or fp32 with TF32 matmuls, on request), fused AdamW, batches pinned and
copied without blocking, and no host synchronisation in a step: losses add up on the device and
are read once per log interval. `--compile` runs the objective through `torch.compile`. A spec
with a time axis trains chunk by chunk, one optimizer step per chunk (`tbptt.py`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.passes.check_capabilities import require
from compiler.tools.training.memory import check_training_memory
from compiler.tools.training.metrics import (
    LOSS_CURVE,
    append_metric,
    open_event_log,
    prepare_metrics,
    record_from_report,
    write_events,
    write_loss_curve,
)
from compiler.tools.training.objective import (
    Task,
    training_loss_class,
    training_task,
)
from compiler.tools.training.optimizers import build_optimizer, clip_gradients
from compiler.tools.training.processes import Processes, gathered, start_processes, wrap
from compiler.tools.training.resume import (
    carried_state,
    restore_run,
    save_run,
    seed_dropout,
    spec_differences,
)
from compiler.tools.training.settings import (
    GRAPHED_MODES,
    Machine,
    RunOptions,
    UsageError,
    configure_matmuls,
    effective_train,
    resolve_machine,
)
from compiler.tools.training.tbptt import Chunks, chunk_length, time_steps

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    from torch import Tensor, nn

    from compiler.ir import IR

log = logging.getLogger(__name__)

ACTIVATIONS = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # by `--precision`


def train(
    spec: str | Path,
    options: RunOptions,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train `spec` on the data at `options.data` (default: the spec's `train.data`); `overrides` (steps, batch, lr, eval_every,
    val_fraction, seed) go over the spec's `train:`. Returns the records logged by this run.

    Raises `UsageError` for a device or precision this machine lacks and `SpecError` for a spec,
    data file or checkpoint at fault, each before anything is written."""
    import torch

    from compiler.pipeline import analyze, build_model
    from compiler.tools.checkpoint import load_weights, read_checkpoint_spec, read_training_state

    ir = analyze(spec, overrides=options.overrides)  # the checkpoint keeps this effective spec
    if options.compile and options.compile_mode in GRAPHED_MODES:
        require(
            ir,
            "cuda_graphs",
            f"train with --compile-mode {options.compile_mode} (CUDA graphs)",
            "use --compile-mode default or max-autotune-no-cudagraphs",
        )
    machine = resolve_machine(options.device, options.precision, options.compile_mode)
    if options.compile and ir.spec.time is not None:
        raise UsageError(
            "--compile: this spec declares a time axis (`time:`), trained chunk by chunk through "
            "a Python loop over its time steps (`model.scan`), which torch.compile would unroll "
            "and recompile for every chunk length; train it without --compile"
        )
    task = training_task(ir)
    settings = effective_train(ir, **overrides)
    out = Path(options.out)
    previous = None
    if options.resume is not None:
        previous = read_training_state(options.resume)
        text, _ = read_checkpoint_spec(options.resume)
        differences = spec_differences(ir, text, options.resume)
        if differences:
            raise SpecError(differences)
    elif (out / "training.safetensors").exists():
        raise SpecError(
            [
                Diagnostic(
                    Span(str(out / "training.safetensors"), 1, 1),
                    "this directory already holds a training checkpoint",
                    f"continue it with `--resume {out}`, or write the new run to another `--out`",
                )
            ]
        )
    data = load_data(spec, ir, task, options.data, settings, previous)
    if previous and previous.state["data"]["sha256"] != data.sha256:
        log.warning(
            "resuming on %s, not the data the checkpoint was trained on (%s)",
            data.describe(),
            previous.state["data"].get("file", "another file"),
        )
    # a time axis: one training step per chunk of `chunk` time steps (tbptt.py)
    sequence = time_steps(data, settings) if task.ports.time else 1
    chunk = chunk_length(settings, sequence) if task.ports.time else 1
    processes = start_processes(machine.device, options.strategy)
    machine = Machine(processes.device, machine.precision)
    if settings.batch % processes.world:
        raise SpecError(
            [
                ir.error(
                    ("train", "batch"),
                    f"a batch of {settings.batch} does not split over {processes.world} processes",
                    f"use a batch divisible by {processes.world}",
                )
            ]
        )
    check_training_memory(  # refused with the estimate before a weight is allocated
        ir,
        batch=settings.batch * chunk,  # a chunk holds the activations of its `chunk` time steps
        context=task.context,
        precision="float32",  # autocast keeps float32 weights, gradients and optimizer state
        activation_precision=ACTIVATIONS[machine.precision],
        device=str(processes.device),
        world=processes.world,
        sharded=processes.strategy == "fsdp",
        batch_span=Span("command line: --batch", 1, 1) if overrides.get("batch") else None,
    )
    if processes.strategy == "fsdp":  # what the spec's parts say they support, asked first
        require(
            ir,
            "fsdp",
            "train under FSDP",
            "train this spec with `--strategy ddp` (every process holds the weights), or remove "
            "the part named",
        )
    start = previous.step if previous else 0
    stop = min(options.stop_at or settings.steps, settings.steps)
    if start >= stop:
        raise SpecError(
            [
                Diagnostic(
                    Span(str(Path(options.resume or out) / "training.safetensors"), 1, 1),
                    f"the checkpoint is at step {start} and this run stops at step {stop}: "
                    "nothing to train",
                    "raise `--steps` (the schedule then spans the new length)",
                )
            ]
        )
    seed_dropout(settings.seed, processes, previous)
    configure_matmuls(machine)

    model = build_model(ir, device=processes.device)
    if previous:
        load_weights(model, options.resume, device=processes.device)
    objective = training_loss_class()(model, task)
    root = wrap(objective, processes)
    step_fn = torch.compile(root, mode=options.compile_mode) if options.compile else root
    optimizer, schedule = build_optimizer(model, settings, fused=machine.device_type == "cuda")
    scaler = torch.amp.GradScaler(machine.device_type, enabled=machine.precision == "fp16")
    if previous:
        restore_run(root, optimizer, schedule, scaler, previous, processes)

    # every check has passed: from here on the run writes its directory
    records = prepare_metrics(out, options.resume, start, processes)
    events = open_event_log(out, options.tensorboard, start) if processes.leader else None
    log.info(
        "training %s from step %d to %d on %s (%s, %s)",
        ir.spec.name, start, stop, data.describe(), machine.device, machine.precision,
    )  # fmt: skip
    if on_start is not None and processes.leader:
        on_start(start, stop)
    step, tokens_done, clock = start, 0, time.perf_counter()
    plotted = clock
    sums = torch.zeros(len(task.outputs) + 1, device=processes.device)  # outputs, training terms
    summed = 0
    chunks = None
    if task.ports.time:
        chunks = Chunks(
            lambda index: _batch(data, "train", index, settings, processes), sequence, chunk
        )
        chunks.restored = carried_state(previous, processes) if previous else None
    try:
        while step < stop:
            if chunks is None:
                inputs, targets = _batch(data, "train", step, settings, processes)
                with _autocast(machine):
                    total, each = step_fn(inputs, targets, step)
                tokens_done += settings.batch * task.context
            else:
                with _autocast(machine):  # a state rebuilt on resuming runs as training did
                    inputs, targets, state = chunks.at(step, model)
                    total, each, state = step_fn(inputs, targets, step, state)
                chunks.carry(step, state)
                first = next(iter(inputs.values()))  # (rank's batch, chunk, tokens, ...)
                tokens_done += settings.batch * first.shape[1] * first.shape[2]
            sums += each.detach()
            summed += 1
            scaler.scale(total).backward()
            scaler.unscale_(optimizer)  # clipping reads the true gradients
            clip_gradients(model, settings)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            evaluate = step % settings.eval_every == 0 or step == stop
            if not (evaluate or step % options.log_every == 0):
                continue
            means = processes.means(sums / summed)  # the one host sync of the interval
            sums.zero_()
            summed = 0
            elapsed = time.perf_counter() - clock
            record = {
                "step": step,
                **_loss_fields(task, means),
                "lr": lr,
                "tokens_per_s": tokens_done / elapsed if elapsed > 0 else 0.0,
                "device": machine.device,
                "precision": machine.precision,
            }
            with gathered(root, processes):  # lattice phases read the weights
                report = model.report()  # before validation's forward passes overwrite it
            record.update(record_from_report(report, objective, processes))
            if evaluate:
                validation = _validation_losses(
                    step_fn, data, settings, task, options, machine, processes
                )
                record["val_loss"] = validation["loss"]
                if "losses" in validation:
                    record["val_losses"] = validation["losses"]
            if processes.leader:
                append_metric(out, record)
                records.append(record)
                if events is not None:
                    write_events(events, record)
            if evaluate:
                save_run(
                    model, root, optimizer, schedule, scaler, step, data, settings, processes, out,
                    carried=None if chunks is None else chunks.carried(step),
                )  # fmt: skip
                if processes.leader and (step == stop or time.perf_counter() - plotted > 60):
                    write_loss_curve(records, out / LOSS_CURVE)  # at the end, and each minute
                    plotted = time.perf_counter()
            if on_record is not None and processes.leader:
                on_record(record)
            tokens_done, clock = 0, time.perf_counter()
    finally:
        if events is not None:
            events.close()
    return [r for r in records if r["step"] > start]


def _loss_fields(task: Task, means: list[float]) -> dict[str, Any]:
    """From the outputs' mean losses and the training terms' (`means`): `loss`, the weighted sum
    of the outputs'; `losses`, each output's, when there are several; `auxiliary_loss`, the
    training terms the spec's parts add (lattice regularisers, companion reconstruction)."""
    each = means[: len(task.outputs)]
    loss = sum(o.weight * value for o, value in zip(task.outputs, each, strict=True))
    fields: dict[str, Any] = {"loss": loss}
    if len(task.outputs) > 1:
        fields["losses"] = {o.name: value for o, value in zip(task.outputs, each, strict=True)}
    fields["auxiliary_loss"] = means[-1]
    return fields


def _autocast(machine: Machine):
    import torch

    dtype = machine.autocast_dtype
    return torch.autocast(machine.device_type, dtype=dtype, enabled=dtype is not None)


def _batch(data: Any, split: str, index: int, settings: Any, processes: Processes):
    """Batch `index` of a split, this rank's rows, on the device (pinned, copied without
    blocking the host on CUDA)."""
    inputs, targets = data.batch(
        split, index, settings.batch, settings.seed, (processes.rank, processes.world)
    )
    return _to_device(inputs, processes.device), _to_device(targets, processes.device)


def _to_device(tensors: dict[str, Tensor], device: str) -> dict[str, Tensor]:
    if not device.startswith("cuda"):
        return {k: v.to(device) for k, v in tensors.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}


def _validation_losses(
    step_fn: nn.Module,
    data: Any,
    settings: Any,
    task: Task,
    options: RunOptions,
    machine: Machine,
    processes: Processes,
) -> dict[str, Any]:
    """Mean losses over the same `eval_batches` held-out batches every time (negative batch
    indices: a stream of their own), dropout off; the RNG of training is not touched."""
    import torch

    step_fn.eval()
    each = torch.zeros(len(task.outputs) + 1, device=processes.device)
    with torch.no_grad(), _autocast(machine):
        for i in range(options.eval_batches):
            inputs, targets = _batch(data, "val", -1 - i, settings, processes)
            each += step_fn(inputs, targets, 0)[1]
    step_fn.train()
    means = processes.means(each / options.eval_batches)
    fields = _loss_fields(task, means)
    fields.pop("auxiliary_loss")
    return fields


# --------------------------------------------------------------------------- data


def load_data(spec: str | Path, ir: IR, task: Task, path: str | None, settings: Any, previous: Any):
    """The run's training data (`datasets.load_training_data`): the file `--data` names, else the
    spec's `train.data`, else the default corpus; a resumed run reads it as the checkpoint did
    (the same character vocabulary or tokenizer)."""
    from compiler.tools.data import DEFAULT_DATA
    from compiler.tools.training.datasets import DataSource, load_training_data, source_from_spec

    if path is not None:
        source = DataSource(str(path))
    elif settings.data is not None:
        source = source_from_spec(settings.data, spec)
    else:
        source = DataSource(str(DEFAULT_DATA))
    state = None
    if previous is not None:
        state = dict(previous.state["data"])
        if "vocabulary" in previous.state:  # checkpoints that kept it beside the data's state
            state.setdefault("vocabulary", previous.state["vocabulary"])
            state.setdefault("format", "text")
    return load_training_data(
        source, task.ports, val_fraction=settings.val_fraction, state=state, batch=settings.batch
    )
