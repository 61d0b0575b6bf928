"""`train(...)`: the training loop of `epicycle train` for character-level language modelling
(nanoGPT's train.py is the model), with periodic validation, checkpoints and metrics records."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.passes.check_capabilities import require
from compiler.tools.training.metrics import (
    LOSS_CURVE,
    append_metric,
    prepare_metrics,
    record_from_report,
    write_loss_curve,
)
from compiler.tools.training.objective import (
    LanguageTask,
    check_vocabulary,
    language_model_loss_class,
    language_task,
)
from compiler.tools.training.optimizers import build_optimizer, clip_gradients
from compiler.tools.training.processes import Processes, gathered, start_processes, wrap
from compiler.tools.training.resume import restore_run, save_run, seed_dropout, spec_differences
from compiler.tools.training.settings import RunOptions, effective_train

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    from torch import Tensor, nn

    from compiler.tools.data import Corpus

log = logging.getLogger(__name__)


def train(
    spec: str | Path,
    options: RunOptions,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train `spec` on the text at `options.data`; `overrides` (steps, batch, lr, eval_every,
    val_fraction, seed) go over the spec's `train:`. Returns the records logged by this run."""
    import torch

    from compiler.pipeline import analyze, build_model
    from compiler.tools.checkpoint import load_weights, read_checkpoint_spec, read_training_state
    from compiler.tools.data import load_corpus

    ir = analyze(spec)
    task = language_task(ir)
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
    vocabulary = previous.state["vocabulary"] if previous else None
    corpus = load_corpus(
        options.data,
        vocabulary=vocabulary,
        val_fraction=settings.val_fraction,
        context=task.context,
    )
    check_vocabulary(ir, task, corpus)
    if previous and previous.state["data"]["sha256"] != corpus.sha256:
        log.warning(
            "resuming on %s, not the text the checkpoint was trained on (%s)",
            corpus.path,
            previous.state["data"]["file"],
        )
    processes = start_processes(options.device, options.strategy)
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

    model = build_model(ir, device=processes.device)
    if previous:
        load_weights(model, options.resume, device=processes.device)
    objective = language_model_loss_class()(model, task)
    root = wrap(objective, processes)
    step_fn = torch.compile(root) if options.compile else root
    optimizer, schedule = build_optimizer(model, settings)
    if previous:
        restore_run(root, optimizer, schedule, previous, processes)

    records = prepare_metrics(out, options.resume, start, processes)
    log.info("training %s from step %d to %d on %s", ir.spec.name, start, stop, corpus.path)
    if on_start is not None and processes.leader:
        on_start(start, stop)
    step, tokens_done, clock = start, 0, time.perf_counter()
    plotted = clock
    while step < stop:
        inputs, targets = _batch(corpus.train, step, settings, task, processes)
        loss, task_loss = step_fn(inputs, targets, step)
        task_loss = task_loss.detach()
        loss.backward()
        clip_gradients(model, settings)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_done += settings.batch * task.context
        evaluate = step % settings.eval_every == 0 or step == stop
        if not (evaluate or step % options.log_every == 0):
            continue
        elapsed = time.perf_counter() - clock
        record = {
            "step": step,
            "loss": processes.mean(task_loss),
            "lr": lr,
            "tokens_per_s": tokens_done / elapsed if elapsed > 0 else 0.0,
        }
        with gathered(root, processes):  # lattice phases read the weights
            report = model.report()  # before validation's forward passes overwrite it
        record.update(record_from_report(report, objective, processes))
        if evaluate:
            record["val_loss"] = _validation_loss(
                step_fn, corpus, settings, task, options, processes
            )
        if processes.leader:
            append_metric(out, record)
            records.append(record)
        if evaluate:
            save_run(model, root, optimizer, schedule, step, corpus, settings, processes, out)
            if processes.leader and (step == stop or time.perf_counter() - plotted > 60):
                write_loss_curve(records, out / LOSS_CURVE)  # at the end, and each minute
                plotted = time.perf_counter()
        if on_record is not None and processes.leader:
            on_record(record)
        tokens_done, clock = 0, time.perf_counter()
    return [r for r in records if r["step"] > start]


def _batch(ids: Tensor, step: int, settings: Any, task: LanguageTask, processes: Processes):
    from compiler.tools.data import batch_at

    x, y = batch_at(
        ids, step, settings.batch, task.context, settings.seed, (processes.rank, processes.world)
    )
    return x.to(processes.device), y.to(processes.device)


def _validation_loss(
    step_fn: nn.Module,
    corpus: Corpus,
    settings: Any,
    task: LanguageTask,
    options: RunOptions,
    processes: Processes,
) -> float:
    """Mean loss over the same `eval_batches` held-out batches every time (negative batch
    indices: a stream of their own), dropout off; the RNG of training is not touched."""
    import torch

    step_fn.eval()
    total = torch.zeros((), device=processes.device)
    with torch.no_grad():
        for i in range(options.eval_batches):
            x, y = _batch(corpus.val, -1 - i, settings, task, processes)
            total += step_fn(x, y, 0)[1]
    step_fn.train()
    return processes.mean(total / options.eval_batches)
