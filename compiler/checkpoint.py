"""Weights on disk: safetensors with the spec that made them embedded in the header.

safetensors holds tensors and a string-to-string header only, so loading a checkpoint can never run
code (a pickle can). The header carries the spec's text and SHA-256, so a checkpoint is
self-describing: `load_checkpoint(dir)` recompiles the embedded spec and loads the weights into it,
and a checkpoint whose tensors do not fit that spec is refused with the names that differ, never
loaded half-way. Files are written to a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import safetensors
import safetensors.torch

from runtime.model import GraphModel

from .diagnostics import Diagnostic, Span, SpecError

WEIGHTS = "model.safetensors"
SPEC = "spec.yaml"
FORMAT = "epicycle-checkpoint-1"


def save_checkpoint(model: GraphModel, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "spec": model.spec_text, "spec_sha256": model.spec_digest}
    target = directory / WEIGHTS
    with tempfile.NamedTemporaryFile(
        dir=directory, prefix=".tmp-", suffix=".safetensors", delete=False
    ) as tmp:
        tmp_path = Path(tmp.name)
    try:
        safetensors.torch.save_model(model, str(tmp_path), metadata=metadata)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)
    spec_tmp = directory / f".tmp-{SPEC}"
    spec_tmp.write_text(model.spec_text, encoding="utf-8")
    os.replace(spec_tmp, directory / SPEC)
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
    from .frontend import load_spec_text
    from .pipeline import build_model

    weights = _weights_path(path)
    text, _ = read_checkpoint_spec(weights)
    loaded = load_spec_text(text, f"{weights}#spec")
    model = build_model(loaded, device=device)
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
    return model


def _weights_path(path: str | Path) -> Path:
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def _error(file: str, message: str, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Span(file, 1, 1), message, hint)
