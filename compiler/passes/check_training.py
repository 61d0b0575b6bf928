"""A `train:` section whose parts contradict each other: a warm-up longer than the training, a
schedule that would end above the learning rate it decays from, a loss for an output the spec does
not have or that does not fit the output's kind."""

from __future__ import annotations

import difflib

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.passes.contract import contract


@contract(requires=(), provides=())
def check_training(ir: IR) -> list[Diagnostic]:
    train = ir.spec.train
    schedule = train.schedule
    found: list[Diagnostic] = check_losses(ir)
    if train.tbptt is not None and ir.spec.time is None:
        found.append(
            ir.error(
                ("train", "tbptt"),
                "`train.tbptt` cuts a time axis into chunks, and this spec declares none",
                "add `time: {}` (the graph then steps through time), or remove `tbptt`",
                key=True,
            )
        )
    if schedule is None or schedule.kind != "warmup_cosine":
        return found
    where = ("train", "schedule")
    if schedule.warmup > train.steps:
        found.append(
            ir.error(
                (*where, "warmup"),
                f"a warm-up of {schedule.warmup} steps is longer than the {train.steps} training steps",
                "shorten `warmup` or raise `train.steps`",
            )
        )
    start = schedule.decay_start
    if start is not None and not schedule.warmup <= start <= train.steps:
        found.append(
            ir.error(
                (*where, "decay_start"),
                f"`decay_start: {start}` must lie between the end of warm-up ({schedule.warmup}) and the "
                f"last step ({train.steps})",
            )
        )
    lr = getattr(train.optimizer, "lr", None)
    if lr is None and train.optimizer is None:  # the default optimizer, at its default rate
        from compiler.language.registry import REGISTRY

        lr = REGISTRY.get("optimizer", "adamw").config().lr
    for field in ("min_lr", "warmup_start_lr"):
        value = getattr(schedule, field)
        if lr is not None and value > lr:
            found.append(
                ir.error(
                    (*where, field),
                    f"`{field}: {value}` is above the optimizer's learning rate {lr}",
                    "the schedule runs between these rates and the peak `lr`: lower it",
                )
            )
    return found


# the losses each output kind can be trained with; the first is its default
LOSSES_BY_KIND = {
    "lm_head": ("cross_entropy",),
    "classification": ("cross_entropy",),
    "regression": ("mse", "huber", "angular"),
}


def check_losses(ir: IR) -> list[Diagnostic]:
    """`train.losses` names outputs that exist, with a loss their kind can be trained with and
    only the options that loss reads."""
    found: list[Diagnostic] = []
    outputs = ir.spec.outputs
    for name, chosen in ir.spec.train.losses.items():
        where = ("train", "losses", name)
        if name not in outputs:
            close = difflib.get_close_matches(name, list(outputs), n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            found.append(
                ir.error(
                    where,
                    f"`train.losses` names `{name}`, which is not an output of this spec",
                    f"{hint}the outputs are {', '.join(f'`{o}`' for o in outputs)}",
                    key=True,
                )
            )
            continue
        kind = outputs[name].kind
        fitting = LOSSES_BY_KIND[kind]
        loss = chosen.loss or fitting[0]
        if loss not in fitting:
            found.append(
                ir.error(
                    (*where, "loss"),
                    f"output `{name}` is `kind: {kind}`, which does not train with `{loss}`",
                    f"use {' or '.join(f'`{f}`' for f in fitting)}",
                )
            )
            continue
        if chosen.delta is not None and loss != "huber":
            found.append(
                ir.error(
                    (*where, "delta"),
                    f"`delta` is read by the `huber` loss only; output `{name}` trains with `{loss}`",
                    "remove `delta`, or set `loss: huber`",
                    key=True,
                )
            )
        if chosen.layout is not None and loss != "angular":
            found.append(
                ir.error(
                    (*where, "layout"),
                    f"`layout` is read by the `angular` loss only; output `{name}` trains with "
                    f"`{loss}`",
                    "remove `layout`, or set `loss: angular`",
                    key=True,
                )
            )
        width = outputs[name].width if kind == "regression" else 0
        if loss == "angular" and width % 2:
            found.append(
                ir.error(
                    (*where, "loss"),
                    f"the angular loss reads output `{name}` as (sine, cosine) pairs, but its "
                    f"`width: {width}` is odd",
                    f"give `{name}` a width of 2 per angle, or train it with `mse`",
                )
            )
    return found
