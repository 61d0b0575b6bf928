"""What `epicycle train` optimises: next-token prediction over the spec's `lm_head` outputs (the
task a spec must declare to be trained), plus the spec's training terms, with every fractal
node's levels trained at once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import SpecError

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    from torch import Tensor, nn

    from compiler.ir import IR
    from compiler.tools.data import Corpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LanguageTask:
    """What `train` needs from a spec: one `tokens` input and the `lm_head` outputs over it."""

    input: str
    outputs: tuple[str, ...]
    vocab: int
    context: int


def language_task(ir: IR) -> LanguageTask:
    """The spec's token input and LM heads, or a located error saying what `train` needs."""
    needs = "`epicycle train` needs one `{kind: tokens}` input and `kind: lm_head` outputs"
    inputs = ir.spec.inputs
    if len(inputs) != 1 or next(iter(inputs.values())).kind != "tokens":
        kinds = ", ".join(f"{n} ({i.kind})" for n, i in inputs.items())
        raise SpecError(
            [
                ir.error(
                    ("inputs",),
                    f"this spec's inputs are {kinds}; {needs}",
                    "train this spec with your own loop (see `compiler.tools.training`)",
                    key=True,
                )
            ]
        )
    name, spec = next(iter(inputs.items()))
    others = [n for n, o in ir.spec.outputs.items() if o.kind != "lm_head"]
    heads = tuple(n for n, o in ir.spec.outputs.items() if o.kind == "lm_head")
    if others or not heads:
        where = ("outputs", others[0]) if others else ("outputs",)
        raise SpecError(
            [
                ir.error(
                    where,
                    f"output `{others[0]}` is `kind: {ir.spec.outputs[others[0]].kind}`; {needs}"
                    if others
                    else f"this spec has no `lm_head` output; {needs}",
                    "character-level training predicts the next token: read it out with an lm_head",
                    key=True,
                )
            ]
        )
    return LanguageTask(name, heads, spec.vocab, spec.context)


def check_vocabulary(ir: IR, task: LanguageTask, corpus: Corpus) -> None:
    if corpus.characters > task.vocab:
        raise SpecError(
            [
                ir.error(
                    ("inputs", task.input, "vocab"),
                    f"`vocab: {task.vocab}` is smaller than the {corpus.characters} distinct "
                    f"characters of {corpus.path}",
                    f"set `vocab: {corpus.characters}` (or more) on input `{task.input}`",
                )
            ]
        )


def language_model_loss_class():
    import torch.nn.functional as F
    from torch import nn

    class LanguageModelLoss(nn.Module):
        """Next-token cross-entropy of the spec's LM heads plus the spec's training terms, in one
        forward, so DDP and FSDP see the whole step. Every fractal node trains all its levels at
        once (design 001), weighted by its `level_weights`: an output that reads a fractal alone
        is scored through that fractal's view, the other outputs through the model's forward."""

        def __init__(self, model: nn.Module, task: LanguageTask):
            super().__init__()
            self.model, self.task = model, task
            self.fractals = level_trained_fractals(model)
            self.scored_by = {o: view for view in self.fractals.values() for o in view.outputs}

        def forward(self, tokens: Tensor, targets: Tensor, step: int) -> tuple[Tensor, Tensor]:
            plain = [o for o in self.task.outputs if o not in self.scored_by]
            logits = self.model(tokens) if plain else {}
            losses = [
                self.scored_by[o].loss(targets, tokens, output=o)[0]
                if o in self.scored_by
                else F.cross_entropy(logits[o].flatten(0, -2), targets.flatten())
                for o in self.task.outputs
            ]
            task_loss = sum(losses) / len(losses)
            # the caller detaches the task loss: returned detached from a compiled step beside a
            # sum it shares a node with (when the spec has no training terms, `+ 0`), inductor
            # in torch 2.13 handed back the total without its graph
            return task_loss + self.model.auxiliary_loss(step), task_loss

    return LanguageModelLoss


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
