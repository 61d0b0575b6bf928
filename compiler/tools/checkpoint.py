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

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import safetensors
import safetensors.torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
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
    _check_spec_digest(shown, metadata)
    return metadata["spec"], metadata


def spec_digest(text: str) -> str:
    """The SHA-256 a checkpoint records for its spec (as `LoadedSpec.digest` computes it)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_spec_digest(shown: str, metadata: dict[str, str]) -> None:
    """The header's spec must be the one the weights were saved from: its recorded SHA-256 is
    compared on every read (load, resume, export), so an edited header is never compiled."""
    recorded = metadata.get("spec_sha256")
    found = spec_digest(metadata["spec"])
    if recorded == found:
        return
    what = (
        "records no spec sha256"
        if not recorded
        else f"records spec sha256 {recorded[:12]}..., but its embedded spec hashes to "
        f"{found[:12]}...: the spec in the header was edited after the weights were saved"
    )
    raise SpecError(
        [
            _error(
                shown,
                f"this checkpoint {what}",
                "weights are only loaded into the spec that made them: use an unedited copy of "
                "the checkpoint, or compile the changed spec and train it (`epicycle compile "
                "SPEC --out DIR`, `epicycle train`)",
            )
        ]
    )


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
    read_checkpoint_spec(weights)  # the header first: a readable checkpoint of an unedited spec
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
    problems = training_state_problems(step, state, tensors)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SpecError(
            [
                _error(
                    shown,
                    f"the training state is damaged: {'; '.join(problems[:3])}{more}",
                    "the file was edited or written by another program; resume from an earlier "
                    "checkpoint, or train a new run",
                )
            ]
        )
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


class _StoredModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StoredTokenizer(_StoredModel):
    """The tokenizer file a text was read through, by digest."""

    file: StrictStr
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    tokens: Annotated[StrictInt, Field(ge=0)]


class StoredData(_StoredModel):
    """Which data the run read (`TrainingData.state()`: its format, and the vocabulary, tokenizer,
    token dtype or array mapping it was read with), and how far."""

    file: StrictStr
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    position: Annotated[StrictInt, Field(ge=0)]
    format: StrictStr
    vocabulary: Annotated[StrictStr, Field(min_length=1)] | None = None
    tokenizer: StoredTokenizer | None = None
    dtype: StrictStr | None = None
    arrays: dict[StrictStr, StrictStr] | None = None


class StoredRng(_StoredModel):
    """How many processes saved their generator states (`rng/<rank>/cpu` tensors)."""

    world: Annotated[StrictInt, Field(ge=1)]


Number = StrictInt | StrictFloat
Scalar = Number | StrictBool | None


class StoredTuple(_StoredModel):
    """A tuple as `TrainingState.pack` stores it (`betas`)."""

    items: Annotated[list[Scalar], Field(alias="$tuple")]


Setting = Scalar | StrictStr | list[Scalar | StrictStr] | StoredTuple


class StoredParamGroup(BaseModel):
    """An optimizer's parameter group by parameter name; its hyper-parameters vary by optimizer,
    but each is a number, a flag, a word or a list of numbers (`betas`)."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, Setting]
    params: list[StrictStr]
    lr: Number


class StoredSchedule(BaseModel):
    """A learning-rate schedule's state (`LRScheduler.state_dict()`): its counters are whole
    numbers and its rates numbers; the schedule's own settings are plain values."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, Setting]
    last_epoch: StrictInt
    step_count: Annotated[StrictInt, Field(alias="_step_count")]
    base_lrs: list[Number]
    last_lr: Annotated[list[Number], Field(alias="_last_lr")]


class StoredOptimizer(_StoredModel):
    """An optimizer state dict keyed by parameter name (every strategy writes the same shape)."""

    state: dict[str, dict[str, Any]]
    param_groups: list[StoredParamGroup]


class StoredTrainingState(_StoredModel):
    """The JSON of a training state (`TrainingState.state`) as `epicycle train` writes it: read
    through this model, a field of the wrong type is a clear refusal instead of a crash later."""

    vocabulary: Annotated[StrictStr, Field(min_length=1)] | None = None  # a character text's
    data: StoredData
    settings: dict[str, Any]
    rng: StoredRng
    optimizer: StoredOptimizer
    schedule: StoredSchedule


def training_state_problems(step: int, state: Any, tensors: dict[str, Tensor]) -> list[str]:
    """What is wrong with a training state read from disk, in words; empty when it is sound."""
    if step < 0:
        return [f"the step is {step}"]
    try:
        StoredTrainingState.model_validate(state)
    except ValidationError as exc:
        return list(dict.fromkeys(_validation_problem(e, state) for e in exc.errors()))
    problems = list(_reference_problems(state, tensors, "state"))
    for rank in range(state["rng"]["world"]):
        if f"rng/{rank}/cpu" not in tensors:
            problems.append(f"the random state of process {rank} (`rng/{rank}/cpu`) is missing")
    return problems


def _validation_problem(error: dict[str, Any], state: Any) -> str:
    """One pydantic error in the state's own terms: the path into the JSON (without the type
    tags pydantic adds for each member of a union) and what was found there."""
    where, value = ["state"], state
    for part in error["loc"]:
        inside = isinstance(value, dict) and part in value
        inside = inside or (isinstance(value, list) and isinstance(part, int) and part < len(value))
        if not inside:
            break
        where.append(str(part))
        value = value[part]
    shown = ".".join(where)
    if error["type"] == "missing":
        return f"`{shown}.{error['loc'][-1]}` is missing"
    if error["type"] == "extra_forbidden":
        return f"`{shown}` is not a field of a training state"
    return f"`{shown}` has the wrong type ({_json_type(value)})"


def _json_type(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "a number", float: "a number", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def _reference_problems(value: Any, tensors: dict[str, Tensor], where: str) -> Iterator[str]:
    """Every `$tensor` reference names a stored tensor; `$items` and `$tuple` hold lists."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _reference_problems(item, tensors, f"{where}.{i}")
        return
    if not isinstance(value, dict):
        return
    if "$tensor" in value:
        key = value["$tensor"]
        if not isinstance(key, str) or len(value) != 1:
            yield f"`{where}` is not a tensor reference"
        elif key not in tensors:
            yield f"the tensor `{key}` (at `{where}`) is missing"
        return
    for tag, what in (("$items", "mapping"), ("$tuple", "tuple")):
        if tag not in value:
            continue
        items = value[tag]
        sound = len(value) == 1 and isinstance(items, list)
        if not sound or (tag == "$items" and not all(map(_is_item, items))):
            yield f"`{where}` is not a stored {what}"
            return
        for i, item in enumerate(items):
            inner = item[1] if tag == "$items" else item
            yield from _reference_problems(inner, tensors, f"{where}.{i}")
        return
    for key, item in value.items():
        yield from _reference_problems(item, tensors, f"{where}.{key}")


def _is_item(pair: Any) -> bool:
    """A `$items` entry: a key (of a mapping whose keys are not all names) and its value."""
    return isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str | int | float)


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
