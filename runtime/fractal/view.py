"""A compiled model seen through one of its fractal nodes: every level at once, any sub-model alone,
and merging separately trained models into the slices (docs/designs.md, design 001).

`model.node(name).fractal` (or `model.fractal(name)`) returns a `FractalView`. The outputs it serves are the spec's outputs
that read that node alone; a sub-model's output head is the matching column slice of the full
head (with `tie: true`, the sliced token embedding, as in the original), and its input embedding
is the matching column slice of the input's table or projection.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.fractal.levels import Window
from runtime.fractal.stacked import IGNORED, member_loss, split_batch
from runtime.fractal.transformer import FractalTransformer, level_loss
from runtime.ports import FeatureInput, LinearHead, PooledHead, TokenInput, check_context

# The view reads a `runtime.model.GraphModel` through one of its `NodeHandle`s; the model makes
# its views, so this module names those types without importing them (an import circle otherwise).
GraphModel = NodeHandle = Any


class FractalView:
    def __init__(self, handle: NodeHandle):
        """The view of fractal node `handle` (`model.node(name)`); `handle.fractal_problem` says
        why a fractal has none (it receives messages, or no output reads it alone)."""
        problem = handle.fractal_problem
        if problem is not None:
            raise ValueError(problem)
        self.model: GraphModel = handle.model
        self.node, self.handle = handle.name, handle
        self.fractal: FractalTransformer = handle.module
        self.inputs = handle.plan.inputs
        self.outputs = list(handle.outputs)
        # each output's per-level losses from the latest `loss` call, detached (for `report`)
        self._level_losses: dict[str, Tensor] = {}

    @property
    def levels(self) -> int:
        return self.fractal.fractal.levels

    def level_weights(self) -> tuple[float, ...]:
        return self.fractal.fractal.weights()

    def report(self) -> dict[str, Any]:
        """Levels, their loss weights and, once `loss` has run, each level's latest loss (the mean
        over the outputs scored): this node's `fractal` entry in `GraphModel.report()`."""
        entry: dict[str, Any] = {"levels": self.levels, "level_weights": list(self.level_weights())}
        if self._level_losses:
            latest = torch.stack(list(self._level_losses.values())).mean(0)
            entry["level_loss"] = [float(v) for v in latest]
        return entry

    # ------------------------------------------------------------------ running

    def all_levels(self, *args: Tensor, **kwargs: Tensor) -> dict[str, list[Tensor]]:
        """Every sub-model of every level in one lock-step pass. Per output, a list over levels of
        `(batch, tokens, k_level, out)` (pooled heads: `(batch, k_level, out)`)."""
        stack = self.fractal.level_stack
        members = self._stacked_outputs(args, kwargs, self.outputs)
        if members is not None:
            return {name: stack.split_levels(y) for name, y in members.items()}
        x = self._stream(self.model._bind(args, kwargs), 0, self.fractal.cfg.width)
        states = self.fractal.run(x, self.fractal.all_windows(), as_columns=False)
        return {
            name: [_blocked_head(self.model.outputs[name], h) for h in states]
            for name in self.outputs
        }

    def loss(
        self, targets: Tensor, *args: Tensor, output: str | None = None, **kwargs: Tensor
    ) -> tuple[Tensor, list[Tensor]]:
        """Cross-entropy over all levels at once, weighted by the spec's `level_weights`; returns the
        total and each level's mean over its sub-models. `output` defaults to the only one served.
        Under `level_batch: split`, a model in training mode trains level `l` on the `l`-th of
        `levels` shares of the batch; in evaluation mode every level is scored on every sequence,
        so validation losses compare across recipes."""
        output = output or self._only_output()
        total, per_level = self._loss(targets, args, kwargs, output)
        self._level_losses[output] = torch.stack(per_level).detach()
        return total, per_level

    def _loss(
        self, targets: Tensor, args: tuple, kwargs: dict, output: str
    ) -> tuple[Tensor, list[Tensor]]:
        split = self.fractal.fractal.level_batch == "split" and self.model.training
        weights = self.level_weights()
        members = self._stacked_outputs(args, kwargs, [output], split)
        if members is not None:
            stack = self.fractal.level_stack
            each = stack.member_targets(targets, split)
            return member_loss(members[output], each, stack.members_per_level, weights)
        if not split:
            logits = self.all_levels(*args, **kwargs)[output]
            return level_loss(logits, targets, weights)
        values = self.model._bind(args, kwargs)
        x = split_batch(self._stream(values, 0, self.fractal.cfg.width), self.levels, 0.0)
        shares = split_batch(targets, self.levels, IGNORED)
        per_level = []
        for level, window in enumerate(self.fractal.all_windows()):
            state = self.fractal.run(x[level], [window], as_columns=False)[0]
            logits = _blocked_head(self.model.outputs[output], state)
            per_level.append(level_loss([logits], shares[level])[0])
        total = sum(w * loss for w, loss in zip(weights, per_level, strict=True))
        return total, per_level

    def _stacked_outputs(
        self, args: tuple, kwargs: dict, outputs: list[str], split: bool = False
    ) -> dict[str, Tensor] | None:
        """Under the stacked schedule, each output of every sub-model, `(members, ...)`; else None."""
        fractal = self.fractal
        if not fractal.fractal.stacked(fractal.cfg.width, fractal.norm_out.weight.device):
            return None
        stack = fractal.level_stack
        x = self._stream(self.model._bind(args, kwargs), 0, fractal.cfg.width)
        states = stack.run(fractal, x, split)
        return {name: stack.member_outputs(self.model.outputs[name], states) for name in outputs}

    def sub_model(self, level: int, index: int = 0) -> FractalSubModel:
        """Sub-model `(level, index)` as a module of its own; it shares this model's parameters and
        computes only what it needs (its slice; plus its descendants or ancestors when residual
        streams are exchanged)."""
        self.fractal.check_address(level, index)
        return FractalSubModel(self, level, index)

    # ------------------------------------------------------------------ merging

    @torch.no_grad()
    def merge(self, sources: dict[tuple[int, int], GraphModel]) -> None:
        """Make sub-model `(level, index)` of this model a copy of each source: a model compiled from
        a plain-transformer spec of the sub-model's shape, with the same inputs and outputs. The
        transformer's weights go into the diagonal blocks, token tables and head weights into
        their column slices; blocks no source covers keep their values."""
        shared_bias: dict[str, tuple[tuple[int, int], Tensor]] = {}
        for (level, index), source in sources.items():
            self.fractal.check_address(level, index)
            where = f"source for sub-model ({level}, {index})"
            body = [node for node in source.nodes() if node.address is not None]
            if len(body) != 1:
                raise ValueError(f"{where}: expected a model of one transformer node")
            self.fractal.implant(level, index, body[0].module)
            reads = {
                name: read
                for (name, _), read in zip(body[0].plan.inputs, body[0].reads, strict=True)
            }
            a, b = self.fractal.columns(Window(level, index, 1))
            for name, _ in self.inputs:
                mine = self.model.inputs[name]
                theirs = dict(source.inputs).get(name)
                if theirs is None or type(theirs) is not type(mine):
                    raise ValueError(f"{where}: it has no {type(mine).__name__} input `{name}`")
                if not isinstance(reads.get(name), nn.Identity):
                    raise ValueError(f"{where}: its input `{name}` must have the node's width")
                if isinstance(mine, TokenInput):
                    if theirs.vocab != mine.vocab:
                        raise ValueError(
                            f"{where}: vocabulary {theirs.vocab}, expected {mine.vocab}"
                        )
                    mine.table.weight[:, a:b] = theirs.table.weight
                else:
                    mine.proj.weight[a:b] = theirs.proj.weight
                    mine.proj.bias[a:b] = theirs.proj.bias
            for name in self.outputs:
                head = self.model.outputs[name]
                theirs = dict(source.outputs).get(name)
                if theirs is None or type(theirs) is not type(head):
                    raise ValueError(f"{where}: it has no {type(head).__name__} output `{name}`")
                tied = head.proj.weight is _table_weight(self.model)
                if tied != (theirs.proj.weight is _table_weight(source)):
                    raise ValueError(
                        f"{where}: output `{name}` must be tied to the embedding exactly when this one is"
                    )
                if not tied:
                    head.proj.weight[:, a:b] = theirs.proj.weight
                if head.proj.bias is not None:
                    earlier = shared_bias.get(name)
                    if earlier is not None and not torch.equal(earlier[1], theirs.proj.bias):
                        raise ValueError(
                            f"{where}: output `{name}`'s bias differs from that of the source for "
                            f"sub-model {earlier[0]}; every sub-model shares one bias, so both cannot be exact"
                        )
                    head.proj.bias.copy_(theirs.proj.bias)
                    shared_bias[name] = ((level, index), theirs.proj.bias.clone())

    # ------------------------------------------------------------------ internals

    def _only_output(self) -> str:
        if len(self.outputs) != 1:
            raise ValueError(
                f"fractal `{self.node}` feeds outputs {self.outputs}; name one with `output=`"
            )
        return self.outputs[0]

    def _stream(self, values: dict[str, Tensor], a: int, b: int) -> Tensor:
        """Columns `[a, b)` of the fractal's input stream, computing only those columns."""
        reads = self.handle.reads
        x = None
        for (name, _), read in zip(self.inputs, reads, strict=True):
            module, value = self.model.inputs[name], values[name]
            check_context(name, module, value)
            if isinstance(read, nn.Identity) and isinstance(module, TokenInput):
                part = F.embedding(value, module.table.weight[:, a:b])
            elif isinstance(read, nn.Identity) and isinstance(module, FeatureInput):
                part = F.linear(value, module.proj.weight[a:b], module.proj.bias[a:b])
            else:
                part = F.linear(module(value), read.weight[a:b])
            x = part if x is None else x + part
        if x is None:
            raise ValueError(f"fractal `{self.node}` reads no input")
        return x


class FractalSubModel(nn.Module):
    """One sub-model of a compiled fractal, runnable alone: `forward` takes the spec's inputs and
    returns the outputs that read the fractal, computed from this sub-model's slices only."""

    def __init__(self, view: FractalView, level: int, index: int):
        super().__init__()
        self.model = view.model  # registered: .to(), .eval() and parameters() follow the parent
        self.view, self.level, self.index = view, level, index

    def forward(self, *args: Tensor, **kwargs: Tensor) -> dict[str, Tensor]:
        view, fractal = self.view, self.view.fractal
        windows = fractal.sub_model_windows(self.level, self.index)
        lo = min(fractal.columns(w)[0] for w in windows)
        hi = max(fractal.columns(w)[1] for w in windows)
        x = view._stream(self.model._bind(args, kwargs), lo, hi)
        state = fractal.run(x, windows, offset=lo)[-1]
        a, b = fractal.columns(windows[-1])
        result = {}
        for name in view.outputs:
            head = self.model.outputs[name]
            read = head.pool_tokens(state) if isinstance(head, PooledHead) else state
            result[name] = F.linear(read, head.proj.weight[:, a:b], head.proj.bias)
        return result

    def extra_repr(self) -> str:
        return f"level={self.level}, index={self.index}, width={self.view.fractal.sub_config(self.level).width}"


def _blocked_head(head: nn.Module, state: Tensor) -> Tensor:
    """Apply a read-out head to all `k` sub-models of a level at once, `state` being sub-model-major
    `(k, batch, tokens, d/k)`: sub-model `j` reads the `j`-th column block of the head's weight.
    Returns `(batch, tokens, k, out)` (pooled heads `(batch, k, out)`), a view of a
    sub-model-major result."""
    if isinstance(head, PooledHead):
        state = head.pool_tokens(state)
    elif not isinstance(head, LinearHead):
        raise TypeError(f"cannot slice a {type(head).__name__} head")
    k = state.shape[0]
    weight = head.proj.weight.unflatten(1, (k, -1)).transpose(0, 1)  # (k, out, d/k)
    flat = state.reshape(k, -1, state.shape[-1])
    y = torch.bmm(flat, weight.transpose(1, 2))
    if head.proj.bias is not None:
        y = y + head.proj.bias
    return y.view(*state.shape[:-1], -1).movedim(0, -2)


def _table_weight(model: GraphModel) -> Tensor | None:
    tables = [m.table.weight for m in model.inputs.values() if isinstance(m, TokenInput)]
    return tables[0] if len(tables) == 1 else None
