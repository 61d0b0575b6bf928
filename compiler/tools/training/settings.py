"""How one `epicycle train` run goes: its command-line options, the device and precision they
resolve to on this machine, and the spec's `train:` section with the command line's values put
over it.

Devices: `auto` (the default) is CUDA when torch sees a GPU (under `torchrun`, when this host has a
GPU for every local process), else the CPU; `cpu`, `cuda` (under torchrun: the GPU of the local
rank), `cuda:N` and `mps` name one. Precisions: `auto` is bf16 autocast on CUDA, fp32 elsewhere;
`fp32` runs float32 matmuls as TF32 on CUDA; `fp16` autocasts to float16 with a gradient scaler
(CUDA only); `bf16` autocasts to bfloat16 on CUDA, and on the CPU too (torch's CPU autocast: a
way to try a GPU recipe's numerics, usually slower than fp32 on a CPU). A device or precision this
machine cannot honour is a `UsageError` (exit 2), raised before anything is read or written.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError

if TYPE_CHECKING:
    from compiler.ir import IR

log = logging.getLogger(__name__)

DEVICES = "auto, cpu, cuda, cuda:N or mps"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHED_MODES = ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs


class UsageError(ValueError):
    """A command-line value this machine cannot honour (`epicycle train` exits 2)."""


@dataclass(frozen=True)
class RunOptions:
    """How one `epicycle train` invocation runs; the rest comes from the spec's `train:`."""

    out: str
    data: str | None = None  # default: the spec's `train.data`, else data/shakespeare.txt
    resume: str | None = None
    stop_at: int | None = None  # stop after this step; the schedule still spans `steps`
    log_every: int = 10
    eval_batches: int = 8
    # auto | cpu | cuda | cuda:N | mps; default: $EPICYCLE_DEVICE, else auto (as `--device`)
    device: str = field(default_factory=lambda: os.environ.get("EPICYCLE_DEVICE", "auto"))
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    compile: bool = False
    compile_mode: str = "default"  # torch.compile's mode; reduce-overhead: CUDA graphs
    strategy: str = "auto"  # auto | none | ddp | fsdp
    tensorboard: bool | None = None  # None: event files when the tensorboard package is installed
    overrides: tuple = ()  # `--set PATH=VALUE`s (str or `compiler.language.overrides.Override`)


@dataclass(frozen=True)
class Machine:
    """Where and in what precision a run computes, resolved from `--device` and `--precision`."""

    device: str  # cpu, cuda (one process: cuda:N as given) or mps
    precision: str  # bf16 | fp16 | fp32

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def autocast_dtype(self) -> Any:
        """The dtype the forward autocasts to, or None (fp32: no autocast)."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


def resolve_machine(device: str, precision: str, compile_mode: str = "default") -> Machine:
    """The device and precision of this run on this machine, or a `UsageError` saying what to use."""
    resolved = resolve_device(device)
    chosen = resolve_precision(precision, resolved)
    if compile_mode not in COMPILE_MODES:
        raise UsageError(f"unknown --compile-mode `{compile_mode}`: use {', '.join(COMPILE_MODES)}")
    if compile_mode in GRAPHED_MODES and not resolved.startswith("cuda"):
        raise UsageError(
            f"--compile-mode {compile_mode} records CUDA graphs, and this run is on {resolved}: "
            "use --compile-mode default (or max-autotune-no-cudagraphs)"
        )
    return Machine(resolved, chosen)


def resolve_device(device: str) -> str:
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        if gpus and gpus >= local_world:
            return "cuda"
        if gpus:
            log.info(
                "--device auto: %d process(es) on this host but %d GPU(s); training on the CPU",
                local_world,
                gpus,
            )
        return "cpu"
    if device == "cpu":
        return "cpu"
    if device == "mps":
        if not (torch.backends.mps.is_available()):
            raise UsageError("--device mps: no Apple GPU (MPS) here; use --device auto or cpu")
        return "mps"
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise UsageError(f"unknown device `{device}`: use {DEVICES}")
    if not gpus:
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if not torch.backends.cuda.is_built()
            else "torch sees no CUDA GPU on this machine"
        )
        raise UsageError(f"--device {device}: {why}; use --device cpu (or auto)")
    index = match.group(1)
    if launched and index is not None:
        raise UsageError(
            f"--device {device}: under torchrun each process takes the GPU of its local rank; "
            "use --device cuda"
        )
    if launched and local_rank >= gpus:
        raise UsageError(
            f"--device cuda: torchrun started {local_world} processes on this host, which has "
            f"{gpus} GPU(s); start at most {gpus} (`--nproc-per-node {gpus}`)"
        )
    if index is not None and int(index) >= gpus:
        names = "cuda:0" if gpus == 1 else f"cuda:0 .. cuda:{gpus - 1}"
        raise UsageError(f"--device {device}: this machine has {gpus} GPU(s) ({names})")
    return device


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision `{precision}`: use {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise UsageError(
            f"--precision fp16 needs a CUDA GPU (float16 autocast with a gradient scaler); this run "
            f"is on {device}: use --precision fp32 (or bf16)"
        )
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bfloat16; use --precision fp16")
    if precision == "bf16" and device == "mps":
        raise UsageError("--precision bf16: on mps epicycle trains in fp32; use --precision fp32")
    return precision


def configure_matmuls(machine: Machine) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and later: 10-bit mantissa
    inputs, float32 accumulation), which every precision benefits from."""
    import torch

    if machine.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _option_error(error: dict) -> Diagnostic:
    """A pydantic error of a `train` field set from the command line, located at its option."""
    field = str(error["loc"][0]) if error["loc"] else "train"
    option = "--lr" if field == "optimizer" else "--" + field.replace("_", "-")
    return Diagnostic(
        Span(f"command line: {option}", 1, 1),
        f"{option} {error['input']!r}: {error['msg'][0].lower()}{error['msg'][1:]}",
        f"give {option} a value the spec's `train.{field}` accepts (docs/spec.md)",
    )


def effective_train(ir: IR, **overrides: Any) -> Any:
    """The spec's `train:` section with command-line values (those not None) put over it; `lr`
    replaces the optimizer's learning rate."""
    from pydantic import ValidationError

    from compiler.components import AdamW
    from compiler.language.spec import Train

    train = ir.spec.train
    lr = overrides.pop("lr", None)
    values = {k: v for k, v in overrides.items() if v is not None}
    if lr is not None:
        optimizer = train.optimizer if train.optimizer is not None else AdamW()
        values["optimizer"] = optimizer.model_copy(update={"lr": float(lr)})
    try:
        train = Train.model_validate({**dict(train), **values})
    except ValidationError as exc:  # a command-line value outside the schema's bounds
        raise SpecError([_option_error(error) for error in exc.errors()]) from None
    schedule = train.schedule
    warmup = getattr(schedule, "warmup", 0)
    if warmup > train.steps:
        raise SpecError(
            [
                ir.error(
                    ("train", "schedule"),
                    f"a warm-up of {warmup} steps is longer than the {train.steps} training steps",
                    "train for more `--steps` or shorten the schedule's `warmup`",
                )
            ]
        )
    return train
