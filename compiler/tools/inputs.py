"""Random inputs shaped as a spec declares them: what `compile`'s smoke forward, `export`'s example
and the tests feed a model. One place, so a new input shape (the time axis) reaches all of them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


def random_inputs(
    spec: Any,
    *,
    batch: int = 2,
    tokens: int = 8,
    time_steps: int = 3,
    seed: int | None = None,
    device: Any = "cpu",
) -> dict[str, Tensor]:
    """Every input of `spec` in declaration order: token ids below its vocabulary, or standard
    normal features; `(batch, tokens)` or, with a time axis, `(batch, time_steps, tokens)` (then
    `width`). Drawn from `seed` (default the spec's), so two calls give the same values."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed if seed is None else seed)
    lead = (batch, time_steps) if spec.time is not None else (batch,)
    inputs = {}
    for name, declared in spec.inputs.items():
        if declared.kind == "tokens":
            value = torch.randint(0, declared.vocab, (*lead, tokens), generator=generator)
        else:
            value = torch.randn(*lead, tokens, declared.width, generator=generator)
        inputs[name] = value.to(device)
    return inputs
