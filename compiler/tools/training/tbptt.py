"""Truncated backpropagation through time: how `epicycle train` walks a spec with a time axis.

A batch of sequences `(batch, time, ...)` is cut into chunks of `train.tbptt.chunk` time steps
(default: the whole sequence, one chunk). One chunk is one training step: `model.scan` runs it from
the state the previous chunk left, its per-step outputs are scored against its targets, the loss is
backpropagated and the optimizer steps; the state is then detached (the gradient stops at the
chunk's first step) and carried into the next chunk. A sequence of T steps takes ceil(T / chunk)
training steps, the next batch starting from a fresh state. Step `s` reads batch `s // chunks` at
chunk `s % chunks`; a checkpoint written in mid-sequence holds the state carried into the next
chunk (`resume.carried_state`), so a resumed run continues from exactly that state, as the run
that never stopped did."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn


def time_steps(data: Any, settings: Any) -> int:
    """The length of the data's time axis (every example has the same: the readers checked)."""
    inputs, _ = data.batch("train", 0, 1, settings.seed)
    return next(iter(inputs.values())).shape[1]


def chunk_length(settings: Any, steps: int) -> int:
    """Time steps per chunk: `train.tbptt.chunk`, at most the sequence; without it, the whole."""
    return steps if settings.tbptt is None else min(settings.tbptt.chunk, steps)


@dataclass
class Chunks:
    """The chunk each training step trains on, with the state it starts from.

    `fetch(index)` gives batch `index` on the device (the loop's `_batch`)."""

    fetch: Any
    steps: int  # the time axis's length
    length: int  # time steps per chunk
    _index: int = -1
    _batch: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None
    _state: tuple[Tensor, ...] | None = None
    _next: int = field(default=-1)  # the chunk `_state` is the start of
    restored: tuple[Tensor, ...] | None = None  # from a checkpoint, for the first chunk resumed

    @property
    def per_sequence(self) -> int:
        return math.ceil(self.steps / self.length)

    def at(self, step: int, model: nn.Module):
        """Inputs, targets and starting state of training step `step`'s chunk."""

        index, chunk = divmod(step, self.per_sequence)
        if index != self._index:
            self._index, self._batch, self._state = index, self.fetch(index), None
        inputs, targets = self._batch
        first = next(iter(inputs.values()))
        begin, end = chunk * self.length, min((chunk + 1) * self.length, self.steps)
        if chunk == 0:
            self._state = model.init_state(first.shape[0], first.shape[2])
        elif self._next != chunk:  # resumed in mid-sequence: the state the checkpoint carried
            if self.restored is None:
                raise RuntimeError(
                    f"step {step} resumes chunk {chunk} of a sequence, but the checkpoint holds "
                    "no carried state"
                )
            self._state, self.restored = self.restored, None
        return (
            {k: v[:, begin:end] for k, v in inputs.items()},
            {k: v[:, begin:end] for k, v in targets.items()},
            self._state,
        )

    def carried(self, step: int) -> tuple[Tensor, ...] | None:
        """The state the next chunk starts from, after training step `step` (counted from 1),
        when that chunk continues a sequence; None at a sequence's end."""
        return self._state if step % self.per_sequence else None

    def carry(self, step: int, state: tuple[Tensor, ...]) -> None:
        """Keep the state `step`'s chunk ended in, detached: the next chunk's gradient stops at
        its first step."""
        self._state = tuple(s.detach() for s in state)
        self._next = step % self.per_sequence + 1
