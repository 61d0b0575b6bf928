"""The losses `epicycle train` scores outputs with (`objective.py` says which output gets which):
cross-entropy over row chunks, mean squared error, Huber, and the angular loss of (sine, cosine)
pairs. Each returns a float32 scalar, whatever precision the model ran in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# float32 elements of one cross-entropy chunk (256 MiB): `CHUNK_ELEMENTS // vocab` rows at a time
CHUNK_ELEMENTS = 1 << 26


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss and its gradient `(softmax - onehot) / rows` at once, one chunk of rows at a time;
    the gradient is kept in the logits' dtype, so backward is one multiply."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_rows: int) -> Tensor:  # type: ignore[override]
        count = logits.shape[0]
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, count, chunk_rows):
            log_p = logits[start : start + chunk_rows].float().log_softmax(dim=-1)
            picked = targets[start : start + chunk_rows, None]
            total = total - log_p.gather(1, picked).sum()
            if grad is not None:
                probabilities = log_p.exp_()
                probabilities.scatter_add_(
                    1, picked, torch.full_like(picked, -1, dtype=log_p.dtype)
                )
                grad[start : start + chunk_rows] = probabilities.mul_(1 / count)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def chunked_cross_entropy(logits: Tensor, targets: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Mean cross-entropy of `logits (rows, classes)` against `targets (rows,)`: the value and the
    gradient of `F.cross_entropy`, but no float32 copy of the whole batch's logits ever exists,
    only one chunk's (Liger's fused cross-entropy, without fusing the head's matmul into it)."""
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    return _ChunkedCrossEntropy.apply(logits, targets, rows)


def angular_loss(predicted: Tensor, target: Tensor, layout: str = "halves") -> Tensor:
    """Mean `1 - cos(a - b)` over the angles, `a` the direction of each predicted (sine, cosine)
    vector and `b` the target's: `cos(a - b)` is the two vectors' cosine similarity. `halves`:
    every sine, then every cosine; `pairs`: `(sin, cos)` of each angle in turn."""
    predicted, target = predicted.float(), target.float()
    k = predicted.shape[-1] // 2
    if layout == "pairs":
        a, b = predicted.unflatten(-1, (k, 2)), target.unflatten(-1, (k, 2))
    else:
        a = predicted.unflatten(-1, (2, k)).transpose(-1, -2)
        b = target.unflatten(-1, (2, k)).transpose(-1, -2)
    return (1 - F.cosine_similarity(a, b, dim=-1, eps=1e-6)).mean()


def output_loss(spec, predicted: Tensor, target: Tensor) -> Tensor:
    """One output's loss against its target; `spec` is its `objective.OutputLoss`."""
    if spec.loss == "cross_entropy":
        return chunked_cross_entropy(predicted.flatten(0, -2), target.flatten())
    if spec.loss == "mse":
        return F.mse_loss(predicted.float(), target.float())
    if spec.loss == "huber":
        return F.huber_loss(predicted.float(), target.float(), delta=spec.delta)
    return angular_loss(predicted, target, spec.layout)
