"""The resource guard: before any weight is allocated, compare what the model needs with a budget.

A spec that asks for more memory than the machine has should fail with the numbers, not be killed
by the kernel half-way through initialisation. The estimate is deliberately simple and documented:

* parameters: counted exactly on the meta device (the `estimate` pass), 4 bytes each in float32;
* training adds a gradient and AdamW's two moments per parameter (x4 in all);
* activations, when a batch shape is given: per token and block, about `34 * width` values saved
  for backward plus `5 * heads * tokens` for attention scores when they are materialised
  (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"),
  times feedback steps for `unroll`, in 4-byte floats. It is an upper estimate for fused kernels.

The default budget is the free memory of the target device (`torch.cuda.mem_get_info`, or the
available physical memory on the CPU: `compiler.tools.training.memory.available_memory`). A
training step's own estimate, per device and precision, is `compiler.tools.training.memory`.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.ir import IR, node_id
from compiler.language.diagnostics import Diagnostic, SpecError

GiB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    training_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.training_state + self.activations


def estimate_memory(
    ir: IR, *, training: bool = False, batch: int = 0, tokens: int = 0
) -> MemoryEstimate:
    parameters = 4 * ir.facts.parameters
    activations = 0
    if batch and tokens:
        federation = ir.facts.federation
        steps = federation.steps if federation.mode == "unroll" else 1
        for name in federation.nodes:
            cfg = ir.graph.nodes[node_id(name)]["config"]
            per_token_block = 34 * cfg.width + 5 * cfg.heads * tokens
            activations += 4 * batch * tokens * cfg.layers * per_token_block * steps
    return MemoryEstimate(parameters, 3 * parameters if training else 0, activations)


def free_memory(device: str | None) -> int | None:
    """Bytes free on `device`, or None when it cannot be told."""
    import torch

    from compiler.tools.training.memory import available_memory

    return available_memory(str(torch.device(device or "cpu")))[0]


def check_resources(
    ir: IR,
    *,
    device: str | None = None,
    budget: int | None = None,
    training: bool = False,
    batch: int = 0,
    tokens: int = 0,
) -> MemoryEstimate:
    """Raise `SpecError` with the numbers if the estimate exceeds the budget (default: free memory)."""
    need = estimate_memory(ir, training=training, batch=batch, tokens=tokens)
    source = "the budget you set"
    if budget is None:
        budget = free_memory(device)
        source = f"free memory on {device or 'cpu'}"
    if budget is None or need.total <= budget:
        return need
    parts = [f"parameters {_size(need.parameters)} in float32"]
    if need.training_state:
        parts.append(f"gradients and AdamW state {_size(need.training_state)}")
    if need.activations:
        parts.append(f"activations {_size(need.activations)} for batch {batch} x {tokens} tokens")
    raise SpecError(
        [
            Diagnostic(
                ir.span(("nodes",), key=True),
                f"this model needs about {_size(need.total)} ({' + '.join(parts)}) "
                f"but the budget is {_size(budget)} ({source})",
                "shrink the spec (widths, layers, nodes), use a device with more memory, raise the budget "
                "(`--budget` / `budget=`), or check the spec without building it (`epicycle validate`)",
            )
        ]
    )


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"
