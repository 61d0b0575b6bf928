"""The spec's `train:` section made real: the optimizer and schedule it names, and gradient clipping.

    model = compiler.build_model("specs/components.yaml")
    optimizer, schedule = compiler.build_optimizer(model)
    for step in range(model.spec.train.steps):
        loss = task_loss(model(batch)) + model.auxiliary_loss(step)
        loss.backward()
        clip_gradients(model)
        optimizer.step(); schedule.step(); optimizer.zero_grad()

Optimizers and schedules are registry components (`compiler.language.registry`): `adamw`, `sgd`, `fam`
(frequency-adaptive momentum, docs/designs.md, design 003), `constant`, `warmup_cosine`, or others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compiler.language.registry import REGISTRY

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    import torch
    from torch import nn


def build_optimizer(
    model: nn.Module, train: Any = None, *, fused: bool = False
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and learning-rate schedule of `train` (default: the model's spec's section).
    `fused`: where the registry's optimizer is torch's AdamW, its fused CUDA kernel (one launch for
    every parameter, and a gradient scaler's inf check without a host sync)."""
    from compiler.components import AdamW, Constant

    train = train if train is not None else model.spec.train
    chosen = train.optimizer if train.optimizer is not None else AdamW()
    optimizer = REGISTRY.get("optimizer", chosen.kind).build(model, **chosen.options())
    if fused:
        optimizer = fused_adamw(optimizer)
    schedule = train.schedule if train.schedule is not None else Constant()
    scheduler = REGISTRY.get("schedule", schedule.kind).build(
        optimizer, train.steps, **schedule.options()
    )
    return optimizer, scheduler


def clip_gradients(model: nn.Module, train: Any = None) -> torch.Tensor | None:
    """Clip the global gradient norm to the spec's `grad_clip` (nothing when it is null)."""
    import torch

    train = train if train is not None else model.spec.train
    if train.grad_clip is None:
        return None
    return torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)


def fused_adamw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same AdamW (parameter groups and hyper-parameters) with `fused=True`; any other
    optimizer as it is."""
    import inspect

    import torch

    if type(optimizer) is not torch.optim.AdamW:
        return optimizer
    accepted = set(inspect.signature(torch.optim.AdamW).parameters) - {"params", "fused", "foreach"}
    groups = [
        {k: v for k, v in group.items() if k == "params" or k in accepted}
        for group in optimizer.param_groups
    ]
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return torch.optim.AdamW(groups, **defaults, fused=True)
