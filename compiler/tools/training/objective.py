"""What `epicycle train` optimises: each output's loss against its target, weighted as the spec's
`train.losses` says, plus the training terms the spec's parts declare, with every fractal node's
levels trained at once.

The losses, by output kind (`train.losses.OUTPUT.loss`; the first is the default):

* `lm_head`: `cross_entropy` against the next token of its tokens input;
* `classification`: `cross_entropy` against one class id per example;
* `regression`: `mse`, `huber` (with `delta`) or `angular` against values per token. `angular`
  reads the output's 2k values as k angles, `[sin a1 .. sin ak, cos a1 .. cos ak]` (`layout:
  halves`, as examples/antikythera_sky.py lays out the 7 longitudes) or `(sin, cos)` of each angle
  in turn (`layout: pairs`), and the target alike; the loss is the mean of `1 - cos(a - b)` over
  the angles, `a` the angle of the predicted (sine, cosine) vector, `b` the target's. Only the
  direction of the predicted vector counts, so its length is free.

The losses themselves are in `losses.py`; cross-entropy runs over row chunks there, so a 50k-token
vocabulary never holds float32 logits for the whole batch, only for one chunk at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compiler.tools.training.ports import Ports, TargetPort, ports_of

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    from torch import Tensor, nn

    from compiler.ir import IR

log = logging.getLogger(__name__)

DEFAULT_LOSS = {"lm_head": "cross_entropy", "classification": "cross_entropy", "regression": "mse"}


@dataclass(frozen=True)
class OutputLoss:
    """How one output is scored: its loss, weight and options, and the target it is scored on."""

    name: str
    loss: str  # cross_entropy | mse | huber | angular
    weight: float
    target: TargetPort
    delta: float = 1.0  # huber
    layout: str = "halves"  # angular


@dataclass(frozen=True)
class Task:
    """What `train` needs from a spec: its ports and each output's loss."""

    ports: Ports
    outputs: tuple[OutputLoss, ...]

    @property
    def context(self) -> int:
        return self.ports.context

    def output(self, name: str) -> OutputLoss:
        return next(o for o in self.outputs if o.name == name)


def training_task(ir: IR) -> Task:
    """The spec's ports and losses; `check_training` has checked `train.losses` at validate time."""
    ports = ports_of(ir)
    chosen = ir.spec.train.losses
    outputs = []
    for name, spec in ir.spec.outputs.items():
        declared = chosen.get(name)
        loss = (declared.loss if declared else None) or DEFAULT_LOSS[spec.kind]
        outputs.append(
            OutputLoss(
                name,
                loss,
                declared.weight if declared else 1.0,
                ports.target(name),
                delta=(declared.delta if declared else None) or 1.0,
                layout=(declared.layout if declared else None) or "halves",
            )
        )
    return Task(ports, tuple(outputs))


def training_loss_class():
    from torch import nn

    from compiler.tools.training.losses import output_loss

    class TrainingLoss(nn.Module):
        """Every output's weighted loss plus the spec's training terms, in one forward, so DDP and
        FSDP see the whole step. Every fractal node trains all its levels at once (design 001),
        weighted by its `level_weights`: a next-token output that reads a fractal alone is scored
        through that fractal's view, the other outputs through the model's forward.

        Returns the total (to differentiate), and each output's loss and the training terms,
        stacked (to log)."""

        def __init__(self, model: nn.Module, task: Task):
            super().__init__()
            self.model, self.task = model, task
            self.fractals = level_trained_fractals(model)
            self.scored_by = {
                o: view
                for view in self.fractals.values()
                for o in view.outputs
                if task.output(o).target.kind == "next_token"
            }

        def forward(
            self,
            inputs: dict[str, Tensor],
            targets: dict[str, Tensor],
            step: int,
            state: tuple[Tensor, ...] | None = None,
        ):
            """With `state` (a time axis's, `tbptt.py`): the chunk in `inputs` runs from it by
            `model.scan`, and the state after the chunk is returned third."""
            import torch

            plain = [o for o in self.task.outputs if o.name not in self.scored_by]
            if state is not None:
                state, predicted = self.model.scan(state, **inputs)
            else:
                predicted = self.model(**inputs) if plain else {}
            losses = []
            for spec in self.task.outputs:
                if spec.name in self.scored_by:
                    view = self.scored_by[spec.name]
                    losses.append(view.loss(targets[spec.name], output=spec.name, **inputs)[0])
                else:
                    losses.append(output_loss(spec, predicted[spec.name], targets[spec.name]))
            weighted = sum(
                o.weight * loss for o, loss in zip(self.task.outputs, losses, strict=True)
            )
            auxiliary = self.model.auxiliary_loss(step, task_loss=self.weighted_plain(targets))
            each = torch.stack([*(loss.float() for loss in losses), auxiliary.float()])
            if state is not None:
                return weighted + auxiliary, each, state
            return weighted + auxiliary, each

        def weighted_plain(self, targets: dict[str, Tensor]):
            """The weighted task loss of an outputs dict, as `feedback.correction` scores the
            outputs at the supervised states along the equilibrium solve."""

            def task_loss(outputs: dict[str, Tensor]) -> Tensor:
                return sum(
                    o.weight * output_loss(o, outputs[o.name], targets[o.name])
                    for o in self.task.outputs
                    if o.name in outputs
                )

            return task_loss

    return TrainingLoss


def level_trained_fractals(model: nn.Module) -> dict[str, Any]:
    """The fractal nodes whose levels train at once, by name, with their views. A fractal that
    cannot run its levels alone (it receives messages, or no output reads it alone) trains as one
    model; the log says why."""
    views = {}
    for node in model.nodes():
        if not node.nests:
            continue
        if node.fractal_problem is not None:
            log.warning(
                "fractal `%s` trains without level losses: %s", node.name, node.fractal_problem
            )
            continue
        views[node.name] = node.fractal
    return views
