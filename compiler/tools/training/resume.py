"""Checkpoints of a training run and resuming from them step for step: the spec must match the
checkpoint's, and the weights, optimizer, schedule, RNG states and data position are saved (every
rank takes part, rank 0 writes; `compiler.tools.checkpoint` holds the files) and restored, and
dropout seeded per rank when there is nothing to restore."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compiler.language.diagnostics import Diagnostic, Span, SpecError

if TYPE_CHECKING:  # torch loads on first use: `epicycle validate` never needs it
    from torch import Tensor, nn

    from compiler.ir import IR
    from compiler.tools.training.processes import Processes

log = logging.getLogger(__name__)


def spec_differences(ir: IR, checkpoint_text: str, checkpoint: str) -> list[Diagnostic]:
    """Where the spec differs from the one embedded in a checkpoint, each located in the spec.
    The `train:` section may change between runs (more steps, another learning rate)."""
    from compiler.language.frontend import load_spec_text

    saved = load_spec_text(checkpoint_text, f"{checkpoint}#spec").spec
    old = saved.model_dump(mode="json", by_alias=True, exclude={"train"})
    new = ir.spec.model_dump(mode="json", by_alias=True, exclude={"train"})
    return [
        ir.error(
            path,
            f"`{'.'.join(map(str, path))}` is {_show(b)} here but {_show(a)} in the checkpoint "
            f"being resumed ({checkpoint})",
            "resume with the spec the checkpoint was trained from (its text is in "
            f"{Path(checkpoint) / 'spec.yaml'}), or start a new run without `--resume`",
        )
        for path, a, b in _differences(old, new, ())
    ]


def _differences(old: Any, new: Any, path: tuple) -> Iterator[tuple[tuple, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            yield from _differences(old.get(key), new.get(key), (*path, key))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _differences(a, b, (*path, i))
    elif old != new:
        yield path, old, new


def _show(value: Any) -> str:
    return "absent" if value is None else json.dumps(value)


def seed_dropout(seed: int, processes: Processes, previous: Any) -> None:
    """Dropout draws from torch's global generator: seeded per rank, or restored on resume."""
    import torch

    if previous is not None:
        saved = previous.state["rng"]
        if saved["world"] == processes.world:
            rank = f"rng/{processes.rank}"
            torch.set_rng_state(previous.tensors[f"{rank}/cpu"])
            if f"{rank}/cuda" in previous.tensors and processes.device.startswith("cuda"):
                torch.cuda.set_rng_state(previous.tensors[f"{rank}/cuda"])
            return
        log.warning(
            "the checkpoint was trained on %d processes, this run has %d: dropout is reseeded, so "
            "the run will not repeat an uninterrupted one exactly",
            saved["world"],
            processes.world,
        )
        seed = seed + previous.step
    torch.manual_seed(seed + processes.rank)


def _rng_tensors(processes: Processes) -> dict[str, Tensor]:
    """Every rank's generator states, gathered to all (rank 0 writes them)."""
    import torch

    states = {"cpu": torch.get_rng_state()}
    if processes.device.startswith("cuda"):
        states["cuda"] = torch.cuda.get_rng_state()
    if processes.world == 1:
        return {f"rng/0/{k}": v for k, v in states.items()}
    import torch.distributed as dist

    gathered_states = {}
    for kind, state in states.items():
        local = state.to(processes.device)
        parts = [torch.empty_like(local) for _ in range(processes.world)]
        dist.all_gather(parts, local)
        gathered_states.update({f"rng/{r}/{kind}": p.cpu() for r, p in enumerate(parts)})
    return gathered_states


def _gathered(tensors, processes: Processes, prefix: str) -> dict[str, Tensor]:
    """Each rank's `tensors` (same shapes on every rank), gathered to all as
    `prefix/<rank>/<i>`."""
    import torch

    if processes.world == 1:
        return {f"{prefix}/0/{i}": t.detach().cpu() for i, t in enumerate(tensors)}
    import torch.distributed as dist

    out = {}
    for i, tensor in enumerate(tensors):
        local = tensor.detach().contiguous().to(processes.device)
        parts = [torch.empty_like(local) for _ in range(processes.world)]
        dist.all_gather(parts, local)
        out.update({f"{prefix}/{r}/{i}": p.cpu() for r, p in enumerate(parts)})
    return out


def carried_state(previous: Any, processes: Processes) -> tuple[Tensor, ...] | None:
    """This rank's carried time-axis state from a checkpoint saved in mid-sequence, or None."""
    prefix = f"tbptt/{processes.rank}/"
    found = sorted(
        (int(k.removeprefix(prefix)), v)
        for k, v in previous.tensors.items()
        if k.startswith(prefix)
    )
    return tuple(v.to(processes.device) for _, v in found) or None


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_run(
    model, root, optimizer, schedule, scaler, step, data, settings, processes, out, carried=None
) -> None:
    """A checkpoint of everything resuming needs; collectives on every rank, files on rank 0.
    `data.state()` says which data the run read (file, digest, vocabulary); the data position is
    the step alone. `carried`: on a time axis stopped in mid-sequence, the state each rank carries
    into its next chunk (`tbptt/<rank>/<i>`), so the resumed run continues from that very state."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from compiler.tools.checkpoint import TrainingState, save_checkpoint

    weights = None
    if processes.strategy == "fsdp":
        full = get_model_state_dict(root, options=_state_options())
        weights = {k.removeprefix("model."): v for k, v in full.items()}
    if processes.strategy == "fsdp":
        optimizer_state = get_optimizer_state_dict(root, optimizer, options=_state_options())
    else:
        optimizer_state = _named_optimizer_state(root, optimizer)
    rng = _rng_tensors(processes)
    kept_state = {} if carried is None else _gathered(carried, processes, "tbptt")
    if not processes.leader:
        return
    state = TrainingState(step)
    kept = data.state()  # the format, and the vocabulary or tokenizer the ids came from
    if "vocabulary" in kept:  # beside the data too: what a sampler decodes ids with
        state.state["vocabulary"] = kept["vocabulary"]
    state.state["data"] = {**kept, "file": data.path, "sha256": data.sha256, "position": step}
    state.state["settings"] = json.loads(settings.model_dump_json())
    state.state["rng"] = {"world": processes.world}
    state.tensors.update(rng)
    state.tensors.update(kept_state)
    state.pack("optimizer", optimizer_state)
    state.pack("schedule", schedule.state_dict())
    if scaler.is_enabled():  # fp16: the loss scale and its growth tracker
        state.pack("scaler", scaler.state_dict())
    try:
        save_checkpoint(model, out, weights=weights, training=state)
    except OSError as exc:
        raise SpecError(
            [
                Diagnostic(
                    Span(str(out), 1, 1),
                    f"cannot write the checkpoint of step {step}: {exc.strerror or exc}",
                    "the checkpoint already there is unchanged; free space (or choose another "
                    "`--out`) and `--resume` from it",
                )
            ]
        ) from None


def restore_run(root, optimizer, schedule, scaler, previous, processes) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    saved = previous.unpack("optimizer")
    if processes.strategy == "fsdp":
        set_optimizer_state_dict(root, optimizer, saved, options=_state_options())
    else:
        index = {name: i for i, name in enumerate(_parameter_names(root, optimizer))}
        optimizer.load_state_dict(
            {
                "state": {index[name]: value for name, value in saved["state"].items()},
                "param_groups": [
                    {**group, "params": [index[name] for name in group["params"]]}
                    for group in saved["param_groups"]
                ],
            }
        )
    schedule.load_state_dict(previous.unpack("schedule"))
    if scaler.is_enabled() and "scaler" in previous.state:
        scaler.load_state_dict(previous.unpack("scaler"))


def _parameter_names(root: nn.Module, optimizer: Any) -> list[str]:
    """The optimizer's parameters in `state_dict` order, by name (as FSDP's state dicts spell
    them), so checkpoints of every strategy read alike."""
    module = getattr(root, "module", root)  # DDP's wrapped module
    names = {id(p): n for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _named_optimizer_state(root: nn.Module, optimizer: Any) -> dict[str, Any]:
    names = _parameter_names(root, optimizer)
    state = optimizer.state_dict()
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
