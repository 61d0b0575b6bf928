"""How one `epicycle train` run goes: its command-line options, and the spec's `train:` section
with the command line's values put over it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import SpecError

if TYPE_CHECKING:
    from compiler.ir import IR


@dataclass(frozen=True)
class RunOptions:
    """How one `epicycle train` invocation runs; the rest comes from the spec's `train:`."""

    data: str
    out: str
    resume: str | None = None
    stop_at: int | None = None  # stop after this step; the schedule still spans `steps`
    log_every: int = 10
    eval_batches: int = 8
    device: str = "cpu"
    compile: bool = False
    strategy: str = "auto"  # auto | none | ddp | fsdp


def effective_train(ir: IR, **overrides: Any) -> Any:
    """The spec's `train:` section with command-line values (those not None) put over it; `lr`
    replaces the optimizer's learning rate."""
    from compiler.components import AdamW
    from compiler.language.spec import Train

    train = ir.spec.train
    lr = overrides.pop("lr", None)
    values = {k: v for k, v in overrides.items() if v is not None}
    if lr is not None:
        optimizer = train.optimizer if train.optimizer is not None else AdamW()
        values["optimizer"] = optimizer.model_copy(update={"lr": float(lr)})
    train = Train.model_validate({**dict(train), **values})
    schedule = train.schedule
    warmup = getattr(schedule, "warmup", 0)
    if warmup > train.steps:
        raise SpecError(
            [
                ir.error(
                    ("train", "schedule"),
                    f"a warm-up of {warmup} steps is longer than the {train.steps} training steps",
                    "train for more `--steps` or shorten the schedule's `warmup`",
                )
            ]
        )
    return train
