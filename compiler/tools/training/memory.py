"""What a training step needs in memory, per device, estimated before anything is allocated.

`epicycle train --batch 1000000` used to allocate for a minute and die in the allocator; now the
run is refused at once, with the estimate and the machine's memory (`check_training_memory`).

The estimate, in bytes, for one device of `world` (data parallel: each holds batch / world):

* weights: every parameter (the exact count of `compiler.passes.estimate`) at `precision`;
* gradients: one per parameter, at `precision`;
* optimizer state: AdamW's two moments, SGD's momentum (none without momentum), FAM's one
  momentum, per parameter at `precision` (torch keeps them in the parameter's dtype); FSDP
  (`sharded`) divides weights, gradients and state by `world`;
* activations saved for backward, from Korthikanti et al. 2022 ("Reducing Activation Recomputation
  in Large Transformer Models", section 4.1), generalised to our MLP width: per token and block
  `9 * width + 2 * mlp_in` values (attention's input, q, k, v and output 5.5 w; the MLP's input,
  its inner activations 2 * mlp_in and a dropout mask; two norms), which with a 4x MLP is the
  paper's `34 w` bytes at 16 bits, plus the paper's `2.5 * heads * tokens` for the scores, their
  softmax and its dropout mask where the attention materialises them (a registered score-level
  component or token mixer); the fused kernels (flash, memory-efficient, torch's CPU kernel) keep
  one log-sum-exp per head and token instead. Times the feedback steps that keep a tape
  (`unroll`: all, `truncated`: `backprop_steps`, `equilibrium`: one), with one block more for the
  gradients backward holds while it works through a block. Plus each input's embedded stream, the
  message bus per step (state, message, gradient), each head's output four times (logits, their
  log-softmax, and the gradients of both) and each companion's hidden streams. It is meant
  as an upper bound (the test holds it within a factor of the measured peak).

`tests/test_training_memory.py` holds the estimate against measured peaks: RSS on the CPU and
`torch.cuda.max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError

if TYPE_CHECKING:
    from compiler.ir import IR

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30


@dataclass(frozen=True)
class TrainingMemory:
    """Bytes one device needs for a training step, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    parameters: int
    batch: int  # sequences on this device
    context: int
    precision: str
    world: int
    optimizer_kind: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        """One line: the total and its parts, in the user's terms."""
        per = " per device" if self.world > 1 else ""
        return (
            f"about {size(self.total)}{per}: weights {size(self.weights)} "
            f"({self.parameters:,} parameters in {self.precision}), gradients "
            f"{size(self.gradients)}, {self.optimizer_kind} state {size(self.optimizer)}, "
            f"activations {size(self.activations)} for a batch of {self.batch} x "
            f"{self.context} tokens"
        )


def estimate_training_memory(
    ir: IR,
    *,
    batch: int,
    context: int,
    precision: str = "float32",
    world: int = 1,
    sharded: bool = False,
    activation_precision: str | None = None,
) -> TrainingMemory:
    """A training step of `batch` sequences (over all `world` devices) of `context` tokens, with
    weights, gradients and optimizer state at `precision` and activations at
    `activation_precision` (default the same; under autocast the weights stay float32 and the
    activations are mostly 16-bit)."""
    activation_precision = activation_precision or precision
    for given in (precision, activation_precision):
        if given not in BYTES:
            raise ValueError(f"precision must be one of {', '.join(BYTES)}, got {given!r}")
    element = BYTES[precision]
    per_device = -(-batch // world)
    parameters = ir.facts.parameters
    kind, moments = optimizer_moments(ir)
    held = -(-parameters // world) if sharded else parameters
    values = activation_values(ir, per_device, context)
    return TrainingMemory(
        weights=held * element,
        gradients=held * element,
        optimizer=moments * held * element,
        activations=values * BYTES[activation_precision],
        parameters=parameters,
        batch=per_device,
        context=context,
        precision=precision,
        world=world,
        optimizer_kind=kind,
    )


def optimizer_moments(ir: IR) -> tuple[str, int]:
    """The optimizer's name and the tensors it keeps per parameter."""
    optimizer = ir.spec.train.optimizer if ir.spec.train is not None else None
    kind = optimizer.kind if optimizer is not None else "adamw"
    if kind == "adamw":
        return "AdamW", 2
    if kind == "sgd":
        return "SGD", 1 if optimizer.momentum else 0
    if kind == "fam":
        return "FAM", 1
    return kind, 2  # a registered optimizer: assume Adam's two moments


def activation_values(ir: IR, batch: int, tokens: int) -> int:
    """Values saved for backward in one step (see the module docstring)."""
    federation = ir.facts.federation
    taped = {"unroll": federation.steps, "truncated": federation.backprop_steps}.get(
        federation.mode, 1
    )
    per_token = 0
    for group in federation.groups:
        per_token += len(group.nodes) * block_values(group.config, tokens)
    if federation.edges:
        per_token += 3 * len(federation.nodes) * federation.bus_width
    per_token *= taped
    per_token += sum(data["width"] for _, data in ir.vertices("input"))
    per_token += sum(4 * _output_width(ir, data) for _, data in ir.vertices("output"))
    for _, config in ir.facts.companions.values():
        per_token += 4 * config.hidden * (1 + config.depth) + 4 * config.rows * config.lens_dim
    return batch * tokens * per_token


def block_values(cfg: Any, tokens: int) -> int:
    """Values one token saves for backward through all blocks of one sub-model."""
    width, heads = cfg.width, getattr(cfg, "heads", 1)
    inner = getattr(cfg, "inner_width", 4 * width) * (2 if getattr(cfg, "gated", False) else 1)
    materialised = getattr(cfg, "variant", None) is not None  # a component's own scores
    scores = (5 * heads * tokens + 1) // 2 if materialised else heads
    # and, in backward, the gradients of the block being worked through
    return (getattr(cfg, "layers", 1) + 1) * (9 * width + 2 * inner + scores)


def _output_width(ir: IR, data: dict) -> int:
    spec = data["spec"]
    if data["kind"] == "lm_head":
        tokens = [n for n, i in ir.spec.inputs.items() if i.kind == "tokens"]
        return ir.spec.inputs[spec.vocab_of or tokens[0]].vocab
    return spec.width if data["kind"] == "regression" else spec.classes


def available_memory(device: str) -> tuple[int | None, str]:
    """Bytes `device` can still give and where that figure comes from (None: it cannot tell)."""
    kind = device.split(":")[0]
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA device"
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"free on {device} (torch.cuda.mem_get_info)"
    if kind != "cpu":
        return None, f"unknown for {device}"
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (/proc/meminfo)"
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, "free RAM (sysconf)"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_training_memory(
    ir: IR,
    *,
    batch: int,
    context: int,
    precision: str = "float32",
    device: str = "cpu",
    world: int = 1,
    sharded: bool = False,
    batch_span: Span | None = None,
    activation_precision: str | None = None,
) -> TrainingMemory:
    """Refuse a step that cannot fit, before allocating: a `SpecError` at `batch_span` (where the
    batch was chosen; default the spec's `train.batch`) with the estimate and the memory."""
    need = estimate_training_memory(
        ir,
        batch=batch,
        context=context,
        precision=precision,
        world=world,
        sharded=sharded,
        activation_precision=activation_precision,
    )
    have, source = available_memory(device)
    if have is None or need.total <= have:
        return need
    fits = _largest_batch_that_fits(need, have)
    hint = (
        f"a batch of at most {fits * world} fits; lower `--batch` (or `train.batch`)"
        if fits
        else "even one sequence does not fit: shrink the model, or use a device with more memory"
    )
    raise SpecError(
        [
            Diagnostic(
                batch_span or ir.span(("train", "batch"), key=True),
                f"a training step needs {need.describe()}, but {device} has {size(have)} "
                f"({source})",
                hint + ", or train on more devices",
            )
        ]
    )


def _largest_batch_that_fits(need: TrainingMemory, have: int) -> int:
    fixed = need.weights + need.gradients + need.optimizer
    per_sequence = need.activations // max(need.batch, 1)
    if per_sequence == 0 or have <= fixed:
        return 0
    return min(need.batch, (have - fixed) // per_sequence)


def size(n: int) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
