"""What a spec's inputs take and its outputs are trained against, read from the spec once: the one
description the data readers, the losses and the trainer's checks share.

An input port is what the model's forward takes under that name; a target port is what one output
is compared with: the next tokens of a tokens input (`lm_head`), one class per example
(`classification`), or values per token (`regression`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from compiler.ir import IR


@dataclass(frozen=True)
class InputPort:
    """`tokens`: int64 ids `(batch, tokens)` below `vocab`; `features`: float `(batch, tokens,
    width)`. `context` is the longest sequence the model takes."""

    name: str
    kind: Literal["tokens", "features"]
    context: int
    vocab: int | None = None  # tokens
    width: int | None = None  # features


@dataclass(frozen=True)
class TargetPort:
    """What output `name` is trained against.

    `next_token`: int64 ids `(batch, tokens)`, the tokens input `over` shifted by one;
    `classes`: int64 class ids `(batch,)` below `classes`;
    `values`: float `(batch, tokens, width)`."""

    name: str
    kind: Literal["next_token", "classes", "values"]
    over: str | None = None  # next_token: the tokens input whose next ids are predicted
    classes: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class Ports:
    """`time`: the spec declares a time axis, so every input and target holds one more axis,
    the time steps, after the examples: `(examples, time, ...)`, one step of the graph each."""

    inputs: tuple[InputPort, ...]
    targets: tuple[TargetPort, ...]
    time: bool = False

    def input(self, name: str) -> InputPort:
        return next(p for p in self.inputs if p.name == name)

    def target(self, name: str) -> TargetPort:
        return next(p for p in self.targets if p.name == name)

    @property
    def context(self) -> int:
        """The longest sequence every input takes: the window a batch is cut to."""
        return min(p.context for p in self.inputs)


def ports_of(ir: IR) -> Ports:
    """The spec's ports. An `lm_head` predicts its `vocab_of` input (default: the only tokens
    input; the front end has checked there is one)."""
    inputs = []
    for name, spec in ir.spec.inputs.items():
        if spec.kind == "tokens":
            inputs.append(InputPort(name, "tokens", spec.context, vocab=spec.vocab))
        else:
            inputs.append(InputPort(name, "features", spec.context, width=spec.width))
    token_inputs = [p.name for p in inputs if p.kind == "tokens"]
    targets = []
    for name, spec in ir.spec.outputs.items():
        if spec.kind == "lm_head":
            over = spec.vocab_of or token_inputs[0]
            targets.append(TargetPort(name, "next_token", over=over))
        elif spec.kind == "classification":
            targets.append(TargetPort(name, "classes", classes=spec.classes))
        else:
            targets.append(TargetPort(name, "values", width=spec.width))
    return Ports(tuple(inputs), tuple(targets), time=ir.spec.time is not None)
