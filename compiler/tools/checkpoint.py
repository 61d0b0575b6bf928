"""Weights on disk: safetensors with the spec that made them embedded in the header.

safetensors holds tensors and a string-to-string header only, so loading a checkpoint can never run
code (a pickle can). The header carries the spec's text and SHA-256, so a checkpoint is
self-describing: `load_checkpoint(dir)` recompiles the embedded spec and loads the weights into it,
and a checkpoint whose tensors do not fit that spec is refused with the names that differ, never
loaded half-way. Files are written to a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint intact.

`epicycle train` adds `training.safetensors` beside the weights (`TrainingState`): optimizer moments
and RNG states as tensors, everything else (optimizer hyper-parameters, schedule, vocabulary, data
position, settings) as JSON in its header. Both files carry one `save_id`, so weights and a
training state from different saves are never paired.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
from torch import Tensor

from compiler.language.diagnostics import Diagnostic, Span, SpecError
from compiler.tools.outputs import publish
from runtime.model import GraphModel

WEIGHTS = "model.safetensors"
SPEC = "spec.yaml"
TRAINING = "training.safetensors"
FORMAT = "epicycle-checkpoint-1"
TRAINING_FORMAT = "epicycle-training-1"


def save_checkpoint(
    model: GraphModel,
    directory: str | Path,
    *,
    weights: dict[str, Tensor] | None = None,
    training: TrainingState | None = None,
) -> Path:
    """Write the weights (and, with `training`, the optimizer, schedule, RNG and data state).

    `weights` replaces `model.state_dict()` where the model is sharded (FSDP gathers a full one).
    Every file is written under a temporary name first and renamed only once all are written, so
    a failed save (a full disk) leaves the previous checkpoint as it was.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "spec": model.spec_text, "spec_sha256": model.spec_digest}
    if training is not None:
        metadata.update(train_step=str(training.step), save_id=uuid.uuid4().hex)
    written: list[tuple[Path, Path]] = []
    try:
        target = directory / WEIGHTS
        written.append((_temporary(directory, WEIGHTS), target))
        if weights is None:
            safetensors.torch.save_model(model, str(written[-1][0]), metadata=metadata)
        else:
            tensors, dropped = _drop_tied(model, weights)
            safetensors.torch.save_file(
                tensors, str(written[-1][0]), metadata={**dropped, **metadata}
            )
        if training is not None:
            written.append((_temporary(directory, TRAINING), directory / TRAINING))
            tensors, header = training.encode(metadata["save_id"])
            safetensors.torch.save_file(tensors, str(written[-1][0]), metadata=header)
        spec_tmp = _temporary(directory, SPEC)
        written.append((spec_tmp, directory / SPEC))
        spec_tmp.write_text(model.spec_text, encoding="utf-8")
        for temporary, final in reversed(written):  # the weights last: they name the step
            publish(temporary, final)  # safetensors creates 0600: give the umask's mode
    finally:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
    return target


def read_checkpoint_spec(path: str | Path) -> tuple[str, dict[str, str]]:
    """The embedded spec text and the header, or a located error saying what is wrong with the file."""
    path = _weights_path(path)
    shown = str(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except FileNotFoundError:
        raise SpecError(
            [
                _error(
                    shown,
                    "no checkpoint here",
                    f"expected a `{WEIGHTS}` written by `epicycle compile --out`",
                )
            ]
        ) from None
    except (OSError, safetensors.SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise SpecError(
            [
                _error(
                    shown,
                    f"not a readable safetensors checkpoint ({exc})",
                    "the file is truncated or corrupt; write it again",
                )
            ]
        ) from None
    if metadata.get("format") != FORMAT or "spec" not in metadata:
        raise SpecError(
            [
                _error(
                    shown,
                    "this safetensors file carries no epicycle spec",
                    "load it with safetensors directly",
                )
            ]
        )
    return metadata["spec"], metadata


def load_checkpoint(path: str | Path, *, device: str | None = None) -> GraphModel:
    """Rebuild the model from the embedded spec and load its weights (strictly)."""
    from compiler.language.frontend import load_spec_text
    from compiler.pipeline import build_model

    weights = _weights_path(path)
    text, _ = read_checkpoint_spec(weights)
    loaded = load_spec_text(text, f"{weights}#spec")
    model = build_model(loaded, device=device)
    load_weights(model, weights, device=device)
    return model


def load_weights(model: GraphModel, path: str | Path, *, device: str | None = None) -> None:
    """Load a checkpoint's weights into `model`, strictly: every tensor present, none extra."""
    weights = _weights_path(path)
    try:
        missing, unexpected = safetensors.torch.load_model(
            model, str(weights), strict=False, device=device or "cpu"
        )
    except (OSError, safetensors.SafetensorError, RuntimeError) as exc:
        raise SpecError(
            [
                _error(
                    str(weights),
                    f"the weights do not fit the embedded spec: {str(exc).splitlines()[0]}",
                    "the file is corrupt or was edited",
                )
            ]
        ) from None
    if missing or unexpected:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(sorted(missing)[:5])}" if missing else "",
                f"unexpected {', '.join(sorted(unexpected)[:5])}" if unexpected else "",
            )
            if part
        )
        raise SpecError(
            [_error(str(weights), f"the weights do not fit the embedded spec: {detail}")]
        )


# --------------------------------------------------------------------------- training state


@dataclass
class TrainingState:
    """Everything beyond the weights that a resumed run needs to continue step for step.

    `state` is JSON data (optimizer hyper-parameters, schedule state, vocabulary, data position,
    settings); `tensors` are the optimizer's moments and the RNG states. `pack` turns nested
    optimizer state into both: each tensor goes to safetensors under its path
    (`optimizer/state/body.w/exp_avg`) and leaves a `{"$tensor": key}` in the JSON. No pickle.
    """

    step: int
    state: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def pack(self, key: str, value: Any) -> None:
        """Store a nested structure of dicts, lists, tuples, numbers, strings and tensors."""
        self.state[key] = _flatten(value, key, self.tensors)

    def unpack(self, key: str) -> Any:
        return _unflatten(self.state[key], self.tensors)

    def encode(self, save_id: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        header = {
            "format": TRAINING_FORMAT,
            "step": str(self.step),
            "save_id": save_id,
            "state": json.dumps(self.state),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        return tensors, header


def read_training_state(directory: str | Path) -> TrainingState:
    """The training state saved beside a checkpoint's weights, checked to belong to them."""
    directory = Path(directory)
    path = directory / TRAINING
    shown = str(path)
    _, weights_header = read_checkpoint_spec(directory)
    try:
        with safetensors.safe_open(shown, framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        state = json.loads(header["state"])
        step = int(header["step"])
    except FileNotFoundError:
        raise SpecError(
            [
                _error(
                    shown,
                    "this checkpoint has weights but no training state",
                    "`--resume` needs a directory written by `epicycle train`; to start from these "
                    "weights alone, train a new run",
                )
            ]
        ) from None
    except (OSError, safetensors.SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(
            [
                _error(
                    shown,
                    f"not a readable training state ({type(exc).__name__}: {exc})",
                    "the file is truncated or corrupt; resume from an earlier checkpoint",
                )
            ]
        ) from None
    if header.get("format") != TRAINING_FORMAT:
        raise SpecError([_error(shown, "this safetensors file is not an epicycle training state")])
    if header.get("save_id") != weights_header.get("save_id"):
        raise SpecError(
            [
                _error(
                    shown,
                    f"the training state (step {step}) was not saved with the weights beside it "
                    f"(step {weights_header.get('train_step', 'unknown')})",
                    "a save was interrupted between its renames; resume from another checkpoint",
                )
            ]
        )
    return TrainingState(step, state, tensors)


def _flatten(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors[path] = value
        return {"$tensor": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _flatten(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {"$items": [[k, _flatten(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} at `{path}` in a training state")


def _unflatten(value: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$items" in value:
        return {k: _unflatten(v, tensors) for k, v in value["$items"]}
    if "$tuple" in value:
        return tuple(_unflatten(v, tensors) for v in value["$tuple"])
    return {k: _unflatten(v, tensors) for k, v in value.items()}


def _drop_tied(model: GraphModel, weights: dict[str, Tensor]) -> tuple[dict, dict[str, str]]:
    """Keep one name of each group of tied parameters, as `safetensors.torch.save_model` does
    (the first name in sorted order; the others recorded in the header), so `load_model` reads it."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(_strip_wrappers(name))
    kept = dict(weights)
    dropped = {}
    for names in groups.values():
        keep, *others = sorted(names)
        for other in others:
            kept.pop(other, None)
            dropped[other] = keep
    return {k: v.contiguous() for k, v in kept.items()}, dropped


def _strip_wrappers(name: str) -> str:
    """Parameter names as the unwrapped model spells them (no DDP `module.` / compile prefixes)."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _temporary(directory: Path, name: str) -> Path:
    return directory / f".tmp-{os.getpid()}-{name}"


def _weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def _error(file: str, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Span(file, 1, 1), message, hint)
