"""A `train:` section whose parts contradict each other: a warm-up longer than the training, a
schedule that would end above the learning rate it decays from."""

from __future__ import annotations

from compiler.ir import IR
from compiler.language.diagnostics import Diagnostic
from compiler.passes.contract import contract


@contract(requires=(), provides=())
def check_training(ir: IR) -> list[Diagnostic]:
    train = ir.spec.train
    schedule = train.schedule
    found: list[Diagnostic] = []
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
